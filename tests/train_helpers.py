"""Running the train stage alone, in the test process's Ray, on the tiny example's spec."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from jobspecs import parse_spec
from orchestrator.stages.context import Context
from orchestrator.stages.train import run_train
from tests.helpers import tiny_spec
from workers.storage.store import LocalStore


def train(assets, tmp, adapter: dict | None = None, data_override: dict | None = None, model: dict | None = None,
          **train):
    settings = {"max_steps": 6, "micro_batch_size": 8, "eval_every": 3, "learning_rate": 0.01, **train}
    spec = parse_spec(tiny_spec(assets, f"file://{tmp / 'store'}", train=settings, adapter=adapter or {},
                                data=data_override or {}, model=model or {}))
    ctx = Context(job_id=f"t-{uuid.uuid4().hex[:6]}", spec=spec, store=LocalStore(tmp / "store"),
                  staging=tmp / "staging")
    run_train(ctx)
    return ctx.train


# Two runs that are equal in exact arithmetic (1 worker × 8 vs 2 × 4, ZeRO-2 vs ZeRO-3, a resumed run) differ in
# fp32 by summation order. The floor, measured by tests/benchmarks/test_bench_noise_floor.py (the same 1-worker run
# with each global batch's examples reordered; 2-core CPU): losses ≤ 1.2e-7 relative, adapter tensors ≤ 2.1e-6
# relative (Frobenius), single entries ≤ 7.9e-7 absolute. The adapter is compared per tensor by norm, not entry by
# entry: an entry whose gradient is below AdamW's eps (1e-8) moves by lr·g/eps, so its rounding noise is multiplied
# by lr/eps (1e6 here) — LoRA's A has such entries in the steps right after B leaves zero, and one of them decides an
# elementwise atol however equal the adapters are.
LOSS_REL_TOL = 1e-5  # ≈80× the floor
ADAPTER_REL_TOL = 1e-4  # ≈50× the floor


def adapter_tensors(result) -> dict[str, torch.Tensor]:
    """The adapter's tensors (peft's adapter_model.safetensors, or BitFit's biases)."""
    (weights,) = [data for name, data in result.adapter_files.items() if name.endswith(".safetensors")]
    return load(weights)


def adapter_gaps(a, b) -> dict[str, float]:
    """Per adapter tensor, ‖a − b‖ / ‖b‖ (0 where both are zero or empty)."""
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys() and ta
    gaps = {}
    for key, value in ta.items():
        assert value.shape == tb[key].shape, key
        diff, norm = float((value - tb[key]).norm()), float(tb[key].norm())
        gaps[key] = diff / norm if norm else diff
    return gaps


def assert_same_training(a, b) -> None:
    """Equal up to fp32 summation order: every step's loss, and every tensor of the exported adapter."""
    for x, y in zip(a.metrics, b.metrics, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=LOSS_REL_TOL), x["step"]
    worst = max(adapter_gaps(a, b).items(), key=lambda kv: kv[1])
    assert worst[1] <= ADAPTER_REL_TOL, worst


def registered(snapshot: Path) -> bool:
    """Whether Ray Train's controller has registered a checkpoint (it writes this snapshot after registering one:
    from then on a restarted worker group, or a new run of the job, is handed that checkpoint)."""
    try:
        return json.loads(snapshot.read_text()).get("latest_checkpoint_result") is not None
    except (OSError, ValueError):  # being written
        return False
