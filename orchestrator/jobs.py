"""Job records: what a job is, where it stands, and where this machine can find it again.

The record lives in the store (`jobs/<id>/job.json`), so a finished job's state survives the machine or cluster
that ran it. The local index (`~/.peftfleet/jobs/<id>.json`) only remembers, per job submitted from here, which
store holds it and where its driver runs: a local process (its PID and log file, for `cancel` and for spotting a
dead driver) or a Ray job on a cluster (the cluster's job API address; Ray keeps the log).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from jobspecs.schema import JobSpec, StorageSpec
from orchestrator.artifacts import job_key
from orchestrator.ray_jobs import RAY_TERMINAL, RayCluster, RayJobsError
from orchestrator.store import NotInStore, Store, open_store


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

    def save(self, store: Store) -> None:
        store.put_bytes(job_key(self.id, "job.json"), json.dumps(asdict(self), indent=2).encode())

    @classmethod
    def load(cls, store: Store, job_id: str) -> JobRecord:
        raw = json.loads(store.get_bytes(job_key(job_id, "job.json")))
        raw["stages"] = [StageRecord(**s) for s in raw["stages"]]
        raw["state"] = JobState(raw["state"])
        return cls(**raw)

    def stage_record(self, name: str) -> StageRecord:
        return next(s for s in self.stages if s.name == name)

    def start_stage(self, name: str) -> None:
        self.stage = name
        rec = self.stage_record(name)
        rec.state, rec.started_at = "running", now()

    def end_stage(self, name: str, state: str = "succeeded") -> None:
        rec = self.stage_record(name)
        rec.state, rec.ended_at = state, now()

    def finish(self, state: JobState, error: str | None = None) -> None:
        self.state, self.error, self.ended_at = state, error, now()
        if self.stage and state != JobState.SUCCEEDED:
            self.end_stage(self.stage, state.value.lower())
        if state == JobState.SUCCEEDED:
            self.stage = None


def stage_names(spec: JobSpec) -> list[str]:
    return [*spec.effective_stages, "upload"]


def new_record(job_id: str, spec: JobSpec) -> JobRecord:
    return JobRecord(id=job_id, name=spec.name, stages=[StageRecord(n) for n in stage_names(spec)])


def process_running(pid: int) -> bool:
    """Whether `pid` is a live process here. A finished child that nobody reaped is a zombie: it holds its PID but
    runs nothing (in a container whose PID 1 never reaps orphans, it stays one)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:  # exited between the two checks
        return False


class UnknownJob(Exception):
    pass


@dataclass
class IndexEntry:
    job_id: str
    storage: dict  # StorageSpec as JSON, enough to reopen the job's store
    log: str | None = None  # a local driver's log file (a Ray job's log is Ray's)
    pid: int | None = None
    host: str = field(default_factory=socket.gethostname)
    address: str | None = None  # the Ray job API the driver was submitted to; None: a local driver process
    owner: str | None = None

    def store(self) -> Store:
        return open_store(StorageSpec.model_validate(self.storage))

    def driver_alive(self) -> bool:
        """Whether the driver process this machine started is still running (False if it ran elsewhere)."""
        return self.pid is not None and self.host == socket.gethostname() and process_running(self.pid)


class LocalIndex:
    """Jobs submitted from this machine: `<state_dir>/jobs/<id>.json` plus each job's log folder."""

    def __init__(self, state_dir: Path):
        self.root = Path(state_dir) / "jobs"

    def job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    def add(self, entry: IndexEntry) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{entry.job_id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(entry)))
        os.replace(tmp, path)

    def get(self, job_id: str) -> IndexEntry:
        path = self.root / f"{job_id}.json"
        if "/" in job_id or not path.is_file():
            raise UnknownJob(f"unknown job {job_id!r}: no job with that id was submitted from this machine "
                             f"(known jobs: {self.root})")
        return IndexEntry(**json.loads(path.read_text()))

    def ids(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.json")) if self.root.is_dir() else []


def _driver_end(entry: IndexEntry) -> tuple[JobState, str] | None:
    """How the job ends if its driver is gone without a final state; None while it runs (or can't be asked)."""
    if entry.address:
        try:
            ray_state, message = RayCluster(entry.address).status(entry.job_id)
        except RayJobsError:  # the cluster is gone or unreachable: the stored record is all there is
            return None
        if ray_state not in RAY_TERMINAL:
            return None
        if ray_state == "STOPPED":
            return JobState.CANCELLED, "stopped through the Ray job API"
        return JobState.FAILED, (f"Ray job {entry.job_id} ended {ray_state} without a final state"
                                 + (f": {message}" if message else ""))
    if entry.pid is not None and not entry.driver_alive():
        return JobState.FAILED, f"driver process {entry.pid} exited without a final state (killed or crashed); " \
                                f"see {entry.log}"
    return None


def current_record(entry: IndexEntry) -> JobRecord:
    """The job's record, from the store; corrected when its driver (local process or Ray job) ended without
    writing a final state."""
    store = entry.store()
    try:
        record = JobRecord.load(store, entry.job_id)
    except NotInStore:
        raise UnknownJob(f"job {entry.job_id}: no record in {store.uri}") from None
    if not record.state.terminal and (end := _driver_end(entry)):
        # Re-read once: the driver may have written its final state between our read and its exit.
        record = JobRecord.load(store, entry.job_id)
        if not record.state.terminal:
            state, reason = end
            record.finish(state, f"{reason} (during stage {record.stage or 'start-up'})")
            record.save(store)
    return record
