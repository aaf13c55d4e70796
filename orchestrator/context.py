"""What a stage gets: the job, its frozen spec, the store, a staging folder, and what earlier stages left."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobspecs import JobSpec
from orchestrator.store import Store


@dataclass
class Context:
    job_id: str
    spec: JobSpec
    store: Store
    staging: Path  # staging/<kind>/... becomes jobs/<id>/artifacts/<kind>/...
    results: dict[str, Any] = field(default_factory=dict)  # in-memory hand-over between stages
    warnings: list[str] = field(default_factory=list)  # shown by `status`, kept in the record

    def artifact_dir(self, kind: str) -> Path:
        path = self.staging / kind
        path.mkdir(parents=True, exist_ok=True)
        return path


