"""Remote jobs and the store: submit → first optimizer step, locally (embedded Ray) vs as a Ray job on a running
local head (`submit --address`, and through the gateway); and the store's upload throughput vs plain boto3.

    make bench      (or: pytest -s -m benchmark tests/benchmarks/test_bench_remote.py)

The head (`ray start --head`, token auth) is started before the clock runs, as a cluster is: the remote rows
measure what a user waits for after pressing enter. The S3 server (moto) runs in its own process, so the client
under test does not share its interpreter; both uploads send the same files to the same server, alternately.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path

import pytest
import requests

from jobspecs.schema import StorageSpec
from orchestrator.storage.artifacts import upload_artifacts
from tests.benchmarks.small_llama import build_model, token_samples
from tests.benchmarks.train_job import INTERMEDIATE, LAYERS, SEQ, VOCAB, spec_dict, submit_to_first_step
from tests.helpers import cli, write_spec
from tests.live_cluster import call, gateway, moto_server, ray_head, with_token
from workers.storage.store import S3Store

HIDDEN = 256  # the latency is orchestration, not compute: a smaller model than the training benchmark's
FIRST_STEP = re.compile(r"train: step 1/")


def _until_first_step(read_log, t0: float, timeout: float = 300) -> float:
    while time.perf_counter() - t0 < timeout:
        if FIRST_STEP.search(read_log()):
            return time.perf_counter() - t0
        time.sleep(0.25)
    raise AssertionError(f"no first step within {timeout} s:\n{read_log()[-3000:]}")


def latencies(tmp: Path, model: Path, data: Path) -> dict[str, float]:
    tmp.mkdir(parents=True, exist_ok=True)
    out = {"local": submit_to_first_step(tmp / "local", model, data)[1]}
    with ray_head(tmp, num_cpus=2) as head:
        spec = write_spec(tmp / "job.yaml", spec_dict(model, data, tmp / "store", 1, 3))
        auth = {"Authorization": f"Bearer {head.token}"}
        t0 = time.perf_counter()
        job_id = cli(tmp / "state", "submit", spec, "--address", head.address, env=with_token(head.token),
                     check=True).stdout.strip()
        out["address"] = _until_first_step(
            lambda: requests.get(f"{head.address}/api/jobs/{job_id}/logs", headers=auth, timeout=30).json()["logs"],
            t0)
        _wait_ended(lambda: requests.get(f"{head.address}/api/jobs/{job_id}", headers=auth, timeout=30)
                    .json()["status"] in ("SUCCEEDED", "FAILED", "STOPPED"))
        gw_root = tmp / "gateway"
        gw_root.mkdir()
        with gateway(head, gw_root, data_root=model.parent, storage={"uri": f"file://{tmp / 'gw-store'}"}) as gw:
            body = {k: v for k, v in spec_dict(model, data, tmp / "unused", 1, 3).items() if k != "storage"}
            t0 = time.perf_counter()
            job_id = call(gw, "POST", "/v1/jobs", json={"spec": body}).json()["job_id"]
            out["gateway"] = _until_first_step(lambda: call(gw, "GET", f"/v1/jobs/{job_id}/logs").text, t0)
            _wait_ended(lambda: call(gw, "GET", f"/v1/jobs/{job_id}").json()["state"] in ("SUCCEEDED", "FAILED"))
    return out


def _wait_ended(ended, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ended():
        assert time.monotonic() < deadline
        time.sleep(0.5)


def upload_throughput(tmp: Path, rounds: int = 3) -> dict[str, float]:
    """MiB/s of the store's upload (sha256 per file + upload + manifest) vs boto3 `upload_file` of the same files."""
    import boto3

    staging = tmp / "staging"
    files = {"merged/model.safetensors": 96, "residual_base/model.safetensors": 64, "adapter/adapter.safetensors": 16}
    files |= {f"report/plot{i}.png": 0.25 for i in range(8)}
    for rel, mib in files.items():
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_bytes(os.urandom(int(mib * 1024 * 1024)))
    total_mib = sum(files.values())
    with moto_server() as endpoint:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket="bench")
        store = S3Store(StorageSpec(uri="s3://bench/ours", endpoint_url=endpoint, region="us-east-1"))
        best = {"boto3": float("inf"), "store": float("inf")}
        for r in range(rounds):
            t0 = time.perf_counter()
            for rel in files:
                client.upload_file(str(staging / rel), "bench", f"plain/{r}/{rel}")
            best["boto3"] = min(best["boto3"], time.perf_counter() - t0)
            t0 = time.perf_counter()
            upload_artifacts(store, f"job-{r}-{secrets.token_hex(2)}", staging)
            best["store"] = min(best["store"], time.perf_counter() - t0)
    return {name: total_mib / seconds for name, seconds in best.items()} | {"total_mib": total_mib,
                                                                           "files": len(files)}


@pytest.mark.benchmark
def test_bench_remote(tmp_path):
    model, data = tmp_path / "model", tmp_path / "train.jsonl"
    build_model(model, HIDDEN, LAYERS, INTERMEDIATE, VOCAB, SEQ)
    token_samples(data, 48, SEQ, VOCAB)
    lat = latencies(tmp_path / "latency", model, data)
    up = upload_throughput(tmp_path / "upload")
    rows = [
        ("submit → first optimizer step, local (embedded Ray started by the job) (s)", f"{lat['local']:.1f}",
         "1.00×"),
        ("submit → first optimizer step, `submit --address` to a running Ray head (s)", f"{lat['address']:.1f}",
         f"{lat['address'] / lat['local']:.2f}×"),
        ("submit → first optimizer step, through the gateway to a running Ray head (s)", f"{lat['gateway']:.1f}",
         f"{lat['gateway'] / lat['local']:.2f}×"),
        (f"upload {up['total_mib']:.0f} MiB in {up['files']} files, boto3 upload_file (MiB/s)", f"{up['boto3']:,.0f}",
         "1.00×"),
        ("upload, peftfleet store: sha256 + upload + manifest (MiB/s)", f"{up['store']:,.0f}",
         f"{up['store'] / up['boto3']:.2f}× (target ≥ 0.9×)"),
    ]
    print(f"\nRemote benchmark: Llama hidden {HIDDEN}, {LAYERS} layers, 1 worker ZeRO-2, 2-CPU Ray; S3 = moto server "
          "in its own process on loopback")
    print("| measure | value | ratio |\n|---|---|---|")
    for row in rows:
        print(f"| {' | '.join(row)} |")
    assert up["store"] > 0 and lat["gateway"] > 0
