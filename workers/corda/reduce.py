"""Reducers: a fixed pool of warm processes that fold shard statistics, decompose input groups and write the
residual_base shards of what they decomposed.

They are stateless on purpose: `add` returns a new sum object instead of keeping one, so a reducer lost with its
node takes nothing with it — Ray re-runs the lost calls (lineage) on the restarted actor. A fixed pool instead of
one task per add keeps Ray from starting a fresh process (and a fresh `import torch`) for each of hundreds of
small adds, which on a busy node costs more than the adds themselves.

Model-sized outputs never travel to the driver: a reducer writes the residual weights of the group it decomposed
(and a share of the unchanged tensors) as safetensors shards straight into the job's store, and returns only
the small A, B factors, the diagnostics and what it wrote.
"""

from __future__ import annotations

from jobspecs.schema import StorageSpec
from workers.corda.covariance import GroupStats, add_stats
from workers.corda.decompose import GroupInit, decompose_group
from workers.runtime.process_memory import bound_process_memory, peak_memory_mib
from workers.storage.inputs import local, present
from workers.storage.node_cache import NodeCache
from workers.storage.store import StoredFile, open_store
from workers.storage.weights import publish_shard, read_tensors


class Reducer:
    def __init__(self) -> None:
        import torch

        # Ray sets OMP_NUM_THREADS only for actors that reserve CPUs; a reducer reserves none, and its idle
        # OpenMP threads would spin on the cores the covariance actors are using.
        torch.set_num_threads(1)
        bound_process_memory()

    def ready(self) -> bool:
        return True

    def peak_memory_mib(self) -> float:
        return peak_memory_mib()

    def tokens(self, total: GroupStats) -> int:
        return total.tokens

    def add(self, total: GroupStats, part: GroupStats) -> GroupStats:
        return add_stats([total, part])

    def decompose(self, total: GroupStats, group: str, modules: tuple[str, ...], model_path: str, r: int,
                  mode: str, scaling: float, damping: float | str, dtype: str, storage: StorageSpec, key: str,
                  cache: NodeCache) -> tuple[GroupInit, StoredFile]:
        """Decompose one group and write its residual weights (in `dtype`) as the residual_base shard `key`."""
        import torch

        weights = read_tensors(local(model_path, cache), [f"{m}.weight" for m in modules])
        result = decompose_group(total, group, modules, {m: weights[f"{m}.weight"] for m in modules}, r, mode,
                                 scaling, damping)
        residual = {f"{layer.name}.weight": layer.residual.to(getattr(torch, dtype)) for layer in result.layers}
        for layer in result.layers:
            layer.residual = None
        return result, publish_shard(open_store(storage), key, residual)

    def copy_tensors(self, model_path: str, names: list[str], dtype: str, storage: StorageSpec, key: str,
                     cache: NodeCache) -> StoredFile:
        """Tensors the decomposition leaves unchanged, copied (cast to `dtype`) into the residual_base shard `key`."""
        import torch

        tensors = read_tensors(local(model_path, cache), names, getattr(torch, dtype))
        return publish_shard(open_store(storage), key, tensors)

    def save_stats(self, total: GroupStats, storage: StorageSpec, key: str) -> StoredFile:
        """A reduced sum exactly as decomposed, for the `covariance` artifact."""
        return publish_shard(open_store(storage), key, {"xtx": total.xtx},
                             {"samples": str(total.samples), "tokens": str(total.tokens)})

    def load_stats(self, file: str, cache: NodeCache) -> GroupStats:
        """A sum saved by save_stats, read where it will be decomposed (init.corda.covariance_from: a file, or an
        object of a bucket)."""
        from safetensors import safe_open

        with safe_open(present(local(file, cache)), framework="pt") as f:
            meta = f.metadata()
            return GroupStats(f.get_tensor("xtx"), int(meta["samples"]), int(meta["tokens"]))
