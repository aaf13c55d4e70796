"""Every class of spec error gets the field path and the reason; every example validates."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from jobspecs import SpecError, dump_spec, load_spec, parse_spec, spec_from_frozen
from tests.helpers import EXAMPLES, cli, tiny_spec, weights_only, write_spec


def check(tmp_path: Path, spec: dict) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(tmp_path / "job.yaml", spec))
    return info.value


def test_valid_spec_resolves_paths_and_defaults(tmp_path, assets):
    spec = load_spec(write_spec(tmp_path / "job.yaml", tiny_spec(assets, "file://store")))
    assert spec.model.path == (assets / "tiny-llama").resolve()
    assert spec.storage.uri == f"file://{(tmp_path / 'store').resolve()}"
    assert spec.effective_stages == ["train", "export"]
    assert spec.train.zero_stage == 2 and spec.adapter.method == "lora"


def test_frozen_spec_round_trips(tmp_path, assets):
    spec = load_spec(write_spec(tmp_path / "job.yaml", tiny_spec(assets, "file://store")))
    assert spec_from_frozen(dump_spec(spec)) == spec


@pytest.mark.parametrize(
    ("change", "path", "reason"),
    [
        ({"adapter": {"rank": 4}}, "adapter.rank", "unknown key"),
        ({"bogus_section": {}}, "bogus_section", "unknown key"),
        ({"adapter": {"r": "eight"}}, "adapter.r", "valid integer"),
        ({"adapter": {"r": 0}}, "adapter.r", "greater than 0"),
        ({"adapter": {"r": -3}}, "adapter.r", "greater than 0"),
        ({"train": {"learning_rate": 0}}, "train.learning_rate", "greater than 0"),
        ({"adapter": {"method": "qlora-xl"}}, "adapter.method", "'lora'"),
        ({"model": {"path": "does/not/exist"}}, "model.path", "no such file or directory"),
        ({"data": {"train": "missing.jsonl"}}, "data.train.path", "no such file or directory"),
        ({"storage": {"uri": "s3://"}}, "storage.uri", "needs a bucket"),
        ({"storage": {"uri": "s3:///prefix"}}, "storage.uri", "needs a bucket"),
        ({"storage": {"uri": "s3://A_Bad_Bucket/x"}}, "storage.uri", "not a valid S3 bucket name"),
        ({"storage": {"uri": "gs://bucket"}}, "storage.uri", "must start with file:// or s3://"),
        ({"storage": {"uri": "s3://bucket", "endpoint_url": "minio:9000"}}, "storage.endpoint_url", "http(s) URL"),
        ({"storage": {"uri": "s3://bucket", "secret_key": "x"}}, "storage.secret_key", "never read from a spec"),
        ({"train": {"zero_stage": 4}}, "train.zero_stage", "0, 1, 2 or 3"),
        ({"train": {"offload_param": True}}, "train.offload_param", "needs train.zero_stage: 3"),
        ({"train": {"zero_stage": 0, "offload_optimizer": True}}, "train.offload_optimizer", "zero_stage >= 1"),
        ({"train": {"precision": "fp16"}}, "train.precision", "needs a GPU"),
        ({"adapter": {"method": "lora", "adalora": {"init_r": 12}}}, "adapter.adalora", "only valid when"),
        ({"adapter": {"method": "adalora", "r": 16, "adalora": {"init_r": 8}}}, "adapter.adalora.init_r",
         ">= adapter.r"),
        ({"adapter": {"target_modules": []}}, "adapter.target_modules", "at least one module"),
        ({"stages": ["export", "train"]}, "stages", "pipeline order"),
        ({"stages": ["export"]}, "stages", "export needs train"),
        ({"stages": ["calibrate", "decompose"]}, "stages", "set init.method: corda"),
        ({"name": "Has Spaces"}, "name", "a-z"),
        ({"export": {"formats": ["adapter_on_original_base"]}}, "export.formats", "init.method: corda"),
        ({"adapter": {"method": "prefix"}, "export": {"formats": ["merged"]}}, "export.formats", "no W + α·ΔW"),
        ({"adapter": {"method": "dora"}, "export": {"formats": ["scaled_adapter"]}}, "export.formats",
         "cannot be scaled"),
        ({"adapter": {"method": "p_tuning"}, "export": {"formats": ["merged"]}}, "export.formats", "no W + α·ΔW"),
        ({"adapter": {"method": "prefix", "prefix": {"init_text": "x"}}}, "adapter.prefix.init_text", "unknown key"),
        ({"adapter": {"method": "lora", "p_tuning": {"encoder": "lstm"}}}, "adapter.p_tuning", "only valid when"),
        ({"adapter": {"method": "p_tuning", "p_tuning": {"encoder": "gru"}}}, "adapter.p_tuning.encoder", "'mlp'"),
        ({"adapter": {"method": "bitfit"}}, "adapter.method",
         "bitfit trains bias terms only, and {model} has no bias terms at all (Llama-family models have none"),
        ({"data": {"streaming": True}, "train": {"max_steps": None}}, "train.max_steps", "needed with data.streaming"),
        ({"export": {"merge_alphas": [3]}}, "export.merge_alphas.0", "less than or equal to 2"),
        ({"export": {"formats": ["onnx"]}}, "export.formats.0", "'adapter'"),
    ],
)
def test_spec_errors_name_field_and_reason(tmp_path, assets, change, path, reason):
    error = check(tmp_path, tiny_spec(assets, "file://store", **change))
    text, reason = str(error), reason.format(model=assets / "tiny-llama")
    assert str(tmp_path / "job.yaml") in text
    assert f"{path}: " in text, text
    assert reason in text, text


def test_calibrate_alone_is_refused(tmp_path, assets):
    spec = tiny_spec(assets, "file://store", stages=["calibrate"], init={"method": "corda"},
                     data={"calibration": str(assets / "calibration.jsonl")})
    assert "stages: calibrate alone keeps nothing" in str(check(tmp_path, spec))


def test_model_folder_without_config_is_refused(tmp_path, assets):
    (tmp_path / "not-a-model").mkdir()
    error = check(tmp_path, tiny_spec(assets, "file://store", model={"path": "not-a-model"}))
    assert "model.path: " in str(error) and "no config.json" in str(error)


def test_unsupported_data_file_type(tmp_path, assets):
    (tmp_path / "train.csv").write_text("a,b\n")
    error = check(tmp_path, tiny_spec(assets, "file://store", data={"train": "train.csv"}))
    assert "data.train.path: " in str(error) and "unsupported data file type '.csv'" in str(error)


def test_yaml_syntax_error_names_line(tmp_path):
    (tmp_path / "job.yaml").write_text("name: x\nmodel: [unclosed\n")
    with pytest.raises(SpecError, match=r"line \d+, column \d+: invalid YAML"):
        load_spec(tmp_path / "job.yaml")


def test_a_spec_that_expands_past_any_real_one_is_refused_before_it_is_walked(tmp_path, assets):
    """YAML aliases let a 1 KB file stand for 10^9 values (each later step would walk them); JSON can nest
    deeper than anything validates."""
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]" for i in range(8)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\nname: bomb\n")
    with pytest.raises(SpecError, match="more than 100000 values"):
        load_spec(bomb)
    deep: list = []
    for _ in range(200):
        deep = [deep]
    with pytest.raises(SpecError, match="nested more than 32 levels"):
        parse_spec({**tiny_spec(assets, "file://store"), "name": deep})


def test_all_problems_reported_at_once(tmp_path, assets):
    error = check(tmp_path, tiny_spec(assets, "file://store", adapter={"r": 0, "dropout": 2}))
    assert {p for p, _ in error.problems} == {"adapter.r", "adapter.dropout"}


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_validates(tmp_path, assets, example):
    shutil.copy(example, tmp_path / example.name)
    (tmp_path / "assets").symlink_to(assets)
    (tmp_path / "configs").symlink_to(EXAMPLES / "configs")
    # the tiny examples run here (their files exist); the big ones are for `plan` (config.json only, no data)
    spec = load_spec(tmp_path / example.name, check_files="assets/" in example.read_text())
    assert spec.name == example.stem


def test_cli_validate_exit_codes(tmp_path, state_dir, assets):
    good = write_spec(tmp_path / "good.yaml", tiny_spec(assets, "file://store"))
    bad = write_spec(tmp_path / "bad.yaml", tiny_spec(assets, "file://store", adapter={"r": 0}))
    ok = cli(state_dir, "validate", good)
    assert ok.returncode == 0 and "ok:" in ok.stdout
    refused = cli(state_dir, "validate", bad)
    assert refused.returncode == 2
    assert "adapter.r: Input should be greater than 0" in refused.stderr
    # submit refuses the same spec before anything starts: no job is recorded
    assert cli(state_dir, "submit", bad).returncode == 2
    assert not (state_dir / "jobs").exists()


def test_model_folder_without_a_tokenizer_is_refused_naming_model_tokenizer(tmp_path, assets):
    bare = weights_only(assets, tmp_path / "bare")
    text = str(check(tmp_path, tiny_spec(assets, "file://store", model={"path": str(bare)})))
    assert "model.tokenizer: not set, so the model folder is used, and it: " in text, text
    assert f"{bare} has no tokenizer (no tokenizer.json or tokenizer.model); data.format 'instruction' " \
           "tokenizes text" in text, text
    # a SentencePiece model alone needs its package to be converted into a tokenizer
    (tmp_path / "spm").mkdir()
    (tmp_path / "spm" / "tokenizer.model").write_bytes(b"\x00")
    spec = tiny_spec(assets, "file://store", model={"path": str(bare), "tokenizer": "spm"})
    if importlib.util.find_spec("sentencepiece") is None and importlib.util.find_spec("tiktoken") is None:
        text = str(check(tmp_path, spec))
        assert "model.tokenizer: " in text and "neither is installed" in text, text
    else:
        load_spec(write_spec(tmp_path / "job.yaml", spec))


def test_pretokenized_data_needs_no_tokenizer(tmp_path, assets):
    from workers.data.tokenizer import load_tokenizer, pad_id

    bare = weights_only(assets, tmp_path / "bare")
    (tmp_path / "tokens.jsonl").write_text('{"input_ids": [1, 5, 9, 2]}\n')
    raw = tiny_spec(assets, "file://store", model={"path": str(bare)},
                    data={"format": "tokens", "train": "tokens.jsonl", "eval": None})
    spec = load_spec(write_spec(tmp_path / "job.yaml", raw))
    assert load_tokenizer(spec) is None and pad_id(spec, None) == 3  # the config's pad_token_id
    raw["data"]["pad_token_id"] = 0
    assert pad_id(load_spec(write_spec(tmp_path / "job.yaml", raw)), None) == 0
    # prompt tuning from text still needs one
    raw["adapter"] = {"method": "prompt", "prompt": {"init_text": "reverse the word"}}
    assert "adapter.prompt.init_text is tokenized" in str(check(tmp_path, raw))
    # a config that names no pad or eos id: the error says which field to set
    config = json.loads((bare / "config.json").read_text())
    config.pop("pad_token_id"), config.pop("eos_token_id")
    (bare / "config.json").write_text(json.dumps(config))
    raw["adapter"], raw["data"]["pad_token_id"] = {}, None
    assert "data.pad_token_id: needed for format tokens" in str(check(tmp_path, raw))


def test_bitfit_needs_biases_in_its_target_modules_and_trains_no_scaled_adapter(tmp_path, assets):
    qwen2 = {"path": str(assets / "tiny-qwen2")}
    spec = tiny_spec(assets, "file://store", model=qwen2, adapter={"method": "bitfit", "target_modules": ["q_proj"]})
    write_spec(tmp_path / "ok.yaml", spec)
    assert load_spec(tmp_path / "ok.yaml").adapter.method == "bitfit"
    spec["adapter"]["target_modules"] = ["o_proj", "down_proj"]  # Qwen2 has q/k/v biases only
    assert "has no bias in adapter.target_modules ['o_proj', 'down_proj']" in str(check(tmp_path, spec))
    spec["adapter"]["target_modules"] = "all-linear"
    spec["export"] = {"formats": ["adapter", "scaled_adapter"]}
    assert "export.formats: a BitFit adapter holds the trained biases themselves" in str(check(tmp_path, spec))
