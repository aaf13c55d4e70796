"""An adapter merged into its base one module at a time, so that merged models are written shard by shard and
walked block by block (workers/block_walk.py) without a whole model anywhere.

The adapter is injected by stock peft into a skeleton of the base built on the meta device (no tensor of the model
is allocated). An adapted module gets its base tensors and its own adapter tensors only when its merge is asked
for, peft's own `merge()` does the arithmetic of every method (LoRA, rsLoRA, rank/alpha patterns, DoRA, AdaLoRA,
IA3), and the module goes back to the meta device. So what we write is what `merge_and_unload` would write.

How α scales each method: workers/adapter_math.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from workers.adapter_math import ADAPTER_CONFIG, ADAPTER_WEIGHTS, scale
from workers.weights import SINGLE, pack, read_tensors, shard_name, tensor_infos, write_index

ADAPTER_PREFIX = "base_model.model."


def adapter_method(adapter: Path) -> str:
    """lora, dora, adalora or ia3, from a stock adapter's config."""
    config = json.loads((Path(adapter) / ADAPTER_CONFIG).read_text())
    kind = str(config.get("peft_type", "")).lower()
    return "dora" if kind == "lora" and config.get("use_dora") else kind


class MergedWeights:
    """W_base + α·ΔW of one stock adapter on the base in `base`, for any set of the base's tensors."""

    def __init__(self, base: str | Path, adapter: str | Path, alpha: float = 1.0):
        from peft import PeftModel, set_peft_model_state_dict
        from peft.tuners.tuners_utils import BaseTunerLayer
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModelForCausalLM

        self.method, self.alpha = adapter_method(Path(adapter)), alpha
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
        model = PeftModel.from_pretrained(skeleton, str(adapter), low_cpu_mem_usage=True)
        known = tensor_infos(Path(base))
        # module name (as the base names it) → (its tuner layer, its adapter tensors as the layer names them)
        self.layers: dict[str, tuple[BaseTunerLayer, dict[str, torch.Tensor]]] = {}
        for name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer):
                base_name = name.removeprefix(ADAPTER_PREFIX)
                if f"{base_name}.weight" not in known:
                    raise ValueError(f"{adapter}: the adapted module {base_name} has no weight of its own in {base} "
                                     "(tied to another tensor?); its merge cannot be written tensor by tensor")
                # real (small) tensors for the adapter's own parameters; the base layer stays on meta
                own = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in module.state_dict().items()
                       if not k.startswith("base_layer.")}
                module.load_state_dict(own, assign=True, strict=False)
                self.layers[base_name] = (module, own)
        # peft's own loader maps the saved names onto the layers' (it copies into the tensors made above)
        loaded = set_peft_model_state_dict(model, load_file(str(Path(adapter) / ADAPTER_WEIGHTS)))
        if loaded.unexpected_keys:
            raise ValueError(f"{adapter}: tensors that match no adapted module: {loaded.unexpected_keys[:3]}")
        missing = {k.removeprefix(ADAPTER_PREFIX) for k in loaded.missing_keys if ".base_layer." not in k}
        for base_name, (_, own) in self.layers.items():
            for key, value in own.items():
                if f"{base_name}.{key}" in missing:
                    if not key.startswith("ranknum."):
                        raise ValueError(f"{adapter}: no tensor for {base_name}.{key}")
                    # AdaLoRA does not save its rank counter: peft sets it to the loaded rank when it builds the layer
                    value.fill_(float(own[key.replace("ranknum", "lora_E")].shape[0]))
                own[key] = scale(key, value, self.method, alpha)

    @torch.no_grad()
    def apply(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`tensors` (some of the base's, each adapted module's weight and bias together) with the adapted
        modules' merged; the others as given."""
        out = dict(tensors)
        for name, (module, own) in self.layers.items():
            if f"{name}.weight" not in tensors:
                continue
            base = {k: tensors[f"{name}.{k}"] for k in ("weight", "bias") if f"{name}.{k}" in tensors}
            if set(base) != {k for k, v in module.get_base_layer().named_parameters(recurse=False) if v is not None}:
                raise ValueError(f"{name}: its weight and bias must be merged together")
            # the layer merges in place: give it copies, the caller's tensors stay the base's
            module.load_state_dict({**{f"base_layer.{k}": v.clone() for k, v in base.items()}, **own}, assign=True,
                                   strict=True)
            try:
                module.merge()
                merged = {k: getattr(module.get_base_layer(), k).detach() for k in base}
            finally:
                module.merged_adapters.clear()
                module.to("meta")
            if self.method == "dora":
                merged = {k: base[k] + self.alpha * (merged[k] - base[k]) for k in base}
            out.update({f"{name}.{k}": v for k, v in merged.items()})
        return out


def write_merged(base: str | Path, merge: MergedWeights, out: Path, shard_bytes: int) -> None:
    """The merged model as a Hugging Face folder (config + safetensors shards of at most `shard_bytes` + index),
    written one shard at a time from the base's files: one shard of the base and its merged copy in memory."""
    base, out = Path(base), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    infos = tensor_infos(base)
    # whole modules per shard: a module's weight and bias merge together
    modules: dict[str, list[str]] = {}
    for name in infos:
        modules.setdefault(name.rsplit(".", 1)[0], []).append(name)
    groups = pack({m: sum(infos[n].nbytes for n in names) for m, names in modules.items()}, shard_bytes)
    files: dict[str, str] = {}
    for i, group in enumerate(groups, 1):
        from safetensors.torch import save_file

        names = [n for m in group for n in modules[m]]
        file = SINGLE if len(groups) == 1 else shard_name(i, len(groups))
        save_file({k: v.contiguous() for k, v in merge.apply(read_tensors(base, names)).items()}, str(out / file),
                  metadata={"format": "pt"})
        files.update(dict.fromkeys(names, file))
    if len(groups) > 1:
        write_index(out, files, sum(i.nbytes for i in infos.values()))
    for small in ("config.json", "generation_config.json"):
        if (base / small).is_file():
            shutil.copyfile(base / small, out / small)
