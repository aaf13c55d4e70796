"""Training across nodes of a simulated Ray cluster: one worker per node, gloo between them."""

from __future__ import annotations

import pytest
import ray
import torch

from tests.train_helpers import adapter_tensors, train

pytestmark = pytest.mark.slow


@pytest.fixture
def two_nodes():
    from ray.cluster_utils import Cluster

    # The head only coordinates; each worker node has room for exactly one training worker.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address)
    yield [node.node_id for node in nodes]
    ray.shutdown()
    cluster.shutdown()


def test_one_worker_on_each_of_two_nodes(two_nodes, assets, tmp_path):
    result = train(assets, tmp_path, num_workers=2, micro_batch_size=4, zero_stage=2,
                   placement_strategy="STRICT_SPREAD")
    assert sorted(result.nodes) == sorted(two_nodes)  # rank 0 and rank 1 each on its own worker node
    evals = [m["eval_loss"] for m in result.metrics if "eval_loss" in m]
    assert len(result.metrics) == 6 and evals[-1] < evals[0] - 0.1, evals
    tensors = adapter_tensors(result)
    assert tensors and any(torch.count_nonzero(v) for k, v in tensors.items() if "lora_B" in k)
