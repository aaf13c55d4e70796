"""Checks that compare two models on held-out samples. They run on a worker, never in the driver (which holds no
model), read stage outputs through the node's cache, and walk the models block by block (workers/model/block_walk.py),
so the worker holds one block of each, never a whole model. The arithmetic is fp32 whatever the weights' dtype:
a check should see the weights' error, not its own."""

from __future__ import annotations

import torch

from jobspecs.schema import JobSpec
from workers.model.block_walk import logit_gap, merged
from workers.runtime.job_process import start_job_process
from workers.storage.inputs import local
from workers.storage.node_cache import local_folder, node_cache
from workers.storage.store import StoredFolder


def init_fidelity(spec: JobSpec, residual: StoredFolder, adapter: StoredFolder, samples: list[list[int]]) -> float:
    """max |logits(residual base + CorDA adapter) − logits(base)| over `samples`."""
    start_job_process()
    residual_dir, adapter_dir = local_folder(spec, residual), local_folder(spec, adapter)
    base = local(spec.model.path, node_cache(spec))
    return logit_gap(merged(residual_dir, adapter_dir), merged(base, None), samples, torch.float32)
