"""A Llama-family model walked one decoder block at a time: no process holds more than a block of it.

The structure is built on the meta device from config.json; each block's tensors are read by name from the
folder's memory-mapped safetensors when the walk reaches it (with an adapter merged into them by
workers/methods/merged_weights.py, for the checks and the Wise-FT sweep), run, and freed. Embeddings, the final norm and
the head are loaded only where needed.
Layer-wise calibration (workers/corda/layerwise.py), the logit checks of CorDA's init and its conversion
(`logit_gap`) and the export's Wise-FT sweep (`eval_loss`) walk models this way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from jobspecs.memory import WALK_HIDDEN_BYTES
from workers.data.examples import batches, collate
from workers.methods.bitfit import BiasMerge
from workers.methods.merged_weights import MergedWeights, weights_merge
from workers.model.loss import label_loss_sum, mean_token_loss
from workers.storage.inputs import fetch_all
from workers.storage.weights import read_tensors, tensor_infos

Model = tuple[Path, MergedWeights | BiasMerge | None]  # a folder of weights, and an adapter merged as they load


@dataclass
class Batch:
    hidden: torch.Tensor  # [batch, seq, hidden] at the input of the next block
    valid: torch.Tensor  # real tokens, [batch, seq]
    position_ids: torch.Tensor
    range: str
    labels: torch.Tensor | None = None


class NotWalkable(ValueError):
    """A model whose decoder is not a Llama-style stack of blocks."""


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
            raise NotWalkable(f"{type(self.skeleton).__name__} is not a Llama-family model (decoder.layers, "
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

    def read(self, names: list[str], folder: Path | None, merge: MergedWeights | None) -> dict[str, torch.Tensor]:
        tensors = read_tensors(folder or self.path, names, self.dtype)
        return merge.apply(tensors) if merge else tensors

    def embed(self, samples: Sequence[Sequence[int]], batch_size: int, pad_id: int, folder: Path | None = None,
              merge: MergedWeights | None = None) -> list[Batch]:
        return self.embed_batches(list(batches(samples, batch_size, pad_id)), folder, merge)

    def embed_batches(self, padded: list[tuple[str, dict]], folder: Path | None = None,
                      merge: MergedWeights | None = None) -> list[Batch]:
        """(sample range, collated batch) pairs at the input of block 0."""
        weight = self.read([self.embed_weight], folder, merge)[self.embed_weight].to(self.device)
        state = []
        for span, batch in padded:
            ids = batch["input_ids"].to(self.device)
            positions = torch.arange(ids.shape[1], device=self.device).unsqueeze(0)
            state.append(Batch(nn.functional.embedding(ids, weight), batch["attention_mask"].bool().to(self.device),
                               positions, span, batch.get("labels")))
        return state

    def load(self, k: int, folder: Path | None = None, merge: MergedWeights | None = None) -> nn.Module:
        """Block k with the tensors of `folder` (default: the walk's model), with `merge`'s adapter merged."""
        prefix = f"{self.prefix}.{k}."
        tensors = self.read([n for n in self.tensors if n.startswith(prefix)], folder, merge)
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

    def head(self, folder: Path | None = None, merge: MergedWeights | None = None) -> tuple[nn.Module, torch.Tensor]:
        """The final norm (loaded) and the head's weight."""
        wanted = [f"{self.norm_name}.weight", self.head_weight]
        tensors = self.read(wanted, folder, merge)
        self.norm.load_state_dict({"weight": tensors[wanted[0]].to(self.device)}, assign=True, strict=True)
        return self.norm, tensors[wanted[1]].to(self.device)

    def through_blocks(self, models: Sequence[Model], states: Sequence[list[Batch]]) -> None:
        """Every model's hidden states through every block, one block of one model in memory at a time."""
        for k in range(len(self.blocks)):
            for (folder, merge), state in zip(models, states, strict=True):
                block = self.load(k, folder, merge)
                try:
                    for batch in state:
                        batch.hidden = self.run(block, batch)
                finally:
                    self.unload(k)


def merged(folder: str | Path, adapter: str | Path | None, alpha: float = 1.0) -> Model:
    return Path(folder), weights_merge(folder, adapter, alpha) if adapter else None


@torch.no_grad()
def logit_gap(first: Model, second: Model, samples: list[list[int]], dtype: torch.dtype, pad_id: int = 0,
              device: str = "cpu") -> float:
    """max |logits(first) − logits(second)| over `samples`, two models of the same architecture (see `merged`),
    both walked block by block: a block of each, never a whole model."""
    walk = BlockWalk(first[0], dtype, device)
    models = (first, second)
    states = [walk.embed(samples, 1, pad_id, folder, merge) for folder, merge in models]
    walk.through_blocks(models, states)
    normed, heads = [], []
    for (folder, merge), state in zip(models, states, strict=True):
        norm, head = walk.head(folder, merge)
        normed.append([norm(b.hidden) for b in state])
        heads.append(head)
    # one sample's logits of each at a time: [seq, vocab] is the largest tensor of the check
    return max(float((nn.functional.linear(a, heads[0]).float() - nn.functional.linear(b, heads[1]).float())
                     .abs().max()) for a, b in zip(*normed, strict=True))


@torch.no_grad()
def eval_loss(model: Model, examples: list[dict], batch_size: int, pad_id: int, dtype: torch.dtype,
              device: str = "cpu") -> float:
    """Mean loss per label token over `examples` (as workers/model/loss.py scores them), the model walked block by
    block: one block and at most WALK_HIDDEN_BYTES of the examples' hidden states in memory (a bigger eval set
    takes one walk per such chunk). A model of another architecture is evaluated whole (whole_model_loss)."""
    folder, merge = model
    try:
        walk = BlockWalk(folder, dtype, device)
    except NotWalkable:  # another architecture: the whole model, merged, in this process
        return whole_model_loss(model, examples, batch_size, pad_id, dtype, device)
    width = walk.skeleton.config.hidden_size * 4
    padded = [collate(examples[i : i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]
    chunks: list[list[dict]] = [[]]
    held = 0  # tokens in the last chunk
    for batch in padded:
        size = batch["input_ids"].numel()
        if chunks[-1] and (held + size) * width > WALK_HIDDEN_BYTES:
            chunks.append([])
            held = 0
        chunks[-1].append(batch)
        held += size
    total, tokens = 0.0, 0
    for chunk in chunks:
        state = walk.embed_batches([(str(i), b) for i, b in enumerate(chunk)], folder, merge)
        walk.through_blocks([model], [state])
        norm, head = walk.head(folder, merge)
        for batch in state:
            loss, n = label_loss_sum(nn.functional.linear(norm(batch.hidden), head), batch.labels.to(device))
            total, tokens = total + float(loss), tokens + n
    return total / max(tokens, 1)


def whole_model_loss(model: Model, examples: list[dict], batch_size: int, pad_id: int, dtype: torch.dtype,
                     device: str = "cpu") -> float:
    """eval_loss for a model that cannot be walked: loaded whole, the adapter merged into its weights."""
    from transformers import AutoModelForCausalLM

    folder, merge = model
    whole = AutoModelForCausalLM.from_pretrained(fetch_all(folder), dtype=dtype).to(device).eval()
    if merge:
        whole.load_state_dict(merge.apply(whole.state_dict()))
    return mean_token_loss(whole, examples, batch_size, pad_id, device)
