"""Checks that compare two models on held-out samples. They run on a worker, never in the driver (which holds no
model), and read stage outputs through the node's cache."""

from __future__ import annotations

from jobspecs.schema import JobSpec
from workers.adapter_math import load_model, max_logit_gap
from workers.logs import quiet_libraries
from workers.node_cache import local_folder
from workers.process_memory import bound_process_memory
from workers.store import StoredFolder


def init_fidelity(spec: JobSpec, residual: StoredFolder, adapter: StoredFolder, samples: list[list[int]]) -> float:
    """max |logits(residual base + CorDA adapter) − logits(base)| over `samples`, loaded the way a user would."""
    quiet_libraries()
    bound_process_memory()
    residual_dir, adapter_dir = local_folder(spec, residual), local_folder(spec, adapter)
    return max_logit_gap(load_model(str(residual_dir), adapter_dir), load_model(str(spec.model.path)), samples)
