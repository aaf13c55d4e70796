"""An adapter merged into its base one module at a time, so that merged models are written shard by shard and
walked block by block (workers/model/block_walk.py) without a whole model anywhere.

The adapter is injected by stock peft into a skeleton of the base built on the meta device (no tensor of the model
is allocated). An adapted module gets its base tensors and its own adapter tensors only when its merge is asked
for, peft's own `merge()` does the arithmetic of every method (LoRA, rsLoRA, rank/alpha patterns, DoRA, AdaLoRA,
IA3), and the module goes back to the meta device. So what we write is what `merge_and_unload` would write.

How α scales each method: workers/methods/adapter_math.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from jobspecs.confinement import open_checked
from workers.methods.adapter_math import ADAPTER_CONFIG, ADAPTER_WEIGHTS, scale
from workers.methods.bitfit import BiasMerge, is_bitfit
from workers.storage.weights import SINGLE, pack, read_tensors, shard_name, tensor_infos, write_index, write_streamed

ADAPTER_PREFIX = "base_model.model."


def weights_merge(base: str | Path, adapter: str | Path, alpha: float = 1.0) -> MergedWeights | BiasMerge:
    """W_base + α·ΔW of a trained adapter folder: a stock peft adapter, or BitFit's biases."""
    return BiasMerge(adapter, alpha) if is_bitfit(Path(adapter)) else MergedWeights(base, adapter, alpha)


def adapter_method(adapter: Path) -> str:
    """lora, dora, adalora or ia3, from a stock adapter's config."""
    config = json.loads((Path(adapter) / ADAPTER_CONFIG).read_text())
    kind = str(config.get("peft_type", "")).lower()
    return "dora" if kind == "lora" and config.get("use_dora") else kind


class MergedWeights:
    """W_base + α·ΔW of one stock adapter on the base in `base`, for any set of the base's tensors."""

    def __init__(self, base: str | Path, adapter: str | Path, alpha: float = 1.0):
        from peft import PeftConfig, PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModelForCausalLM

        self.method, self.alpha = adapter_method(Path(adapter)), alpha
        config = PeftConfig.from_pretrained(str(adapter))
        if self.method == "adalora":
            # peft builds AdaLoRA layers at init_r and cuts them to the saved rank pattern by indexing their
            # tensors, which meta tensors cannot do; the saved tensors already have the cut shapes: taken below
            config.rank_pattern = None
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
        model = PeftModel(skeleton, config, low_cpu_mem_usage=True)  # every tensor on meta
        saved, known = load_file(str(Path(adapter) / ADAPTER_WEIGHTS)), tensor_infos(Path(base))
        used: set[str] = set()
        self.layers: dict[str, BaseTunerLayer] = {}  # module name (as the base names it) → its tuner layer
        for name, module in model.named_modules():
            if not isinstance(module, BaseTunerLayer):
                continue
            base_name = name.removeprefix(ADAPTER_PREFIX)
            if f"{base_name}.weight" not in known:
                raise ValueError(f"{adapter}: the adapted module {base_name} has no weight of its own in {base} "
                                 "(tied to another tensor?); its merge cannot be written tensor by tensor")
            for key, meta in module.state_dict().items():
                if key.startswith("base_layer."):
                    continue
                # peft saves a layer's tensor without the adapter's name (and DoRA's magnitude without ".weight")
                stored = f"{name}.{'.'.join(p for p in key.split('.') if p not in module.active_adapters)}"
                stored = stored if stored in saved else stored.removesuffix(".weight")
                if stored in saved:
                    value = scale(key, saved[stored], self.method, alpha)
                    used.add(stored)
                elif key.startswith("ranknum."):  # AdaLoRA does not save it: peft sets it to the rank it built
                    value = torch.full(meta.shape, float(config.init_r), dtype=meta.dtype)
                else:
                    raise ValueError(f"{adapter}: no tensor for {base_name}'s {key}")
                _set(module, key, value)
            self.layers[base_name] = module
        if set(saved) - used:
            raise ValueError(f"{adapter}: tensors that match no adapted module: {sorted(set(saved) - used)[:3]}")

    @torch.no_grad()
    def apply(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`tensors` (some of the base's, each adapted module's weight and bias together) with the adapted
        modules' merged; the others as given."""
        out = dict(tensors)
        for name, module in self.layers.items():
            if f"{name}.weight" not in tensors:
                continue
            layer = module.get_base_layer()
            base = {k: tensors[f"{name}.{k}"] for k in ("weight", "bias") if f"{name}.{k}" in tensors}
            if set(base) != {k for k, _ in layer.named_parameters(recurse=False)}:
                raise ValueError(f"{name}: its weight and bias must be merged together")
            for k, v in base.items():  # the layer merges in place: give it copies, the caller's stay the base's
                _set(layer, k, v.clone())
            try:
                module.merge()
                merged = {k: getattr(layer, k).detach() for k in base}
            finally:
                module.merged_adapters.clear()
                for k, v in base.items():
                    _set(layer, k, torch.empty(v.shape, dtype=v.dtype, device="meta"))
            if self.method == "dora":
                merged = {k: base[k] + self.alpha * (merged[k] - base[k]) for k in base}
            out.update({f"{name}.{k}": v for k, v in merged.items()})
        return out


def _set(module: torch.nn.Module, key: str, value: torch.Tensor) -> None:
    """Replace the parameter or buffer at dotted `key` under `module` by `value` (its shape may differ)."""
    *path, leaf = key.split(".")
    for part in path:
        module = getattr(module, part)
    if leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)


def write_merged(base: str | Path, merge: MergedWeights | BiasMerge, out: Path, shard_bytes: int,
                 root: Path | None = None) -> None:
    """The merged model as a Hugging Face folder (config + safetensors shards of at most `shard_bytes` + index),
    streamed from the base's files one module at a time: a module's base tensors and their merged copies are all
    it holds."""
    base, out = Path(base), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    infos = tensor_infos(base)
    # whole modules per shard: a module's weight and bias merge together
    modules: dict[str, list[str]] = {}
    for name in infos:
        modules.setdefault(name.rsplit(".", 1)[0], []).append(name)
    groups = pack({m: sum(infos[n].nbytes for n in names) for m, names in modules.items()}, shard_bytes)

    def merged(group: list[str]):
        for module in group:
            yield from merge.apply(read_tensors(base, modules[module])).items()

    files: dict[str, str] = {}
    for i, group in enumerate(groups, 1):
        file = SINGLE if len(groups) == 1 else shard_name(i, len(groups))
        names = [n for m in group for n in modules[m]]
        write_streamed(out / file, {n: infos[n] for n in names}, merged(group), {"format": "pt"})
        files.update(dict.fromkeys(names, file))
    if len(groups) > 1:
        write_index(out, files, sum(i.nbytes for i in infos.values()))
    for small in ("config.json", "generation_config.json"):
        if (base / small).is_file():  # copied byte for byte into an artifact: only a checked file
            with open_checked(root, base / small, "model.path") as src, open(out / small, "wb") as dest:
                shutil.copyfileobj(src, dest)
