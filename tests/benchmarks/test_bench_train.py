"""Training: peftfleet's train stage (Ray Train workers, DeepSpeed ZeRO-2) vs a plain single-process peft + torch
loop, and the orchestration overhead from `peftfleet submit` to the first optimizer step.

    make bench      (or: pytest -s -m benchmark tests/benchmarks/test_bench_train.py)

One run, one machine, same model, data, LoRA config and micro-batch. Each Ray worker has one CPU (one torch
thread); the plain loop runs in a fresh process with one thread (one core, like a worker) and with two (the
whole machine, like two workers). Throughput is steady-state: the first steps are left out.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from jobspecs import parse_spec
from orchestrator.context import Context
from orchestrator.driver import run_train
from orchestrator.store import LocalStore
from tests.benchmarks.small_llama import build_model, token_samples
from tests.helpers import cli, write_spec

HIDDEN, LAYERS, INTERMEDIATE, VOCAB = 512, 4, 1376, 2048
SAMPLES, SEQ, MICRO, STEPS, WARM = 96, 128, 4, 12, 2
R, TARGETS = 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def plain_loop(model_path: str, data_path: str, threads: int) -> dict:
    """The peer: stock peft + torch AdamW, one process, token-mean loss; steady-state tokens/s and peak RSS."""
    import resource

    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    samples = [json.loads(line)["input_ids"] for line in Path(data_path).read_text().splitlines()]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path),
                           LoraConfig(r=R, lora_alpha=2 * R, target_modules=TARGETS))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    tokens, seconds = 0, 0.0
    for step in range(STEPS):
        t0 = time.perf_counter()
        batch = samples[step * MICRO : (step + 1) * MICRO]
        width = max(map(len, batch))
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(batch):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step >= WARM:
            tokens, seconds = tokens + int(mask.sum()), seconds + time.perf_counter() - t0
    return {"tokens_per_s": tokens / seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def plain_run(model_path: Path, data_path: Path, threads: int) -> dict:
    code = ("import json, sys; from tests.benchmarks.test_bench_train import plain_loop; "
            f"print(json.dumps(plain_loop({str(model_path)!r}, {str(data_path)!r}, {threads})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[2])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spec_dict(model_path: Path, data_path: Path, store: Path, workers: int, steps: int) -> dict:
    return {
        "name": "bench-train",
        "model": {"path": str(model_path)},
        "data": {"format": "tokens", "train": str(data_path), "max_seq_len": SEQ},
        "adapter": {"r": R, "alpha": 2 * R, "target_modules": TARGETS},
        "train": {"num_workers": workers, "micro_batch_size": MICRO, "max_steps": steps, "zero_stage": 2,
                  "learning_rate": 1e-3},
        "storage": {"uri": f"file://{store}"},
        "cluster": {"num_cpus": 2},
    }


def ours_run(tmp: Path, model_path: Path, data_path: Path, workers: int) -> dict:
    spec = parse_spec(spec_dict(model_path, data_path, tmp / "store", workers, STEPS))
    ctx = Context(job_id=f"bench-{workers}w", spec=spec, store=LocalStore(tmp / "store"),
                  staging=tmp / f"staging{workers}")
    run_train(ctx)
    result = ctx.results["train"]
    steady = result.metrics[WARM:]
    return {"tokens_per_s": sum(m["tokens"] for m in steady) / sum(m["step_s"] for m in steady),
            "peak_rss_mib": max(result.peak_rss_mib)}


def submit_to_first_step(tmp: Path, model_path: Path, data_path: Path) -> tuple[float, float]:
    """Seconds from running `peftfleet submit` until the train stage starts, and until step 1 is logged."""
    tmp.mkdir(parents=True, exist_ok=True)
    spec = write_spec(tmp / "job.yaml", spec_dict(model_path, data_path, tmp / "store", 1, 3))
    state = tmp / "state"
    t0 = time.perf_counter()
    job_id = cli(state, "submit", spec, check=True).stdout.strip()
    log = state / "jobs" / job_id / "driver.log"
    stage_at = None
    while time.perf_counter() - t0 < 300:
        text = log.read_text() if log.exists() else ""
        if stage_at is None and "stage train: started" in text:
            stage_at = time.perf_counter() - t0
        if re.search(r"train: step 1/", text):
            first = time.perf_counter() - t0
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"no first step within 300 s:\n{text}")
    while json.loads(cli(state, "status", job_id, "--json", check=True).stdout)["state"] in ("PENDING", "RUNNING"):
        time.sleep(0.5)
    return stage_at, first


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
        ("peak memory, plain loop process (MiB)", f"{plain1['peak_rss_mib']:,.0f}", "1.00×"),
        ("peak memory per worker, peftfleet 1 worker (MiB)", f"{one['peak_rss_mib']:,.0f}",
         f"{one['peak_rss_mib'] / plain1['peak_rss_mib']:.2f}×"),
        ("peak memory per worker, peftfleet 2 workers (MiB)", f"{two['peak_rss_mib']:,.0f}",
         f"{two['peak_rss_mib'] / plain1['peak_rss_mib']:.2f}×"),
    ]
    print(f"\nTraining benchmark: Llama hidden {HIDDEN}, {LAYERS} layers, intermediate {INTERMEDIATE}, LoRA r={R} on "
          f"7 modules per layer, micro-batch {MICRO} × ≤{SEQ} tokens per worker, steps {WARM + 1}-{STEPS} timed")
    print("| measure | value | ratio |\n|---|---|---|")
    for row in rows:
        print(f"| {' | '.join(row)} |")
    assert one["tokens_per_s"] > 0 and two["tokens_per_s"] > 0
