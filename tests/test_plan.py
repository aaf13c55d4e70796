"""`peftfleet plan`: the memory model from config.json alone, through the CLI as a user runs it."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import yaml

from jobspecs.load import parse_spec
from jobspecs.memory import GIB, PLAN_TOLERANCE, Shape, plan, reservations
from orchestrator.api.cli import parse_bytes
from tests.helpers import EXAMPLES, cli, write_spec

CONFIGS = EXAMPLES / "configs"
# Llama-2-7B's published parameter count, and Llama-3-70B's
LLAMA_7B_PARAMS, LLAMA_70B_PARAMS = 6_738_415_616, 70_553_706_496


def example(tmp_path, **sections) -> dict:
    """The 70B example with its config-only model folder copied beside it, sections replaced."""
    shutil.copytree(CONFIGS, tmp_path / "configs", dirs_exist_ok=True)
    spec = yaml.safe_load((EXAMPLES / "llama-70b-corda.yaml").read_text())
    spec.update(sections)
    return spec


def test_parameter_counts_match_the_published_models():
    assert Shape.from_config(CONFIGS / "llama-2-7b").params == LLAMA_7B_PARAMS
    assert Shape.from_config(CONFIGS / "llama-3-70b").params == LLAMA_70B_PARAMS


def test_plan_reads_config_only_and_answers_the_70b_question(tmp_path, state_dir):
    """The README's question: a 70B CorDA → train job on GPUs of 80 GB. The model folder holds only config.json,
    the data files do not exist: plan needs neither."""
    spec = write_spec(tmp_path / "job.yaml", example(tmp_path))
    assert sorted(p.name for p in (tmp_path / "configs" / "llama-3-70b").iterdir()) == ["config.json"]
    result = json.loads(cli(state_dir, "plan", spec, "--json", "--worker-memory", "80GiB", check=True).stdout)
    assert result["model"]["weights_bytes"] == 2 * LLAMA_70B_PARAMS  # bf16
    assert result["driver"]["weights_bytes"] == 0
    assert result["corda"]["strategy"] == "layerwise"  # a 141 GB replica cannot fit an 80 GiB actor
    assert result["corda"]["replica_bytes"] > 2 * LLAMA_70B_PARAMS
    assert result["corda"]["covariance_bytes_per_group"] == {"qkv": 8192**2 * 4, "o": 8192**2 * 4,
                                                             "gate_up": 8192**2 * 4, "down": 28672**2 * 4}
    by = {p["stage"]: p for p in result["processes"]}
    assert set(by) == {"calibrate", "decompose", "train", "export"}
    assert all(p["total_bytes"] < 80 * GIB for p in result["processes"])  # every stage, the checks included
    assert by["calibrate"]["total_bytes"] < 80 * GIB and by["calibrate"]["count"] == 8
    train = by["train"]
    assert train["parts"]["base weights (÷ workers, ZeRO-3)"] == 2 * LLAMA_70B_PARAMS // 8
    assert train["total_bytes"] < 80 * GIB
    assert result["fits"]["replica_fits"] is False
    assert 1 <= result["fits"]["calibrate_layerwise_workers"] <= 8
    assert 2 <= result["fits"]["train_zero3_workers"] <= 8

    text = cli(state_dir, "plan", spec, "--worker-memory", "80GiB", check=True).stdout
    assert "70.55B parameters" in text and "strategy layerwise" in text and "ZeRO-3 needs" in text


def test_memory_grows_where_it_should(tmp_path):
    """Each figure moves with the knob it depends on: workers divide ZeRO-3's weights, checkpointing cuts the
    activations, more actors shrink each actor's share of hidden states."""
    def train_total(**train) -> int:
        spec = example(tmp_path)
        spec["train"] = {**spec["train"], **train}
        parsed = parse_spec(spec, base_dir=tmp_path, check_files=False)
        return next(p for p in plan(parsed)["processes"] if p["stage"] == "train")["parts"]

    four, eight = train_total(num_workers=4), train_total(num_workers=8)
    assert four["base weights (÷ workers, ZeRO-3)"] == 2 * eight["base weights (÷ workers, ZeRO-3)"]
    plain = train_total(gradient_checkpointing=False)["activations (micro-batch)"]
    assert plain > 10 * train_total()["activations (micro-batch)"]

    def hidden(workers: int) -> int:
        spec = example(tmp_path)
        spec["init"]["corda"] = {**spec["init"]["corda"], "num_workers": workers, "shard_samples": 8}
        parsed = parse_spec(spec, base_dir=tmp_path, check_files=False)
        return plan(parsed)["processes"][0]["parts"]["hidden states of own samples"]

    assert hidden(2) == 4 * hidden(8) == 256 // 2 * 2048 * 8192 * 2


def test_auto_keeps_replica_when_it_fits(tmp_path, state_dir):
    spec = example(tmp_path, model={"path": "configs/llama-2-7b", "dtype": "bfloat16"})
    spec["init"]["corda"]["actor_memory_gib"] = 200
    result = json.loads(cli(state_dir, "plan", write_spec(tmp_path / "j.yaml", spec), "--json", check=True).stdout)
    assert result["model"]["params"] == LLAMA_7B_PARAMS
    assert result["corda"]["strategy"] == "replica" and "fits" not in result


@pytest.mark.parametrize(("text", "size"), [("24GiB", 24 * 2**30), ("80GB", 80 * 10**9), ("512MiB", 2**29),
                                            ("1.5TiB", int(1.5 * 2**40)), ("4096", 4096), (" 2 gib ", 2 * 2**30)])
def test_sizes(text, size):
    assert parse_bytes(text) == size


def test_bad_sizes_and_configs_are_clear_errors(tmp_path, state_dir):
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        parse_bytes("lots")
    spec = write_spec(tmp_path / "job.yaml", example(tmp_path))
    bad = cli(state_dir, "plan", spec, "--worker-memory", "lots")
    assert bad.returncode == 2 and "not a size" in bad.stderr
    (tmp_path / "configs" / "llama-3-70b" / "config.json").write_text('{"model_type": "llama"}')
    bad = cli(state_dir, "plan", spec)
    assert bad.returncode == 2
    assert "config.json: no 'num_attention_heads'" in bad.stderr
    (tmp_path / "configs" / "llama-3-70b" / "config.json").write_text("{not json")
    bad = cli(state_dir, "plan", spec)
    assert bad.returncode == 2 and "config.json: not readable as a config.json" in bad.stderr



def test_a_single_process_that_fits_no_worker_is_named(tmp_path, state_dir):
    """The walked checks and the walked Wise-FT sweep are one process each, whatever the worker count: on 80 GiB
    workers they fit (a block at a time, not 2 × 131 GiB), on 8 GiB workers plan names them."""
    spec = example(tmp_path)
    spec["export"] = {"formats": ["adapter", "merged"], "merge_alphas": [1.0], "wise_ft_alphas": [0.0, 1.0]}
    path = write_spec(tmp_path / "job.yaml", spec)
    result = json.loads(cli(state_dir, "plan", path, "--json", "--worker-memory", "80GiB", check=True).stdout)
    assert result["fits"]["too_big"] == []
    export = next(p for p in result["processes"] if p["stage"] == "export")
    assert export["total_bytes"] < 20 * 2**30
    small = json.loads(cli(state_dir, "plan", path, "--json", "--worker-memory", "8GiB", check=True).stdout)
    assert small["fits"]["too_big"] == ["decompose: init-fidelity check", "export: export task"]
    assert "export: export task: does not fit" in cli(state_dir, "plan", path, "--worker-memory", "8GiB").stdout


def test_processes_on_cpus_reserve_their_planned_peak_plus_the_tolerance(tmp_path):
    """What each kind of process asks Ray for (orchestrator/stages/context.Context.reserve): its plan + 25 %, except
    where it runs on a GPU (the 70B example's actors and training workers), which it reserves instead."""
    raw = example(tmp_path, model={"path": str(tmp_path / "configs" / "llama-3-70b"), "dtype": "bfloat16"})
    on_gpus = parse_spec(raw, check_files=False)
    raw["train"]["use_gpu"] = raw["init"]["corda"]["use_gpu"] = False
    on_cpus = parse_spec(raw, check_files=False)
    planned = {(p["stage"], p["process"]): p["total_bytes"] for p in plan(on_cpus)["processes"]}
    assert reservations(on_cpus) == {k: int(v * (1 + PLAN_TOLERANCE)) for k, v in planned.items()}
    assert set(planned) - set(reservations(on_gpus)) == {("train", "training worker (ZeRO-3)"),
                                                        ("calibrate", "covariance actor (layerwise)")}
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text('{"model_type": "gpt2", "n_embd": 64, "n_layer": 2}')
    assert reservations(parse_spec({**raw, "model": {"path": str(gpt2)}}, check_files=False)) == {}
