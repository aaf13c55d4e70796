"""CorDA calibration on a simulated multi-node Ray cluster: losing a node mid-stage changes nothing."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import ray
import torch

from tests.corda_helpers import corda_spec, ours, run_stages
from tests.helpers import wait_gone


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    # The head only coordinates; three one-CPU worker nodes hold the covariance actors (SPREAD puts the two on
    # different nodes) and leave a spare node for the actor that loses its own.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(3):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_node_removed_during_calibrate_gives_the_same_numbers(cluster, assets, tmp_path):
    def spec_for(tmp):  # many small shards: actor 0 has shards left when it is caught inside one
        return corda_spec(assets, tmp, samples=64, num_workers=2, shard_samples=1, batch_size=1, max_failures=3)

    calm = run_stages(spec_for(tmp_path / "calm"), tmp_path / "calm")
    removed = []

    def remove_an_actors_node(ctx_holder):
        """Remove the node of actor 0 while that actor is inside a shard (Ray titles the process by method)."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            placement = ctx_holder.get("ctx") and ctx_holder["ctx"].results.get("corda_actors")
            if placement and Path(f"/proc/{placement[0][0]}/cmdline").read_bytes().startswith(
                    b"ray::CovarianceWorker.collect"):
                node = next(n for n in cluster.list_all_nodes() if n.node_id == placement[0][1])
                mid_stage = "corda" not in ctx_holder["ctx"].results  # calibrate has not finished
                cluster.remove_node(node, allow_graceful=False)
                removed.append((placement[0][1], mid_stage))
                return
            time.sleep(0.002)

    holder: dict = {}
    thread = threading.Thread(target=remove_an_actors_node, args=(holder,))
    thread.start()
    disturbed = run_stages(spec_for(tmp_path / "disturbed"), tmp_path / "disturbed", holder)
    thread.join()
    assert removed, "no node was removed"
    (node_id, mid_stage), placement = removed[0], disturbed.results["corda_actors"]
    assert mid_stage and node_id == placement[0][1]
    assert wait_gone(placement[0][0])  # the actor went with its node
    a, b = ours(calm), ours(disturbed)
    for key in a:
        assert torch.equal(a[key], b[key]), key
