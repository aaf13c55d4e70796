"""BitFit (Ben Zaken et al., 2022): only bias terms are trained. peft has no BitFit, and it needs little: the base
model with `requires_grad` on the chosen biases (jobspecs.schema.bias_names: those of adapter.target_modules, or
every bias), saved as a small safetensors of those biases beside a config, and merged as
bias_base + α·(bias_trained − bias_base) — the same W_base + α·ΔW as every other method's merges.

    adapter/bitfit_config.json        {"method": "bitfit", "base_model_name_or_path", "target_modules", "biases"}
    adapter/bitfit_model.safetensors  the trained biases, named as in the base's checkpoint

Load it on the base with `model.load_state_dict(load_file("bitfit_model.safetensors"), strict=False)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from jobspecs.schema import bias_names

BITFIT_CONFIG = "bitfit_config.json"
BITFIT_WEIGHTS = "bitfit_model.safetensors"


def mark_trainable(model: torch.nn.Module, targets: list[str] | str) -> list[str]:
    """Freeze everything but the target biases; returns their names."""
    wanted = set(bias_names([n for n, _ in model.named_parameters()], targets))
    for name, param in model.named_parameters():
        param.requires_grad = name in wanted
    return sorted(wanted)


def save_biases(model: torch.nn.Module, out: Path, base_name: str, targets: list[str] | str, is_rank0: bool
                ) -> None:
    """The trained biases as stock safetensors. Under ZeRO-3 they are partitioned, so every rank joins the
    gather and rank 0 writes the full tensors."""
    import deepspeed
    from safetensors.torch import save_file

    params = dict(model.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([params[n] for n in names], modifier_rank=None):
        if is_rank0:
            out.mkdir(parents=True, exist_ok=True)
            save_file({n: params[n].detach().clone().contiguous() for n in names}, str(out / BITFIT_WEIGHTS))
            (out / BITFIT_CONFIG).write_text(json.dumps({"method": "bitfit", "base_model_name_or_path": base_name,
                                                         "target_modules": targets, "biases": names}, indent=2))


def is_bitfit(adapter: Path) -> bool:
    return (Path(adapter) / BITFIT_CONFIG).is_file()


class BiasMerge:
    """bias_base + α·(bias_trained − bias_base) for any set of the base's tensors (MergedWeights' interface)."""

    def __init__(self, adapter: str | Path, alpha: float = 1.0):
        from safetensors.torch import load_file

        self.trained, self.alpha = load_file(str(Path(adapter) / BITFIT_WEIGHTS)), alpha

    @torch.no_grad()
    def apply(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(tensors)
        for name, base in tensors.items():
            if name in self.trained:
                trained = self.trained[name].to(torch.float32)
                merged = trained if self.alpha == 1 else base.float() + self.alpha * (trained - base.float())
                out[name] = merged.to(base.dtype)
        return out
