"""Per-user limits on a shared gateway: what one job may ask for (422 when it asks for more than a user may ever
have) and what one user may hold at once across their jobs in flight (429 while they hold it).

Sizes come from the spec and the model's files alone, before anything runs: workers and GPUs are the most any
stage of the job holds at once (stages run one after another); artifact bytes are the model's weights once per
full-model output (each merged@α, CorDA's residual base) plus the adapters; the fields that size an allocation
in a worker (sequence lengths, virtual tokens, ranks, calibration tokens) have upper bounds. A sweep is checked
trial by trial — every trial is a job — and its size is bounded from its grid's lengths before any trial is built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from jobspecs import JobSpec
from jobspecs.remote import Location, S3Uri, is_remote, top_files
from jobspecs.schema import VIRTUAL_TOKEN_METHODS
from jobspecs.sweep import SweepSpec
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
                                      "is refused before it is even listed (frozen into each spec as its "
                                      "input_prefixes, which every process that reads checks). Default: none.")
    trials: int = Field(16, gt=0, description="Trials of one sweep (each a training run), counted from the grid's "
                                              "lengths before any is built.")
    max_seq_len: int = Field(32768, gt=0, description="data.max_seq_len (and init.corda.seq_len).")
    batch_tokens: int = Field(262_144, gt=0, description="Tokens of one forward pass: train.micro_batch_size × "
                                                         "data.max_seq_len, init.corda.batch_size × seq_len.")
    calibration_tokens: int = Field(4 * 2**20, gt=0, description="init.corda.samples × seq_len: the hidden states "
                                                                 "the covariance actors hold.")
    virtual_tokens: int = Field(2048, gt=0, description="num_virtual_tokens of prefix, prompt and P-tuning.")
    rank: int = Field(1024, gt=0, description="adapter.r (and adapter.adalora.init_r).")
    encoder_width: int = Field(16384, gt=0, description="encoder_hidden_size of prefix projection and P-tuning.")

    @field_validator("input_prefixes")
    @classmethod
    def _prefixes(cls, prefixes: list[str]) -> list[str]:
        return [S3Uri.parse(p) if is_remote(p) else _not_s3(p) for p in prefixes]


def _stages(spec: JobSpec, sweep: SweepSpec | None = None) -> list[tuple[str, int, bool]]:
    """(spec section, worker processes, on GPUs) of each stage that starts workers (a sweep's — the spec's, or
    the one a trial came from — trains as many trials at once as it may)."""
    sweep = sweep or spec.sweep
    at_once = sweep.max_concurrent_trials if sweep else 1
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
        """A sweep holds what its busiest trials hold (a trial's spec may ask for more workers than the job's)."""
        stages = [s for one in [spec, *(t.spec for t in expand(spec, {"check_files": False}))]
                  for s in _stages(one, spec.sweep)]
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


def sweep_size_problem(data: dict, limits: Limits) -> tuple[str, str] | None:
    """(field, why) when a submitted spec's sweep has more trials than the user may run in one job, told from the
    sweep section alone before anything is expanded (None: it has not, or the sweep is invalid, which the spec's
    own validation then says)."""
    raw = data.get("sweep")
    if not isinstance(raw, dict):
        return None
    try:
        size = SweepSpec.model_validate(raw).size
    except ValidationError:
        return None
    if size > limits.trials:
        return "sweep", f"{size} trials; one sweep may have at most {limits.trials} (limits.trials)"
    return None


def _sizes(spec: JobSpec) -> list[tuple[str, int, int, str]]:
    """(field, value, limit, Limits field) of every size that sets an allocation in a worker."""
    data, corda, adapter = spec.data, spec.init.corda, spec.adapter
    out = [("data.max_seq_len", data.max_seq_len, "max_seq_len"),
           ("train.micro_batch_size", spec.train.micro_batch_size * data.max_seq_len, "batch_tokens"),
           ("adapter.r", adapter.r, "rank")]
    if adapter.method == "adalora":
        out.append(("adapter.adalora.init_r", adapter.block().init_r, "rank"))
    if adapter.method in VIRTUAL_TOKEN_METHODS:
        block = adapter.block()
        out.append((f"adapter.{adapter.method}.num_virtual_tokens", block.num_virtual_tokens, "virtual_tokens"))
        if getattr(block, "encoder_hidden_size", None) is not None:
            out.append((f"adapter.{adapter.method}.encoder_hidden_size", block.encoder_hidden_size, "encoder_width"))
    if spec.init.method == "corda":
        corda = spec.init.corda_spec
        out += [("init.corda.seq_len", corda.seq_len, "max_seq_len"),
                ("init.corda.batch_size", corda.batch_size * corda.seq_len, "batch_tokens"),
                ("init.corda.samples", corda.samples * corda.seq_len, "calibration_tokens")]
    return out


_PER_TOKEN = {"batch_tokens": "tokens in one forward pass", "calibration_tokens": "calibration tokens (× seq_len)"}


def _one_job(spec: JobSpec, limits: Limits, sweep: SweepSpec | None = None) -> list[tuple[str, str]]:
    out = []
    for where, n, gpu in _stages(spec, sweep):
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
    for where, value, name in _sizes(spec):
        if value > (cap := getattr(limits, name)):
            what = _PER_TOKEN.get(name, "")
            out.append((where, f"{value}{' ' + what if what else ''}; at most {cap} (limits.{name})"))
    return out


def job_problems(spec: JobSpec, limits: Limits) -> list[tuple[str, str]]:
    """(spec field, why) for every way one job asks for more than the user may ever have (422): the spec's own
    fields, then each trial's (a sweep can set any field), named by the trial."""
    out = _one_job(spec, limits)
    for trial in expand(spec, {"check_files": False}):
        out += [("sweep", f"trial {trial.name}: {where}: {why}")
                for where, why in _one_job(trial.spec, limits, spec.sweep) if (where, why) not in out]
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
