"""Turning a trained adapter into things a user deploys: the adapter on the original base (for adapters trained on a
residual base, like CorDA's) and α-scaled adapters (workers/methods/merged_weights.py merges them module by module).
Everything here goes through stock peft files, so what we check is what a user loads.

How α scales each method (α = 0 is the base model, α = 1 the trained one, exactly):
- LoRA / AdaLoRA: ΔW = s·B·A is linear in B, so α scales lora_B (the same as peft's `rescale_adapter_scale`).
- DoRA: not linear — its magnitude vector renormalises the columns, so even "α = 0" on the adapter changes the
  output. We interpolate the merged weights instead: W(α) = W_base + α·(W_dora − W_base).
- IA3: the learned vectors l scale activations; l(α) = 1 + α·(l − 1).
- Prefix / prompt tuning have no weight delta to scale (refused by the spec's validation).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def read_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((folder / ADAPTER_CONFIG).read_text()), load_file(str(folder / ADAPTER_WEIGHTS))


def write_adapter(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})


def to_original_base(trained: Path, initial: Path, original_base: str, out: Path) -> None:
    """The trained adapter re-expressed on the original base. The residual base is W0 − s·B0·A0, so the trained
    model is W0 + s·(B·A − B0·A0): a LoRA of rank 2r with A' = [A; A0], B' = [B, −B0] and the same scaling
    (alpha doubled with r). This is what peft's `path_initial_model_for_weight_conversion` writes."""
    config, weights = read_adapter(trained)
    init_config, init_weights = read_adapter(initial)
    if config.get("use_rslora") or config.get("use_dora"):
        raise ValueError("adapter_on_original_base: only plain LoRA adapters can be converted (not rsLoRA/DoRA)")
    converted = {}
    for key, value in weights.items():
        if "lora_A" in key:
            converted[key] = torch.cat([value, init_weights[key]], dim=0)
        elif "lora_B" in key:
            converted[key] = torch.cat([value, -init_weights[key]], dim=1)
        else:
            converted[key] = value
    config = {**config, "r": 2 * config["r"], "lora_alpha": 2 * config["lora_alpha"],
              "rank_pattern": {k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()},
              "alpha_pattern": {k: 2 * v for k, v in (config.get("alpha_pattern") or {}).items()},
              "base_model_name_or_path": original_base, "init_lora_weights": True}
    if init_config["r"] != config["r"] // 2:
        raise ValueError(f"{initial}: rank {init_config['r']} differs from the trained adapter's "
                         f"{config['r'] // 2}; the conversion needs the adapter training started from")
    write_adapter(out, config, converted)


def scale(key: str, value: torch.Tensor, method: str, alpha: float) -> torch.Tensor:
    """One adapter tensor of an adapter whose effect is α·ΔW (see the module docstring)."""
    if method in ("lora", "adalora") and "lora_B" in key:
        return value * alpha
    if method == "ia3" and "ia3_" in key:
        return 1 + alpha * (value - 1)
    return value


def scaled_adapter(adapter: Path, method: str, alpha: float, out: Path) -> None:
    """A stock adapter whose effect is α·ΔW (LoRA-family: lora_B·α; IA3: 1 + α·(l − 1))."""
    config, weights = read_adapter(adapter)
    if method == "dora":
        raise ValueError("adapter@α: a DoRA adapter cannot be scaled (its magnitude renormalises); use merged@α")
    write_adapter(out, config, {key: scale(key, value, method, alpha) for key, value in weights.items()})
