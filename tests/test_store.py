"""The artifact store on both backends: local folder and a real S3 HTTP server (moto) through boto3."""

from __future__ import annotations

import hashlib
import json

import boto3
import pytest

from jobspecs.schema import StorageSpec
from orchestrator.storage.artifacts import (
    IncompleteJob,
    IntegrityError,
    fetch_artifacts,
    job_key,
    read_manifest,
    upload_artifacts,
)
from tests.fault_proxy import FaultProxy
from tests.helpers import MiB, make_staging
from workers.storage.store import S3Store, StoreError, open_store, safe_relpath


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return open_store(StorageSpec(uri=f"file://{tmp_path / 'store'}"))
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("bucket")
    return open_store(StorageSpec(uri=f"s3://{bucket}/team/runs", endpoint_url=endpoint, region="us-east-1"))


def test_round_trip_with_multipart_file(store, tmp_path):
    staging = make_staging(tmp_path / "staging", big_mib=17)
    manifest = upload_artifacts(store, "job-1", staging)
    assert set(manifest.artifacts) == {"adapter", "report", "residual_base"}
    assert {f.path for f in manifest.files} == {
        "artifacts/adapter/adapter_config.json", "artifacts/adapter/adapter_model.safetensors",
        "artifacts/report/metrics.jsonl", "artifacts/residual_base/model.safetensors"}

    fetched = fetch_artifacts(store, "job-1", tmp_path / "out")
    assert len(fetched) == 4
    for f in manifest.files:
        local = staging / f.path.removeprefix("artifacts/")
        assert f.sha256 == sha(local) == sha(tmp_path / "out" / f.path.removeprefix("artifacts/"))
        assert f.size == local.stat().st_size

    only = fetch_artifacts(store, "job-1", tmp_path / "only", kind="adapter")
    assert sorted(p.name for p in only) == ["adapter_config.json", "adapter_model.safetensors"]


def test_large_file_really_goes_multipart(s3_endpoint, bucket, tmp_path):
    store = open_store(StorageSpec(uri=f"s3://{bucket}", endpoint_url=s3_endpoint, multipart_threshold_mb=8))
    upload_artifacts(store, "job-mp", make_staging(tmp_path / "staging", big_mib=17))
    head = boto3.client("s3", endpoint_url=s3_endpoint).head_object(
        Bucket=bucket, Key="jobs/job-mp/artifacts/residual_base/model.safetensors")
    assert head["ETag"].strip('"').endswith("-3")  # 17 MiB in 8 MiB parts: a 3-part upload
    assert head["ContentLength"] == 17 * MiB + 12345


def test_manifest_is_written_last_and_lists_everything(store, tmp_path):
    upload_artifacts(store, "job-2", make_staging(tmp_path / "staging"))
    keys = store.list(job_key("job-2"))
    assert "jobs/job-2/manifest.json" in keys
    manifest = json.loads(store.get_bytes("jobs/job-2/manifest.json"))
    listed = {f"jobs/job-2/{f['path']}" for f in manifest["files"]}
    assert listed | {"jobs/job-2/manifest.json"} == set(keys)


def test_fetch_refuses_job_without_manifest(store, tmp_path):
    store.put_bytes("jobs/job-3/artifacts/adapter/adapter_config.json", b"{}")
    with pytest.raises(IncompleteJob, match="has no manifest"):
        fetch_artifacts(store, "job-3", tmp_path / "out")


def test_fetch_detects_corrupted_file(store, tmp_path):
    upload_artifacts(store, "job-4", make_staging(tmp_path / "staging"))
    key = "jobs/job-4/artifacts/adapter/adapter_model.safetensors"
    tampered = bytearray(store.get_bytes(key))
    tampered[100] ^= 0xFF
    store.put_bytes(key, bytes(tampered))  # same size, one bit flipped
    with pytest.raises(IntegrityError, match=r"nothing of kind\(s\) adapter was written \(verified and written: "
                                             r"report\):\n  .*adapter_model\.safetensors: expected 4096 bytes"):
        fetch_artifacts(store, "job-4", tmp_path / "out")
    # a kind is written whole or not at all: no adapter/ without its weights, no staging left; other kinds are kept
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["report"]
    assert (out / "report" / "metrics.jsonl").exists()


def test_refetch_replaces_a_kind_whole(store, tmp_path):
    upload_artifacts(store, "job-6", make_staging(tmp_path / "staging"))
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "stale.bin").write_bytes(b"from an older fetch")
    fetched = fetch_artifacts(store, "job-6", out, kind="adapter")
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(fetched) == sorted((out / "adapter").iterdir())


@pytest.mark.parametrize("name", ["../escape", "a/../../b", "/etc/passwd", "a//b/..", "", "a\\b", "./a"])
def test_path_traversal_is_refused(name):
    with pytest.raises(ValueError):
        safe_relpath(name)


def test_traversal_in_keys_and_manifests_is_refused(store, tmp_path):
    with pytest.raises(ValueError):
        store.put_bytes("jobs/x/../../outside", b"x")
    with pytest.raises(ValueError):
        job_key("../other-job", "manifest.json")
    evil = {"job_id": "job-5", "created_at": "now", "artifacts": {"adapter": "artifacts/adapter"},
            "files": [{"path": "../../../tmp/pwned", "size": 1, "sha256": "0" * 64, "kind": "adapter"}]}
    store.put_bytes("jobs/job-5/manifest.json", json.dumps(evil).encode())
    with pytest.raises(IntegrityError, match="escapes its folder"):
        fetch_artifacts(store, "job-5", tmp_path / "out")
    assert not (tmp_path / "tmp" / "pwned").exists()


def test_upload_failing_midway_leaves_no_manifest(s3_endpoint, bucket, tmp_path):
    port = int(s3_endpoint.rsplit(":", 1)[1])
    proxy = FaultProxy(port, break_after_bytes=6 * MiB)  # the connection dies inside the 17 MiB file
    try:
        store = open_store(StorageSpec(uri=f"s3://{bucket}/runs", endpoint_url=proxy.endpoint, max_attempts=2))
        with pytest.raises(StoreError, match=r"residual_base/model.safetensors: failed after 2 attempts"):
            upload_artifacts(store, "job-6", make_staging(tmp_path / "staging", big_mib=17))
    finally:
        proxy.close()
    direct = open_store(StorageSpec(uri=f"s3://{bucket}/runs", endpoint_url=s3_endpoint))
    assert not direct.exists("jobs/job-6/manifest.json")
    assert "jobs/job-6/artifacts/adapter/adapter_config.json" in direct.list("jobs/job-6")  # it did start
    with pytest.raises(IncompleteJob):
        read_manifest(direct, "job-6")


def test_presigned_urls_name_the_public_endpoint_when_one_is_set(s3_endpoint, bucket):
    import urllib.parse

    import requests

    inside = S3Store(StorageSpec(uri=f"s3://{bucket}/pub", endpoint_url=s3_endpoint, region="us-east-1"))
    inside.put_bytes("a/b.txt", b"hello")
    assert requests.get(inside.presigned_get("a/b.txt"), timeout=10).content == b"hello"
    public = S3Store(StorageSpec(uri=f"s3://{bucket}/pub", endpoint_url=s3_endpoint, region="us-east-1",
                                 public_endpoint_url="https://s3.example.com"))
    url = urllib.parse.urlsplit(public.presigned_get("a/b.txt", 60))
    assert (url.scheme, url.netloc, url.path) == ("https", "s3.example.com", f"/{bucket}/pub/a/b.txt")
    assert "Signature=" in url.query
