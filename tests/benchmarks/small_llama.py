"""A small random Llama and token data, built locally for the benchmarks (nothing is downloaded)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def build_model(path: Path, hidden: int, layers: int, intermediate: int, vocab: int, seq: int,
                max_shard_size: str | None = None) -> None:
    """max_shard_size: save sharded, as real checkpoints are (a few GB per file)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=seq * 2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config)
    if max_shard_size:
        model.save_pretrained(path, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(path)
    del model
    from jobspecs.examples.build_assets import build_tokenizer

    build_tokenizer(["a b c"], path, vocab_size=300)  # only read for its pad id; samples are pre-tokenized


def token_samples(path: Path, count: int, seq: int, vocab: int, ragged: bool = True) -> list[list[int]]:
    """`count` samples of random ids (BOS first), written as `tokens`-format jsonl; ragged: up to seq/4 shorter."""
    rng = random.Random(0)
    samples = [[1] + [rng.randrange(3, vocab) for _ in range(seq - 1 - (rng.randrange(0, seq // 4) if ragged else 0))]
               for _ in range(count)]
    path.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in samples))
    return samples
