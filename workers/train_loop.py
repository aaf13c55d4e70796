"""The train stage's loop, single process: a peft adapter on the frozen base, AdamW, eval, best-by-eval-loss.

Readable top to bottom on purpose. It runs inside one Ray task; the multi-worker DeepSpeed ZeRO loop of the
training issue replaces it behind the same `train_adapter(spec) -> TrainResult` contract.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from jobspecs.schema import JobSpec
from workers.adapters import peft_config
from workers.data import collate, quiet_progress_bars, shard, tokenize


@dataclass
class TrainResult:
    adapter_files: dict[str, bytes]  # the best adapter's `save_pretrained` folder, file name -> content
    metrics: list[dict] = field(default_factory=list)  # one row per logged step / eval
    best_step: int = 0
    best_eval_loss: float | None = None
    total_steps: int = 0


def optimizer_steps(spec: JobSpec, num_examples: int) -> int:
    per_step = spec.train.micro_batch_size * spec.train.grad_accum * spec.train.num_workers
    if spec.train.max_steps is not None:
        return spec.train.max_steps
    return max(1, math.ceil(spec.train.epochs * num_examples / per_step))


@torch.no_grad()
def evaluate(model, examples: list[dict], batch_size: int, pad_id: int) -> float:
    """Mean loss per response token over `examples`."""
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id)
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * n
        tokens += n
    model.train()
    return total / max(tokens, 1)


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def train_adapter(spec: JobSpec, corda_init: dict[str, str] | None = None) -> TrainResult:
    """`corda_init`: {"residual_base": dir, "adapter": dir} from the decompose stage; the adapter starts from
    CorDA's A, B on the residual base instead of the method's own init."""
    from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_progress_bars()
    cfg = spec.train
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(spec.model.tokenizer_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_set = tokenize(spec.data.train, tokenizer, spec.data)
    eval_set = tokenize(spec.data.eval, tokenizer, spec.data) if spec.data.eval else []
    total = optimizer_steps(spec, len(train_set))

    dtype = getattr(torch, spec.model.dtype)
    if corda_init:
        base = AutoModelForCausalLM.from_pretrained(corda_init["residual_base"], dtype=dtype)
        model = PeftModel.from_pretrained(base, corda_init["adapter"], is_trainable=True)
    else:
        base = AutoModelForCausalLM.from_pretrained(spec.model.path, dtype=dtype)
        model = get_peft_model(base, peft_config(spec.adapter, total, spec.model.tokenizer_path))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    print(f"train: {len(train_set)} examples, {total} optimizer steps, "
          f"{sum(p.numel() for p in params):,} trainable parameters ({spec.adapter.method})", flush=True)

    result = TrainResult(adapter_files={}, total_steps=total)
    best_state, epoch, cursor = None, 0, 0
    order = shard(train_set, 0, 1, cfg.seed, epoch)
    model.train()
    start = time.perf_counter()
    tokens_seen = 0
    for step in range(total):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, total, cfg.warmup_steps, cfg.learning_rate)
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            if cursor + cfg.micro_batch_size > len(order):
                epoch, cursor = epoch + 1, 0
                order = shard(train_set, 0, 1, cfg.seed, epoch)
            batch = collate(order[cursor : cursor + cfg.micro_batch_size], pad_id)
            cursor += cfg.micro_batch_size
            tokens_seen += int(batch["attention_mask"].sum())
            loss = model(**batch).loss / cfg.grad_accum
            loss.backward()
            step_loss += float(loss.detach())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf")))
        optimizer.step()
        if spec.adapter.method == "adalora":
            model.base_model.update_and_allocate(step)
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        elapsed = time.perf_counter() - start
        row = {"step": done, "loss": step_loss, "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
               "tokens_per_s": tokens_seen / elapsed, "epoch": epoch}
        last = done == total
        if eval_set and (last or (cfg.eval_every and done % cfg.eval_every == 0)):
            row["eval_loss"] = evaluate(model, eval_set, cfg.micro_batch_size, pad_id)
        score = row.get("eval_loss", row["loss"] if not eval_set else None)
        if score is not None and (result.best_eval_loss is None or score < result.best_eval_loss):
            result.best_eval_loss, result.best_step = score, done
            best_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        result.metrics.append(row)
        if last or done % cfg.log_every == 0:
            eta = elapsed / done * (total - done)
            extra = f" eval_loss {row['eval_loss']:.4f}" if "eval_loss" in row else ""
            print(f"train: step {done}/{total} loss {step_loss:.4f}{extra} lr {row['lr']:.2e} "
                  f"tok/s {row['tokens_per_s']:.0f} eta {eta:.0f}s", flush=True)

    set_peft_model_state_dict(model, best_state)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        result.adapter_files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    print(f"train: best step {result.best_step} (eval loss {result.best_eval_loss})", flush=True)
    return result
