"""A Llama-family model walked one decoder block at a time: no process holds more than a block of it.

The structure is built on the meta device from config.json; each block's tensors are read by name from the
folder's memory-mapped safetensors when the walk reaches it (with a LoRA adapter's s·B·A added to its target
weights, for the checks), run, and freed. Embeddings, the final norm and the head are loaded only where needed.
Layer-wise calibration (workers/layerwise.py) and the logit checks of CorDA's init and its conversion
(`logit_gap`) walk models this way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from workers.covariance import batches
from workers.weights import read_tensors, tensor_infos

ADAPTER_PREFIX = "base_model.model."


@dataclass
class Batch:
    hidden: torch.Tensor  # [batch, seq, hidden] at the input of the next block
    valid: torch.Tensor  # real tokens, [batch, seq]
    position_ids: torch.Tensor
    range: str


class BlockWalk:
    def __init__(self, model_path: str | Path, dtype: torch.dtype, device: str):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.path, self.dtype, self.device = Path(model_path), dtype, device
        config = AutoConfig.from_pretrained(model_path)
        with torch.device("meta"):  # the structure only: no tensor of the model is allocated
            self.skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.skeleton.eval()
        decoder = self.skeleton.get_decoder()
        if not all(hasattr(decoder, a) for a in ("layers", "rotary_emb", "norm")):
            raise ValueError(f"{type(self.skeleton).__name__} is not a Llama-family model (decoder.layers, "
                             "rotary_emb, norm): it cannot be walked block by block")
        names = {id(m): n for n, m in self.skeleton.named_modules()}
        self.blocks, self.prefix = decoder.layers, names[id(decoder.layers)]
        self.norm, self.norm_name = decoder.norm, names[id(decoder.norm)]
        self.embed_weight = f"{names[id(self.skeleton.get_input_embeddings())]}.weight"
        self.head_weight = f"{names[id(self.skeleton.get_output_embeddings())]}.weight"
        self.rotary = type(decoder.rotary_emb)(config=self.skeleton.config).to(device)
        self.tensors = list(tensor_infos(self.path))
        if self.head_weight not in self.tensors:  # tied: the head is the embedding matrix
            self.head_weight = self.embed_weight

    def rename(self, name: str, k: int) -> str:
        """A block-0 module name as block k's."""
        return name.replace(f"{self.prefix}.0.", f"{self.prefix}.{k}.", 1)

    def embed(self, samples: Sequence[Sequence[int]], batch_size: int, pad_id: int,
              folder: Path | None = None) -> list[Batch]:
        weight = read_tensors(folder or self.path, [self.embed_weight], self.dtype)[self.embed_weight]
        weight = weight.to(self.device)
        state = []
        for span, padded in batches(samples, batch_size, pad_id):
            ids = padded["input_ids"].to(self.device)
            positions = torch.arange(ids.shape[1], device=self.device).unsqueeze(0)
            state.append(Batch(nn.functional.embedding(ids, weight), padded["attention_mask"].bool().to(self.device),
                               positions, span))
        return state

    def load(self, k: int, folder: Path | None = None, lora: dict[str, LoraFactors] | None = None) -> nn.Module:
        """Block k with the tensors of `folder` (default: the walk's model), plus a LoRA's s·B·A where it has one."""
        prefix = f"{self.prefix}.{k}."
        names = [n for n in self.tensors if n.startswith(prefix)]
        tensors = read_tensors(folder or self.path, names, self.dtype)
        for name, factors in (lora or {}).items():
            if name.startswith(prefix):
                tensors[name] = (tensors[name].float() + factors.delta()).to(self.dtype)
        block = self.blocks[k]
        block.load_state_dict({n.removeprefix(prefix): t.to(self.device) for n, t in tensors.items()}, assign=True,
                              strict=True)
        return block

    def unload(self, k: int) -> None:
        self.blocks[k].to("meta")

    def run(self, block: nn.Module, batch: Batch) -> torch.Tensor:
        """The block as the whole model runs it: the model's own causal + padding mask and rotary embeddings."""
        from transformers.masking_utils import create_causal_mask

        mask = create_causal_mask(config=self.skeleton.config, inputs_embeds=batch.hidden,
                                  attention_mask=batch.valid, past_key_values=None, position_ids=batch.position_ids)
        position_embeddings = self.rotary(batch.hidden, position_ids=batch.position_ids)
        return block(batch.hidden, attention_mask=mask, position_ids=batch.position_ids,
                     position_embeddings=position_embeddings)

    def head(self, folder: Path | None = None) -> tuple[nn.Module, torch.Tensor]:
        """The final norm (loaded) and the head's weight."""
        wanted = [f"{self.norm_name}.weight", self.head_weight]
        tensors = read_tensors(folder or self.path, wanted, self.dtype)
        self.norm.load_state_dict({"weight": tensors[wanted[0]].to(self.device)}, assign=True, strict=True)
        return self.norm, tensors[wanted[1]].to(self.device)


@dataclass(frozen=True)
class LoraFactors:
    scaling: float
    a: torch.Tensor
    b: torch.Tensor

    def delta(self) -> torch.Tensor:
        """ΔW = s·B·A in fp32, made when its block loads (all of them at once would be the targets' size)."""
        return self.scaling * (self.b.float() @ self.a.float())


def lora_factors(adapter: Path) -> dict[str, LoraFactors]:
    """A stock peft LoRA adapter's factors per base weight name."""
    from workers.adapter_math import read_adapter

    config, weights = read_adapter(adapter)
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_dora"):
        raise ValueError(f"{adapter}: only uniform-rank plain LoRA adapters can be walked block by block")
    r = config["r"]
    scaling = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
    deltas = {}
    for key, a in weights.items():
        if ".lora_A." in key:
            module = key.removeprefix(ADAPTER_PREFIX).split(".lora_A.")[0]
            b = weights[key.replace(".lora_A.", ".lora_B.")]
            deltas[f"{module}.weight"] = LoraFactors(scaling, a, b)
    return deltas


@torch.no_grad()
def logit_gap(first: tuple[Path, Path | None], second: tuple[Path, Path | None], samples: list[list[int]],
              dtype: torch.dtype, pad_id: int = 0, device: str = "cpu") -> float:
    """max |logits(first) − logits(second)| over `samples`, each model a (folder, LoRA adapter or None) of the same
    architecture, both walked block by block: a block of each, never a whole model."""
    walk = BlockWalk(first[0], dtype, device)
    paths = [(Path(folder), lora_factors(adapter) if adapter else {}) for folder, adapter in (first, second)]
    states = [walk.embed(samples, 1, pad_id, folder) for folder, _ in paths]
    for k in range(len(walk.blocks)):
        for (folder, deltas), state in zip(paths, states, strict=True):
            block = walk.load(k, folder, deltas)
            try:
                for batch in state:
                    batch.hidden = walk.run(block, batch)
            finally:
                walk.unload(k)
    normed, heads = [], []
    for (folder, deltas), state in zip(paths, states, strict=True):
        norm, head = walk.head(folder)
        normed.append([norm(b.hidden) for b in state])
        heads.append((head.float() + deltas[walk.head_weight].delta()).to(dtype) if walk.head_weight in deltas
                     else head)
    # one sample's logits of each at a time: [seq, vocab] is the largest tensor of the check
    return max(float((nn.functional.linear(a, heads[0]).float() - nn.functional.linear(b, heads[1]).float())
                     .abs().max()) for a, b in zip(*normed, strict=True))
