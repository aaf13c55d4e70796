"""Starting, following and stopping a job's driver — a local process, or a Ray job on a cluster.

The CLI and the gateway both go through here, so a job behaves the same however it was submitted: the spec and
the record are written to the store first, then the driver starts; its log is a local file or Ray's job log; a
cancel is SIGTERM to the local driver or Ray's stop_job (which sends SIGTERM too), and whoever waits for the end
records CANCELLED if the driver was killed before it could.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import TextIO

import yaml

from jobspecs import JobSpec, dump_spec
from orchestrator.control.jobs import (
    JOB_ID,
    IndexEntry,
    JobError,
    JobRecord,
    JobState,
    LocalIndex,
    UnknownJob,
    cancelled_error,
    new_job_id,
    new_record,
)
from orchestrator.control.launchers import current_record, launcher_for
from orchestrator.control.ray_jobs import RayJobsError
from orchestrator.storage.artifacts import CANCEL_REASON, job_key
from workers.storage.store import StoreError, open_store


def differences(a, b, path: str = "") -> list[str]:
    """Dotted paths where two frozen specs differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(set(a) | set(b))
                for d in differences(a.get(key), b.get(key), f"{path}.{key}" if path else key)]
    return [] if a == b else [path]


class NotStarted(JobError):
    """The job is recorded (FAILED, in the store and the index) but its driver could not be started."""

    def __init__(self, job_id: str, reason: str):
        super().__init__(f"{reason}\njob {job_id} is recorded FAILED; once that is fixed, start it with "
                         f"--job-id {job_id}")
        self.job_id, self.reason = job_id, reason


def prepare_resubmission(spec: JobSpec, job_id: str, store, index: LocalIndex) -> JobRecord | None:
    """The record of an earlier attempt of `job_id` if it may be resumed (None: a new job with this id).
    Checkpoints live in the job's storage, so a new driver continues training where the last one stopped."""
    if not JOB_ID.fullmatch(job_id):
        raise JobError(f"--job-id {job_id!r}: use 1-80 characters of a-z, 0-9, '.', '_' and '-'", code=2)
    if not store.exists(job_key(job_id, "job.json")):
        return None
    try:
        previous = current_record(index.get(job_id))  # notices a driver that died mid-job
    except UnknownJob:
        previous = JobRecord.load(store, job_id)
    if previous.state == JobState.SUCCEEDED:
        raise JobError(f"job {job_id} already SUCCEEDED; fetch its artifacts with: peftfleet fetch {job_id} DEST",
                       code=2)
    if not previous.state.terminal:
        raise JobError(f"job {job_id} is {previous.state.value} (driver {previous.driver or 'not started'}); "
                       f"cancel it first, or wait for it", code=2)
    frozen = yaml.safe_load(store.get_bytes(job_key(job_id, "spec.yaml")))
    changed = differences(frozen, yaml.safe_load(dump_spec(spec)))
    if changed:
        raise JobError(f"job {job_id} was submitted with a different spec (differs at: {', '.join(changed)}); "
                       f"resuming needs the same spec, or submit without --job-id for a new job", code=2)
    return previous


def submit(spec: JobSpec, index: LocalIndex, job_id: str | None = None, address: str | None = None,
           owner: str | None = None, deadline: float | None = None) -> str:
    """Freeze the spec and record into the store, start the driver (here, or as a Ray job on the cluster whose job
    API is `address`), and return the job id. With the id of a job that failed, was cancelled or lost its driver,
    the job runs again and training resumes from its checkpoints."""
    store = open_store(spec.storage)
    try:
        previous = prepare_resubmission(spec, job_id, store, index) if job_id else None
        job_id = job_id or new_job_id(spec.name)
        record = new_record(job_id, spec)
        record.owner = owner
        if previous:
            record.created_at, record.attempts = previous.created_at, previous.attempts + 1
        store.put_bytes(job_key(job_id, "spec.yaml"), dump_spec(spec).encode())
        record.save(store)
    except StoreError as e:
        raise JobError(f"cannot write the job to {spec.storage.uri}: {e}") from None
    storage_json = spec.storage.model_dump_json()
    entry = IndexEntry(job_id=job_id, storage=json.loads(storage_json), address=address, owner=owner,
                       deadline=deadline)
    index.add(entry)  # first: a job whose start fails is still listed, and its owner can retry it
    try:
        launcher_for(entry).start(storage_json, index.job_dir(job_id), record.attempts, spec.cluster.driver_cpus,
                                  {"peftfleet_job": job_id, "name": spec.name, "owner": owner or ""})
    except RayJobsError as err:  # recorded, so the store never holds a PENDING job that nothing will run
        record.finish(JobState.FAILED, f"not started: {err}")
        record.save(store)
        raise NotStarted(job_id, str(err)) from None
    index.add(entry)  # again: a local driver's start filled in its pid and log
    return job_id


def read_log(entry: IndexEntry, position: int = 0, verbose: bool = False) -> tuple[str, int]:
    """The job's log (or its verbose log) from byte/character `position` on, and the position after it."""
    launcher = launcher_for(entry)
    return launcher.read_verbose(position) if verbose else launcher.read_log(position)


def poll_log(entry: IndexEntry, position: int, verbose: bool = False,
             ray_states: dict[str, tuple[str, str]] | None = None) -> tuple[bool, str, int]:
    """One look at a followed log: whether the job had ended, the log from `position`, and the position after."""
    ended = current_record(entry, ray_states).state.terminal  # before the read: what it wrote before ending too
    chunk, position = read_log(entry, position, verbose)
    return ended, chunk, position


def tail(entry: IndexEntry, position: int = 0, poll_s: float = 0.5, verbose: bool = False) -> Iterator[str]:
    """The job's log as it grows, from `position`, until the job has ended (its last lines included)."""
    while True:
        ended, chunk, position = poll_log(entry, position, verbose)
        if chunk:
            yield chunk
        if ended:
            return
        time.sleep(poll_s)


def follow(entry: IndexEntry, sink: TextIO, poll_s: float = 0.5, verbose: bool = False) -> JobRecord:
    """Stream the job's log into `sink` until the job reaches a final state; returns the final record."""
    for chunk in tail(entry, poll_s=poll_s, verbose=verbose):
        sink.write(chunk)
        sink.flush()
    return current_record(entry)


def cancel(entry: IndexEntry, timeout: float, reason: str | None = None) -> JobRecord:
    """Stop a running job and return its final record (CANCELLED unless it ended first). `reason` goes into the
    record's error, whichever of the driver or this call writes it."""
    record = current_record(entry)
    if record.state.terminal:
        return record
    store = entry.store()
    if reason:  # before the stop: the driver reads it as it records its end
        store.put_bytes(job_key(entry.job_id, CANCEL_REASON), reason.encode())
    forced = launcher_for(entry).stop(timeout)
    record = JobRecord.load(store, entry.job_id)
    if not record.state.terminal:  # the driver died before it could record the cancel: record it for it
        record.finish(JobState.CANCELLED, cancelled_error(record.stage or "start-up", reason) + forced)
        record.save(store)
    return record
