"""The export stage: what users deploy from the best checkpoint (workers/exports.py: computed on a worker, each
format written to the store by it), then the report (orchestrator/stages/report.py, small files, here)."""

from __future__ import annotations

import logging

from orchestrator.stages.context import Context, ExportOutputs
from orchestrator.stages.report import write_report
from orchestrator.stages.waits import model_task
from orchestrator.storage.artifacts import job_key

log = logging.getLogger("peftfleet.export")


def run_export(ctx: Context) -> None:
    from workers.exports import export_formats

    result, init = ctx.needs("train"), ctx.corda_init
    corda = init and {"residual_base": init.residual_base, "adapter": init.adapter}
    # One task, one CPU: the formats load the model, which the driver never does.
    outputs, folders = model_task(ctx, "export", "export task", export_formats, ctx.spec, result.adapter_files,
                                  corda, init.fidelity_samples if init else [], job_key(ctx.job_id, "artifacts"),
                                  retries=1)
    ctx.published += folders
    ctx.export = ExportOutputs(conversion=outputs["conversion"], wise_ft=outputs["wise_ft"])
    log.info("export: %s written", ", ".join(f.prefix.rsplit("/", 1)[-1] for f in folders) or "nothing")
    write_report(ctx)
