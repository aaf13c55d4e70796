"""The CLI end to end, as a user drives it: real embedded Ray, real training, both store backends."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from orchestrator.control.launchers import process_running
from tests.helpers import cli, tiny_spec, wait_gone, write_spec
from tests.train_helpers import registered


def record(state_dir, job_id) -> dict:
    return json.loads(cli(state_dir, "status", job_id, "--json", check=True).stdout)


def test_tiny_example_end_to_end(tmp_path, state_dir, assets):
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(assets, f"file://{tmp_path / 'store'}"))
    submitted = cli(state_dir, "submit", spec, "--wait", check=True)
    job_id = submitted.stdout.strip()
    assert re.fullmatch(r"tiny-lora-\d{8}-\d{6}-[0-9a-f]{8}", job_id)
    assert "train: 40/40 steps" in submitted.stderr and f"job {job_id} SUCCEEDED" in submitted.stderr

    rec = record(state_dir, job_id)
    assert rec["state"] == "SUCCEEDED" and rec["error"] is None
    assert [s["state"] for s in rec["stages"]] == ["succeeded"] * 3
    log = cli(state_dir, "logs", job_id, check=True).stdout
    assert "train: 40/40 steps" in log and "train: step 0/40 eval_loss" in log
    # the log a user reads holds our lines only: the driver's, and the workers' progress lines Ray forwards
    ours = re.compile(r"\d{4}-\d\d-\d\d [\d:,]+ (INFO|WARNING|ERROR) |\(\w+ pid=\d+\) "
                      r"(train|calibrate|decompose|export):|--- attempt ")
    assert [line for line in log.splitlines() if not ours.match(line)] == []
    # everything the libraries said is in the verbose log (with the job's own lines), here and in the store
    verbose = cli(state_dir, "logs", job_id, "--verbose", check=True).stdout
    assert "TrainController" in verbose and "train: 40/40 steps" in verbose
    uploaded = (tmp_path / "store" / "jobs" / job_id / "verbose.log").read_text()
    assert "TrainController" in uploaded and verbose.startswith(uploaded)  # uploaded as the driver ended
    listing = cli(state_dir, "artifacts", job_id, check=True).stdout
    assert "adapter_model.safetensors" in listing and "metrics.jsonl" in listing

    fetched = cli(state_dir, "fetch", job_id, tmp_path / "out", check=True)
    assert "sha256 ok" in fetched.stderr
    page = Path(cli(state_dir, "report", job_id, check=True).stdout.strip())
    assert page == state_dir / "jobs" / job_id / "report" / "index.html" and "loss.png" in page.read_text()
    metrics = [json.loads(line) for line in (tmp_path / "out" / "report" / "metrics.jsonl").read_text().splitlines()]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert len(metrics) == 40 and len(evals) == 4
    assert evals[-1] < evals[0] - 0.2, evals  # it really learned

    # the adapter loads with stock peft and is the trained one, not the init
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(assets / "tiny-llama")
    model = PeftModel.from_pretrained(base, tmp_path / "out" / "adapter")
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) > 0 for p in lora_b)


@pytest.mark.slow
def test_failed_stage_leaves_failed_job_and_no_manifest(tmp_path, state_dir, assets):
    broken = tmp_path / "broken-model"
    shutil.copytree(assets / "tiny-llama", broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    spec = tiny_spec(assets, f"file://{tmp_path / 'store'}", model={"path": str(broken)})
    run = cli(state_dir, "submit", write_spec(tmp_path / "job.yaml", spec), "--wait")
    assert run.returncode == 1
    job_id = run.stdout.strip()
    rec = record(state_dir, job_id)
    assert rec["state"] == "FAILED" and rec["stage"] == "train"
    assert "safetensors" in rec["error"].lower() or "header" in rec["error"].lower(), rec["error"]
    assert [s["state"] for s in rec["stages"]] == ["failed", "pending", "pending"]
    assert not (tmp_path / "store" / "jobs" / job_id / "manifest.json").exists()
    fetch = cli(state_dir, "fetch", job_id, tmp_path / "out")
    assert fetch.returncode == 1 and "has no manifest" in fetch.stderr


@pytest.mark.slow
def test_a_process_no_node_can_hold_fails_its_stage_naming_it(tmp_path, state_dir, assets):
    """Ray would wait forever for a node with the memory a process reserves: the stage fails at once instead."""
    import yaml

    from tests.helpers import EXAMPLES

    spec = yaml.safe_load((EXAMPLES / "tiny-corda.yaml").read_text())
    spec["storage"] = {"uri": f"file://{tmp_path / 'store'}"}
    spec["init"]["corda"]["actor_memory_gib"] = 100_000
    (tmp_path / "assets").symlink_to(assets)
    run = cli(state_dir, "submit", write_spec(tmp_path / "job.yaml", spec), "--wait", timeout=300)
    assert run.returncode == 1
    rec = record(state_dir, run.stdout.strip())
    assert rec["state"] == "FAILED" and rec["stage"] == "calibrate"
    assert "calibrate: a covariance actor (replica) reserves 100000.00 GiB" in rec["error"], rec["error"]
    assert "no node of this cluster has more than" in rec["error"]


@pytest.mark.slow
def test_cancel_running_job(tmp_path, state_dir, assets):
    spec = tiny_spec(assets, f"file://{tmp_path / 'store'}", train={"max_steps": 100_000, "eval_every": None})
    job_id = cli(state_dir, "submit", write_spec(tmp_path / "job.yaml", spec), check=True).stdout.strip()
    log = state_dir / "jobs" / job_id / "driver.log"
    deadline = time.monotonic() + 120
    while not (log.exists() and "train: step 2/" in log.read_text()):
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
        time.sleep(0.5)
    worker_pid = int(re.search(r"\(RayTrainWorker pid=(\d+)", log.read_text()).group(1))
    driver_pid = json.loads((state_dir / "jobs" / f"{job_id}.json").read_text())["pid"]

    cancelled = cli(state_dir, "cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr
    rec = record(state_dir, job_id)
    assert rec["state"] == "CANCELLED" and rec["stage"] == "train"
    assert rec["stages"][0]["state"] == "cancelled"
    assert not process_running(driver_pid)
    assert wait_gone(worker_pid, timeout=20), "training worker survived the cancel"  # it goes with embedded Ray
    assert not (tmp_path / "store" / "jobs" / job_id / "manifest.json").exists()


@pytest.mark.parametrize("command", ["status", "logs", "cancel", "artifacts"])
def test_unknown_job_is_a_clear_error(state_dir, command):
    run = cli(state_dir, command, "no-such-job")
    assert run.returncode == 2 and "unknown job 'no-such-job'" in run.stderr


@pytest.mark.slow
def test_corda_job_end_to_end(tmp_path, state_dir, assets):
    """The CorDA example through the CLI: calibrate → decompose → train from the CorDA init → export → upload."""
    import yaml

    from tests.helpers import EXAMPLES

    spec = yaml.safe_load((EXAMPLES / "tiny-corda.yaml").read_text())
    spec["storage"] = {"uri": f"file://{tmp_path / 'store'}"}
    spec["train"]["max_steps"] = 10
    (tmp_path / "assets").symlink_to(assets)
    run = cli(state_dir, "submit", write_spec(tmp_path / "job.yaml", spec), "--wait", check=True)
    job_id = run.stdout.strip()
    assert "calibrate: shard" in run.stderr and "init fidelity max |Δlogits|" in run.stderr
    assert [s["state"] for s in record(state_dir, job_id)["stages"]] == ["succeeded"] * 5
    cli(state_dir, "fetch", job_id, tmp_path / "out", check=True)
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"adapter", "corda_init", "residual_base", "report"}
    report = json.loads((out / "report" / "corda.json").read_text())
    assert report["init_fidelity_max_abs_logit_diff"] < 1e-4
    assert len(report["groups"]) == 8 and report["groups"][0]["samples"] == 56

    # the trained adapter sits on the residual base: trained ≠ init, and both load with stock peft
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    init = load_file(str(out / "corda_init" / "adapter_model.safetensors"))
    trained = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert init.keys() == trained.keys()
    assert any(not torch.equal(init[k], trained[k]) for k in init)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "residual_base"), out / "adapter")


@pytest.mark.slow
def test_corda_only_job_is_the_cluster_scale_init(tmp_path, state_dir, assets):
    import yaml

    from tests.helpers import EXAMPLES

    spec = yaml.safe_load((EXAMPLES / "tiny-corda.yaml").read_text())
    spec.update(stages=["calibrate", "decompose"], storage={"uri": f"file://{tmp_path / 'store'}"})
    spec["init"]["corda"].update(mode="kpm", save_covariance=True)
    (tmp_path / "assets").symlink_to(assets)
    job_id = cli(state_dir, "submit", write_spec(tmp_path / "job.yaml", spec), "--wait", check=True).stdout.strip()
    kinds = cli(state_dir, "artifacts", job_id, check=True).stdout
    assert "kinds: corda_init, covariance, report, residual_base" in kinds
    rec = record(state_dir, job_id)
    assert [s["name"] for s in rec["stages"]] == ["calibrate", "decompose", "upload"]
    assert any("fewer calibration tokens than peft's guidance" in w for w in rec["warnings"])


def test_help_everywhere(state_dir):
    commands = ["validate", "plan", "submit", "status", "logs", "cancel", "artifacts", "fetch", "report", "list",
                "serve", "token"]
    top = cli(state_dir, "--help", check=True).stdout
    assert all(c in top for c in commands)
    for command in commands:
        assert cli(state_dir, command, "--help", check=True).stdout.startswith("usage: peftfleet " + command)


METHODS = {  # label → the adapter section
    "dora": {"method": "dora", "target_modules": ["q_proj", "v_proj"]},
    "adalora": {"method": "adalora", "r": 2, "target_modules": ["q_proj", "v_proj"],
                "adalora": {"init_r": 4, "tinit": 1}},
    "ia3": {"method": "ia3", "target_modules": ["k_proj", "v_proj", "down_proj"],
            "ia3": {"feedforward_modules": ["down_proj"]}},
    "prefix": {"method": "prefix", "prefix": {"num_virtual_tokens": 4}},
    "prefix-projection": {"method": "prefix", "prefix": {"num_virtual_tokens": 4, "projection": True,
                                                         "encoder_hidden_size": 32}},
    "prompt": {"method": "prompt", "prompt": {"num_virtual_tokens": 4, "init_text": "reverse upper repeat add"}},
    "p-tuning-lstm": {"method": "p_tuning", "p_tuning": {"num_virtual_tokens": 4, "encoder": "lstm"}},
    "bitfit": {"method": "bitfit", "target_modules": "all-linear"},
}
PEFT_TYPES = {"dora": "LORA", "adalora": "ADALORA", "ia3": "IA3", "prefix": "PREFIX_TUNING",
              "prompt": "PROMPT_TUNING", "p_tuning": "P_TUNING"}


@pytest.mark.slow
def test_each_adapter_method_trains_through_the_cli_on_a_running_cluster(tmp_path, state_dir, assets, local_ray):
    """Every method at once, as the trials of one sweep submitted to an already running Ray
    (`cluster.address`), as on a shared cluster; each trial's adapter loads as the README says (stock peft;
    BitFit's biases into its base, the tiny Qwen2). BitFit's merged export is tested in test_export."""
    import ray
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    trials = [{**{f"adapter.{k}": v for k, v in adapter.items()},
               **({"model.path": str(assets / "tiny-qwen2")} if adapter["method"] == "bitfit" else {})}
              for adapter in METHODS.values()]
    spec = tiny_spec(assets, f"file://{tmp_path / 'store'}", train={"max_steps": 3, "eval_every": 3,
                                                                    "learning_rate": 0.01},
                     export={"formats": ["adapter"], "wise_ft_alphas": []},
                     cluster={"address": ray.get_runtime_context().gcs_address},
                     sweep={"trials": trials, "max_concurrent_trials": 4})
    run = cli(state_dir, "submit", write_spec(tmp_path / "methods.yaml", spec), "--wait", timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    job_id = run.stdout.strip().splitlines()[0]
    outcomes = {json.loads(p.read_text())["name"]: json.loads(p.read_text())
                for p in (tmp_path / "store" / "jobs" / job_id / "trials").glob("*/trial.json")}
    assert len(outcomes) == len(METHODS) and all(o["status"] == "finished" for o in outcomes.values()), outcomes
    cli(state_dir, "fetch", job_id, tmp_path / "out", "--kind", "trials", check=True)
    ids = torch.tensor([[1, 40, 41, 42]])
    for name, outcome in outcomes.items():
        adapter, method = tmp_path / "out" / "trials" / name / "adapter", outcome["values"]["adapter.method"]
        if method == "bitfit":
            base = AutoModelForCausalLM.from_pretrained(assets / "tiny-qwen2")
            biases = load_file(adapter / "bitfit_model.safetensors")
            assert sorted(biases) == sorted(n for n, _ in base.named_parameters() if n.endswith(".bias"))
            assert any(not torch.equal(v, base.state_dict()[k]) for k, v in biases.items())  # they trained
            _, unexpected = base.load_state_dict(biases, strict=False)
            assert not unexpected
            continue
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["peft_type"] == PEFT_TYPES[method] and config.get("use_dora", False) == (method == "dora")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets / "tiny-llama"), adapter)
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=ids).logits).all()
    assert ray.is_initialized()  # the job's driver disconnected from the cluster; it did not stop it


@pytest.mark.slow
def test_resubmitting_after_a_driver_crash_resumes_training(tmp_path, state_dir, assets):
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(assets, f"file://{tmp_path / 'store'}", train={
        "max_steps": 12, "checkpoint_every": 2, "eval_every": 6, "log_every": 1}))
    job_id = cli(state_dir, "submit", spec, check=True).stdout.strip()
    snapshot = tmp_path / "store" / "jobs" / job_id / "train" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 240
    while not registered(snapshot):
        assert time.monotonic() < deadline, "no checkpoint was registered"
        time.sleep(0.2)
    driver_pid = json.loads((state_dir / "jobs" / f"{job_id}.json").read_text())["pid"]
    log = Path(json.loads((state_dir / "jobs" / f"{job_id}.json").read_text())["log"])
    os.kill(driver_pid, signal.SIGKILL)  # the driver crashes: no final state is written
    workers = [int(p) for p in re.findall(r"\(RayTrainWorker pid=(\d+)", log.read_text())]
    assert all(wait_gone(pid, timeout=30) for pid in workers)  # the embedded Ray went with its driver
    rec = record(state_dir, job_id)
    assert rec["state"] == "FAILED" and "exited without a final state" in rec["error"]

    # a different spec under the same id is refused: the checkpoints belong to the frozen one
    changed = write_spec(tmp_path / "changed.yaml", tiny_spec(assets, f"file://{tmp_path / 'store'}", train={
        "max_steps": 30, "checkpoint_every": 2, "eval_every": 6, "log_every": 1}))
    refused = cli(state_dir, "submit", changed, "--job-id", job_id)
    assert refused.returncode == 2 and "differs at: train.max_steps" in refused.stderr

    resumed = cli(state_dir, "submit", spec, "--job-id", job_id, "--wait")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rec = record(state_dir, job_id)
    assert rec["state"] == "SUCCEEDED" and rec["attempts"] == 2
    match = re.search(r"train: resumed from step (\d+)", resumed.stderr)
    assert match and 2 <= int(match.group(1)) < 12  # resumed from a checkpoint, not restarted
    cli(state_dir, "fetch", job_id, tmp_path / "out", "--kind", "report", check=True)
    summary = json.loads((tmp_path / "out" / "report" / "summary.json").read_text())
    assert summary["resumed_from"] == [int(match.group(1))]
    metrics = [json.loads(line) for line in (tmp_path / "out" / "report" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13))  # the step count continued

    again = cli(state_dir, "submit", spec, "--job-id", job_id)
    assert again.returncode == 2 and "already SUCCEEDED" in again.stderr
