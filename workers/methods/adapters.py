"""The spec's adapter section as a stock peft config: peft implements every method, we only translate."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from jobspecs.schema import AdapterSpec

if TYPE_CHECKING:
    from peft import PeftConfig


def peft_config(adapter: AdapterSpec, total_steps: int, tokenizer_path: Path) -> PeftConfig:
    """`total_steps` (optimizer steps of the whole run) feeds AdaLoRA's budget schedule when the spec omits it.
    BitFit is not peft's (workers/methods/bitfit.py)."""
    # peft is imported here, not at module level: the driver imports this module only to hand it to Ray Train
    # workers, and peft costs it seconds on the way to the first training step.
    from peft import (
        AdaLoraConfig,
        IA3Config,
        LoraConfig,
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptEncoderReparameterizationType,
        PromptTuningConfig,
        PromptTuningInit,
        TaskType,
    )

    task = TaskType.CAUSAL_LM
    common = {"target_modules": adapter.target_modules, "task_type": task}
    block = adapter.block()
    if adapter.method in ("lora", "dora"):
        return LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                          use_dora=adapter.method == "dora", **common)
    if adapter.method == "adalora":
        return AdaLoraConfig(
            init_r=block.init_r, target_r=adapter.r, tinit=block.tinit, tfinal=block.tfinal, deltaT=block.delta_t,
            beta1=block.beta1, beta2=block.beta2, orth_reg_weight=block.orth_reg_weight,
            total_step=block.total_step or total_steps, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
            **common,
        )
    if adapter.method == "ia3":
        return IA3Config(feedforward_modules=block.feedforward_modules, **common)
    if adapter.method == "prefix":
        hidden = {"encoder_hidden_size": block.encoder_hidden_size} if block.encoder_hidden_size else {}
        return PrefixTuningConfig(num_virtual_tokens=block.num_virtual_tokens, prefix_projection=block.projection,
                                  task_type=task, **hidden)
    if adapter.method == "p_tuning":
        hidden = {"encoder_hidden_size": block.encoder_hidden_size} if block.encoder_hidden_size else {}
        kind = PromptEncoderReparameterizationType.LSTM if block.encoder == "lstm" else \
            PromptEncoderReparameterizationType.MLP
        return PromptEncoderConfig(num_virtual_tokens=block.num_virtual_tokens, encoder_reparameterization_type=kind,
                                   encoder_num_layers=block.encoder_num_layers, encoder_dropout=block.encoder_dropout,
                                   task_type=task, **hidden)
    if block.init_text is None:
        return PromptTuningConfig(num_virtual_tokens=block.num_virtual_tokens, task_type=task)
    return PromptTuningConfig(
        num_virtual_tokens=block.num_virtual_tokens, task_type=task, prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text=block.init_text, tokenizer_name_or_path=str(tokenizer_path),
    )
