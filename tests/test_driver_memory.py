"""The driver holds no model: a layer-wise CorDA → ZeRO-3 train → export job through the CLI, on a model and on
one 4× its size. The record's per-stage peaks (each process reports its own) show where the bytes went."""

from __future__ import annotations

import json

import pytest

from jobspecs.load import load_spec
from jobspecs.memory import PLAN_TOLERANCE, plan
from tests.benchmarks.small_llama import build_model, token_samples
from tests.helpers import cli, write_spec

pytestmark = pytest.mark.slow

VOCAB, SEQ = 2048, 32


def job(tmp_path, state_dir, hidden: int) -> tuple[dict, int]:
    """Run the job on a Llama of `hidden` (8 blocks); its record's stages, and the model's bytes."""
    folder = tmp_path / f"h{hidden}"
    build_model(folder / "model", hidden, 8, int(hidden * 2.6875), VOCAB, SEQ)
    data = folder / "tokens.jsonl"
    token_samples(data, 24, SEQ, VOCAB)
    spec = {
        "name": f"mem-{hidden}",
        "model": {"path": str(folder / "model")},
        "data": {"format": "tokens", "train": str(data), "eval": str(data), "calibration": str(data),
                 "max_seq_len": SEQ},
        "adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "down_proj"]},
        "init": {"method": "corda", "corda": {"samples": 16, "seq_len": SEQ, "batch_size": 4, "num_workers": 2,
                                              "shard_samples": 4, "strategy": "layerwise", "fidelity_samples": 2,
                                              "fidelity_tolerance": 1.0}},
        "train": {"num_workers": 2, "zero_stage": 3, "max_steps": 2, "micro_batch_size": 2, "eval_every": 2},
        "export": {"formats": ["adapter", "merged"], "merge_alphas": [1.0], "wise_ft_alphas": [0.0, 1.0]},
        "storage": {"uri": f"file://{folder / 'store'}"},
        "cluster": {"num_cpus": 2, "node_cache_dir": str(folder / "cache")},
    }
    job_id = cli(state_dir, "submit", write_spec(folder / "job.yaml", spec), "--wait", timeout=900,
                 check=True).stdout.strip()
    record = json.loads(cli(state_dir, "status", job_id, "--json", check=True).stdout)
    weights = sum(f.stat().st_size for f in (folder / "model").glob("*.safetensors"))
    peaks = {s["name"]: s["peak_memory_mib"] for s in record["stages"]}
    reserved = {s["name"]: s["reserved_memory_mib"] for s in record["stages"]}
    # `plan` predicted every process's peak (from config.json alone) within its tolerance, and each process
    # reserved that much (+ the tolerance) from Ray and stayed inside it
    predicted = plan(load_spec(folder / "job.yaml"))["processes"]
    assert {(p["stage"], p["process"]) for p in predicted} == {(s, k) for s, kinds in peaks.items() for k in kinds
                                                               if k != "driver"}
    for p in predicted:
        measured, planned = peaks[p["stage"]][p["process"]], p["total_bytes"] / 2**20
        assert abs(planned / measured - 1) <= PLAN_TOLERANCE, (p, measured)
        assert reserved[p["stage"]][p["process"]] == pytest.approx(planned * (1 + PLAN_TOLERANCE), abs=0.1)
        assert measured <= reserved[p["stage"]][p["process"]], (p, measured)
    assert not [w for w in record["warnings"] if "reserved" in w], record["warnings"]
    return peaks, weights


def test_driver_peak_memory_stays_flat_when_the_model_grows_4x(tmp_path, state_dir):
    small, small_bytes = job(tmp_path, state_dir, 512)
    big, big_bytes = job(tmp_path, state_dir, 1024)
    grown = (big_bytes - small_bytes) / 2**20
    assert grown > 250  # the larger model really is larger (≈ 4×: 106 → 402 MiB)
    assert set(big) == {"calibrate", "decompose", "train", "export", "upload"}
    assert big["calibrate"].keys() == {"covariance actor (layerwise)", "driver"}
    assert big["decompose"].keys() == {"reducer", "init-fidelity check", "driver"}
    assert big["train"].keys() == {"training worker (ZeRO-3)", "driver"}
    assert big["export"].keys() == {"export task", "driver"}
    driver = big["upload"]["driver"] - small["upload"]["driver"]  # the driver's peak over the whole job
    assert driver < 0.1 * grown, (small, big)
    # the processes that walk the model grow by a block, not by the model: calibration, the init-fidelity check,
    # the export (its Wise-FT sweep walks, merged@1 streams module by module)
    def growth(stage: str, process: str) -> float:
        return big[stage][process] - small[stage][process]

    assert growth("calibrate", "covariance actor (layerwise)") < 0.6 * grown, (small, big)
    assert growth("decompose", "init-fidelity check") < 0.6 * grown, (small, big)
    assert growth("export", "export task") < 0.6 * grown, (small, big)
