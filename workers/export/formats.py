"""The export stage's work, on a worker: the formats users deploy, computed from stock files
(workers/methods/adapter_math.py has the math) and written to the job's store kind by kind. It runs as a Ray task, not
in the driver, because the Wise-FT sweep and the conversion check walk the model block by block and the merges stream it
shard by shard (no whole model in memory); it reads CorDA's outputs through the node's cache.

    adapter                    the trained peft adapter (for CorDA: on residual_base)
    adapter_on_original_base   CorDA: the same model as a rank-2r LoRA on the original base, logits checked
    merged@<α>                 full model W_base + α·ΔW (safetensors + tokenizer), for each export.merge_alphas
    adapter@<α>                stock adapter with effect α·ΔW, for each export.merge_alphas
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from jobspecs.memory import SHARD_BYTES
from jobspecs.schema import VIRTUAL_TOKEN_METHODS, JobSpec
from workers.data.examples import tokenize
from workers.data.tokenizer import load_tokenizer, pad_id
from workers.methods import adapter_math
from workers.methods.merged_weights import weights_merge, write_merged
from workers.model.block_walk import eval_loss, logit_gap, merged
from workers.runtime.job_process import start_job_process
from workers.runtime.logs import say
from workers.storage.inputs import confinement_root, on_node
from workers.storage.node_cache import local_folder
from workers.storage.store import StoredFolder, open_store


def fmt(alpha: float) -> str:
    return f"{alpha:g}"


def export_formats(spec: JobSpec, adapter_files: dict[str, bytes], corda_init: dict[str, StoredFolder] | None,
                   samples: list[list[int]], prefix: str) -> tuple[dict, list[StoredFolder]]:
    """Every format the spec asks for, each written to `prefix/<kind>/` in the store; returns the conversion
    check and the Wise-FT rows (for the report) and what was written."""
    start_job_process()
    store, out = open_store(spec.storage), {"conversion": None, "wise_ft": []}
    with tempfile.TemporaryDirectory(prefix="peftfleet-export-") as tmp:
        staging, work = Path(tmp) / "staging", Path(tmp) / "work"
        kinds = write_formats(spec, on_node(spec), adapter_files, corda_init, samples, staging, work, out)
        return out, [store.publish_folder(f"{prefix}/{kind}", staging / kind) for kind in kinds]


def write_formats(spec: JobSpec, inputs: JobSpec, adapter_files: dict[str, bytes],
                  corda_init: dict[str, StoredFolder] | None, samples: list[list[int]], staging: Path, work: Path,
                  out: dict) -> list[str]:
    """`inputs`: the spec with its inputs on this node (workers/storage/inputs.py); `spec` names them for the
    artifacts."""
    formats, method = spec.export.formats, spec.adapter.method
    kinds: list[str] = []

    def folder(kind: str, wanted: bool) -> Path:
        path = staging / kind if wanted else work / kind
        path.mkdir(parents=True, exist_ok=True)
        if wanted:
            kinds.append(kind)
        return path

    adapter = folder("adapter", "adapter" in formats)
    for name, data in adapter_files.items():
        (adapter / name).write_bytes(data)
    tokenizer = load_tokenizer(inputs)
    original_base, base_name = inputs.model.path, str(spec.model.path)

    # A CorDA adapter lives on the residual base; everything after this works on the original base.
    on_original = adapter
    if corda_init:
        on_original = folder("adapter_on_original_base", "adapter_on_original_base" in formats)
        initial, residual = local_folder(spec, corda_init["adapter"]), local_folder(spec, corda_init["residual_base"])
        adapter_math.to_original_base(adapter, initial, base_name, on_original)
        # block by block (one block of each model at a time), in fp32, like the init-fidelity check
        gap = logit_gap(merged(residual, adapter), merged(original_base, on_original), samples, torch.float32)
        out["conversion"] = {"max_abs_logit_diff": gap, "tolerance": spec.export.conversion_tolerance,
                             "samples": len(samples)}
        say(f"export: adapter on the original base: max |Δlogits| {gap:.2e} over {len(samples)} samples "
            f"(tolerance {spec.export.conversion_tolerance:.0e})")
        if gap > spec.export.conversion_tolerance:
            raise RuntimeError(f"export: the converted adapter on the original base differs from the trained model "
                               f"by max |Δlogits| {gap:.3e} > export.conversion_tolerance "
                               f"{spec.export.conversion_tolerance:g}")
    if method not in VIRTUAL_TOKEN_METHODS and spec.export.wise_ft_alphas and spec.data.eval:
        examples, pad = tokenize(inputs.data.eval, tokenizer, spec.data), pad_id(inputs, tokenizer)
        for alpha in spec.export.wise_ft_alphas:  # one walk of the model per α
            loss = eval_loss(merged(original_base, on_original, alpha), examples, spec.train.micro_batch_size, pad,
                             torch.float32)
            perplexity = math.exp(min(loss, 50.0))
            out["wise_ft"].append({"alpha": alpha, "eval_loss": loss, "perplexity": perplexity})
            say(f"export: Wise-FT α {fmt(alpha)}: eval loss {loss:.4f}, perplexity {perplexity:.2f}")
    for alpha in spec.export.merge_alphas if "merged" in formats else []:
        merged_dir = folder(f"merged@{fmt(alpha)}", True)
        write_merged(original_base, weights_merge(original_base, on_original, alpha), merged_dir, SHARD_BYTES,
                     root=confinement_root(spec.data_root, original_base))
        if tokenizer is not None:
            tokenizer.save_pretrained(merged_dir)
        say(f"export: merged@{fmt(alpha)} written")
    for alpha in spec.export.merge_alphas if "scaled_adapter" in formats else []:
        adapter_math.scaled_adapter(on_original, method, alpha, folder(f"adapter@{fmt(alpha)}", True))
    return kinds
