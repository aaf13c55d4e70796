"""Sweep benchmark (one run, ratios against the peer measured here: the same work as separate jobs).

1. A CorDA rank sweep (r 4, 8, 16, 32, one trial at a time) vs the same four CorDA jobs run back to back:
   the sweep calibrates once, starts one driver and one Ray, and exports once (target ≤ 0.5×).
2. Trials per hour of four LoRA trials, two at a time vs one at a time (the ceiling: two cores).
3. Submit → first optimizer step of a sweep's first trial vs a single job's (target ≤ 1.2×).
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.benchmarks.small_llama import build_model, token_samples
from tests.helpers import cli, write_spec

pytestmark = pytest.mark.benchmark

HIDDEN, LAYERS, INTERMEDIATE, VOCAB, SEQ = 256, 4, 688, 2048, 64
RANKS = [4, 8, 16, 32]
FIRST_STEP = re.compile(r"(train|trial \S+): step 1/")


def spec(tmp: Path, name: str, model: Path, data: Path, **sections) -> dict:
    raw = {
        "name": name,
        "model": {"path": str(model)},
        "data": {"format": "tokens", "train": str(data), "eval": str(data.with_name("eval.jsonl")),
                 "calibration": str(data), "max_seq_len": SEQ},
        "adapter": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "train": {"max_steps": 6, "micro_batch_size": 4, "eval_every": 6, "learning_rate": 3e-3},
        "export": {"formats": ["adapter"], "wise_ft_alphas": []},
        "storage": {"uri": f"file://{tmp / 'store'}"},
        "cluster": {"num_cpus": 2},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


def corda(r: int) -> dict:
    return {"init": {"method": "corda", "corda": {"samples": 64, "seq_len": SEQ, "batch_size": 8, "num_workers": 2,
                                                   "fidelity_samples": 2, "fidelity_tolerance": 1.0}},
            "adapter": {"r": r, "alpha": 2 * r}}


def run(tmp: Path, raw: dict) -> dict:
    """Submit, then follow the driver's log: wall seconds, seconds to the first optimizer step, the record."""
    state = tmp / "state"
    tmp.mkdir(parents=True, exist_ok=True)
    path = write_spec(tmp / f"{raw['name']}.yaml", raw)
    t0 = time.perf_counter()
    job_id = cli(state, "submit", path, check=True).stdout.strip()
    log, first = state / "jobs" / job_id / "driver.log", None
    while True:
        text = log.read_text() if log.exists() else ""
        if first is None and FIRST_STEP.search(text):
            first = time.perf_counter() - t0
        record = json.loads(cli(state, "status", job_id, "--json", check=True).stdout)
        if record["state"] not in ("PENDING", "RUNNING"):
            break
        time.sleep(0.5)
    wall = time.perf_counter() - t0
    assert record["state"] == "SUCCEEDED", (record["error"], text[-3000:])
    return {"wall": wall, "first": first, "record": record, "log": log.read_text()}


def stage_s(record: dict, name: str) -> float:
    stage = next(s for s in record["stages"] if s["name"] == name)
    return (datetime.fromisoformat(stage["ended_at"]) - datetime.fromisoformat(stage["started_at"])).total_seconds()


def test_sweep_benchmark(tmp_path):
    model, data = tmp_path / "model", tmp_path / "tokens.jsonl"
    build_model(model, HIDDEN, LAYERS, INTERMEDIATE, VOCAB, SEQ)
    token_samples(data, 128, SEQ, VOCAB)
    token_samples(data.with_name("eval.jsonl"), 16, SEQ, VOCAB)

    separate = [run(tmp_path / f"job-r{r}", spec(tmp_path / f"job-r{r}", f"corda-r{r}", model, data, **corda(r)))
                for r in RANKS]
    corda_sweep = run(tmp_path / "corda-sweep", spec(tmp_path / "corda-sweep", "corda-sweep", model, data, **corda(8),
                                                     sweep={"grid": {"adapter.r": RANKS},
                                                            "tie": {"adapter.alpha": "2 * adapter.r"}}))
    assert corda_sweep["log"].count("calibrate: strategy") == 1
    lora = {"grid": {"train.learning_rate": [1e-3, 2e-3, 3e-3, 5e-3]}}
    one = run(tmp_path / "lora-1", spec(tmp_path / "lora-1", "lora-one", model, data, sweep=lora))
    two = run(tmp_path / "lora-2", spec(tmp_path / "lora-2", "lora-two", model, data,
                                        sweep={**lora, "max_concurrent_trials": 2}))
    single = run(tmp_path / "single", spec(tmp_path / "single", "single", model, data))

    back_to_back = sum(s["wall"] for s in separate)
    per_hour = {k: 4 / stage_s(v["record"], "train") * 3600 for k, v in (("1", one), ("2", two))}
    rows = [
        ("4 CorDA jobs back to back, r 4/8/16/32 (s)", f"{back_to_back:.1f}", "1.00×"),
        ("one CorDA sweep over r 4/8/16/32, one trial at a time (s)", f"{corda_sweep['wall']:.1f}",
         f"{corda_sweep['wall'] / back_to_back:.2f}× (target ≤ 0.5×)"),
        ("  of which calibrate + 4 decompositions (s)",
         f"{stage_s(corda_sweep['record'], 'calibrate') + stage_s(corda_sweep['record'], 'decompose'):.1f}", ""),
        ("  a single job's calibrate + decompose (s)",
         f"{stage_s(separate[0]['record'], 'calibrate') + stage_s(separate[0]['record'], 'decompose'):.1f}", ""),
        ("LoRA trials per hour, 1 at a time", f"{per_hour['1']:.0f}", "1.00×"),
        ("LoRA trials per hour, 2 at a time", f"{per_hour['2']:.0f}", f"{per_hour['2'] / per_hour['1']:.2f}×"),
        ("submit → first optimizer step, a single job (s)", f"{single['first']:.1f}", "1.00×"),
        ("submit → first optimizer step, a sweep's first trial (s)", f"{one['first']:.1f}",
         f"{one['first'] / single['first']:.2f}× (target ≤ 1.2×)"),
        ("a trial's share of the train stage, 1 at a time (s)", f"{stage_s(one['record'], 'train') / 4:.1f}", ""),
        ("a single job's train stage (s)", f"{stage_s(single['record'], 'train'):.1f}", ""),
    ]
    print(f"\nSweep benchmark: Llama hidden {HIDDEN}, {LAYERS} layers, 6 steps per trial of micro-batch 4 × {SEQ} "
          "tokens, 1 worker per trial, CorDA 64 samples on 2 actors, embedded Ray on 2 CPUs")
    print("| measure | value | ratio |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
