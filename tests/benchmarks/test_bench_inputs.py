"""Inputs from a bucket: submit → first optimizer step with the model and data in S3 (cold node cache, then warm)
vs on local disk, and what one node downloads (GETs per object, header reads, listings, bytes vs the model).

    make bench      (or: pytest -s -m benchmark tests/benchmarks/test_bench_inputs.py)

The S3 server (moto) runs in its own process on loopback, behind a proxy that counts requests; the job runs on an
embedded Ray (one node). The model is saved in shards, as real checkpoints are.
"""

from __future__ import annotations

import os
from collections import Counter

import boto3
import pytest

from tests.benchmarks.small_llama import build_model, token_samples
from tests.benchmarks.train_job import HIDDEN, INTERMEDIATE, LAYERS, SEQ, VOCAB, submit_to_first_step
from tests.fault_proxy import FaultProxy
from tests.helpers import upload_folder
from tests.live_cluster import moto_server


def counted(proxy: FaultProxy) -> dict:
    """Whole-object GETs per key, ranged reads from byte 0 (safetensors headers), listings."""
    gets, headers, lists = Counter(), 0, 0
    for line, rng in proxy.requests:
        method, target = line.split()[:2]
        if method != "GET":
            continue
        if "?" in target:
            lists += 1
        elif rng is not None and rng.startswith("bytes=0-"):
            headers += 1
        else:
            gets[target.split("/", 2)[2]] += 1
    return {"gets": gets, "headers": headers, "lists": lists}


@pytest.mark.benchmark
def test_bench_inputs(tmp_path):
    model, data = tmp_path / "model", tmp_path / "train.jsonl"
    build_model(model, HIDDEN, LAYERS, INTERMEDIATE, VOCAB, SEQ, max_shard_size="20MB")
    token_samples(data, 48, SEQ, VOCAB)
    model_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    local = submit_to_first_step(tmp_path / "local", model, data)
    with moto_server() as endpoint:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket="bench")
        upload_folder(client, "bench", "model", model)
        client.upload_file(str(data), "bench", "data/train.jsonl")
        proxy = FaultProxy(int(endpoint.rsplit(":", 1)[1]))
        env = {**os.environ, "AWS_ENDPOINT_URL_S3": proxy.endpoint}
        cache = tmp_path / "node-cache"
        try:
            cold = submit_to_first_step(tmp_path / "cold", "s3://bench/model", "s3://bench/data/train.jsonl", env,
                                        node_cache_dir=str(cache))
            first = counted(proxy)
            proxy.requests.clear()
            warm = submit_to_first_step(tmp_path / "warm", "s3://bench/model", "s3://bench/data/train.jsonl", env,
                                        node_cache_dir=str(cache))
            second = counted(proxy)
        finally:
            proxy.close()
    shards = len(list(model.glob("*.safetensors")))
    weights = {k: n for k, n in first["gets"].items() if k.endswith(".safetensors")}
    rows = [
        ("submit → first optimizer step, model and data on local disk (s)", f"{local[1]:.1f}", "1.00×"),
        ("submit → first optimizer step, model and data in S3, cold node cache (s)", f"{cold[1]:.1f}",
         f"{cold[1] / local[1]:.2f}×"),
        ("submit → first optimizer step, model and data in S3, warm node cache (s)", f"{warm[1]:.1f}",
         f"{warm[1] / local[1]:.2f}×"),
        (f"whole-object GETs of the {shards} weight shards, cold (per shard)", str(sum(weights.values())),
         f"max {max(weights.values())} per shard"),
        ("whole-object GETs of every other object (config, tokenizer, index, data), cold",
         str(sum(first["gets"].values()) - sum(weights.values())), ""),
        ("ranged header reads / listings, cold", f"{first['headers']} / {first['lists']}", ""),
        ("whole-object GETs, warm: weights / other (the node's verified copies are reused; the submitter's and the "
         "driver's validation read config.json themselves)",
         f"{sum(n for k, n in second['gets'].items() if k.endswith('.safetensors'))} / "
         f"{sum(n for k, n in second['gets'].items() if not k.endswith('.safetensors'))}",
         ", ".join(sorted(second["gets"]))),
    ]
    print(f"\nInputs benchmark: Llama hidden {HIDDEN}, {LAYERS} layers ({model_bytes / 2**20:.0f} MiB in {shards} "
          "shards), 1 worker ZeRO-2, embedded Ray (1 node); S3 = moto in its own process on loopback")
    print("| measure | value | ratio |\n|---|---|---|")
    for row in rows:
        print(f"| {' | '.join(row)} |")
    assert max(weights.values()) == 1 and len(weights) == shards
    assert not [k for k in second["gets"] if k.endswith(".safetensors")]
