"""peft's own single-process CorDA, the peer of the CorDA benchmarks: its model, config and covariance pass."""

from __future__ import annotations

import time

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_calibrated(model_path, samples: list[list[int]], r: int):
    """(model, LoraConfig, seconds): the model with peft's covariance collected over `samples`, batch 1."""
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import calib_cov_distribution, target_modules
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights="corda",
                        corda_config=CordaConfig(corda_method="ipm"))
    for _, module in target_modules(model, config):
        module.corda_method, module.rank = "ipm", r
    t0 = time.perf_counter()
    with torch.no_grad():
        calib_cov_distribution(model, config, lambda: [model(input_ids=torch.tensor([s])) for s in samples],
                               None, None)
    return model, config, time.perf_counter() - t0
