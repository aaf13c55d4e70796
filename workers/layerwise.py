"""Layer-wise CorDA calibration: no process holds more than one decoder block of the model.

The sequential onloading of GPTQ/llm-compressor, distributed: each actor owns a fixed set of calibration shards
and keeps their hidden states (one tensor per batch, at the boundary of the block it has reached). For block k it
loads only block k's tensors (safetensors, memory-mapped, by name), accumulates every input group of the block
with the same hooks and per-shard `Accumulator` as a replica, runs its hidden states through the *original*
block and frees it. A shard's statistics depend only on its samples, so folding them in shard order gives the
same sums for any number of actors.

After every block the hidden states are written to the node's disk (the two latest blocks kept), so an actor
that Ray restarts resumes its shards from the last completed block; on a fresh node it recomputes them from the
embeddings (loading each earlier block once more) — the same numbers, later.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from workers.covariance import DTYPES, Accumulator, InputGroup, batches, group_by_input, target_linears
from workers.node_cache import NodeCache
from workers.process_memory import bound_process_memory, peak_memory_mib
from workers.weights import read_tensors, tensor_infos


@dataclass
class Batch:
    hidden: torch.Tensor  # [batch, seq, hidden] at the input of the next block
    valid: torch.Tensor  # real tokens, [batch, seq]
    position_ids: torch.Tensor
    range: str


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
                 shards: dict[int, list[list[int]]], batch_size: int, pad_id: int, node_cache_dir: str | None,
                 spill_name: str):
        from transformers import AutoConfig, AutoModelForCausalLM

        from workers.logs import quiet_libraries

        quiet_libraries()
        bound_process_memory()
        self.path, self.dtype, self.device = Path(model_path), getattr(torch, dtype), device
        self.acc_dtype, self.scale = DTYPES[covariance_dtype], scale
        self.shards, self.batch_size, self.pad_id = shards, batch_size, pad_id
        # resolved here, on the actor's node (the driver's temp folder may not be this node's)
        self.spill = NodeCache(node_cache_dir).root / "layerwise" / spill_name
        self.spill.mkdir(parents=True, exist_ok=True)
        config = AutoConfig.from_pretrained(model_path)
        with torch.device("meta"):  # the structure only: no tensor of the model is allocated
            self.skeleton = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        self.skeleton.eval()
        decoder = self.skeleton.get_decoder()
        if not hasattr(decoder, "layers") or not hasattr(decoder, "rotary_emb"):
            raise ValueError(f"init.corda.strategy layerwise: {type(self.skeleton).__name__} is not a Llama-family "
                             "model (decoder.layers + rotary_emb); use strategy: replica")
        names = {id(m): n for n, m in self.skeleton.named_modules()}
        self.blocks, self.prefix = decoder.layers, names[id(decoder.layers)]
        self.embed_weight = f"{names[id(self.skeleton.get_input_embeddings())]}.weight"
        self.rotary = type(decoder.rotary_emb)(config=self.skeleton.config).to(device)
        self.tensors = list(tensor_infos(self.path))
        self.states: dict[int, tuple[int, list[Batch]]] = {}  # shard → (next block, batches)

    def where(self) -> tuple[int, str]:
        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id()

    def num_blocks(self) -> int:
        return len(self.blocks)

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
        batch = self._embed(self.shards[shard][:1])[0]
        block = self._load(0)
        try:
            first = group_by_input({n: m for n, m in layers.items() if n.startswith(f"{self.prefix}.0.")},
                                   lambda: self._run(block, batch))
        finally:
            self._unload(0)
        found = []
        for k in range(len(self.blocks)):
            mine = {n for n in layers if n.startswith(f"{self.prefix}.{k}.")}
            groups = [InputGroup(self._rename(g.name, k), tuple(self._rename(m, k) for m in g.modules), g.dim)
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
        block = self._load(k)
        modules = dict(self.skeleton.named_modules())
        out, tokens, seconds, flops = [], 0, 0.0, 0.0
        try:
            for shard in sorted(self.shards):
                acc = Accumulator(modules, groups, self.acc_dtype, self.scale, shard)
                _, state = self.states[shard]
                with acc.hooked():
                    for batch in state:
                        acc.mask, acc.range = batch.valid, batch.range
                        batch.hidden = self._run(block, batch)
                self._advance(shard, k + 1, state)
                out += acc.results()
                tokens += int(sum(b.valid.sum() for b in state))
                seconds, flops = seconds + acc.seconds, flops + acc.flops
        finally:
            self._unload(k)
        return (*out, BlockSummary(k, tuple(sorted(self.shards)), tokens, os.getpid(), seconds, flops, replayed,
                                   peak_memory_mib()))

    def close(self) -> None:
        """Delete this actor's hidden-state checkpoints."""
        shutil.rmtree(self.spill, ignore_errors=True)

    # --- hidden states -------------------------------------------------------------------------------------------

    def _reach(self, shard: int, k: int) -> int:
        """Bring `shard` to the input of block k: from memory, the node's checkpoint, or the embeddings (then
        replaying the blocks before k). Returns how many blocks were replayed."""
        at, state = self.states.get(shard, (None, None))
        if at != k:
            at, state = self._checkpoint(shard, k)
        if state is None:
            at, state = 0, self._embed(self.shards[shard])
        for j in range(at, k):
            block = self._load(j)
            try:
                for batch in state:
                    batch.hidden = self._run(block, batch)
            finally:
                self._unload(j)
        self.states[shard] = (k, state)
        return k - at

    def _checkpoint(self, shard: int, k: int) -> tuple[int, list[Batch] | None]:
        """The latest checkpoint of `shard` at or before block k."""
        for j in (k, k - 1):
            file = self.spill / f"shard-{shard}.block-{j}.pt"
            if j >= 0 and file.is_file():
                return j, torch.load(file, map_location=self.device, weights_only=False)
        return 0, None

    def _advance(self, shard: int, k: int, state: list[Batch]) -> None:
        self.states[shard] = (k, state)
        file = self.spill / f"shard-{shard}.block-{k}.pt"
        tmp = file.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, file)  # a checkpoint exists whole or not at all
        (self.spill / f"shard-{shard}.block-{k - 2}.pt").unlink(missing_ok=True)

    def _embed(self, samples: Sequence[Sequence[int]]) -> list[Batch]:
        weight = read_tensors(self.path, [self.embed_weight], self.dtype)[self.embed_weight].to(self.device)
        state = []
        for span, padded in batches(samples, self.batch_size, self.pad_id):
            ids = padded["input_ids"].to(self.device)
            positions = torch.arange(ids.shape[1], device=self.device).unsqueeze(0)
            state.append(Batch(nn.functional.embedding(ids, weight), padded["attention_mask"].bool().to(self.device),
                               positions, span))
        return state

    # --- blocks --------------------------------------------------------------------------------------------------

    def _rename(self, name: str, k: int) -> str:
        return name.replace(f"{self.prefix}.0.", f"{self.prefix}.{k}.", 1)

    def _load(self, k: int) -> nn.Module:
        prefix = f"{self.prefix}.{k}."
        names = [n for n in self.tensors if n.startswith(prefix)]
        tensors = read_tensors(self.path, names, self.dtype)
        block = self.blocks[k]
        block.load_state_dict({n.removeprefix(prefix): t.to(self.device) for n, t in tensors.items()}, assign=True,
                              strict=True)
        return block

    def _unload(self, k: int) -> None:
        self.blocks[k].to("meta")

    def _run(self, block: nn.Module, batch: Batch) -> torch.Tensor:
        """The block as the whole model runs it: the model's own causal + padding mask and rotary embeddings."""
        from transformers.masking_utils import create_causal_mask

        mask = create_causal_mask(config=self.skeleton.config, inputs_embeds=batch.hidden,
                                  attention_mask=batch.valid, past_key_values=None, position_ids=batch.position_ids)
        position_embeddings = self.rotary(batch.hidden, position_ids=batch.position_ids)
        return block(batch.hidden, attention_mask=mask, position_ids=batch.position_ids,
                     position_embeddings=position_embeddings)
