"""Running the train stage alone, in the test process's Ray, on the tiny example's spec."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import torch
from safetensors.torch import load

from jobspecs import parse_spec
from orchestrator.context import Context
from orchestrator.driver import run_train
from orchestrator.store import LocalStore
from tests.helpers import tiny_spec


def train(assets, tmp, adapter: dict | None = None, data_override: dict | None = None, **train):
    settings = {"max_steps": 6, "micro_batch_size": 8, "eval_every": 3, "learning_rate": 0.01, **train}
    spec = parse_spec(tiny_spec(assets, f"file://{tmp / 'store'}", train=settings, adapter=adapter or {},
                                data=data_override or {}))
    ctx = Context(job_id=f"t-{uuid.uuid4().hex[:6]}", spec=spec, store=LocalStore(tmp / "store"),
                  staging=tmp / "staging")
    run_train(ctx)
    return ctx.results["train"]


def adapter_tensors(result) -> dict[str, torch.Tensor]:
    return load(result.adapter_files["adapter_model.safetensors"])


def registered(snapshot: Path) -> bool:
    """Whether Ray Train's controller has registered a checkpoint (it writes this snapshot after registering one:
    from then on a restarted worker group, or a new run of the job, is handed that checkpoint)."""
    try:
        return json.loads(snapshot.read_text()).get("latest_checkpoint_result") is not None
    except (OSError, ValueError):  # being written
        return False
