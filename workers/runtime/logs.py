"""Which output a user reads and which goes to the verbose log.

A job's log is stdout: our progress lines and warnings. Everything the libraries say (Ray's and Ray Train's
actor logs, DeepSpeed, transformers, Python warnings) goes to stderr, which the driver writes to the job's verbose
log (`peftfleet logs JOB --verbose`) — Ray forwards each worker's stdout to the driver's stdout and its stderr to the
driver's stderr, so the split holds for every process of the job. Progress bars are switched off everywhere: they
are repaint noise in a file.
"""

from __future__ import annotations

import os
import sys
import warnings


def say(message: str) -> None:
    """A progress line for the job's log. Not print(): Ray Train patches print in its workers to also log through
    its own logger, and every line would appear twice."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def quiet_libraries() -> None:
    """Progress bars off; library messages to stderr. Every process that runs job code does this first
    (workers/runtime/job_process.py)."""
    # save_pretrained imports DeepSpeed (accelerate's isinstance check) in processes that run no engine, and
    # DeepSpeed then probes for an accelerator and warns on stdout. Training workers set their own, before this.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    # peft calls this deprecated transformers API on every get_peft_model; nothing for a user to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if "deepspeed" in sys.modules:
        route_deepspeed_logs()


def route_deepspeed_logs() -> None:
    """DeepSpeed's logger writes to stdout (it would land in the user's log): send it to stderr."""
    import logging

    from deepspeed.utils import logger

    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)
