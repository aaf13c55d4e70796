"""The one loss: next-token cross-entropy summed over label tokens (labels −100 are not scored), in fp32.

Training normalises it by the global batch's label tokens; evaluation (the train stage's eval, the Wise-FT sweep)
reports it per label token over the whole set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.data.examples import IGNORE, collate
from workers.methods.adalora import REGULARISER


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """(Σ next-token cross-entropy over label tokens, number of label tokens, AdaLoRA's regulariser if the model
    returns one)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    # Prompt/prefix tuning prepend virtual tokens: score only the real positions.
    loss, n = label_loss_sum(out.logits[:, -batch["input_ids"].shape[1] :], batch["labels"])
    return loss, n, out.get(REGULARISER)


def label_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(Σ next-token cross-entropy over label tokens, their number) for logits and labels of the same positions."""
    labels, logits = labels[:, 1:], logits[:, :-1]
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    return loss, int((labels != IGNORE).sum())


@torch.no_grad()
def mean_token_loss(model, examples: list[dict], batch_size: int, pad_id: int, device="cpu") -> float:
    """Mean loss per label token over `examples`, in order, `batch_size` at a time."""
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id).items()}
        loss, n, _ = token_loss_sum(model, batch)
        total, tokens = total + float(loss), tokens + n
    return total / max(tokens, 1)
