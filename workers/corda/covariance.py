"""CorDA calibration statistics: per input group, the sum of xᵀx over calibration samples and the sample count.

Semantics are peft's (`peft.tuners.lora.corda.calib_cov_distribution`), computed faster:
- one matrix per *input group*: target layers that read the same tensor (q/k/v; gate/up) share it, found by
  probing the model, not by name — peft keeps an identical copy per layer and multiplies the work;
- batches larger than 1: padding (attention mask 0) never enters the statistics, and each sample is scaled by its
  own factor before accumulation, so the result equals peft's batch-1 loop;
- the scale is peft's `abs(max(x))` (the largest *signed* element) by default; `max_abs` uses max |x|.
A shard's statistics are returned whole, so the driver can count a retried shard exactly once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from workers.data.examples import batches
from workers.runtime.job_process import start_job_process
from workers.runtime.process_memory import peak_memory_mib
from workers.storage.inputs import fetch_all, local
from workers.storage.node_cache import NodeCache

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class InputGroup:
    name: str  # the first member; its input is hooked
    modules: tuple[str, ...]  # every target layer reading the same input tensor
    dim: int  # input features


@dataclass
class GroupStats:
    xtx: torch.Tensor  # Σ over samples of (x/scale)ᵀ(x/scale), [dim, dim]
    samples: int
    tokens: int


@dataclass(frozen=True)
class ShardSummary:
    shard: int
    samples: int
    tokens: int
    pid: int  # the actor process that computed it
    accumulate_s: float  # time inside the hooks (scale, mask, xᵀx), for the FLOP/s figure
    flops: float  # 2·tokens·dim² summed over groups
    peak_memory_mib: float  # the actor process's peak so far


class NonFiniteActivations(ValueError):
    pass


def target_linears(model: nn.Module, targets: Sequence[str] | str) -> dict[str, nn.Linear]:
    """Linear layers whose name matches a target suffix (peft's rule), or every linear but the LM head."""
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if targets == "all-linear":
            if name.split(".")[-1] != "lm_head":
                found[name] = module
        elif any(name == t or name.endswith(f".{t}") for t in targets):
            found[name] = module
    return found


@torch.no_grad()
def find_input_groups(model: nn.Module, targets: Sequence[str] | str, probe_ids: Sequence[int]) -> list[InputGroup]:
    """Run one sample and group the target layers by the tensor object they received as input."""
    layers = target_linears(model, targets)
    if not layers:
        raise ValueError(f"adapter.target_modules {targets!r} matches no linear layer of the model")
    device = next(model.parameters()).device
    return group_by_input(layers, lambda: model(input_ids=torch.tensor([list(probe_ids)], device=device)))


def group_by_input(layers: dict[str, nn.Linear], run: Callable[[], object]) -> list[InputGroup]:
    """Call `run` (a forward pass through `layers`) and group the layers by the tensor object they received."""
    seen: dict[str, torch.Tensor] = {}

    def remember(name: str, inputs: tuple) -> None:  # a hook must return None, or it replaces the output
        seen.setdefault(name, inputs[0])

    handles = [
        module.register_forward_hook(lambda m, inputs, out, name=name: remember(name, inputs))
        for name, module in layers.items()
    ]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    for name in layers:
        if name not in seen:
            raise ValueError(f"target layer {name} did not run in a forward pass; it cannot be calibrated")
        for group in groups:
            if seen[group[0]] is seen[name]:
                group.append(name)
                break
        else:
            groups.append([name])
    return [InputGroup(g[0], tuple(g), layers[g[0]].in_features) for g in groups]


class Accumulator:
    """The statistics of one shard: hooks on each group's first member add its masked, scaled Σxᵀx.

    Set `mask` (real tokens, [batch, seq]) and `range` (for error messages) before each forward pass.
    """

    def __init__(self, modules: dict[str, nn.Module], groups: Sequence[InputGroup], acc_dtype: torch.dtype,
                 scale: str, shard: int):
        self.modules, self.groups, self.acc_dtype, self.scale, self.shard = modules, groups, acc_dtype, scale, shard
        self.stats = {g.name: GroupStats(torch.zeros(g.dim, g.dim, dtype=acc_dtype), 0, 0) for g in groups}
        self.mask: torch.Tensor | None = None
        self.range = ""
        self.seconds = 0.0  # time inside the hooks (scale, mask, xᵀx), for the FLOP/s figure
        self.flops = 0.0

    def add(self, name: str, inputs: tuple) -> None:
        t0 = time.perf_counter()
        x = inputs[0].detach().to(self.acc_dtype)
        valid = self.mask.unsqueeze(-1)
        if self.scale == "max_abs":
            scale = x.abs().masked_fill(~valid, 0).amax(dim=(1, 2))
        else:  # peft: abs() of the largest signed element of the sample
            scale = x.masked_fill(~valid, float("-inf")).amax(dim=(1, 2)).abs()
        rows = (x / scale.view(-1, 1, 1))[self.mask]  # [real tokens in the batch, dim]
        if not torch.isfinite(rows).all():
            raise NonFiniteActivations(
                f"NaN/Inf in the input activations of {name} (shard {self.shard}, samples {self.range}): "
                "check the model weights and the calibration data"
            )
        acc = self.stats[name]
        acc.xtx.addmm_(rows.T, rows)
        acc.samples += x.shape[0]
        acc.tokens += rows.shape[0]
        self.seconds += time.perf_counter() - t0
        self.flops += 2.0 * rows.shape[0] * rows.shape[1] ** 2

    @contextmanager
    def hooked(self) -> Iterator[None]:
        handles = [self.modules[g.name].register_forward_hook(lambda m, i, o, n=g.name: self.add(n, i))
                   for g in self.groups]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def results(self) -> list[GroupStats]:
        """Each group's statistics on the CPU, in `groups` order."""
        for acc in self.stats.values():
            acc.xtx = acc.xtx.cpu()
        return [self.stats[g.name] for g in self.groups]


class CovarianceWorker:
    """One model replica that turns calibration shards into per-group statistics. Runs as a Ray actor."""

    def __init__(self, model_path: str, dtype: str, covariance_dtype: str, scale: str, device: str,
                 cache: NodeCache):
        from transformers import AutoModelForCausalLM

        start_job_process()
        folder = fetch_all(local(model_path, cache))  # a replica reads every weight file (from a bucket: fetched)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
        self.device = device
        self.acc_dtype = DTYPES[covariance_dtype]
        self.scale = scale

    def where(self) -> tuple[int, str]:
        """(pid, Ray node id) of this replica, for the driver's log and for fault injection in tests."""
        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id()

    def groups(self, targets: Sequence[str] | str, probe_ids: Sequence[int]) -> list[InputGroup]:
        return find_input_groups(self.model, targets, probe_ids)

    @torch.no_grad()
    def collect(
        self, shard: int, samples: Sequence[Sequence[int]], groups: Sequence[InputGroup], batch_size: int, pad_id: int
    ) -> tuple:
        """(GroupStats for each group in `groups` order..., ShardSummary): separate objects for Ray, so each
        group's reduction fetches only its own matrix."""
        acc = Accumulator(dict(self.model.named_modules()), groups, self.acc_dtype, self.scale, shard)
        with acc.hooked():
            for acc.range, padded in batches(samples, batch_size, pad_id):
                acc.mask = padded["attention_mask"].bool().to(self.device)
                self.model(input_ids=padded["input_ids"].to(self.device), attention_mask=acc.mask)
        summary = ShardSummary(shard, len(samples), sum(len(s) for s in samples), os.getpid(), acc.seconds, acc.flops,
                               peak_memory_mib())
        return (*acc.results(), summary)


def add_stats(parts: Iterable[GroupStats]) -> GroupStats:
    """Sum in the given order (the driver passes shard order, so the result is independent of scheduling)."""
    parts = list(parts)
    total = GroupStats(parts[0].xtx.clone(), parts[0].samples, parts[0].tokens)
    for p in parts[1:]:
        total.xtx += p.xtx
        total.samples += p.samples
        total.tokens += p.tokens
    return total
