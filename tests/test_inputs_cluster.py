"""A job whose model and data live only in a bucket, on two simulated nodes that share no folder.

Each node has its own temp folder (so its own node cache) and reaches the bucket through its own proxy, which
counts what that node downloads; the driver runs in a private mount namespace (a tmpfs no other process sees)
with a proxy of its own. The spec author's copies of the model and data are deleted before the job starts. The
job (layer-wise CorDA, two training workers one per node streaming the training set, export with merges) must
succeed, each object must be downloaded at most once per node, the driver must fetch no weights (headers only),
and each streamed training file must be fetched by the one node whose worker drew it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import boto3
import pytest

from jobspecs import dump_spec, parse_spec
from orchestrator.control.jobs import JobRecord, new_record
from orchestrator.storage.artifacts import read_manifest
from tests.corda_helpers import ALPHA, TARGETS, R
from tests.fault_proxy import FaultProxy
from tests.helpers import cli, tiny_spec, upload_folder, write_spec
from workers.storage.store import open_store

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def sharded_model(assets: Path, out: Path) -> Path:
    """The tiny model saved in several safetensors shards (about one decoder block each), with its tokenizer."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(assets / "tiny-llama").save_pretrained(out, max_shard_size="150KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(assets / "tiny-llama" / name, out / name)
    return out


def downloads(proxy: FaultProxy) -> Counter:
    """Whole-object GETs per key (ranged reads from byte 0 of a header are not counted: they are headers)."""
    seen: Counter = Counter()
    for line, rng in proxy.requests:
        method, target = line.split()[:2]
        if method == "GET" and "?" not in target and (rng is None or not rng.startswith("bytes=0-")):
            seen[target.split("/", 2)[2]] += 1
    return seen


@pytest.fixture
def nodes(tmp_path, s3_endpoint):
    from ray.cluster_utils import Cluster

    port = int(s3_endpoint.rsplit(":", 1)[1])
    proxies = [FaultProxy(port) for _ in range(4)]  # node 0, node 1, the driver, the head node
    temps = [tmp_path / f"node-{i}-tmp" for i in ("0", "1", "head")]
    for temp in temps:
        temp.mkdir()

    def node_env(i: int) -> dict:
        return {"TMPDIR": str(temps[i]), "AWS_ENDPOINT_URL_S3": proxies[i if i < 2 else 3].endpoint}

    # The head node has no CPU but runs the CPU-less reducers, which read weights: like every pod of a real
    # cluster it has the bucket's endpoint and a cache of its own.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "env_vars": node_env(2)})
    for i in range(2):
        cluster.add_node(num_cpus=1, env_vars=node_env(i))
    yield cluster, proxies, temps[:2]
    cluster.shutdown()
    for proxy in proxies:
        proxy.close()


def test_a_job_reading_only_from_a_bucket_runs_on_nodes_that_share_no_folder(nodes, assets, tmp_path, s3_endpoint,
                                                                              bucket):
    cluster, proxies, temps = nodes
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    author = tmp_path / "author"  # the spec author's files: uploaded, then gone
    upload_folder(client, bucket, "models/tiny", sharded_model(assets, author / "model"))
    lines = (assets / "train.jsonl").read_text().splitlines()
    for k in range(8):
        client.put_object(Bucket=bucket, Key=f"data/train/part-{k}.jsonl",
                          Body=("\n".join(lines[k * 32 : (k + 1) * 32]) + "\n").encode())
    for name in ("eval.jsonl", "calibration.jsonl"):
        client.upload_file(str(assets / name), bucket, f"data/{name}")
    shutil.rmtree(author)

    raw = tiny_spec(assets, f"s3://{bucket}/store", adapter={"r": R, "alpha": ALPHA, "target_modules": TARGETS},
                    init={"method": "corda", "corda": {"samples": 16, "fidelity_samples": 2, "num_workers": 2,
                                                       "strategy": "layerwise"}},
                    export={"formats": ["adapter", "adapter_on_original_base", "merged"], "merge_alphas": [1.0],
                            "wise_ft_alphas": [0.0, 1.0]})
    raw["model"] = {"path": f"s3://{bucket}/models/tiny"}
    raw["data"].update(train=f"s3://{bucket}/data/train", eval=f"s3://{bucket}/data/eval.jsonl",
                       calibration=f"s3://{bucket}/data/calibration.jsonl", streaming=True)
    raw["train"].update(num_workers=2, placement_strategy="STRICT_SPREAD", max_steps=2, micro_batch_size=4,
                        eval_every=None)
    raw["storage"] = {"uri": f"s3://{bucket}/store", "endpoint_url": s3_endpoint}
    with pytest.MonkeyPatch.context() as env:  # the submitter validates through the driver's proxy
        env.setenv("AWS_ENDPOINT_URL_S3", proxies[2].endpoint)
        spec = parse_spec(raw)
    store, job_id = open_store(spec.storage), "bucket-only"
    store.put_bytes(f"jobs/{job_id}/spec.yaml", dump_spec(spec).encode())
    new_record(job_id, spec).save(store)

    private = tmp_path / "driver-tmp"
    private.mkdir()
    script = ('mount -t tmpfs none "$1" && cd "$2" && TMPDIR="$1" AWS_ENDPOINT_URL_S3="$8" exec "$3" '
              '-m orchestrator.control.driver "$4" "$5" --ray-address "$6" --verbose-log "$7"')
    verbose = tmp_path / "verbose.log"
    run = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(private), str(ROOT),
         sys.executable, job_id, spec.storage.model_dump_json(), cluster.address, str(verbose), proxies[2].endpoint],
        capture_output=True, text=True, timeout=600)
    record = JobRecord.load(store, job_id)
    assert run.returncode == 0 and record.state.value == "SUCCEEDED", (record.error, run.stdout[-3000:],
                                                                      verbose.read_text()[-3000:])
    assert list(private.iterdir()) == []
    assert {"adapter", "adapter_on_original_base", "merged@1", "residual_base"} <= set(read_manifest(store, job_id)
                                                                                       .artifacts)

    per_node = [downloads(proxy) for proxy in proxies[:2]]
    for node in [*per_node, downloads(proxies[3])]:
        assert not node or max(node.values()) == 1, node  # nothing downloaded twice on a node
    assert all(per_node), per_node
    shards = {k for node in per_node for k in node if k.endswith(".safetensors")}
    assert len(shards) >= 3  # the model is sharded; both nodes read weights
    driver = downloads(proxies[2])
    assert not [k for k in driver if k.endswith(".safetensors") or "/train/" in k], driver  # headers only
    assert "data/calibration.jsonl" in driver  # the driver tokenizes the calibration set
    trained = [{k for k in node if "/train/part-" in k} for node in per_node]
    assert all(trained) and not trained[0] & trained[1], trained  # each streamed file on the node that drew it
    caches = [sorted(p.name for p in (t / "peftfleet-cache").rglob("*.safetensors")) for t in temps]
    assert all(caches), caches  # each node its own cache
    assert "train: 8 streamed units" in run.stdout


def test_an_outage_mid_download_is_retried_then_fails_the_stage_naming_the_key(assets, tmp_path, state_dir,
                                                                               s3_endpoint, bucket):
    """The bucket goes away while a training worker downloads the model's weights: the fetch is retried (the
    spec's storage.max_attempts), then the job ends FAILED in its train stage with the object's key, and no
    manifest."""
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    upload_folder(client, bucket, "models/tiny", assets / "tiny-llama")
    client.upload_file(str(assets / "train.jsonl"), bucket, "data/train.jsonl")
    outage = FaultProxy(int(s3_endpoint.rsplit(":", 1)[1]), fault="cut", match="model.safetensors HTTP",
                        cut_bytes=100_000, down_after_cut=True)
    raw = tiny_spec(assets, f"file://{tmp_path / 'store'}", model={"path": f"s3://{bucket}/models/tiny"},
                    storage={"uri": f"file://{tmp_path / 'store'}", "max_attempts": 2, "timeout_s": 2})
    raw["data"] = {**raw["data"], "train": f"s3://{bucket}/data/train.jsonl", "eval": None}
    raw["train"].update(max_steps=2, max_failures=0, eval_every=None)
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": outage.endpoint}
    try:
        run = cli(state_dir, "submit", write_spec(tmp_path / "job.yaml", raw), "--wait", env=env)
    finally:
        outage.close()
    assert run.returncode == 1, run.stdout + run.stderr
    job_id = run.stdout.strip().splitlines()[0]
    record = json.loads((tmp_path / "store" / "jobs" / job_id / "job.json").read_text())
    key = f"s3://{bucket}/models/tiny/model.safetensors"
    assert record["state"] == "FAILED" and record["stage"] == "train", record
    assert f"download {key}: failed after 2 attempts" in record["error"], record["error"]
    assert not (tmp_path / "store" / "jobs" / job_id / "manifest.json").exists()
    assert len([line for line, _ in outage.requests if "model.safetensors HTTP" in line]) == 1  # then refused
