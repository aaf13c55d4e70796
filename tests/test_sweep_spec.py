"""The sweep section: expansion into named trials, ties, random draws, the budget, and errors that name the trial
and the field before anything starts."""

from __future__ import annotations

import pytest

from jobspecs import SpecError, dump_spec, parse_spec, spec_from_frozen
from jobspecs.trials import expand
from tests.helpers import tiny_spec


def sweep_spec(assets, tmp_path, sweep: dict, **sections):
    return tiny_spec(assets, f"file://{tmp_path / 'store'}", sweep=sweep, **sections)


def error_of(raw) -> str:
    with pytest.raises(SpecError) as err:
        parse_spec(raw)
    return str(err.value)


def test_a_grid_expands_to_every_combination_each_a_whole_spec(assets, tmp_path):
    spec = parse_spec(sweep_spec(assets, tmp_path, {"grid": {"adapter.r": [4, 8],
                                                             "train.learning_rate": [0.003, 0.01]},
                                                    "tie": {"adapter.alpha": "2 * adapter.r"}}))
    trials = expand(spec)
    assert [t.name for t in trials] == ["t00-r4-lr0p003", "t01-r4-lr0p01", "t02-r8-lr0p003", "t03-r8-lr0p01"]
    assert [(t.spec.adapter.r, t.spec.adapter.alpha, t.spec.train.learning_rate) for t in trials] == [
        (4, 8, 0.003), (4, 8, 0.01), (8, 16, 0.003), (8, 16, 0.01)]
    assert all(t.spec.sweep is None and t.spec.data == spec.data for t in trials)
    assert trials[2].values == {"adapter.r": 8, "train.learning_rate": 0.003, "adapter.alpha": 16}
    # the frozen form keeps the sweep, and expands to the same trials where the driver reads it
    assert [t.spec for t in expand(spec_from_frozen(dump_spec(spec)))] == [t.spec for t in trials]


def test_lists_of_lists_random_draws_and_explicit_trials(assets, tmp_path):
    sweep = {"grid": {"adapter.target_modules": [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj"]]},
             "random": {"train.learning_rate": {"loguniform": [1e-4, 1e-1]}, "train.seed": {"randint": [0, 99]}},
             "num_samples": 3, "seed": 7, "trials": [{"adapter.r": 16, "train.seed": 5}]}
    spec = parse_spec(sweep_spec(assets, tmp_path, sweep))
    trials = expand(spec)
    assert len(trials) == 2 * 3 + 1
    assert trials[0].spec.adapter.target_modules == ["q_proj", "v_proj"]
    assert trials[1].name.startswith("t01-q_proj+k_proj+v_proj-lr")
    rates = [t.spec.train.learning_rate for t in trials[:6]]
    assert all(1e-4 <= r <= 1e-1 for r in rates) and len(set(rates)) == 6
    assert [t.spec.train.learning_rate for t in expand(spec)] == [t.spec.train.learning_rate for t in trials]
    assert (trials[-1].spec.adapter.r, trials[-1].spec.train.seed) == (16, 5)
    other = parse_spec(sweep_spec(assets, tmp_path, {**sweep, "seed": 8}))
    assert [t.spec.train.learning_rate for t in expand(other)][:6] != rates


def test_a_bad_trial_value_names_the_trial_and_the_field(assets, tmp_path):
    text = error_of(sweep_spec(assets, tmp_path, {"grid": {"adapter.r": [4, 0]}}))
    assert "sweep: trial t01-r0 (adapter.r=0): adapter.r: Input should be greater than 0" in text
    text = error_of(sweep_spec(assets, tmp_path, {"grid": {"adapter.rank": [4, 8]}}))
    assert "sweep: trial t00-rank4 (adapter.rank=4): adapter.rank: unknown key" in text
    text = error_of(sweep_spec(assets, tmp_path, {"trials": [{"init.method": "corda"}]}))
    assert "sweep: trial t00-corda (init.method=corda): data.calibration:" in text
    text = error_of(sweep_spec(assets, tmp_path, {"grid": {"data.train": [str(tmp_path / "nowhere.jsonl")]}}))
    assert "sweep: trial t00-train" in text and "data.train" in text and "no such file" in text


def test_what_cannot_be_swept_and_the_budget(assets, tmp_path):
    assert "storage is shared by every trial" in error_of(
        sweep_spec(assets, tmp_path, {"grid": {"storage.uri": ["file:///a", "file:///b"]}}))
    assert "nothing to sweep" in error_of(sweep_spec(assets, tmp_path, {}))
    assert "exceed sweep.max_trials 3" in error_of(
        sweep_spec(assets, tmp_path, {"grid": {"adapter.r": [2, 4]}, "num_samples": 2, "max_trials": 3}))
    assert "is not 'k * other.path'" in error_of(
        sweep_spec(assets, tmp_path, {"grid": {"adapter.r": [2]}, "tie": {"adapter.alpha": "r ** 2"}}))
    assert "swept twice" in error_of(
        sweep_spec(assets, tmp_path, {"grid": {"adapter.r": [2]}, "random": {"adapter.r": {"randint": [1, 4]}}}))
    assert "loguniform: needs lo < hi and lo > 0" in error_of(
        sweep_spec(assets, tmp_path, {"random": {"train.learning_rate": {"loguniform": [0, 1]}}}))
    raw = sweep_spec(assets, tmp_path, {"grid": {"adapter.r": [2, 4]}})
    raw["data"] = {**raw["data"], "eval": None}
    assert "sweep.metric: eval_loss needs data.eval" in error_of(raw)


def corda_sweep(assets, tmp_path, sweep: dict) -> dict:
    return sweep_spec(assets, tmp_path, sweep, init={"method": "corda", "corda": {"samples": 8}},
                      data={"format": "instruction", "train": str(assets / "train.jsonl"),
                            "eval": str(assets / "eval.jsonl"), "calibration": str(assets / "calibration.jsonl")})


def test_corda_trials_share_one_calibration_and_each_decomposition_is_computed_once(assets, tmp_path):
    from orchestrator.stages.sweep import decompositions

    spec = parse_spec(corda_sweep(assets, tmp_path, {"grid": {"adapter.r": [4, 8], "init.corda.mode": ["ipm", "kpm"],
                                                              "train.learning_rate": [0.003, 0.01]}}))
    assert spec.effective_stages == ["calibrate", "decompose", "train", "export"]
    found = decompositions(spec)
    assert [(d.name, d.trials) for d in found] == [
        ("d0-r4-ipm", ("t00-r4-ipm-lr0p003", "t01-r4-ipm-lr0p01")),
        ("d1-r4-kpm", ("t02-r4-kpm-lr0p003", "t03-r4-kpm-lr0p01")),
        ("d2-r8-ipm", ("t04-r8-ipm-lr0p003", "t05-r8-ipm-lr0p01")),
        ("d3-r8-kpm", ("t06-r8-kpm-lr0p003", "t07-r8-kpm-lr0p01"))]
    # a sweep over the init method calibrates for its CorDA trials only
    mixed = parse_spec(sweep_spec(assets, tmp_path, {"grid": {"init.method": ["default", "corda"]}},
                                  data={"format": "instruction", "train": str(assets / "train.jsonl"),
                                        "eval": str(assets / "eval.jsonl"),
                                        "calibration": str(assets / "calibration.jsonl")}))
    assert mixed.effective_stages[:2] == ["calibrate", "decompose"]
    assert [d.trials for d in decompositions(mixed)] == [("t01-corda",)]
    text = error_of(corda_sweep(assets, tmp_path, {"grid": {"init.corda.samples": [8, 16]}}))
    assert "trials t00-samples8 and t01-samples16 calibrate CorDA differently (corda.samples differs)" in text


def test_the_bundle_needs_a_sweep_one_method_one_base_and_trials_that_exist(assets, tmp_path):
    bundle = {"formats": ["adapter", "adapter_bundle"]}
    raw = tiny_spec(assets, f"file://{tmp_path / 'store'}", export=bundle)
    assert "adapter_bundle collects a sweep's trials; this spec has no sweep" in error_of(raw)
    assert "adapter_bundle needs one adapter.method for all trials" in error_of(
        sweep_spec(assets, tmp_path, {"grid": {"adapter.method": ["lora", "dora"]}}, export=bundle))
    assert "sweep.bundle_trials: no trial is named 't09'" in error_of(
        sweep_spec(assets, tmp_path, {"grid": {"adapter.r": [2, 4]}, "bundle_trials": ["t00-r2", "t09"]},
                   export=bundle))
    spec = parse_spec(sweep_spec(assets, tmp_path, {"grid": {"adapter.r": [2, 4]}, "bundle_trials": ["t01-r4"]},
                                 export=bundle))
    assert spec.sweep.bundle_trials == ["t01-r4"]


def test_tasks_multiply_the_trials_and_relative_paths_mean_the_spec_folder(assets, tmp_path):
    import shutil

    folder = tmp_path / "specs"
    folder.mkdir()
    shutil.copy(assets / "eval.jsonl", folder / "other.jsonl")
    raw = sweep_spec(assets, tmp_path, {"grid": {"adapter.r": [2, 4]},
                                        "tasks": {"upper": {}, "other": {"data.train": "other.jsonl"}}})
    spec = parse_spec(raw, base_dir=folder)
    trials = expand(spec)
    assert [(t.name, t.task) for t in trials] == [("t00-upper-r2", "upper"), ("t01-upper-r4", "upper"),
                                                  ("t02-other-r2", "other"), ("t03-other-r4", "other")]
    assert trials[2].spec.data.train.path == folder / "other.jsonl"
    assert trials[0].spec.data.train.path == assets / "train.jsonl"
    # frozen, the sweep's relative path is already absolute: the driver reads the same trials anywhere
    frozen = spec_from_frozen(dump_spec(spec))
    assert [t.spec for t in expand(frozen)] == [t.spec for t in trials]
    assert "a task name is 1-40 chars" in error_of(sweep_spec(assets, tmp_path, {"tasks": {"Bad.Name": {}}}))
