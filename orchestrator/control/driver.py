"""The Ray driver: runs one job's stages in order and keeps its record true.

    python -m orchestrator.control.driver JOB_ID STORAGE_JSON [--ray-address auto] [--verbose-log FILE]

Started by `peftfleet submit`: as a local process (Ray per the spec's `cluster` section), or as a Ray job on a
cluster (`--ray-address auto`: join the cluster it runs on, whatever the spec says).

Every stage reads what earlier stages left in `Context` and writes artifacts under `staging/<kind>/`. The
upload stage always runs last and writes the manifest last, so a FAILED or CANCELLED job never has one.
SIGTERM (`peftfleet cancel`) ends the job CANCELLED: Ray work in flight is cancelled, the record says which
stage was interrupted.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from jobspecs import JobSpec, SpecError, spec_from_frozen
from jobspecs.schema import StorageSpec
from orchestrator.control.jobs import JobRecord, JobState, cancelled_error, stage_names
from orchestrator.stages.context import Context
from orchestrator.stages.corda import run_calibrate, run_decompose
from orchestrator.stages.export import run_export
from orchestrator.stages.sweep import run_sweep_calibrate, run_sweep_decompose, run_trials
from orchestrator.stages.train import preload, run_train
from orchestrator.stages.upload import run_upload
from orchestrator.stages.waits import JobCancelled, check_cancelled, reason_of, request_cancel
from orchestrator.storage.artifacts import CANCEL_REASON, VERBOSE_LOG, job_key
from workers.runtime.process_memory import peak_memory_mib
from workers.storage.store import NotInStore, Store, StoreError, open_store

log = logging.getLogger("peftfleet.driver")
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


# What each stage reads and leaves is typed on Context (calibration, corda_init, train, export); the order is the
# spec's (JobSpec.effective_stages), upload last.
def _or_sweep(plain: Callable[[Context], None], sweep: Callable[[Context], None]) -> Callable[[Context], None]:
    return lambda ctx: (sweep if ctx.spec.sweep else plain)(ctx)


STAGES: dict[str, Callable[[Context], None]] = {
    "calibrate": _or_sweep(run_calibrate, run_sweep_calibrate),
    "decompose": _or_sweep(run_decompose, run_sweep_decompose),
    "train": _or_sweep(run_train, run_trials),
    "export": run_export,
    "upload": run_upload,
}


def _init_ray(spec: JobSpec, ray_address: str | None) -> None:
    import ray

    if ray_address is not None:
        ray.init(address=ray_address, configure_logging=False)
    elif spec.cluster.address is None:
        # "local" always starts a private embedded Ray, never joins one that happens to run on this machine.
        ray.init(address="local", num_cpus=spec.cluster.num_cpus, include_dashboard=False,
                 object_store_memory=spec.cluster.object_store_memory_mb * 1024 * 1024, configure_logging=False)
    else:
        ray.init(address=spec.cluster.address, configure_logging=False)


def run_job(job_id: str, store: Store, ray_address: str | None = None) -> JobRecord:
    """Run every stage of the job recorded in `store`; returns the final record (never raises for stage errors)."""
    import ray

    record = JobRecord.load(store, job_id)
    if record.state.terminal:  # e.g. cancelled while Ray still had it queued
        log.warning("job %s is already %s; nothing to run", job_id, record.state.value)
        return record
    record.state, record.started_at = JobState.RUNNING, record.started_at or record.created_at
    record.driver = {"host": socket.gethostname(), "pid": os.getpid()}
    try:
        # The files are checked where they are read: a job submitted to a cluster names paths on the cluster.
        spec = spec_from_frozen(store.get_bytes(job_key(job_id, "spec.yaml")).decode(), check_files=True)
    except SpecError as err:
        record.finish(JobState.FAILED, f"the spec's files do not all check out here on {socket.gethostname()} "
                                       f"(missing, or leading outside its data_root): {err}")
        record.save(store)
        log.error("%s", record.error)
        return record
    record.save(store)

    staging = Path(tempfile.mkdtemp(prefix=f"peftfleet-{job_id}-"))
    ctx = Context(job_id=job_id, spec=spec, store=store, staging=staging)
    try:
        # Importing torch, Ray Train and the model libraries takes seconds of CPU; Ray's start-up is mostly waiting
        # for its daemons. Overlap them: this is the bulk of a job's time to its first training step.
        warming = threading.Thread(target=preload, daemon=True)
        warming.start()
        _init_ray(spec, ray_address)
        warming.join()
        # After ray.init, which installs a handler of its own. Only a flag: raising inside Ray's C++ calls breaks them.
        signal.signal(signal.SIGTERM, lambda signum, frame: request_cancel())
        for name in stage_names(spec):
            check_cancelled()
            record.start_stage(name)
            record.save(store)
            log.info("stage %s: started", name)
            STAGES[name](ctx)
            record.warnings = list(dict.fromkeys(ctx.warnings))  # a sweep's decompositions may say one twice
            record.end_stage(name, peaks={**ctx.peaks.get(name, {}), "driver": round(peak_memory_mib(), 1)},
                             reserved=ctx.reserved.get(name))
            record.save(store)
            log.info("stage %s: done", name)
        record.finish(JobState.SUCCEEDED)
    except JobCancelled:
        log.warning("job cancelled during stage %s", record.stage)
        record.finish(JobState.CANCELLED, cancelled_error(record.stage, _cancel_reason(store, job_id)))
    except Exception as err:
        # The user reads one line; the traceback (host paths, package versions) goes to the verbose log only,
        # under a reference the line names, so whoever runs the cluster finds it.
        ref = secrets.token_hex(4)
        logging.getLogger("verbose").error("error %s: stage %s failed:\n%s", ref, record.stage,
                                           traceback.format_exc())
        record.finish(JobState.FAILED, f"{reason_of(err)} [error {ref}: its traceback is in the job's verbose log]")
        log.error("stage %s failed: %s", record.stage, record.error)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        shutil.rmtree(staging, ignore_errors=True)
        ray.shutdown()
    record.save(store)
    log.info("job %s: %s%s", job_id, record.state.value, f" ({record.error})" if record.error else "")
    return record


def _cancel_reason(store: Store, job_id: str) -> str | None:
    try:
        return store.get_bytes(job_key(job_id, CANCEL_REASON)).decode()
    except (NotInStore, StoreError):  # cancelled by its owner, or the store is away: the plain record
        return None


class _Tee(io.TextIOBase):
    """stdout that also lands in the verbose log, so that log has every line in order."""

    def __init__(self, *streams: TextIO):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def fileno(self) -> int:
        return self.streams[0].fileno()


def route_output(verbose_log: Path) -> None:
    """The job's log is stdout (our lines and every worker's stdout, which Ray forwards there); stderr — library
    logs, warnings, Ray's C++ logs, every worker's stderr — goes to `verbose_log`, and so does a copy of stdout."""
    verbose = open(verbose_log, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (open for the process's life)
    os.dup2(verbose.fileno(), 2)
    sys.stderr = verbose
    sys.stdout = _Tee(sys.stdout, verbose)
    ours = logging.StreamHandler(sys.stdout)
    ours.setFormatter(logging.Formatter(LOG_FORMAT))
    ours_logger = logging.getLogger("peftfleet")
    ours_logger.handlers, ours_logger.propagate = [ours], False
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr, force=True)  # the libraries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.control.driver")
    parser.add_argument("job_id")
    parser.add_argument("storage_json")
    parser.add_argument("--ray-address", help="join this Ray cluster (a Ray job passes 'auto') instead of the spec's")
    parser.add_argument("--verbose-log", type=Path, help="where library output goes (default: a temporary file); "
                        "uploaded to the job's store prefix as verbose.log when the driver ends")
    args = parser.parse_args(argv)
    verbose_log = args.verbose_log
    if verbose_log is None:
        fd, name = tempfile.mkstemp(prefix=f"peftfleet-{args.job_id}-", suffix=".log")
        os.close(fd)
        verbose_log = Path(name)
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # the log is a file: no ANSI colour codes in it
    route_output(verbose_log)
    store = open_store(StorageSpec.model_validate(json.loads(args.storage_json)))
    try:
        record = run_job(args.job_id, store, args.ray_address)
    finally:
        sys.stdout.flush()
        try:
            store.put_file(job_key(args.job_id, VERBOSE_LOG), verbose_log)
        except (StoreError, OSError) as err:
            log.warning("the verbose log stays at %s: not uploaded (%s)", verbose_log, err)
        else:
            if args.verbose_log is None:
                verbose_log.unlink()
    return 0 if record.state == JobState.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
