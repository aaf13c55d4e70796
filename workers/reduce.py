"""Reducers: a fixed pool of warm processes that fold shard statistics and decompose input groups.

They are stateless on purpose: `add` returns a new sum object instead of keeping one, so a reducer lost with its
node takes nothing with it — Ray re-runs the lost calls (lineage) on the restarted actor. A fixed pool instead of
one task per add keeps Ray from starting a fresh process (and a fresh `import torch`) for each of hundreds of
small adds, which on a busy node costs more than the adds themselves.
"""

from __future__ import annotations

from workers.covariance import GroupStats, add_stats
from workers.decompose import GroupInit, decompose_group, load_weights


class Reducer:
    def __init__(self) -> None:
        import torch

        # Ray sets OMP_NUM_THREADS only for actors that reserve CPUs; a reducer reserves none, and its idle
        # OpenMP threads would spin on the cores the covariance actors are using.
        torch.set_num_threads(1)

    def ready(self) -> bool:
        return True

    def add(self, total: GroupStats, part: GroupStats) -> GroupStats:
        return add_stats([total, part])

    def decompose(
        self,
        total: GroupStats,
        group: str,
        modules: tuple[str, ...],
        model_path: str,
        r: int,
        mode: str,
        scaling: float,
        damping: float | str,
    ) -> GroupInit:
        return decompose_group(total, group, modules, load_weights(model_path, modules), r, mode, scaling, damping)
