"""Starting, following and stopping a job's driver — a local process, or a Ray job on a cluster.

The CLI and the gateway both go through here, so a job behaves the same however it was submitted: the spec and
the record are written to the store first, then the driver starts; its log is a local file or Ray's job log; a
cancel is SIGTERM to the local driver or Ray's stop_job (which sends SIGTERM too), and whoever waits for the end
records CANCELLED if the driver was killed before it could.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import yaml

from jobspecs import JobSpec, dump_spec
from orchestrator.artifacts import VERBOSE_LOG, job_key
from orchestrator.jobs import (
    JOB_ID,
    IndexEntry,
    JobRecord,
    JobState,
    LocalIndex,
    UnknownJob,
    current_record,
    new_job_id,
    new_record,
)
from orchestrator.ray_jobs import RAY_TERMINAL, RayCluster, RayJobsError
from orchestrator.store import NotInStore, StoreError, open_store


class JobError(Exception):
    """An operation on a job that cannot go ahead (submit, cancel, logs); code 2 for bad input, 1 otherwise."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def differences(a, b, path: str = "") -> list[str]:
    """Dotted paths where two frozen specs differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(set(a) | set(b))
                for d in differences(a.get(key), b.get(key), f"{path}.{key}" if path else key)]
    return [] if a == b else [path]


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
           owner: str | None = None) -> str:
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
    entry = IndexEntry(job_id=job_id, storage=json.loads(storage_json), address=address, owner=owner)
    if address:
        cluster = RayCluster(address)
        if previous:  # Ray job ids are single-use: the earlier attempt's Ray job (and its log) makes way
            cluster.forget(job_id)
        try:
            cluster.submit_driver(job_id, storage_json, driver_cpus=spec.cluster.driver_cpus,
                                  metadata={"peftfleet_job": job_id, "name": spec.name, "owner": owner or ""})
        except RayJobsError as err:  # recorded, so the store never holds a PENDING job that nothing will run
            record.finish(JobState.FAILED, f"not started: {err}")
            record.save(store)
            raise JobError(f"{err}\njob {job_id} is recorded FAILED; once that is fixed, start it with "
                           f"--job-id {job_id}") from None
    else:
        job_dir = index.job_dir(job_id)
        job_dir.mkdir(parents=True, exist_ok=True)
        entry.log = str(job_dir / "driver.log")
        verbose = verbose_log(entry)
        with open(entry.log, "ab") as log, open(verbose, "ab") as library_log:
            if previous:
                for f in (log, library_log):
                    f.write(f"--- attempt {record.attempts} (resubmitted) ---\n".encode())
            proc = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.driver", job_id, storage_json, "--verbose-log", str(verbose)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=library_log, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        entry.pid = proc.pid
    index.add(entry)
    return job_id


def verbose_log(entry: IndexEntry) -> Path:
    """A local driver's verbose log: library output (and a copy of the job's log), beside the job's log."""
    return Path(entry.log).with_name("verbose.log")


def read_log(entry: IndexEntry, position: int = 0, verbose: bool = False) -> tuple[str, int]:
    """The job's log (or its verbose log) from byte/character `position` on, and the position after it."""
    if verbose and (entry.address or not verbose_log(entry).exists()):
        try:  # the driver uploads it when it ends
            text = entry.store().get_bytes(job_key(entry.job_id, VERBOSE_LOG)).decode(errors="replace")
        except NotInStore:
            raise JobError(f"job {entry.job_id}: its verbose log is uploaded to the store when its driver ends, and "
                           "is not there yet") from None
        return text[position:], len(text)
    if entry.address:
        text = RayCluster(entry.address).logs(entry.job_id)
        return text[position:], len(text)
    path = verbose_log(entry) if verbose else Path(entry.log)
    if not path.exists():
        return "", position
    with open(path, "rb") as f:
        f.seek(position)
        chunk = f.read()
    return chunk.decode(errors="replace"), position + len(chunk)


def tail(entry: IndexEntry, position: int = 0, poll_s: float = 0.5, verbose: bool = False) -> Iterator[str]:
    """The job's log as it grows, from `position`, until the job has ended (its last lines included)."""
    while True:
        ended = current_record(entry).state.terminal  # before the read: what it wrote before ending is read too
        chunk, position = read_log(entry, position, verbose)
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


def cancel(entry: IndexEntry, timeout: float) -> JobRecord:
    """Stop a running job and return its final record (CANCELLED unless it ended first)."""
    record = current_record(entry)
    if record.state.terminal:
        return record
    if entry.address:
        cluster = RayCluster(entry.address)
        queued = cluster.status(entry.job_id)[0] == "PENDING"
        cluster.stop(entry.job_id)  # SIGTERM to the driver; Ray kills it after RAY_JOB_STOP_WAIT_TIME_S
        # A queued job has no driver to wait for (Ray acts on the stop only once it is scheduled); recorded
        # CANCELLED below, its driver refuses to run if it ever starts.
        deadline = time.monotonic() + (0 if queued else timeout)
        while time.monotonic() < deadline and cluster.status(entry.job_id)[0] not in RAY_TERMINAL:
            time.sleep(0.2)
        forced = ""
    else:
        if not entry.driver_alive():
            raise JobError(f"job {record.id}: its driver (pid {entry.pid}) is not running on this machine")
        os.kill(entry.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and entry.driver_alive():
            time.sleep(0.2)
        forced = f" (driver killed after {timeout:.0f}s)" if entry.driver_alive() else ""
        if forced:  # it did not wind down in time: take its whole session (embedded Ray included) down
            os.killpg(entry.pid, signal.SIGKILL)
    store = entry.store()
    record = JobRecord.load(store, entry.job_id)
    if not record.state.terminal:  # the driver died before it could record the cancel: record it for it
        record.finish(JobState.CANCELLED, f"cancelled during stage {record.stage or 'start-up'}{forced}")
        record.save(store)
    return record
