"""The S3 fault matrix: artifact uploads through a loopback proxy that drops connections, answers 500 / 503 or
stalls, in front of a real S3 server (moto) and real boto3. A transient fault is retried and the upload completes
byte for byte; a permanent one fails the upload naming the key and the cause, and no manifest is written.
(A tampered S3 object failing its sha256 on fetch: tests/test_store.py::test_fetch_detects_corrupted_file[s3].)"""

from __future__ import annotations

import re

import boto3
import pytest

from jobspecs.schema import StorageSpec
from orchestrator.storage.artifacts import IncompleteJob, fetch_artifacts, read_manifest, upload_artifacts
from tests.fault_proxy import REQUEST_FAULTS, FaultProxy
from tests.helpers import make_staging
from workers.storage.store import StoreError, open_store

MAX_ATTEMPTS = 2  # S3Store's whole-operation attempts; botocore gets the same number as *retries*, so:
BOTO_TRIES = MAX_ATTEMPTS + 1  # tries per request inside one S3Store attempt
BIG = "artifacts/residual_base/model.safetensors"  # 11 MiB: three parts of 5 MiB (S3's smallest part size)

# Which request a fault hits: the first file's PutObject, one part of the multipart file, the manifest's PutObject.
TARGETS = {"first-file": "adapter_config.json", "part": "partNumber=2", "manifest": "manifest.json"}
# What each fault looks like once botocore gives up on it.
CAUSES = {
    "drop": r"Connection was closed|Connection reset|Broken pipe",
    "500": r"InternalError",
    "503": r"SlowDown",
    "stall": r"Read timeout",
}


def storage(bucket: str, endpoint: str, fault: str | None = None) -> StorageSpec:
    # A stalled request costs the whole timeout on every try: keep it short (moto answers in milliseconds; a
    # request that is merely slow is retried too).
    return StorageSpec(uri=f"s3://{bucket}/runs", endpoint_url=endpoint, multipart_threshold_mb=5,
                       max_attempts=MAX_ATTEMPTS, timeout_s=0.5 if fault == "stall" else 60)


@pytest.fixture
def faulty(s3_endpoint):
    """Starts fault proxies in front of the S3 server; closes them after the test."""
    proxies: list[FaultProxy] = []

    def start(fault: str, times: int | None, match: str) -> FaultProxy:
        proxies.append(FaultProxy(int(s3_endpoint.rsplit(":", 1)[1]), fault=fault, times=times, match=match))
        return proxies[-1]

    yield start
    for proxy in proxies:
        proxy.close()


def open_uploads(s3_endpoint: str, bucket: str) -> list[dict]:
    return boto3.client("s3", endpoint_url=s3_endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads", [])


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("fault", REQUEST_FAULTS)
def test_transient_fault_is_retried_and_the_upload_completes(fault, target, faulty, s3_endpoint, bucket, tmp_path):
    staging = make_staging(tmp_path / "staging", big_mib=11)
    # As many faults in a row as botocore tries a request: its own retries run out, S3Store's retry finishes.
    proxy = faulty(fault, times=BOTO_TRIES, match=TARGETS[target])
    manifest = upload_artifacts(open_store(storage(bucket, proxy.endpoint, fault)), "job-t", staging)
    assert len(proxy.injected) == BOTO_TRIES, proxy.injected

    clean = open_store(storage(bucket, s3_endpoint))
    assert read_manifest(clean, "job-t") == manifest
    fetched = fetch_artifacts(clean, "job-t", tmp_path / "out")  # checks every file's size and sha256
    assert len(fetched) == len(manifest.files) == 4
    for entry in manifest.files:
        rel = entry.path.removeprefix("artifacts/")
        assert (tmp_path / "out" / rel).read_bytes() == (staging / rel).read_bytes()
    head = boto3.client("s3", endpoint_url=s3_endpoint).head_object(Bucket=bucket, Key=f"runs/jobs/job-t/{BIG}")
    assert head["ETag"].strip('"').endswith("-3")  # it really went up in parts
    assert open_uploads(s3_endpoint, bucket) == []  # the multipart upload that failed was aborted, not left behind


@pytest.mark.parametrize("fault", REQUEST_FAULTS)
def test_permanent_fault_fails_the_upload_and_writes_no_manifest(fault, faulty, s3_endpoint, bucket, tmp_path):
    staging = make_staging(tmp_path / "staging", big_mib=11)
    proxy = faulty(fault, times=None, match=TARGETS["part"])
    key = re.escape(f"upload s3://{bucket}/runs/jobs/job-p/{BIG}: failed after {MAX_ATTEMPTS} attempts: ")
    with pytest.raises(StoreError, match=rf"^{key}.*({CAUSES[fault]})"):
        upload_artifacts(open_store(storage(bucket, proxy.endpoint, fault)), "job-p", staging)
    assert len(proxy.injected) == MAX_ATTEMPTS * BOTO_TRIES, proxy.injected  # every try of both layers hit it

    clean = open_store(storage(bucket, s3_endpoint))
    assert not clean.exists("jobs/job-p/manifest.json")
    with pytest.raises(IncompleteJob):
        fetch_artifacts(clean, "job-p", tmp_path / "out")
    uploaded = clean.list("jobs/job-p")
    assert "jobs/job-p/artifacts/adapter/adapter_config.json" in uploaded  # the files before it did go up
    assert f"jobs/job-p/{BIG}" not in uploaded
    assert open_uploads(s3_endpoint, bucket) == []
