"""AdaLoRA under DeepSpeed, done so that ranks really shrink.

peft's documented loop (`update_and_allocate` after `optimizer.step()`) fails silently under DeepSpeed:
- peft reads gradients through `deepspeed.utils.safe_get_full_grad` only when transformers' global DeepSpeed
  config is set (HF Trainer sets it), else it reads `p.grad`, which ZeRO has moved into its buckets;
- ZeRO keeps fp32 master weights and copies them over the module's parameters at every `engine.step()`, so the
  masks peft writes into `lora_E` are undone and every layer keeps its initial rank.
So: keep an `HfDeepSpeedConfig` alive, allocate between the last backward of a step and `engine.step()` (the
full gradients exist only then), and after the step write the masked `lora_E` back into the fp32 master copy.
"""

from __future__ import annotations

import torch


class AdaLoraBudget:
    def __init__(self, engine, ds_config: dict):
        from transformers.integrations import HfDeepSpeedConfig

        self._hf_ds_config = HfDeepSpeedConfig(ds_config)  # must stay referenced: peft looks it up globally
        self.engine = engine
        self.tuner = engine.module.base_model  # peft's AdaLoraModel
        self.config = self.tuner.peft_config[self.tuner.trainable_adapter_name]

    def regularizer(self) -> torch.Tensor:
        """peft's orthogonality penalty, mean over lora_A/lora_B of ‖PPᵀ − I‖_F (peft adds it only when the model
        computes the loss itself; we compute a token-normalised loss, so we add it here)."""
        total, count = 0.0, 0
        for name, p in self.tuner.model.named_parameters():
            if ("lora_A" in name or "lora_B" in name) and self.tuner.trainable_adapter_name in name:
                cov = p @ p.T if "lora_A" in name else p.T @ p
                total = total + torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype))
                count += 1
        return self.config.orth_reg_weight * total / max(count, 1)

    def allocate(self, step: int) -> None:
        """Score importance and mask to the budget; call after the step's last backward, before engine.step()."""
        self.tuner.update_and_allocate(step)

    def enforce(self) -> None:
        """Re-apply the rank pattern after engine.step() and make it stick in ZeRO's fp32 master copy."""
        pattern = self.config.rank_pattern
        if not pattern:
            return
        self.tuner.rankallocator.mask_using_rank_pattern(self.tuner.model, pattern)
        if self.engine.zero_optimization_stage() == 0:
            return
        from deepspeed.utils import safe_set_full_fp32_param

        for name, p in self.tuner.model.named_parameters():
            if "lora_E" in name:
                safe_set_full_fp32_param(p, p.data.clone())

    def ranks(self) -> dict[str, int]:
        """Effective rank per adapted layer: its nonzero singular values (peft never resizes during training)."""
        return {name.split(".lora_E")[0].removeprefix("model."): int(torch.count_nonzero(p))
                for name, p in self.tuner.model.named_parameters() if "lora_E" in name}
