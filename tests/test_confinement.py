"""Every file a job reads from a folder its user named stays inside its data root: links, index entries, the
check repeated where the files are read (tests/test_remote.py performs the same attacks through the gateway)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from jobspecs import SpecError, parse_spec
from jobspecs.confinement import Outside, open_checked
from tests.helpers import tiny_spec

SECRET = "/proc/self/environ"  # what an attacker wants: the reading process's environment


@pytest.fixture
def root(tmp_path, assets) -> Path:
    """A data root holding a copy of the tiny model (with its tokenizer) and the data."""
    root = tmp_path / "data"
    shutil.copytree(assets / "tiny-llama", root / "model")
    for name in ("train.jsonl", "eval.jsonl"):
        shutil.copy(assets / name, root / name)
    return root


def spec_in(root: Path, **sections) -> dict:
    spec = tiny_spec(root.parent / "unused", f"file://{root.parent / 'store'}", **sections)
    spec["model"] = {"path": "model", **sections.get("model", {})}
    spec["data"].update(train="train.jsonl", eval="eval.jsonl")
    return {**spec, "data_root": str(root)}


def problems(root: Path, spec: dict) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as err:
        parse_spec(spec, base_dir=root)
    return err.value.problems


def test_a_spec_inside_its_data_root_validates(root):
    spec = parse_spec(spec_in(root), base_dir=root)
    assert spec.data_root == root.resolve() and spec.model.path == (root / "model").resolve()


def test_a_link_inside_a_named_folder_that_leaves_the_root_is_refused_naming_the_file(root):
    link = root / "model" / "chat_template.jinja"
    link.unlink()
    link.symlink_to(SECRET)
    [(where, why)] = problems(root, spec_in(root))
    assert where == "model.path" and str(link) in why and "outside the data root" in why
    assert SECRET not in why  # where it leads is not echoed back


def test_links_that_stay_inside_the_root_are_fine_and_are_followed(root):
    (root / "shared").mkdir()
    shutil.move(root / "model" / "tokenizer.json", root / "shared" / "tokenizer.json")
    (root / "model" / "tokenizer.json").symlink_to(root / "shared" / "tokenizer.json")
    parse_spec(spec_in(root), base_dir=root)
    (root / "shared" / "evil").symlink_to(SECRET)  # a linked folder is walked too
    (root / "model" / "more").symlink_to(root / "shared")
    [(where, why)] = problems(root, spec_in(root))
    assert where == "model.path" and "shared/evil" in why


@pytest.mark.parametrize("name", ["/etc/passwd", "../train.jsonl", ""])
def test_an_index_naming_a_file_outside_its_folder_is_refused(root, name):
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": name}}
    (root / "model" / "model.safetensors.index.json").write_text(json.dumps(index))
    [(where, why)] = problems(root, spec_in(root))
    assert where == "model.path" and "model.safetensors.index.json" in why and repr(name) in why


def test_a_covariance_artifact_naming_files_elsewhere_is_refused(root):
    folder = root / "cov"
    folder.mkdir()
    (folder / "groups.json").write_text(json.dumps([{"group": "g", "modules": [], "dim": 4, "file": "/etc/passwd"}]))
    spec = spec_in(root, init={"method": "corda", "corda": {"covariance_from": "cov"}},
                   adapter={"method": "lora", "r": 4})
    spec["data"]["calibration"] = "train.jsonl"
    assert problems(root, spec) == [("init.corda.covariance_from", "groups.json names '/etc/passwd', which is not "
                                     f"a file inside {folder.resolve()}")]


def test_a_dataset_folder_with_a_link_out_and_a_fifo_are_refused(root):
    folder = root / "ds"
    folder.mkdir()
    (folder / "data-00000-of-00001.arrow").symlink_to(SECRET)
    spec = spec_in(root)
    spec["data"]["train"] = "ds"
    [(where, why)] = problems(root, spec)
    assert where == "data.train.path" and "outside the data root" in why
    (folder / "data-00000-of-00001.arrow").unlink()
    os.mkfifo(folder / "state.json")  # a reader would hang on it
    [(where, why)] = problems(root, spec)
    assert where == "data.train.path" and "not a regular file" in why


def test_outside_is_one_message_whether_the_path_exists_or_not(root):
    answers = []
    for path in ("/etc", "/no/such/folder"):
        spec = spec_in(root)
        spec["model"]["path"] = path
        [(_, why)] = problems(root, spec)
        answers.append(why.replace(path, "P"))
    assert answers[0] == answers[1] and "outside the data root" in answers[0]


def test_a_file_swapped_after_the_check_is_refused_where_it_is_read(root):
    from workers.data.tokenizer import load_tokenizer

    spec = parse_spec(spec_in(root), base_dir=root)
    template = root / "model" / "chat_template.jinja"
    template.unlink()
    template.symlink_to(SECRET)  # after validation, before the read
    with pytest.raises(Outside, match=r"chat_template\.jinja"):
        load_tokenizer(spec)
    with pytest.raises(Outside, match="leads outside the data root"):
        open_checked(root.resolve(), template, "model.path")


def test_a_job_name_with_a_trailing_newline_is_refused(root):
    [(where, _)] = problems(root, {**spec_in(root), "name": "x\n"})
    assert where == "name"


CODE_ADJACENT = {  # DeepSpeed would open these paths, or import these modules
    "flops_profiler": {"enabled": True, "output_file": "/tmp/pwned"},
    "torch_autocast": {"enabled": True, "lower_precision_safe_modules": ["os.system"]},
    "zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/etc"}},
}


def test_a_confined_job_may_set_only_allow_listed_deepspeed_keys(root):
    from workers.train.deepspeed_config import deepspeed_config

    fine = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "bf16": {"enabled": False},
            "zero_optimization": {"stage": 2, "overlap_comm": True, "offload_optimizer": {"device": "cpu"}}}
    (root / "ds.json").write_text(json.dumps(fine))
    spec = spec_in(root, train={"deepspeed_config": "ds.json"})
    assert deepspeed_config(parse_spec(spec, base_dir=root), 1)["zero_optimization"]["stage"] == 2

    (root / "ds.json").write_text(json.dumps({**fine, **CODE_ADJACENT}))
    [(where, why)] = problems(root, spec)
    assert where == "train.deepspeed_config"
    for named in ("flops_profiler", "torch_autocast", "zero_optimization.offload_param.device='nvme'",
                  "zero_optimization.offload_param.nvme_path"):
        assert named in why, why
    assert "zero_optimization.stage" not in why and "bf16" not in why

    # Validated, then rewritten before the worker reads it: the worker's read is checked too.
    (root / "ds.json").write_text(json.dumps(fine))
    checked = parse_spec(spec, base_dir=root)
    (root / "ds.json").write_text(json.dumps({**fine, **CODE_ADJACENT}))
    with pytest.raises(ValueError, match="flops_profiler"):
        deepspeed_config(checked, 1)


def test_without_a_data_root_the_deepspeed_json_is_used_verbatim(root):
    from workers.train.deepspeed_config import deepspeed_config

    (root / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, **CODE_ADJACENT}))
    spec = spec_in(root, train={"deepspeed_config": "ds.json"})
    del spec["data_root"]
    assert deepspeed_config(parse_spec(spec, base_dir=root), 1)["flops_profiler"]["output_file"] == "/tmp/pwned"


def test_a_save_to_disk_folder_naming_files_outside_it_is_refused(root):
    """datasets joins the file names its state.json lists to the folder unchecked: they go through `entry`."""
    import datasets

    from jobspecs.schema import DataSource
    from workers.data.records import load_records

    datasets.Dataset.from_dict({"prompt": ["p"], "response": ["r"]}).save_to_disk(str(root / "ds"))
    shutil.copy(root / "ds" / "data-00000-of-00001.arrow", root / "elsewhere.arrow")
    state = root / "ds" / "state.json"
    state.write_text(state.read_text().replace('"data-00000-of-00001.arrow"', '"../elsewhere.arrow"'))
    spec = spec_in(root)
    spec["data"]["train"] = "ds"
    [(where, why)] = problems(root, spec)
    assert where == "data.train.path" and why.startswith("state.json names '../elsewhere.arrow', which is not")
    with pytest.raises(Outside, match="which is not a file inside"):
        load_records(DataSource(path=root / "ds"))


def test_a_node_cache_inside_the_root_is_refused_however_it_is_spelled(root):
    """The job trusts its cache (verified copies, spill files): no user may write there."""
    for spelled in (root / "cache", root.parent / "elsewhere" / ".." / root.name / "cache"):
        [(where, why)] = problems(root, spec_in(root, cluster={"node_cache_dir": str(spelled)}))
        assert where == "cluster.node_cache_dir" and "is inside the data root" in why
    outside = parse_spec(spec_in(root, cluster={"node_cache_dir": str(root / ".." / "cache")}), base_dir=root)
    assert outside.cluster.node_cache_dir == root.parent / "cache"  # resolved


@pytest.mark.parametrize("path", ["a" * 5000, "/".join(["b" * 255] * 20)])
def test_a_path_the_filesystem_refuses_is_a_field_error(root, path):
    [(where, why)] = problems(root, spec_in(root, model={"path": path}))
    assert where == "model.path" and "File name too long" in why
