"""Training: peftfleet's train stage (Ray Train workers, DeepSpeed ZeRO-2) vs a plain single-process peft + torch
loop, and the orchestration overhead from `peftfleet submit` to the first optimizer step.

    make bench      (or: pytest -s -m benchmark tests/benchmarks/test_bench_train.py)

One run, one machine, same model, data, LoRA config and micro-batch. Each Ray worker has one CPU (one torch
thread); the plain loop runs in a fresh process with one thread (one core, like a worker) and with two (the
whole machine, like two workers). Throughput is steady-state: the first steps are left out.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from jobspecs import parse_spec
from orchestrator.stages.context import Context
from orchestrator.stages.train import run_train
from tests.benchmarks.small_llama import build_model, token_samples
from tests.benchmarks.train_job import (
    HIDDEN,
    INTERMEDIATE,
    LAYERS,
    MICRO,
    SAMPLES,
    SEQ,
    STEPS,
    VOCAB,
    WARM,
    R,
    spec_dict,
    submit_to_first_step,
)
from workers.storage.store import LocalStore


def plain_run(model_path: Path, data_path: Path, threads: int) -> dict:
    code = ("import json, sys; from tests.benchmarks.train_job import plain_loop; "
            f"print(json.dumps(plain_loop({str(model_path)!r}, {str(data_path)!r}, {threads})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[2])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ours_run(tmp: Path, model_path: Path, data_path: Path, workers: int) -> dict:
    spec = parse_spec(spec_dict(model_path, data_path, tmp / "store", workers, STEPS))
    ctx = Context(job_id=f"bench-{workers}w", spec=spec, store=LocalStore(tmp / "store"),
                  staging=tmp / f"staging{workers}")
    run_train(ctx)
    result = ctx.train
    steady = result.metrics[WARM:]
    return {"tokens_per_s": sum(m["tokens"] for m in steady) / sum(m["step_s"] for m in steady),
            "peak_memory_mib": max(result.peak_memory_mib)}


@pytest.mark.benchmark
def test_bench_train(tmp_path):
    model_path, data_path = tmp_path / "model", tmp_path / "train.jsonl"
    build_model(model_path, HIDDEN, LAYERS, INTERMEDIATE, VOCAB, SEQ)
    token_samples(data_path, SAMPLES, SEQ, VOCAB)
    plain1 = plain_run(model_path, data_path, 1)
    plain2 = plain_run(model_path, data_path, 2)
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024**2,
             configure_logging=False)
    try:
        one = ours_run(tmp_path / "one", model_path, data_path, 1)
        two = ours_run(tmp_path / "two", model_path, data_path, 2)
    finally:
        ray.shutdown()
    to_stage, to_step = submit_to_first_step(tmp_path / "overhead", model_path, data_path)
    base = plain1["tokens_per_s"]
    rows = [
        ("training tokens/s, plain peft + torch loop (1 thread)", f"{base:,.0f}", "1.00×"),
        ("training tokens/s, plain peft + torch loop (2 threads)", f"{plain2['tokens_per_s']:,.0f}",
         f"{plain2['tokens_per_s'] / base:.2f}×"),
        ("training tokens/s, peftfleet 1 worker, ZeRO-2", f"{one['tokens_per_s']:,.0f}",
         f"{one['tokens_per_s'] / base:.2f}×"),
        ("training tokens/s, peftfleet 2 workers, ZeRO-2", f"{two['tokens_per_s']:,.0f}",
         f"{two['tokens_per_s'] / base:.2f}×"),
        ("2 workers vs 1 worker", f"{two['tokens_per_s'] / one['tokens_per_s']:.2f}×", "target ≥ 1.6×"),
        ("submit → train stage started (s)", f"{to_stage:.1f}", ""),
        ("submit → first optimizer step logged (s)", f"{to_step:.1f}", "target < 20 s"),
        ("peak memory, plain loop process (MiB)", f"{plain1['peak_memory_mib']:,.0f}", "1.00×"),
        ("peak memory per worker, peftfleet 1 worker (MiB)", f"{one['peak_memory_mib']:,.0f}",
         f"{one['peak_memory_mib'] / plain1['peak_memory_mib']:.2f}×"),
        ("peak memory per worker, peftfleet 2 workers (MiB)", f"{two['peak_memory_mib']:,.0f}",
         f"{two['peak_memory_mib'] / plain1['peak_memory_mib']:.2f}×"),
    ]
    print(f"\nTraining benchmark: Llama hidden {HIDDEN}, {LAYERS} layers, intermediate {INTERMEDIATE}, LoRA r={R} on "
          f"7 modules per layer, micro-batch {MICRO} × ≤{SEQ} tokens per worker, steps {WARM + 1}-{STEPS} timed")
    print("| measure | value | ratio |\n|---|---|---|")
    for row in rows:
        print(f"| {' | '.join(row)} |")
    assert one["tokens_per_s"] > 0 and two["tokens_per_s"] > 0
