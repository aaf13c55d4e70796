"""What a stage gets: the job, its frozen spec, the store, a staging folder — and, typed, what earlier stages left.

    calibrate → Calibration → decompose → CordaInit → train → TrainResult → export → ExportOutputs → report
    (a sweep's train stage also leaves every trial's TrialOutcome, ranked, for the adapter bundle)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobspecs import JobSpec
from jobspecs.memory import PLAN_TOLERANCE, reservations
from orchestrator.storage.artifacts import job_key
from workers.storage.store import Store, StoredFile, StoredFolder

if TYPE_CHECKING:  # the worker modules import torch; the driver imports this module before it needs torch
    from workers.corda.covariance import InputGroup
    from workers.train.train_loop import TrainResult


@dataclass
class Early:
    """Work that layer-wise calibration starts per block as soon as the block's sums are folded, by group index:
    the reducers' decompose calls and (with save_covariance) save calls, as references."""

    decompositions: dict[int, Any] = field(default_factory=dict)
    saved: dict[int, Any] = field(default_factory=dict)


@dataclass
class Calibration:
    """calibrate → decompose: each input group's Σxᵀx, as a reference into the object store held by a reducer."""

    groups: list[InputGroup]
    totals: list[Any]  # one ObjectRef per group (the driver never holds the statistics); None once `early` took it
    reducers: list[Any]  # the reducer actors holding them; decomposition runs where each sum is
    held: list[list[int]]  # held-out samples for the init-fidelity check
    tokens: int
    calibrate_s: float
    shards: list[dict] = field(default_factory=list)  # per-shard summaries; empty when covariance_from was reused
    actors: list[tuple[int, str]] = field(default_factory=list)  # (pid, node id) of each covariance actor
    early: Early = field(default_factory=Early)


@dataclass
class CordaInit:
    """decompose → train and export: the folders training starts from, in the job's store (never a driver-local
    path: the consumers run on other nodes and read them through their node's cache)."""

    residual_base: StoredFolder  # the base with W_res, sharded safetensors
    adapter: StoredFolder  # stock LoRA holding CorDA's A, B
    fidelity_samples: list[list[int]]  # the export checks its conversion on the same held-out samples


@dataclass
class ExportOutputs:
    """export → report: the checks and the sweep."""

    conversion: dict | None = None  # CorDA: adapter on the original base vs the trained model
    wise_ft: list[dict] = field(default_factory=list)  # one row per α


@dataclass
class TrialOutcome:
    """sweep → export: how a trial ended, as jobs/<id>/trials/<trial>/trial.json keeps it."""

    name: str
    values: dict
    status: str  # finished | stopped (by the scheduler) | failed
    reason: str = ""  # why it stopped or failed
    best: float | None = None  # sweep.metric at its best checkpoint
    result: dict = field(default_factory=dict)  # its TrainResult but the adapter's bytes
    adapter: dict | None = None  # the StoredFolder of its best adapter, as a dict
    params: int = 0  # the adapter's trainable parameters
    task: str | None = None  # sweep.tasks: the task it trained for

    @property
    def usable(self) -> bool:
        return self.status != "failed" and self.best is not None and math.isfinite(self.best)

    def adapter_folder(self) -> StoredFolder | None:
        if self.adapter is None:
            return None
        return StoredFolder(self.adapter["prefix"], tuple(StoredFile(**f) for f in self.adapter["files"]))


@dataclass
class Context:
    job_id: str
    spec: JobSpec
    store: Store
    staging: Path  # small driver-written files: staging/<kind>/... becomes jobs/<id>/artifacts/<kind>/...
    warnings: list[str] = field(default_factory=list)  # shown by `status`, kept in the record
    published: list[StoredFolder] = field(default_factory=list)  # artifacts workers already wrote to the store
    calibration: Calibration | None = None
    corda_init: CordaInit | None = None
    train: TrainResult | None = None
    export: ExportOutputs | None = None
    trial_inits: dict[str, CordaInit] = field(default_factory=dict)  # a sweep's CorDA trials: trial → its init
    trials: list[TrialOutcome] = field(default_factory=list)  # a sweep's trials, in order (the best first: ranked)
    job_spec: JobSpec | None = None  # the submitted spec, once `spec` was narrowed to a sweep's best trial
    publish_under: str = ""  # a folder inside artifacts/ this context's stages publish into (a sweep's "corda/d0/")
    keep_sums: bool = False  # a sweep's calibration: its sums outlive a decomposition (the next one needs them)
    peaks: dict[str, dict[str, float]] = field(default_factory=dict)  # stage → process kind → peak RSS (MiB)
    reserved: dict[str, dict[str, float]] = field(default_factory=dict)  # stage → process kind → Ray memory (MiB)
    _plan: dict[tuple[str, str], int] | None = field(default=None, repr=False)
    _inputs: JobSpec | None = field(default=None, repr=False)

    @property
    def inputs(self) -> JobSpec:
        """The spec with its inputs on the driver's node, for what the driver itself reads (the tokenizer, the
        calibration records, config.json, safetensors headers): inputs in a bucket are listed, their small files
        fetched into the node cache, their weights never (workers/storage/inputs.py). Other processes are handed `spec`
        and localize on their own node."""
        if self._inputs is None:
            from workers.storage.inputs import on_node

            self._inputs = on_node(self.spec)
        return self._inputs

    def narrow(self, spec: JobSpec) -> None:
        """From here on the job is `spec`: a sweep's best trial, whose adapter the export works on (the job's own
        spec, with its sweep, stays as job_spec)."""
        self.job_spec = self.job_spec or self.spec
        self.spec, self._inputs, self._plan = spec, None, None

    def reserve(self, stage: str, process: str, requested: float | None = None) -> dict:
        """Ray options reserving host memory for one kind of process: `requested` bytes where the spec asks for
        them, else what `peftfleet plan` gives it (+ its tolerance); {} where there is no plan for it."""
        if requested is None:
            if self._plan is None:
                self._plan = reservations(self.spec)
            requested = self._plan.get((stage, process))
        if not requested:
            return {}
        import ray

        # Ray would wait for such a node forever: say so now
        largest = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n["Alive"]), default=0)
        if requested > largest:
            raise ValueError(f"{stage}: a {process} reserves {requested / 2**30:.2f} GiB (its planned peak + "
                             f"{PLAN_TOLERANCE:.0%}, or the spec's request) but no node of this cluster has more than "
                             f"{largest / 2**30:.2f} GiB for Ray's processes: use nodes with more memory, or more "
                             "workers (`peftfleet plan SPEC --worker-memory` says how many fit)")
        self.reserved.setdefault(stage, {})[process] = round(requested / 2**20, 1)
        return {"memory": int(requested)}

    def record_peak(self, stage: str, process: str, mib: Iterable[float]) -> None:
        """The largest peak resident memory among a stage's processes of one kind (what `plan` predicts); a
        warning when it is above what they reserved, since Ray then places more on a node than fits it."""
        peak = self.peaks.setdefault(stage, {})[process] = round(max(mib), 1)
        reserved = self.reserved.get(stage, {}).get(process)
        if reserved and peak > reserved:
            self.warnings.append(f"{stage}: a {process} peaked at {peak:,.0f} MiB, above the {reserved:,.0f} MiB it "
                                 "reserved from Ray: nodes may be given more processes than fit them; set the "
                                 "memory request higher (init.corda.actor_memory_gib for covariance actors) or "
                                 "report the spec, `peftfleet plan` is off for it")

    def artifact_key(self, kind: str) -> str:
        """The store folder of an artifact this context's stage publishes itself (worker-written)."""
        return job_key(self.job_id, f"artifacts/{self.publish_under}{kind}")

    def artifact_dir(self, kind: str) -> Path:
        path = self.staging / self.publish_under / kind
        path.mkdir(parents=True, exist_ok=True)
        return path

    def needs(self, name: str) -> Any:
        """What an earlier stage left under `name`; a clear error if it did not run."""
        value = getattr(self, name)
        if value is None:
            raise RuntimeError(f"{name} is missing: the stage that produces it did not run before this one")
        return value
