"""Build the examples' assets locally: a tiny Llama, its tokenizer and small instruction datasets.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on the generated data, the model is a
`LlamaForCausalLM` built from a config with a fixed seed. Same arguments → same files.

    python -m jobspecs.examples.build_assets [DIR]      # default: jobspecs/examples/assets
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

DEFAULT_DIR = Path(__file__).parent / "assets"
WORDS = (
    "apple river stone cloud tiger maple orbit candle silver garden rocket violet bridge harbor meadow "
    "pepper falcon copper winter summer planet lemon forest marble pencil window basket shadow thunder"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% if m['role'] == 'assistant' %}"
    "{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def instruction_records(n: int, seed: int) -> list[dict[str, str]]:
    """Small deterministic tasks a tiny model can learn: reverse, upper-case, repeat, add."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        task = rng.choice(("reverse", "upper", "repeat", "add"))
        if task == "add":
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            prompt, response = f"add: {a} + {b}\n", str(a + b)
        else:
            word = rng.choice(WORDS)
            response = {"reverse": word[::-1], "upper": word.upper(), "repeat": f"{word} {word}"}[task]
            prompt = f"{task}: {word}\n"
        records.append({"prompt": prompt, "response": response})
    return records


def build_tokenizer(texts: list[str], out: Path, vocab_size: int = 384):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=specials, show_progress=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return tokenizer


def build_tiny_model(
    out: Path, tokenizer, pretrain_texts: list[str], family: str = "llama", hidden: int = 64, layers: int = 2,
    heads: int = 4, kv_heads: int = 2, pretrain_steps: int = 150, seed: int = 0,
) -> None:
    """A causal LM from a config (family llama, or qwen2: the same stack with q/k/v biases, for BitFit), briefly
    pretrained so it is a base worth fine-tuning (a random model's frozen lm_head behind RMSNorm can barely move its
    logits). Fixed seed, one thread → same weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # a bar per save is repaint noise in `make demo`'s output
    # save_pretrained imports DeepSpeed (accelerate's isinstance check), which would probe for an accelerator and warn
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
        family]
    config = config_class(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = model_class(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        rng = random.Random(seed)
        for _ in range(pretrain_steps):
            batch = tokenizer(rng.sample(pretrain_texts, 32), padding=True, return_tensors="pt")
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            model(**batch, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out, safe_serialization=True)


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def build_assets(out: Path = DEFAULT_DIR, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Write tiny-llama/ and tiny-qwen2/ (model + tokenizer), train.jsonl, eval.jsonl and calibration.jsonl under
    `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": instruction_records(256, seed), "eval": instruction_records(32, seed + 1),
              "calibration": instruction_records(64, seed + 2)}
    for name, records in splits.items():
        write_jsonl(out / f"{name}.jsonl", records)
    model_dir = out / "tiny-llama"
    texts = [r["prompt"] + r["response"] for records in splits.values() for r in records]
    tokenizer = build_tokenizer(texts, model_dir)
    # The base knows the vocabulary and two of the four tasks; fine-tuning teaches the other two.
    pretrain = [r["prompt"] + r["response"] for r in instruction_records(512, seed + 3)
                if r["prompt"].split(":")[0] in ("reverse", "upper")]
    build_tiny_model(model_dir, tokenizer, pretrain, hidden=hidden, layers=layers, seed=seed)
    tokenizer.save_pretrained(out / "tiny-qwen2")
    build_tiny_model(out / "tiny-qwen2", tokenizer, pretrain, family="qwen2", hidden=hidden, layers=layers, seed=seed)
    return out


if __name__ == "__main__":
    target = build_assets(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR)
    print(f"assets written to {target}")
