"""The export stage: what users deploy from the best checkpoint (workers/export/formats.py: computed on a worker, each
format written to the store by it), then the report (orchestrator/stages/report.py, small files, here)."""

from __future__ import annotations

import logging

from orchestrator.stages.context import Context, ExportOutputs
from orchestrator.stages.report import write_report
from orchestrator.stages.waits import model_task
from orchestrator.storage.artifacts import job_key
from workers.storage.store import StoredFolder

log = logging.getLogger("peftfleet.export")


def run_export(ctx: Context) -> None:
    from workers.export.formats import export_formats

    result, init = ctx.needs("train"), ctx.corda_init
    corda = init and {"residual_base": init.residual_base, "adapter": init.adapter}
    # One task, one CPU: the formats load the model, which the driver never does.
    outputs, folders = model_task(ctx, "export", "export task", export_formats, ctx.spec, result.adapter_files,
                                  corda, init.fidelity_samples if init else [], job_key(ctx.job_id, "artifacts"),
                                  retries=1)
    if ctx.job_spec and "adapter_bundle" in ctx.job_spec.export.formats:  # a sweep's (its trials have no bundle)
        folders.append(_bundle(ctx))
    ctx.published += folders
    ctx.export = ExportOutputs(conversion=outputs["conversion"], wise_ft=outputs["wise_ft"])
    log.info("export: %s written", ", ".join(f.prefix.rsplit("/", 1)[-1] for f in folders) or "nothing")
    write_report(ctx)


def _bundle(ctx: Context) -> StoredFolder:
    """The sweep's chosen trials in one folder of named adapters (workers/export/bundle.py), as a Ray task."""
    from workers.export.bundle import write_bundle

    sweep = ctx.needs("job_spec").sweep
    chosen = sweep.bundle_trials
    usable = [o for o in ctx.trials if o.usable]  # best first
    if isinstance(chosen, list):
        members = [o for o in usable if o.name in chosen]
        for name in sorted(set(chosen) - {o.name for o in members}):
            ctx.warnings.append(f"export: adapter_bundle leaves out trial {name}: it has no usable checkpoint")
    elif sweep.tasks:  # one adapter per task: its best trial, named for the task
        members = [o for task in sweep.tasks if (o := next((u for u in usable if u.task == task), None))]
    else:
        members = usable[:chosen]
    init = ctx.trial_inits
    return model_task(ctx, "export", "bundle task", write_bundle, ctx.spec, [
        {"name": o.task if sweep.tasks and not isinstance(chosen, list) else o.name, "trial": o.name,
         "values": o.values, "best": o.best, "status": o.status, "adapter": o.adapter_folder(),
         "corda_init": init[o.name].adapter if o.name in init else None} for o in members],
        sweep.metric, job_key(ctx.job_id, "artifacts/adapter_bundle"), retries=1)
