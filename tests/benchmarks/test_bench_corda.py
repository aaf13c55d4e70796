"""CorDA calibration and decomposition: peftfleet (Ray actors, input groups, batches) vs peft's single process.

    make bench      (or: pytest -s -m benchmark tests/benchmarks/test_bench_corda.py)

One run, one machine, same model and samples. peft runs with one torch thread, like each of our actors (Ray
gives an actor with num_cpus=1 one OpenMP thread), so "1 worker" compares one core with one core.
"""

from __future__ import annotations

import json
import time

import pytest
import ray
import torch
from peft.tuners.lora.corda import collect_eigens, target_modules

from jobspecs import parse_spec
from orchestrator.stages.context import Context
from orchestrator.stages.corda import run_calibrate, run_decompose
from tests.benchmarks.peft_corda import TARGETS, peft_calibrated
from tests.benchmarks.small_llama import build_model, token_samples
from workers.storage.store import LocalStore

HIDDEN, LAYERS, INTERMEDIATE, VOCAB = 512, 4, 1376, 2048
SAMPLES, SEQ, BATCH = 64, 128, 8
R = 16


def peft_run(model_path, samples):
    torch.set_num_threads(1)
    model, config, calibrate_s = peft_calibrated(model_path, samples, R)
    cov_bytes = sum(m.covariance_matrix.numel() * m.covariance_matrix.element_size()
                    for _, m in target_modules(model, config))
    t0 = time.perf_counter()
    collect_eigens(model, config, verbose=False)
    decompose_s = time.perf_counter() - t0
    torch.set_num_threads(2)
    return calibrate_s, decompose_s, cov_bytes


def ours_run(tmp, model_path, data_path, workers):
    spec = parse_spec({
        "model": {"path": str(model_path)},
        "data": {"format": "tokens", "train": str(data_path), "calibration": str(data_path), "max_seq_len": SEQ},
        "adapter": {"r": R, "alpha": 2 * R, "target_modules": TARGETS},
        "init": {"method": "corda", "corda": {"samples": SAMPLES, "seq_len": SEQ, "batch_size": BATCH,
                                              "num_workers": workers, "shard_samples": SAMPLES // 8,
                                              "fidelity_samples": 2, "fidelity_tolerance": 1.0}},
        "stages": ["calibrate", "decompose"],
    })
    ctx = Context(job_id="bench", spec=spec, store=LocalStore(tmp / "store"), staging=tmp / f"staging{workers}")
    t0 = time.perf_counter()
    run_calibrate(ctx)
    stage_s = time.perf_counter() - t0
    state = ctx.calibration
    cov_bytes = sum(g.dim * g.dim * 4 for g in state.groups)
    accumulate_s = sum(s.accumulate_s for s in state.shards)
    flops = sum(s.flops for s in state.shards)
    run_decompose(ctx)
    report = json.loads((ctx.staging / "report" / "corda.json").read_text())
    return state.calibrate_s, stage_s, report["decompose_s"], cov_bytes, flops / accumulate_s


def matmul_flops() -> float:
    """This machine's single-thread fp32 torch.matmul rate on a square problem of the same size class."""
    torch.set_num_threads(1)
    a, b = torch.randn(1024, HIDDEN), torch.randn(1024, HIDDEN)
    a.T @ b
    t0, n = time.perf_counter(), 20
    for _ in range(n):
        a.T @ b
    rate = n * 2 * 1024 * HIDDEN * HIDDEN / (time.perf_counter() - t0)
    torch.set_num_threads(2)
    return rate


@pytest.mark.benchmark
def test_bench_corda(tmp_path):
    model_path, data_path = tmp_path / "model", tmp_path / "calibration.jsonl"
    build_model(model_path, HIDDEN, LAYERS, INTERMEDIATE, VOCAB, SEQ)
    samples = token_samples(data_path, SAMPLES, SEQ, VOCAB)
    tokens = sum(len(s) for s in samples)
    peft_cal, peft_dec, peft_bytes = peft_run(model_path, samples)
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024**2,
             configure_logging=False)
    try:
        one = ours_run(tmp_path, model_path, data_path, 1)
        two = ours_run(tmp_path, model_path, data_path, 2)
    finally:
        ray.shutdown()
    peak = matmul_flops()
    rows = [
        ("calibration tokens/s, peft preprocess_corda (1 thread, batch 1)", f"{tokens / peft_cal:,.0f}", "1.00×"),
        ("calibration tokens/s, peftfleet 1 worker", f"{tokens / one[0]:,.0f}", f"{peft_cal / one[0]:.2f}×"),
        ("calibration tokens/s, peftfleet 2 workers", f"{tokens / two[0]:,.0f}", f"{peft_cal / two[0]:.2f}×"),
        ("calibrate stage wall incl. actor start-up, 2 workers (s)", f"{two[1]:.1f}", f"{peft_cal / two[1]:.2f}×"),
        ("covariance memory per replica, peft (MiB)", f"{peft_bytes / 2**20:.1f}", "1.00×"),
        ("covariance memory per replica, peftfleet (MiB)", f"{one[3] / 2**20:.1f}", f"{one[3] / peft_bytes:.2f}×"),
        ("decomposition wall, peft sequential (s)", f"{peft_dec:.2f}", "1.00×"),
        ("decomposition wall, peftfleet 2 CPUs (s)", f"{two[2]:.2f}", f"{peft_dec / two[2]:.2f}×"),
        ("accumulation GFLOP/s in the hooks vs torch.matmul (1 thread)",
         f"{one[4] / 1e9:.1f} / {peak / 1e9:.1f}", f"{one[4] / peak:.2f}"),
    ]
    print(f"\nCorDA benchmark: Llama hidden {HIDDEN}, {LAYERS} layers, intermediate {INTERMEDIATE}, "
          f"{SAMPLES} samples × ≤{SEQ} tokens ({tokens} tokens), r={R}, 7 target modules per layer, batch {BATCH}")
    print("| measure | value | ratio vs peft |\n|---|---|---|")
    for row in rows:
        print(f"| {' | '.join(row)} |")
    assert one[3] < peft_bytes
