"""Inputs that live only in a bucket: validated with a listing (errors name the field and the key), mirrored into
the node cache once per node, checked, refetched when damaged, resumed after a cut-off, and a stage that cannot
get them fails naming the key. Real boto3 against moto's HTTP server, through a proxy that counts and breaks."""

from __future__ import annotations

import threading
from pathlib import Path

import boto3
import pytest
import torch

from jobspecs import SpecError, parse_spec
from tests.fault_proxy import FaultProxy
from tests.helpers import tiny_spec, upload_folder
from workers.storage.inputs import local, on_node, present, read_head
from workers.storage.node_cache import NodeCache
from workers.storage.store import StoreError
from workers.storage.weights import tensor_infos

SAFETENSORS = "model.safetensors"


@pytest.fixture
def remote(assets, s3_endpoint, bucket, monkeypatch):
    """The tiny model and its data in a bucket, the endpoint from the AWS chain's environment (as MinIO users set
    it), through a proxy that records every request."""
    proxy = FaultProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    upload_folder(client, bucket, "models/tiny", assets / "tiny-llama")
    for name in ("train.jsonl", "eval.jsonl"):
        client.upload_file(str(assets / name), bucket, f"data/{name}")
    yield bucket, client, proxy
    proxy.close()


def gets(proxy: FaultProxy, key: str) -> list[str | None]:
    """The Range header of every GET of `key` (None: the whole object)."""
    return [rng for line, rng in proxy.requests if line.startswith("GET ") and line.split()[1].split("?")[0]
            .endswith(f"/{key}")]


def bucket_spec(assets, tmp_path, bucket: str, **changes) -> dict:
    raw = tiny_spec(assets, f"file://{tmp_path / 'store'}")
    raw["model"]["path"] = f"s3://{bucket}/models/tiny"
    raw["data"]["train"] = f"s3://{bucket}/data/train.jsonl"
    raw["data"]["eval"] = f"s3://{bucket}/data/eval.jsonl"
    for section, value in changes.items():
        raw[section] = {**raw.get(section, {}), **value}
    return raw


def problems(raw: dict) -> dict[str, str]:
    with pytest.raises(SpecError) as err:
        parse_spec(raw)
    return dict(err.value.problems)


def test_a_spec_whose_inputs_are_in_a_bucket_validates_and_names_what_is_missing(remote, assets, tmp_path):
    bucket, client, _ = remote
    spec = parse_spec(bucket_spec(assets, tmp_path, bucket))
    assert spec.model.path == f"s3://{bucket}/models/tiny" and spec.model.tokenizer_path == spec.model.path

    missing = bucket_spec(assets, tmp_path, bucket)
    missing["data"]["train"] = f"s3://{bucket}/data/nope.jsonl"
    missing["model"]["path"] = f"s3://{bucket}/models/none"
    found = problems(missing)
    assert found["model.path"] == f"no objects under s3://{bucket}/models/none/"
    assert found["data.train.path"].startswith(f"no data file s3://{bucket}/data/nope.jsonl")

    client.upload_file(str(assets / "tiny-llama" / "config.json"), bucket, "models/bin-only/config.json")
    client.put_object(Bucket=bucket, Key="models/bin-only/pytorch_model.bin", Body=b"0")
    client.put_object(Bucket=bucket, Key="data/train.csv", Body=b"a,b\n")
    client.put_object(Bucket=bucket, Key="cov/group.safetensors", Body=b"0")
    bad = bucket_spec(assets, tmp_path, bucket, init={"method": "corda", "corda": {"covariance_from": f"s3://{bucket}/cov"}})
    bad["model"]["path"] = f"s3://{bucket}/models/bin-only"
    bad["model"]["tokenizer"] = f"s3://{bucket}/models/tiny"
    bad["data"]["train"] = f"s3://{bucket}/data/train.csv"
    bad["data"]["calibration"] = f"s3://{bucket}/data/train.jsonl"
    bad["adapter"] = {"method": "lora"}
    found = problems(bad)
    assert "has no model.safetensors" in found["model.path"] and "pytorch_model.bin" in found["model.path"]
    assert found["data.train.path"].startswith("unsupported data file type '.csv'")
    assert found["init.corda.covariance_from"] == f"s3://{bucket}/cov is not a `covariance` artifact (no s3://{bucket}/cov/groups.json)"

    no_tokenizer = bucket_spec(assets, tmp_path, bucket)
    no_tokenizer["model"]["tokenizer"] = f"s3://{bucket}/data"
    assert "has no tokenizer" in str(problems(no_tokenizer))
    assert "not a valid S3 bucket name" in problems(bucket_spec(assets, tmp_path, "A_B"))["model.path"]


def test_inputs_are_fetched_once_per_node_headers_by_one_ranged_get(remote, assets, tmp_path):
    bucket, _, proxy = remote
    spec = parse_spec(bucket_spec(assets, tmp_path, bucket, cluster={"node_cache_dir": str(tmp_path / "node")}))
    proxy.requests.clear()
    mirrors = []

    def a_process():  # each localizes the spec and reads the model's header, then its weights and its data
        inputs = on_node(spec)
        tensor_infos(inputs.model.path)
        mirrors.append(inputs)

    threads = [threading.Thread(target=a_process) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    inputs = mirrors[0]
    assert not (inputs.model.path / SAFETENSORS).exists()  # listed; its header read; its tensors not fetched
    assert len(gets(proxy, f"models/tiny/{SAFETENSORS}")) == 1  # one ranged GET of the header for the node
    assert gets(proxy, "models/tiny/config.json") == [None] and gets(proxy, "models/tiny/tokenizer.json") == [None]
    assert gets(proxy, "data/train.jsonl") == []  # data files too are fetched when read

    for path in (inputs.model.path / SAFETENSORS, inputs.data.train.path):
        assert present(path).read_bytes() == present(path).read_bytes()
    assert gets(proxy, f"models/tiny/{SAFETENSORS}")[1:] == [None] and gets(proxy, "data/train.jsonl") == [None]
    assert (inputs.model.path / SAFETENSORS).read_bytes() == (assets / "tiny-llama" / SAFETENSORS).read_bytes()
    assert read_head(inputs.model.path / SAFETENSORS, 0, 8) == (assets / "tiny-llama" / SAFETENSORS).read_bytes()[:8]

    # a damaged copy (same size, other bytes) is noticed and fetched again
    local_copy = inputs.data.train.path
    local_copy.write_bytes(bytes(local_copy.stat().st_size))
    assert present(local_copy).read_bytes() == (assets / "train.jsonl").read_bytes()
    assert gets(proxy, "data/train.jsonl") == [None, None]


def test_a_cut_off_download_resumes_and_an_outage_fails_naming_the_key(remote, assets, tmp_path, s3_endpoint):
    bucket = remote[0]
    size = (assets / "tiny-llama" / SAFETENSORS).stat().st_size
    cut = FaultProxy(int(s3_endpoint.rsplit(":", 1)[1]), fault="cut", times=2, match=SAFETENSORS, cut_bytes=150_000)
    cache = NodeCache(tmp_path / "node", attempts=3, timeout_s=5)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("AWS_ENDPOINT_URL_S3", cut.endpoint)
            model = local(f"s3://{bucket}/models/tiny", cache)
            fetched = present(model / SAFETENSORS)
        assert fetched.read_bytes() == (assets / "tiny-llama" / SAFETENSORS).read_bytes()
        ranges = [rng for line, rng in cut.requests if SAFETENSORS in line]
        assert len(ranges) == 3 and ranges[0] is None  # cut twice, each time resumed where the copy ended
        starts = [int(r.removeprefix("bytes=").split("-")[0]) for r in ranges[1:]]
        assert 0 < starts[0] < starts[1] < size
    finally:
        cut.close()

    down = FaultProxy(int(s3_endpoint.rsplit(":", 1)[1]), fault="cut", match=SAFETENSORS, cut_bytes=100_000,
                      down_after_cut=True)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("AWS_ENDPOINT_URL_S3", down.endpoint)
            model = local(f"s3://{bucket}/models/tiny", NodeCache(tmp_path / "other", attempts=2, timeout_s=2))
            with pytest.raises(StoreError, match=rf"download s3://{bucket}/models/tiny/{SAFETENSORS}: failed after 2"):
                present(model / SAFETENSORS)
        part = Path(model) / f".{SAFETENSORS}.part"
        assert 0 < part.stat().st_size < size and not (Path(model) / SAFETENSORS).exists()  # kept to resume
    finally:
        down.close()


def test_a_layer_wise_walk_fetches_only_the_shards_of_the_blocks_it_reads(remote, assets, tmp_path):
    from tests.test_inputs_cluster import sharded_model
    from workers.model.block_walk import BlockWalk

    bucket, client, proxy = remote
    upload_folder(client, bucket, "models/sharded", sharded_model(assets, tmp_path / "sharded"))
    walk = BlockWalk(local(f"s3://{bucket}/models/sharded", NodeCache(tmp_path / "node")), torch.float32, "cpu")
    where = {name: info.file for name, info in tensor_infos(walk.path).items()}
    block = [n for n in where if n.startswith(f"{walk.prefix}.1.")]
    walk.read(block, None, None)
    fetched = sorted(p.name for p in walk.path.glob("*.safetensors"))
    assert fetched == sorted({where[n] for n in block}) and len(set(where.values())) > len(fetched)
    assert all(rng is None for line, rng in proxy.requests if any(f in line for f in fetched) and rng is None)


def test_a_listing_is_trusted_only_where_this_node_wrote_it(remote, assets, tmp_path):
    """A `.peftfleet-listing.json` a user puts in a folder they name (pointing at another user's bucket, naming
    files outside the folder), one copied from a real mirror, or a real one edited: no listing at all."""
    import json
    import shutil

    from workers.data.records import data_files
    from workers.storage.inputs import LISTING, confinement_root, listed_files

    bucket, client, proxy = remote
    client.put_object(Bucket=bucket, Key="bob/train.jsonl", Body=b'{"prompt": "BOB-SECRET", "response": "x"}\n')
    cache = NodeCache(tmp_path / "node")
    mirror = local(f"s3://{bucket}/models/tiny", cache)
    real = json.loads((mirror / LISTING).read_text())
    forged_folder = tmp_path / "mine"
    forged_folder.mkdir()
    (forged_folder / "a.jsonl").write_text('{"prompt": "mine", "response": "x"}\n')
    (tmp_path / "outside.jsonl").write_text("{}\n")
    forged = {"uri": f"s3://{bucket}/bob", "cache": cache.settings(), "files": {"train.jsonl": [52, "", ""],
                                                                              "../outside.jsonl": [3, "", ""]}}
    copied = tmp_path / "copied"
    shutil.copytree(mirror, copied)
    tampered = {**real, "files": {**real["files"], "../../etc/passwd": [1, "", ""]}}
    proxy.requests.clear()
    for folder, listing in ((forged_folder, forged), (forged_folder, {**forged, "mac": real["mac"]}),
                            (copied, None), (mirror, tampered)):
        if listing is not None:
            (folder / LISTING).write_text(json.dumps(listing))
        names = listed_files(folder)
        assert "train.jsonl" not in names and not any(".." in n for n in names), names
        assert confinement_root(tmp_path / "root", folder) == tmp_path / "root"  # an ordinary folder
        assert present(folder / "config.json") == folder / "config.json"  # nothing fetched for it
    assert [p.name for p in data_files(forged_folder)] == ["a.jsonl"]
    assert not [line for line, _ in proxy.requests if "/bob/" in line]  # bob's bucket was never asked

    # A real listing is read back; its bucket must be under the job's input prefixes, like every input.
    fresh = local(f"s3://{bucket}/models/tiny", cache)
    assert "model.safetensors" in listed_files(fresh) and confinement_root(None, fresh) == fresh.resolve()
    fenced = NodeCache(tmp_path / "fenced", prefixes=[f"s3://{bucket}/data"])
    with pytest.raises(PermissionError, match="not under the job's input_prefixes"):
        local(f"s3://{bucket}/models/tiny", fenced)
    data = local(f"s3://{bucket}/data/train.jsonl", fenced)
    assert present(data).read_bytes() == (assets / "train.jsonl").read_bytes()

