"""Sweeps end to end through the CLI: real Ray Tune, Ray Train, DeepSpeed and peft on the tiny models."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import cli, tiny_spec, write_spec

pytestmark = pytest.mark.slow


def trial_outcomes(store, job_id) -> dict[str, dict]:
    folder = store / "jobs" / job_id / "trials"
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(folder.glob("*/trial.json"))}


def test_a_grid_runs_every_trial_stops_a_diverging_one_early_and_exports_the_best(tmp_path, state_dir, assets):
    """r × learning rate, one at a time under ASHA: the diverging learning rate is stopped at the first rung, and
    the best finished trial by eval loss is the job's adapter."""
    store = tmp_path / "store"
    spec = tiny_spec(assets, f"file://{store}", train={"max_steps": 6, "eval_every": 2, "learning_rate": 0.01},
                     sweep={"grid": {"adapter.r": [4, 8], "train.learning_rate": [0.01, 50.0]},
                            "tie": {"adapter.alpha": "2 * adapter.r"}, "scheduler": "asha",
                            "asha": {"grace_period": 2, "reduction_factor": 4}, "bundle_trials": 2},
                     export={"formats": ["adapter", "adapter_bundle"]})
    run = cli(state_dir, "submit", write_spec(tmp_path / "sweep.yaml", spec), "--wait", timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    job_id = run.stdout.strip().splitlines()[0]
    outcomes = trial_outcomes(store, job_id)
    assert list(outcomes) == ["t00-r4-lr0p01", "t01-r4-lr50", "t02-r8-lr0p01", "t03-r8-lr50"]
    for name in ("t01-r4-lr50", "t03-r8-lr50"):
        assert outcomes[name]["status"] == "stopped", outcomes[name]
        assert outcomes[name]["reason"].startswith("stopped by ASHA at step 2/6: eval_loss"), outcomes[name]
    finished = {n: o for n, o in outcomes.items() if o["status"] == "finished"}
    assert set(finished) == {"t00-r4-lr0p01", "t02-r8-lr0p01"}
    assert all(o["result"]["total_steps"] == 6 for o in finished.values())
    best = min(finished, key=lambda n: finished[n]["best"])
    sweep = json.loads((store / "jobs" / job_id / "artifacts" / "report" / "sweep.json").read_text())
    assert sweep["best"] == best
    assert f"sweep: best trial {best}" in run.stderr and "2 finished, 2 stopped early, 0 failed" in run.stderr
    assert re.search(r"\(RayTrainWorker pid=\d+\) trial t02-r8-lr0p01: step 6/6 loss", run.stderr)

    status = cli(state_dir, "status", job_id, check=True).stdout
    assert f"best so far: {best}" in status and "stopped by ASHA at step 2/6" in status
    trial_log = cli(state_dir, "logs", job_id, "--trial", "t01-r4-lr50", check=True).stdout
    assert "trial t01-r4-lr50 stopped (stopped by ASHA" in trial_log and "t00-r4-lr0p01" not in trial_log
    assert "has no trial 't09'" in cli(state_dir, "logs", job_id, "--trial", "t09").stderr

    cli(state_dir, "fetch", job_id, tmp_path / "out", check=True)
    out = tmp_path / "out"
    for name, outcome in outcomes.items():  # every trial keeps its best adapter, of its own rank
        config = json.loads((out / "trials" / name / "adapter" / "adapter_config.json").read_text())
        assert config["r"] == outcome["values"]["adapter.r"] and config["lora_alpha"] == 2 * config["r"]
    assert ((out / "adapter" / "adapter_model.safetensors").read_bytes()
            == (out / "trials" / best / "adapter" / "adapter_model.safetensors").read_bytes())
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["best_eval_loss"] == pytest.approx(finished[best]["best"])
    assert "sweep.html" in (out / "report" / "index.html").read_text()

    # the bundle: the two best, best first, loaded by stock peft in a fresh interpreter as named adapters
    usable = {n: o["best"] for n, o in outcomes.items() if o["best"] is not None and o["best"] < float("inf")}
    order = sorted(usable, key=usable.get)[:2]
    assert sorted(p.name for p in (out / "adapter_bundle").iterdir()) == sorted([*order, "README.md"])
    readme = (out / "adapter_bundle" / "README.md").read_text()
    assert f'adapter_bundle/{order[0]}", adapter_name="{order[0]}"' in readme
    check = {"base": str(assets / "tiny-llama"), "bundle": str(out / "adapter_bundle"),
             "members": {n: [str(assets / "tiny-llama"), str(out / "trials" / n / "adapter")] for n in order}}
    loaded = subprocess.run([sys.executable, "-m", "tests.bundle_check", json.dumps(check)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    report = json.loads(loaded.stdout.splitlines()[-1])
    assert report["gaps"] == dict.fromkeys(order, 0.0) and report["distinct"], report


def test_a_corda_sweep_calibrates_once_and_decomposes_each_rank_and_mode_once(tmp_path, state_dir, assets):
    """r × mode: one covariance collection, four decompositions, and each trial's init is exactly what a single
    CorDA job with that r and mode computes."""
    store = tmp_path / "store"
    corda = {"method": "corda", "corda": {"samples": 16, "fidelity_samples": 2, "num_workers": 2}}
    data = {"format": "instruction", "train": str(assets / "train.jsonl"), "eval": str(assets / "eval.jsonl"),
            "calibration": str(assets / "calibration.jsonl"), "max_seq_len": 64}
    spec = tiny_spec(assets, f"file://{store}", init=corda, data=data, train={"max_steps": 2, "eval_every": 2},
                     adapter={"target_modules": ["q_proj", "v_proj"]}, export={"formats": ["adapter"]},
                     sweep={"grid": {"adapter.r": [4, 8], "init.corda.mode": ["ipm", "kpm"]},
                            "tie": {"adapter.alpha": "2 * adapter.r"}, "max_concurrent_trials": 2})
    run = cli(state_dir, "submit", write_spec(tmp_path / "sweep.yaml", spec), "--wait", timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    job_id = run.stdout.strip().splitlines()[0]
    log = run.stderr
    assert log.count("stage calibrate: started") == 1 and log.count("calibrate: strategy") == 1
    assert len(re.findall(r"calibrate: \d+ samples in \d+ shards", log)) == 1  # one collection
    assert [m for m in re.findall(r"decompose (\d)/4: (\S+)", log)] == [
        ("1", "d0-r4-ipm"), ("2", "d1-r4-kpm"), ("3", "d2-r8-ipm"), ("4", "d3-r8-kpm")]
    assert all(o["status"] == "finished" for o in trial_outcomes(store, job_id).values())

    single = tiny_spec(assets, f"file://{store}", init={**corda, "corda": {**corda["corda"], "mode": "kpm"}},
                       data=data, adapter={"target_modules": ["q_proj", "v_proj"], "r": 8, "alpha": 16},
                       stages=["calibrate", "decompose"])
    alone = cli(state_dir, "submit", write_spec(tmp_path / "single.yaml", single), "--wait", timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    alone_id = alone.stdout.strip().splitlines()[0]
    for kind in ("corda_init", "residual_base"):
        mine = store / "jobs" / job_id / "artifacts" / "corda" / "d3-r8-kpm" / kind
        for a, b in _pairs(mine, store / "jobs" / alone_id / "artifacts" / kind):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kind


def _pairs(mine, theirs):
    names = sorted(p.name for p in theirs.glob("*.safetensors"))
    assert names == sorted(p.name for p in mine.glob("*.safetensors")) and names
    return [(load_file(mine / n), load_file(theirs / n)) for n in names]


def test_a_resubmitted_sweep_keeps_its_ended_trials_resumes_the_others_and_flags_the_abnormal_seed(
        tmp_path, state_dir, assets):
    """Seeds 0-2 and a fourth seed with a learning-rate spike, two at a time. The driver dies once a trial has
    ended while another has a checkpoint: resubmitted, the ended trials are kept as they were, the interrupted
    one resumes from its checkpoint, the rest run; the comparison flags the spiked seed."""
    store = tmp_path / "store"
    spec = write_spec(tmp_path / "sweep.yaml", tiny_spec(
        assets, f"file://{store}", train={"max_steps": 4, "eval_every": 2, "checkpoint_every": 2,
                                          "learning_rate": 0.01},
        sweep={"trials": [{"train.seed": 0}, {"train.seed": 1}, {"train.seed": 2},
                          {"train.seed": 3, "train.learning_rate": 1.0}], "max_concurrent_trials": 2}))
    job_id = cli(state_dir, "submit", spec, check=True).stdout.strip()
    trials = store / "jobs" / job_id / "trials"
    deadline = time.monotonic() + 400
    while True:
        ended = {p.parent.name for p in trials.glob("*/trial.json")}
        running = {p.parents[1].name for p in trials.glob("*/train/checkpoint_manager_snapshot.json")} - ended
        if ended and running:
            break
        assert time.monotonic() < deadline, "no trial ended while another had a checkpoint"
        time.sleep(0.1)
    os.kill(json.loads((state_dir / "jobs" / f"{job_id}.json").read_text())["pid"], signal.SIGKILL)
    kept = {p.parent.name: p.read_bytes() for p in trials.glob("*/trial.json")}  # what the lost driver recorded
    interrupted = sorted(running - set(kept))
    assert interrupted, "the interrupted trials all ended before the kill"

    resumed = cli(state_dir, "submit", spec, "--job-id", job_id, "--wait", timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    second = resumed.stderr.rsplit("--- attempt", 1)[-1]  # the job's log holds both attempts
    assert (f"4 trials (train.learning_rate, train.seed), {len(kept)} ended in an earlier run, {4 - len(kept)} to run"
            in second)
    resumed_at = {name: re.search(rf"trial {name}: resumed from step ([24])", second) for name in interrupted}
    assert all(resumed_at.values()), second[-3000:]
    assert not [name for name in kept if f"trial {name}:" in second]  # not trained again
    assert {name: (trials / name / "trial.json").read_bytes() for name in kept} == kept
    outcomes = trial_outcomes(store, job_id)
    assert [o["status"] for o in outcomes.values()] == ["finished"] * 4
    for name, match in resumed_at.items():  # from its last step, a run saves no further checkpoint to say so
        assert outcomes[name]["result"]["resumed_from"] == ([2] if match[1] == "2" else []), outcomes[name]
    sweep = json.loads((store / "jobs" / job_id / "artifacts" / "report" / "sweep.json").read_text())
    assert list(sweep["flagged"]) == ["t03-seed3-lr1"], sweep["flagged"]
    assert "t03-seed3-lr1 looks like an abnormal seed" in resumed.stderr
    assert "t03-seed3-lr1" in (store / "jobs" / job_id / "artifacts" / "report" / "sweep.html").read_text()
