"""Layer-wise CorDA calibration: no process holds more than one decoder block of the model.

The sequential onloading of GPTQ/llm-compressor, distributed: each actor owns a fixed set of calibration shards
and keeps their hidden states (one tensor per batch, at the boundary of the block it has reached). For block k it
loads only block k's tensors (safetensors, memory-mapped, by name), accumulates every input group of the block
with the same hooks and per-shard `Accumulator` as a replica, runs its hidden states through the *original*
block and frees it. A shard's statistics depend only on its samples, so folding them in shard order gives the
same sums for any number of actors.

After every block the hidden states are written to the node's disk (the two latest blocks kept), so an actor
that Ray restarts resumes its shards from the last completed block; on a fresh node it recomputes them from the
embeddings (loading each earlier block once more) — the same numbers, later. When an actor's hidden states do
not fit its memory (`spill`, decided by jobspecs/memory.py), it keeps only the shard at work in memory and reads
the others back from those files.

Those files are tensors only (safetensors: nothing in them is ever unpickled) in a folder the actor's first
incarnation creates and that must not exist before (its name carries a random part the driver drew), private to
this user; a restarted incarnation reuses it only if it is still the folder this user made.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from workers.corda.covariance import DTYPES, Accumulator, InputGroup, group_by_input, target_linears
from workers.model.block_walk import Batch, BlockWalk
from workers.runtime.job_process import start_job_process
from workers.runtime.process_memory import peak_memory_mib
from workers.storage.inputs import local
from workers.storage.node_cache import NodeCache


@dataclass(frozen=True)
class BlockSummary:
    block: int
    shards: tuple[int, ...]
    tokens: int
    pid: int
    accumulate_s: float
    flops: float
    replayed: int  # earlier blocks this call had to recompute (after a restart without its checkpoint)
    peak_memory_mib: float  # the actor process's peak so far


class LayerwiseWorker:
    """A Ray actor: the hidden states of its own shards, walked through the decoder blocks one at a time."""

    def __init__(self, model_path: str, dtype: str, covariance_dtype: str, scale: str, device: str,
                 shards: dict[int, list[list[int]]], batch_size: int, pad_id: int, cache: NodeCache,
                 spill_name: str, spill: bool = False):
        start_job_process()
        self.dtype, self.device = getattr(torch, dtype), device
        self.acc_dtype, self.scale = DTYPES[covariance_dtype], scale
        self.shards, self.batch_size, self.pad_id = shards, batch_size, pad_id
        # resolved here, on the actor's node (the driver's temp folder may not be this node's)
        self.spill = _private_folder(cache.root / "layerwise" / spill_name)
        self.spilling = spill
        try:
            # a model in a bucket is mirrored: its weight files are fetched as the walk first reads them
            self.walk = BlockWalk(local(model_path, cache), self.dtype, device)
        except ValueError as e:
            raise ValueError(f"init.corda.strategy layerwise: {e}; use strategy: replica") from None
        self.skeleton, self.blocks, self.prefix = self.walk.skeleton, self.walk.blocks, self.walk.prefix
        self.states: dict[int, tuple[int, list[Batch] | None]] = {}  # shard → (next block, batches; None: on disk)

    def where(self) -> tuple[int, str]:
        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id()

    @torch.no_grad()
    def groups(self, targets: Sequence[str] | str) -> list[list[InputGroup]]:
        """Each block's input groups: found by probing block 0 with this actor's first batch, carried to every
        block by name, and checked against each block's target layers (blocks must be alike)."""
        layers = target_linears(self.skeleton, targets)
        if not layers:
            raise ValueError(f"adapter.target_modules {targets!r} matches no linear layer of the model")
        outside = [n for n in layers if not n.startswith(f"{self.prefix}.")]
        if outside:
            raise ValueError(f"init.corda.strategy layerwise: target layers outside the decoder blocks "
                             f"({', '.join(outside)}) cannot be calibrated block by block; use strategy: replica")
        shard = min(self.shards)
        batch = self.walk.embed(self.shards[shard][:1], self.batch_size, self.pad_id)[0]
        block = self.walk.load(0)
        try:
            first = group_by_input({n: m for n, m in layers.items() if n.startswith(f"{self.prefix}.0.")},
                                   lambda: self.walk.run(block, batch))
        finally:
            self.walk.unload(0)
        found = []
        for k in range(len(self.blocks)):
            mine = {n for n in layers if n.startswith(f"{self.prefix}.{k}.")}
            groups = [InputGroup(self.walk.rename(g.name, k), tuple(self.walk.rename(m, k) for m in g.modules), g.dim)
                      for g in first]
            if {m for g in groups for m in g.modules} != mine:
                raise ValueError(f"init.corda.strategy layerwise: block {k}'s target layers differ from block 0's; "
                                 "use strategy: replica")
            found.append(groups)
        return found

    @torch.no_grad()
    def block(self, k: int, groups: Sequence[InputGroup]) -> tuple:
        """Block k for every shard of this actor, in shard order: (GroupStats per shard per group..., summary)."""
        replayed = 0
        for shard in sorted(self.shards):
            replayed = max(replayed, self._reach(shard, k))
            if self.spilling:
                self._park(shard, k)
        block = self.walk.load(k)
        modules = dict(self.skeleton.named_modules())
        out, tokens, seconds, flops = [], 0, 0.0, 0.0
        try:
            for shard in sorted(self.shards):
                acc = Accumulator(modules, groups, self.acc_dtype, self.scale, shard)
                state = self.states[shard][1]
                if state is None:  # spilled: read back just this shard
                    state = self._load(shard, k)
                with acc.hooked():
                    for batch in state:
                        acc.mask, acc.range = batch.valid, batch.range
                        batch.hidden = self.walk.run(block, batch)
                self._advance(shard, k + 1, state)
                out += acc.results()
                tokens += int(sum(b.valid.sum() for b in state))
                if self.spilling:
                    self.states[shard], state = (k + 1, None), None
                seconds, flops = seconds + acc.seconds, flops + acc.flops
        finally:
            self.walk.unload(k)
        return (*out, BlockSummary(k, tuple(sorted(self.shards)), tokens, os.getpid(), seconds, flops, replayed,
                                   peak_memory_mib()))

    def close(self) -> None:
        """Delete this actor's hidden-state checkpoints (and the job's spill folder once every actor's are gone)."""
        shutil.rmtree(self.spill, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.spill.parent.rmdir()

    # --- hidden states -------------------------------------------------------------------------------------------

    def _reach(self, shard: int, k: int) -> int:
        """Bring `shard` to the input of block k: from memory, the node's checkpoint, or the embeddings (then
        replaying the blocks before k). Returns how many blocks were replayed."""
        at, state = self.states.get(shard, (None, None))
        if at == k and (state is not None or self._file(shard, k).is_file()):
            return 0  # in memory, or (spilling) on disk at block k
        at, state = self._checkpoint(shard, k)
        if state is None:
            at, state = 0, self.walk.embed(self.shards[shard], self.batch_size, self.pad_id)
        for j in range(at, k):
            block = self.walk.load(j)
            try:
                for batch in state:
                    batch.hidden = self.walk.run(block, batch)
            finally:
                self.walk.unload(j)
        self.states[shard] = (k, state)
        return k - at

    def _checkpoint(self, shard: int, k: int) -> tuple[int, list[Batch] | None]:
        """The latest checkpoint of `shard` at or before block k."""
        for j in (k, k - 1):
            if j >= 0 and self._file(shard, j).is_file():
                return j, self._load(shard, j)
        return 0, None

    def _file(self, shard: int, k: int) -> Path:
        return self.spill / f"shard-{shard}.block-{k}.safetensors"

    def _park(self, shard: int, k: int) -> None:
        """Leave `shard`'s hidden states (at block k) only on disk."""
        if not self._file(shard, k).is_file():
            self._save(shard, k, self.states[shard][1])
        self.states[shard] = (k, None)

    def _save(self, shard: int, k: int, state: list[Batch]) -> None:
        file = self._file(shard, k)
        tmp = file.with_suffix(".tmp")
        tensors = {f"{i}.{name}": getattr(b, name).contiguous() for i, b in enumerate(state)
                   for name in _TENSORS if getattr(b, name) is not None}
        save_file(tensors, tmp, metadata={"ranges": json.dumps([b.range for b in state])})
        os.replace(tmp, file)  # a checkpoint exists whole or not at all

    def _load(self, shard: int, k: int) -> list[Batch]:
        from safetensors import safe_open

        file = self._file(shard, k)
        with safe_open(file, framework="pt") as f:
            ranges = json.loads(f.metadata()["ranges"])
        tensors = load_file(file, device=self.device)
        return [Batch(**{name: tensors.get(f"{i}.{name}") for name in _TENSORS}, range=span)
                for i, span in enumerate(ranges)]

    def _advance(self, shard: int, k: int, state: list[Batch]) -> None:
        self.states[shard] = (k, state)
        self._save(shard, k, state)
        self._file(shard, k - 2).unlink(missing_ok=True)


_TENSORS = ("hidden", "valid", "position_ids", "labels")  # a Batch's tensors; its range goes in the metadata


def _private_folder(folder: Path) -> Path:
    """`folder`, made now by this actor's first incarnation (refused if anything is there already: a spill folder
    no one could have known of has nothing in it), or, in an incarnation Ray restarted, kept only while it is still
    a folder of this user's that no one else may write."""
    import ray

    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir(mode=0o700)
        return folder
    except FileExistsError:
        if not ray.get_runtime_context().was_current_actor_reconstructed:
            raise RuntimeError(f"layer-wise spill folder {folder} exists before its actor made it") from None
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise RuntimeError(f"layer-wise spill folder {folder} is no longer the actor's own private folder")
    return folder
