"""Per-user limits on a shared gateway: what one job may ask for (422 when it asks for more than a user may ever
have) and what one user may hold at once across their jobs in flight (429 while they hold it).

Sizes come from the spec and the model's files alone, before anything runs: workers and GPUs are the most any
stage of the job holds at once (stages run one after another); artifact bytes are the model's weights once per
full-model output (each merged@α, CorDA's residual base) plus the adapters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator

from jobspecs import JobSpec
from jobspecs.remote import Location, S3Uri, is_remote, top_files
from jobspecs.schema import input_paths
from jobspecs.trials import decomposition_key, expand

_WEIGHT_SUFFIXES = (".safetensors", ".bin")


class Limits(BaseModel):
    """What one user may use. Each field is enforced at submit, naming the field (limits.<field>)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    jobs_in_flight: int = Field(4, gt=0, description="Jobs not yet ended (queued or running) at once.")
    workers: int = Field(8, gt=0, description="Worker processes (training workers, CorDA actors) across the "
                                              "user's jobs in flight.")
    gpus: int = Field(8, ge=0, description="GPUs across the user's jobs in flight.")
    steps: int = Field(100_000, gt=0, description="train.max_steps of one job; an epochs-based job is bounded "
                                                  "by job_hours instead.")
    job_hours: float = Field(24.0, gt=0, description="Wall-clock deadline of a job, from its submission; a job "
                                                     "past it is cancelled and recorded so.")
    artifact_gib: float = Field(200.0, gt=0, description="Estimated bytes of one job's artifacts (merged models, "
                                                         "CorDA's residual base, adapters).")
    merge_alphas: int = Field(8, gt=0, description="export.merge_alphas of one job (each a model-sized "
                                                   "artifact, or a model-sized merge); Wise-FT evaluations are "
                                                   "bounded by job_hours.")
    input_prefixes: list[str] = Field(default_factory=list, description="s3://bucket/prefix under which the "
                                      "user's specs may name inputs (model, tokenizer, data, covariance_from): the "
                                      "cluster reads them with its own credentials, so a bucket no one listed here "
                                      "is refused before it is even listed. Default: none.")

    @field_validator("input_prefixes")
    @classmethod
    def _prefixes(cls, prefixes: list[str]) -> list[str]:
        return [S3Uri.parse(p) if is_remote(p) else _not_s3(p) for p in prefixes]


def _stages(spec: JobSpec) -> list[tuple[str, int, bool]]:
    """(spec section, worker processes, on GPUs) of each stage that starts workers (a sweep's trains as many
    trials at once as it may)."""
    at_once = spec.sweep.max_concurrent_trials if spec.sweep else 1
    stages = [("train", spec.train.num_workers * at_once, spec.train.use_gpu)]
    if spec.uses_corda:
        corda = spec.init.corda_spec
        stages.append(("init.corda", corda.num_workers, corda.use_gpu))
    return stages


@dataclass(frozen=True)
class Usage:
    """What a job holds while in flight: its busiest stage's workers and GPUs (stages run one after another)."""

    workers: int
    gpus: int

    @classmethod
    def of(cls, spec: JobSpec) -> Usage:
        stages = _stages(spec)
        return cls(max(n for _, n, _ in stages), max(n if gpu else 0 for _, n, gpu in stages))


def model_bytes(folder: Location) -> int:
    return sum(size for name, size in top_files(folder).items() if name.endswith(_WEIGHT_SUFFIXES))


def artifact_bytes(spec: JobSpec) -> int:
    """An upper estimate of the job's artifacts: the model once per full-model output."""
    full = len(spec.export.merge_alphas) if "merged" in spec.export.formats else 0
    # a residual base per CorDA decomposition (a sweep's distinct ones)
    specs = [t.spec for t in expand(spec, {"check_files": False})] or [spec]
    full += len({json.dumps(key, sort_keys=True) for s in specs if (key := decomposition_key(s)) is not None})
    return full * model_bytes(spec.model.path)


def _not_s3(prefix: str) -> str:
    raise ValueError(f"{prefix!r}: an s3://bucket/prefix")


def bucket_problems(spec: JobSpec, limits: Limits) -> list[tuple[str, str]]:
    """(field, why) for each input in a bucket outside the user's limits.input_prefixes (checked before anything
    lists the bucket: the answer says nothing about what is there)."""
    allowed = limits.input_prefixes
    return [(where, f"{uri} is not under a prefix you may read inputs from (limits.input_prefixes: "
                    f"{', '.join(allowed) or 'none'})")
            for where, uri in input_paths(spec, S3Uri) if not any(uri.is_relative_to(p) for p in allowed)]


def job_problems(spec: JobSpec, limits: Limits) -> list[tuple[str, str]]:
    """(spec field, why) for every way one job asks for more than the user may ever have: 422."""
    out = []
    for where, n, gpu in _stages(spec):
        if n > limits.workers:
            out.append((f"{where}.num_workers", f"{n} workers; you may hold at most {limits.workers} at once "
                                                f"(limits.workers)"))
        if gpu and n > limits.gpus:
            out.append((f"{where}.use_gpu", f"{n} GPUs ({where}.num_workers on GPUs); you may hold at most "
                                            f"{limits.gpus} at once (limits.gpus)"))
    if spec.train.max_steps is not None and spec.train.max_steps > limits.steps:
        out.append(("train.max_steps", f"{spec.train.max_steps} steps; at most {limits.steps} (limits.steps)"))
    if len(spec.export.merge_alphas) > limits.merge_alphas:
        out.append(("export.merge_alphas", f"{len(spec.export.merge_alphas)} values; at most {limits.merge_alphas} "
                                           "(limits.merge_alphas)"))
    if (size := artifact_bytes(spec)) > limits.artifact_gib * 2**30:
        out.append(("export.formats", f"the job's artifacts would be ≈ {size / 2**30:.1f} GiB (a full model per "
                                      f"merged α and for CorDA's residual base); at most {limits.artifact_gib:g} "
                                      f"GiB (limits.artifact_gib)"))
    return out


def in_flight_problem(spec: JobSpec, held: list[JobSpec], limits: Limits) -> str | None:
    """Why the user may not start this job now, given the specs of their jobs in flight (429); None: they may."""
    if len(held) >= limits.jobs_in_flight:
        return f"you have {len(held)} jobs in flight, the most you may (limits.jobs_in_flight); wait for one to end"
    usage, holding = Usage.of(spec), [Usage.of(s) for s in held]
    for name, unit, cap in (("workers", "workers", limits.workers), ("gpus", "GPUs", limits.gpus)):
        now = sum(getattr(u, name) for u in holding)
        if now + getattr(usage, name) > cap:
            return (f"your jobs in flight hold {now} {unit}; this one needs {getattr(usage, name)} more, past "
                    f"{cap} (limits.{name}); wait for one to end")
    return None
