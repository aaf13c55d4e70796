"""CorDA test helpers shared by the single-node and the multi-node tests."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from jobspecs import parse_spec
from orchestrator.stages.context import Context
from orchestrator.stages.corda import run_calibrate, run_decompose
from orchestrator.storage.artifacts import job_key
from tests.helpers import tiny_spec
from workers.storage.store import LocalStore
from workers.storage.weights import read_tensors, weight_map

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 4, 8


def corda_job(assets: Path, tmp: Path, model: dict | None = None, **corda) -> dict:
    """The CorDA spec as a dict (calibrate + decompose), for a test to extend or write out for the CLI."""
    spec = tiny_spec(assets, f"file://{tmp / 'store'}", adapter={"r": R, "alpha": ALPHA, "target_modules": TARGETS},
                     init={"method": "corda", "corda": {"samples": 32, "fidelity_samples": 4, **corda}},
                     stages=["calibrate", "decompose"])
    spec["model"].update(model or {})
    spec["data"]["calibration"] = str(assets / "calibration.jsonl")
    return spec


def corda_spec(assets: Path, tmp: Path, model: dict | None = None, **corda) -> object:
    return parse_spec(corda_job(assets, tmp, model, **corda))


def run_stages(spec, tmp: Path, holder: dict | None = None) -> Context:
    """calibrate + decompose; `holder["ctx"]` exposes the context to a fault-injecting thread while they run."""
    ctx = Context(job_id="t", spec=spec, store=LocalStore(tmp / "store"), staging=tmp / "staging")
    if holder is not None:
        holder["ctx"] = ctx
    run_calibrate(ctx)
    run_decompose(ctx)
    return ctx


def published(ctx: Context) -> Path:
    """Where the stages wrote the job's artifacts in its (local) store: artifacts/<kind>/..."""
    return ctx.store.root / job_key(ctx.job_id, "artifacts")


def ours(ctx: Context) -> dict[str, torch.Tensor]:
    return corda_tensors(published(ctx))


def corda_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """CorDA's A, B and residual weight per layer, from a folder holding `residual_base/` and `corda_init/` (a
    job's artifacts in its store, or fetched)."""
    residual_dir = folder / "residual_base"
    residual = read_tensors(residual_dir, weight_map(residual_dir))
    adapter = load_file(str(folder / "corda_init" / "adapter_model.safetensors"))
    out = {}
    for key, value in adapter.items():  # base_model.model.<layer>.lora_A.weight
        layer, kind = key.removeprefix("base_model.model.").rsplit(".", 2)[0], key.split(".")[-2]
        out[f"{layer}.{kind}.default.weight"] = value
        out[f"{layer}.base_layer.weight"] = residual[f"{layer}.weight"]
    return out
