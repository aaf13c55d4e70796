"""Job records: what a job is, where it stands, and where this machine can find it again.

The record lives in the store (`jobs/<id>/job.json`), so a finished job's state survives the machine or cluster
that ran it. The local index (`~/.peftfleet/jobs/<id>.json`) only remembers, per job submitted from here, which
store holds it and where its driver runs: a local process (its PID and log file, for `cancel` and for spotting a
dead driver) or a Ray job on a cluster (the cluster's job API address; Ray keeps the log).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import secrets
import socket
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from jobspecs.schema import JobSpec, StorageSpec
from orchestrator.storage.artifacts import TRIALS_BOARD, job_key
from workers.storage.store import NotInStore, Store, open_store


class JobState(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


JOB_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,79}")


def new_job_id(name: str) -> str:
    # 32 random bits: a gateway may take many submissions in one second, and ids must never collide.
    return f"{name}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(4)}"


@dataclass
class StageRecord:
    name: str
    state: str = "pending"  # pending | running | succeeded | failed | cancelled
    started_at: str | None = None
    ended_at: str | None = None
    peak_memory_mib: dict[str, float] = field(default_factory=dict)  # per process kind, the driver's included
    reserved_memory_mib: dict[str, float] = field(default_factory=dict)  # per process kind: what it asked Ray for


@dataclass
class JobRecord:
    id: str
    name: str
    stages: list[StageRecord]
    state: JobState = JobState.PENDING
    created_at: str = field(default_factory=now)
    started_at: str | None = None
    ended_at: str | None = None
    stage: str | None = None  # the running stage, or the one that failed / was cancelled
    error: str | None = None
    warnings: list[str] = field(default_factory=list)  # things a user can act on (e.g. too little calibration data)
    driver: dict = field(default_factory=dict)  # host, pid
    attempts: int = 1  # resubmissions of a failed job under its id run it again (training resumes)
    owner: str | None = None  # the gateway user who submitted it
    sweep: bool = False  # many trials: `trials` is read from the sweep's board (trials.json), which its stage keeps
    trials: list[dict] = field(default_factory=list)  # per trial: trial, state, step, metric, best (not in job.json)

    def to_dict(self) -> dict:
        """The record as JSON-ready data (JobState is a str): what `status --json` prints (job.json: without the
        trials, which their own file holds)."""
        return asdict(self)

    def save(self, store: Store) -> None:
        raw = self.to_dict()
        raw.pop("trials")
        store.put_bytes(job_key(self.id, "job.json"), json.dumps(raw, indent=2).encode())

    @classmethod
    def load(cls, store: Store, job_id: str) -> JobRecord:
        raw = json.loads(store.get_bytes(job_key(job_id, "job.json")))
        raw["stages"] = [StageRecord(**s) for s in raw["stages"]]
        raw["state"] = JobState(raw["state"])
        record = cls(**raw)
        if record.sweep:
            with contextlib.suppress(NotInStore):  # no trial has started yet
                record.trials = json.loads(store.get_bytes(job_key(job_id, TRIALS_BOARD)))
        return record

    def stage_record(self, name: str) -> StageRecord:
        return next(s for s in self.stages if s.name == name)

    def start_stage(self, name: str) -> None:
        self.stage = name
        rec = self.stage_record(name)
        rec.state, rec.started_at = "running", now()

    def end_stage(self, name: str, state: str = "succeeded", peaks: dict[str, float] | None = None,
                  reserved: dict[str, float] | None = None) -> None:
        rec = self.stage_record(name)
        rec.state, rec.ended_at = state, now()
        rec.peak_memory_mib = peaks or rec.peak_memory_mib
        rec.reserved_memory_mib = reserved or rec.reserved_memory_mib

    def finish(self, state: JobState, error: str | None = None) -> None:
        self.state, self.error, self.ended_at = state, error, now()
        if self.stage and state != JobState.SUCCEEDED:
            self.end_stage(self.stage, state.value.lower())
        if state == JobState.SUCCEEDED:
            self.stage = None


def stage_names(spec: JobSpec) -> list[str]:
    return [*spec.effective_stages, "upload"]


def new_record(job_id: str, spec: JobSpec) -> JobRecord:
    return JobRecord(id=job_id, name=spec.name, stages=[StageRecord(n) for n in stage_names(spec)],
                     sweep=spec.sweep is not None)


def cancelled_error(stage: str, reason: str | None) -> str:
    """A cancelled job's error: the stage it stopped in, after the canceller's reason if it gave one."""
    return f"{reason + ': ' if reason else ''}cancelled during stage {stage}"


class UnknownJob(Exception):
    pass


class JobError(Exception):
    """An operation on a job that cannot go ahead (submit, cancel, logs); code 2 for bad input, 1 otherwise."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


@dataclass
class IndexEntry:
    job_id: str
    storage: dict  # StorageSpec as JSON, enough to reopen the job's store
    log: str | None = None  # a local driver's log file (a Ray job's log is Ray's)
    pid: int | None = None
    host: str = field(default_factory=socket.gethostname)
    address: str | None = None  # the Ray job API the driver was submitted to; None: a local driver process
    owner: str | None = None
    deadline: float | None = None  # unix time past which the gateway cancels the job (its owner's limits)

    def store(self) -> Store:
        with _stores_lock:  # boto3 makes clients from its default session, which is not thread-safe
            return _store(json.dumps(self.storage, sort_keys=True))


_stores_lock = threading.Lock()


@functools.lru_cache(maxsize=64)
def _store(storage_json: str) -> Store:
    # One store per storage: an S3 client costs tens of ms to make, and a listing asks one per job.
    return open_store(StorageSpec.model_validate_json(storage_json))


class LocalIndex:
    """Jobs submitted from this machine: `<state_dir>/jobs/<id>.json` plus each job's log folder."""

    def __init__(self, state_dir: Path):
        self.root = Path(state_dir) / "jobs"

    def job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    def add(self, entry: IndexEntry) -> None:
        """Written whole (a rename) and readable by this user alone: an index names every job's owner and store."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.root / f"{entry.job_id}.json"
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{entry.job_id}.")  # mode 0600
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(asdict(entry)))
        os.replace(tmp, path)

    def get(self, job_id: str) -> IndexEntry:
        path = self.root / f"{job_id}.json"
        if "/" in job_id or not path.is_file():
            raise UnknownJob(f"unknown job {job_id!r}: no job with that id was submitted from this machine "
                             f"(known jobs: {self.root})")
        return IndexEntry(**json.loads(path.read_text()))

    def ids(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.json")) if self.root.is_dir() else []
