"""AdaLoRA under DeepSpeed, done so that ranks really shrink.

peft's documented loop (`update_and_allocate` after `optimizer.step()`) fails silently under DeepSpeed:
- peft reads gradients through `deepspeed.utils.safe_get_full_grad` only when transformers' global DeepSpeed
  config is set (HF Trainer sets it), else it reads `p.grad`, which ZeRO has moved into its buckets;
- ZeRO keeps fp32 master weights and copies them over the module's parameters at every `engine.step()`, so the
  masks peft writes into `lora_E` are undone and every layer keeps its initial rank.
So: keep an `HfDeepSpeedConfig` alive, allocate between the last backward of a step and `engine.step()` (the
full gradients exist only then), and after the step write the masked `lora_E` back into the fp32 master copy.

Under ZeRO-3 every adapter tensor is a partitioned shard (shape [0] locally) outside its module's forward, so the
orthogonal regulariser is computed inside the model's forward (lora_A/lora_B registered as parameters of the top
module, so ZeRO keeps them gathered there and gathers them again for the backward), and allocation, masking and
rank counting run inside `GatheredParameters`.
"""

from __future__ import annotations

import contextlib

import torch

REGULARISER = "orth_reg"  # the model output key the regulariser travels in


def adapter_params(model, kinds: tuple[str, ...]) -> list[tuple[str, torch.nn.Parameter]]:
    """The adapter's parameters whose names contain one of `kinds` (peft's naming: lora_A, lora_E, lora_ranknum...)."""
    return [(name, p) for name, p in model.named_parameters() if any(k in name for k in kinds)]


def add_regulariser(model, zero3: bool) -> None:
    """Make the peft model's forward return peft's orthogonality penalty under `REGULARISER`: the mean over
    lora_A/lora_B of ‖PPᵀ − I‖_F times orth_reg_weight (peft adds it only when the model computes the loss itself;
    we compute a token-normalised loss). Call before `deepspeed.initialize`, so this hook runs before ZeRO-3
    releases the parameters at the end of the forward."""
    tuner = model.base_model
    weight = tuner.peft_config[tuner.trainable_adapter_name].orth_reg_weight
    factors = adapter_params(model, ("lora_A", "lora_B"))
    if zero3:
        import deepspeed

        for _, p in factors:
            deepspeed.zero.register_external_parameter(model, p)

    def hook(_module, _inputs, output):
        total = 0.0
        for name, p in factors:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            total = total + torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype,
                                                                        device=cov.device))
        output[REGULARISER] = weight * total / max(len(factors), 1)
        return output

    model.register_forward_hook(hook)


class AdaLoraBudget:
    def __init__(self, engine, ds_config: dict):
        from transformers.integrations import HfDeepSpeedConfig

        self._hf_ds_config = HfDeepSpeedConfig(ds_config)  # must stay referenced: peft looks it up globally
        self.engine = engine
        self.tuner = engine.module.base_model  # peft's AdaLoraModel
        self.config = self.tuner.peft_config[self.tuner.trainable_adapter_name]
        self.zero3 = engine.zero_optimization_stage() == 3

    def _gathered(self, kinds: tuple[str, ...], modifier_rank: int | None):
        """The named adapter parameters whole on every rank (a no-op below ZeRO-3)."""
        if not self.zero3:
            return contextlib.nullcontext()
        import deepspeed

        params = [p for _, p in adapter_params(self.tuner.model, kinds)]
        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)

    def allocate(self, step: int) -> None:
        """Score importance and mask to the budget; call after the step's last backward, before engine.step()."""
        with self._gathered(("lora_",), modifier_rank=0):  # everything peft's update_ipt reads
            self.tuner.update_and_allocate(step)

    def enforce(self) -> None:
        """Re-apply the rank pattern after engine.step() and make it stick in ZeRO's fp32 master copy."""
        pattern = self.config.rank_pattern
        if not pattern:
            return
        with self._gathered(("lora_E",), modifier_rank=0):
            self.tuner.rankallocator.mask_using_rank_pattern(self.tuner.model, pattern)
            if self.engine.zero_optimization_stage() == 0:
                return
            from deepspeed.utils import safe_set_full_fp32_param

            for _, p in adapter_params(self.tuner.model, ("lora_E",)):
                safe_set_full_fp32_param(p, p.data.clone())

    def ranks(self) -> dict[str, int]:
        """Effective rank per adapted layer: its nonzero singular values (peft never resizes during training)."""
        with self._gathered(("lora_E",), modifier_rank=None):
            return {name.split(".lora_E")[0].removeprefix("model."):
                    int(torch.count_nonzero(p)) for name, p in adapter_params(self.tuner.model, ("lora_E",))}
