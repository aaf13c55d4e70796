"""The upload stage, always last: every staged artifact to the store with its sha256, then the manifest (which
also lists the artifacts workers wrote to the store themselves, e.g. residual_base)."""

from __future__ import annotations

import logging

from orchestrator.stages.context import Context
from orchestrator.storage.artifacts import job_key, upload_artifacts

log = logging.getLogger("peftfleet.upload")


def run_upload(ctx: Context) -> None:
    def progress(entry, i, n):
        log.info("upload: %d/%d %s (%d bytes)", i, n, entry.path, entry.size)

    manifest = upload_artifacts(ctx.store, ctx.job_id, ctx.staging, on_file=progress, published=ctx.published)
    log.info("upload: manifest written with %d files: %s", len(manifest.files),
             ctx.store.url_of(job_key(ctx.job_id, "manifest.json")))
