"""The export stage: the best checkpoint's adapter and what users deploy from it (see workers/export.py for the
math), then the report. Artifact kinds, each a folder in the manifest:

    adapter                    the trained peft adapter (for CorDA: on residual_base)
    adapter_on_original_base   CorDA: the same model as a rank-2r LoRA on the original base, logits checked
    merged@<α>                 full model W_base + α·ΔW (safetensors + tokenizer), for each export.merge_alphas
    adapter@<α>                stock adapter with effect α·ΔW, for each export.merge_alphas
    report                     metrics.jsonl, summary.json, report.json, index.html and PNG plots
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from orchestrator.stages.context import Context, ExportOutputs
from orchestrator.stages.report import write_report

log = logging.getLogger("peftfleet.export")


def _fmt(alpha: float) -> str:
    return f"{alpha:g}"


def run_export(ctx: Context) -> None:
    with tempfile.TemporaryDirectory(prefix="peftfleet-export-") as work:
        ctx.export = export_artifacts(ctx, Path(work))
    write_report(ctx)


def export_artifacts(ctx: Context, work: Path) -> ExportOutputs:
    """Write the artifact folders the spec asks for; returns the checks and the sweep for the report."""
    from workers import adapter_math
    from workers.data import load_tokenizer, pad_id, tokenize

    spec, result = ctx.spec, ctx.needs("train")
    formats, method = spec.export.formats, spec.adapter.method
    adapter = ctx.artifact_dir("adapter") if "adapter" in formats else work / "adapter"
    adapter.mkdir(parents=True, exist_ok=True)
    for name, data in result.adapter_files.items():
        (adapter / name).write_bytes(data)
    tokenizer = load_tokenizer(spec)
    pad = pad_id(spec, tokenizer)
    original_base = str(spec.model.path)
    outputs = ExportOutputs()

    # A CorDA adapter lives on the residual base; everything after this works on the original base.
    on_original = adapter
    init = ctx.corda_init
    if init:
        on_original = (ctx.artifact_dir("adapter_on_original_base") if "adapter_on_original_base" in formats
                       else work / "adapter_on_original_base")
        adapter_math.to_original_base(adapter, init.adapter, original_base, on_original)
        samples = init.fidelity_samples
        gap = adapter_math.max_logit_gap(adapter_math.load_model(str(init.residual_base), adapter),
                                   adapter_math.load_model(original_base, on_original), samples)
        outputs.conversion = {"max_abs_logit_diff": gap, "tolerance": spec.export.conversion_tolerance,
                                 "samples": len(samples)}
        log.info("export: adapter on the original base: max |Δlogits| %.2e over %d samples (tolerance %.0e)",
                 gap, len(samples), spec.export.conversion_tolerance)
        if gap > spec.export.conversion_tolerance:
            raise RuntimeError(f"export: the converted adapter on the original base differs from the trained model "
                               f"by max |Δlogits| {gap:.3e} > export.conversion_tolerance "
                               f"{spec.export.conversion_tolerance:g}")
    if method not in ("prefix", "prompt") and spec.export.wise_ft_alphas and spec.data.eval:
        examples = tokenize(spec.data.eval, tokenizer, spec.data)
        rows = adapter_math.wise_ft_sweep(original_base, on_original, method, spec.export.wise_ft_alphas, examples,
                                    spec.train.micro_batch_size, pad, work / "wise-ft")
        for row in rows:
            log.info("export: Wise-FT α %s: eval loss %.4f, perplexity %.2f", _fmt(row["alpha"]), row["eval_loss"],
                     row["perplexity"])
        outputs.wise_ft = rows
    for alpha in spec.export.merge_alphas if "merged" in formats else []:
        folder = ctx.artifact_dir(f"merged@{_fmt(alpha)}")
        merged = adapter_math.interpolated_model(original_base, on_original, method, alpha,
                                                 work / f"merge-{_fmt(alpha)}")
        merged.save_pretrained(folder, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        log.info("export: merged@%s written", _fmt(alpha))
    for alpha in spec.export.merge_alphas if "scaled_adapter" in formats else []:
        adapter_math.scaled_adapter(on_original, method, alpha, ctx.artifact_dir(f"adapter@{_fmt(alpha)}"))
    return outputs
