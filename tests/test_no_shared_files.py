"""Stage outputs cross nodes through the store, never as a path on the driver's disk.

On KubeRay every node is a pod with its own /tmp; `ray.cluster_utils.Cluster` runs every "node" on one filesystem,
where a driver-local path would happen to work. Here the driver runs in its own mount namespace with a private
tmpfs as its temp folder, so no worker can see a file it writes there: a CorDA → train → export job must still
succeed, with the workers reading residual_base and corda_init from the store through their node cache.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobspecs import dump_spec, parse_spec
from orchestrator.control.jobs import JobRecord, new_record
from orchestrator.storage.artifacts import read_manifest
from tests.corda_helpers import ALPHA, TARGETS, R
from tests.helpers import tiny_spec
from workers.storage.store import LocalStore
from workers.storage.weights import INDEX

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    yield cluster
    cluster.shutdown()


def test_a_driver_whose_files_no_worker_sees_runs_corda_train_export(cluster, assets, tmp_path):
    raw = tiny_spec(assets, f"file://{tmp_path / 'store'}", adapter={"r": R, "alpha": ALPHA, "target_modules": TARGETS},
                    init={"method": "corda", "corda": {"samples": 16, "fidelity_samples": 2, "num_workers": 2}},
                    export={"formats": ["adapter", "adapter_on_original_base", "merged"], "merge_alphas": [1.0],
                            "wise_ft_alphas": [0.0, 1.0]},
                    cluster={"node_cache_dir": str(tmp_path / "node-cache")})
    raw["train"] = {**raw["train"], "max_steps": 2, "micro_batch_size": 8}
    raw["data"]["calibration"] = str(assets / "calibration.jsonl")
    spec = parse_spec(raw)
    store, job_id = LocalStore(tmp_path / "store"), "no-shared-files"
    store.put_bytes(f"jobs/{job_id}/spec.yaml", dump_spec(spec).encode())
    new_record(job_id, spec).save(store)

    private = tmp_path / "driver-tmp"  # the driver's temp folder: a tmpfs only its own mount namespace has
    private.mkdir()
    script = 'mount -t tmpfs none "$1" && cd "$2" && TMPDIR="$1" exec "$3" -m orchestrator.control.driver "$4" "$5" ' \
             '--ray-address "$6" --verbose-log "$7"'
    verbose = tmp_path / "verbose.log"
    run = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(private), str(ROOT),
         sys.executable, job_id, spec.storage.model_dump_json(), cluster.address, str(verbose)],
        capture_output=True, text=True, timeout=600)
    record = JobRecord.load(store, job_id)
    assert run.returncode == 0 and record.state.value == "SUCCEEDED", (record.error, run.stdout[-3000:],
                                                                      verbose.read_text()[-3000:])
    assert list(private.iterdir()) == []  # what the driver staged there was never visible outside

    manifest = read_manifest(store, job_id)
    kinds = set(manifest.artifacts)
    assert {"adapter", "adapter_on_original_base", "corda_init", "merged@1", "report", "residual_base"} <= kinds
    residual = [f.path for f in manifest.files if f.kind == "residual_base"]
    assert f"artifacts/residual_base/{INDEX}" in residual and len([p for p in residual if "-of-" in p]) > 1
    # the workers read CorDA's outputs through the node cache (one copy: every "node" here shares a disk)
    cached = sorted(p.name for p in (tmp_path / "node-cache").rglob("*.safetensors"))
    assert "adapter_model.safetensors" in cached and any("-of-" in name for name in cached)
    assert "train: step 2/2" in run.stdout and "init fidelity" in run.stdout
    report = json.loads(store.get_bytes(f"jobs/{job_id}/artifacts/report/summary.json"))
    assert report  # the report (written by the driver from small results) made it too
