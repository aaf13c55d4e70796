"""Models walked block by block (the logit checks of CorDA's init and conversion) against stock transformers + peft
running the whole model."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from workers.model.block_walk import BlockWalk, NotWalkable, logit_gap, merged

SAMPLES = [[1, 5, 9, 12, 7, 3], [1, 4, 4, 8]]


def whole_gap(a, b) -> float:
    with torch.no_grad():
        return max(float((a(input_ids=torch.tensor([s])).logits - b(input_ids=torch.tensor([s])).logits).abs().max())
                   for s in SAMPLES)


def trained_lora(base_path, out, seed: int = 0):
    """A LoRA on every linear layer with random (non-zero) B, saved as stock peft saves it."""
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_walked_gap_equals_the_whole_model_gap(assets, tmp_path, tied):
    base = assets / "tiny-llama"
    if tied:  # GQA (one KV head) and a head that is the embedding matrix
        config = LlamaConfig(**{**AutoModelForCausalLM.from_pretrained(base).config.to_dict(),
                                "num_key_value_heads": 1, "tie_word_embeddings": True})
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(tmp_path / "tied")
        base = tmp_path / "tied"
    adapter = trained_lora(base, tmp_path / "adapter")
    stock = whole_gap(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval(),
                      AutoModelForCausalLM.from_pretrained(base).eval())
    walked = logit_gap(merged(base, adapter), merged(base, None), SAMPLES, torch.float32)
    assert stock > 1e-2  # the adapter changes the model
    # merged s·B·A vs peft's unmerged forward: the same function, rounded differently (fp32)
    assert walked == pytest.approx(stock, rel=1e-4)
    assert logit_gap(merged(base, adapter), merged(base, adapter), SAMPLES, torch.float32) == 0.0


def test_a_model_that_is_not_llama_shaped_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(NotWalkable, match="not a Llama-family model"):
        BlockWalk(tmp_path / "gpt2", torch.float32, "cpu")
