"""Where a job's driver runs: a process on this machine, or a Ray job on a cluster — one interface for both.

Submitting, reading the log, cancelling and telling how a job ended go through `launcher_for(entry)`, so the
branch between the two lives here once, and job records (orchestrator/control/jobs.py) know nothing of Ray's client.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path

from orchestrator.control.jobs import IndexEntry, JobError, JobRecord, JobState, UnknownJob
from orchestrator.control.ray_jobs import RAY_TERMINAL, RayCluster, RayJobsError
from orchestrator.storage.artifacts import VERBOSE_LOG, job_key
from workers.storage.store import NotInStore


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


class Launcher(ABC):
    """A job's driver, wherever it runs. `entry` is this machine's (or the gateway's) index entry for the job."""

    def __init__(self, entry: IndexEntry):
        self.entry = entry

    @abstractmethod
    def start(self, storage_json: str, job_dir: Path, attempt: int, driver_cpus: float,
              metadata: dict[str, str]) -> None:
        """Start the driver of a job already recorded in the store (attempt > 1: a resubmission)."""

    @abstractmethod
    def read_log(self, position: int) -> tuple[str, int]:
        """The job's log from `position` on, and the position after it."""

    def read_verbose(self, position: int) -> tuple[str, int]:
        """The verbose log (library output): the copy the driver uploads to the store when it ends."""
        try:
            text = self.entry.store().get_bytes(job_key(self.entry.job_id, VERBOSE_LOG)).decode(errors="replace")
        except NotInStore:
            raise JobError(f"job {self.entry.job_id}: its verbose log is uploaded to the store when its driver "
                           "ends, and is not there yet") from None
        return text[position:], len(text)

    @abstractmethod
    def stop(self, timeout: float) -> str:
        """Ask the driver to stop (SIGTERM) and wait up to `timeout`; returns a note if it had to be forced."""

    @abstractmethod
    def ended(self, ray_states: dict[str, tuple[str, str]] | None = None) -> tuple[JobState, str] | None:
        """How the job ends if its driver is gone without a final state; None while it runs (or can't be asked).
        `ray_states`: Ray's (status, message) of every job, when the caller asked for them at once."""

    @abstractmethod
    def where(self) -> str:
        """Where its log is, for `status`."""


class LocalProcess(Launcher):
    """`python -m orchestrator.control.driver` in its own session on this machine; stdout is the job's log, stderr the
    verbose log, both in the job's folder under the state dir."""

    def verbose_log(self) -> Path:
        return Path(self.entry.log).with_name("verbose.log")

    def alive(self) -> bool:
        """Whether the driver process this machine started is still running (False if it ran elsewhere)."""
        entry = self.entry
        return entry.pid is not None and entry.host == socket.gethostname() and process_running(entry.pid)

    def start(self, storage_json: str, job_dir: Path, attempt: int, driver_cpus: float,
              metadata: dict[str, str]) -> None:
        job_dir.mkdir(parents=True, exist_ok=True)
        self.entry.log = str(job_dir / "driver.log")
        verbose = self.verbose_log()
        with open(self.entry.log, "ab") as log, open(verbose, "ab") as library_log:
            if attempt > 1:
                for f in (log, library_log):
                    f.write(f"--- attempt {attempt} (resubmitted) ---\n".encode())
            proc = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.control.driver", self.entry.job_id, storage_json,
                 "--verbose-log", str(verbose)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=library_log, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.entry.pid = proc.pid

    def read_log(self, position: int) -> tuple[str, int]:
        return _read_file(Path(self.entry.log), position)

    def read_verbose(self, position: int) -> tuple[str, int]:
        if self.verbose_log().exists():
            return _read_file(self.verbose_log(), position)
        return super().read_verbose(position)

    def stop(self, timeout: float) -> str:
        entry = self.entry
        if not self.alive():
            raise JobError(f"job {entry.job_id}: its driver (pid {entry.pid}) is not running on this machine")
        os.kill(entry.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.alive():
            time.sleep(0.2)
        if not self.alive():
            return ""
        os.killpg(entry.pid, signal.SIGKILL)  # it did not wind down in time: its whole session, embedded Ray too
        return f" (driver killed after {timeout:.0f}s)"

    def ended(self, ray_states: dict[str, tuple[str, str]] | None = None) -> tuple[JobState, str] | None:
        if self.entry.pid is not None and not self.alive():
            return JobState.FAILED, (f"driver process {self.entry.pid} exited without a final state (killed or "
                                     f"crashed); see {self.entry.log}")
        return None

    def where(self) -> str:
        return str(self.entry.log)


class RayJob(Launcher):
    """The driver as a Ray job (submission id = job id) through the cluster's job API; Ray keeps the log."""

    def cluster(self) -> RayCluster:
        return RayCluster(self.entry.address)

    def start(self, storage_json: str, job_dir: Path, attempt: int, driver_cpus: float,
              metadata: dict[str, str]) -> None:
        cluster = self.cluster()
        if attempt > 1:  # Ray job ids are single-use: the earlier attempt's Ray job (and its log) makes way
            cluster.forget(self.entry.job_id)
        cluster.submit_driver(self.entry.job_id, storage_json, driver_cpus=driver_cpus, metadata=metadata)

    def read_log(self, position: int) -> tuple[str, int]:
        text = self.cluster().logs(self.entry.job_id)
        return text[position:], len(text)

    def stop(self, timeout: float) -> str:
        cluster, job_id = self.cluster(), self.entry.job_id
        queued = cluster.status(job_id)[0] == "PENDING"
        cluster.stop(job_id)  # SIGTERM to the driver; Ray kills it after RAY_JOB_STOP_WAIT_TIME_S
        # A queued job has no driver to wait for (Ray acts on the stop only once it is scheduled); the caller
        # records it CANCELLED, and its driver refuses to run if it ever starts.
        deadline = time.monotonic() + (0 if queued else timeout)
        while time.monotonic() < deadline and cluster.status(job_id)[0] not in RAY_TERMINAL:
            time.sleep(0.2)
        return ""

    def ended(self, ray_states: dict[str, tuple[str, str]] | None = None) -> tuple[JobState, str] | None:
        if ray_states is not None:
            if self.entry.job_id not in ray_states:  # not submitted yet (indexed first), or already forgotten
                return None
            ray_state, message = ray_states[self.entry.job_id]
        else:
            try:
                ray_state, message = self.cluster().status(self.entry.job_id)
            except RayJobsError:  # the cluster is gone or unreachable: the stored record is all there is
                return None
        if ray_state not in RAY_TERMINAL:
            return None
        if ray_state == "STOPPED":
            return JobState.CANCELLED, "stopped through the Ray job API"
        return JobState.FAILED, (f"Ray job {self.entry.job_id} ended {ray_state} without a final state"
                                 + (f": {message}" if message else ""))

    def where(self) -> str:
        return f"Ray job {self.entry.job_id} at {self.entry.address}"


def launcher_for(entry: IndexEntry) -> Launcher:
    return RayJob(entry) if entry.address else LocalProcess(entry)


def current_record(entry: IndexEntry, ray_states: dict[str, tuple[str, str]] | None = None) -> JobRecord:
    """The job's record, from the store; corrected when its driver (local process or Ray job) ended without
    writing a final state (`ray_states`: see Launcher.ended)."""
    store = entry.store()
    try:
        record = JobRecord.load(store, entry.job_id)
    except NotInStore:
        raise UnknownJob(f"job {entry.job_id}: no record in {store.uri}") from None
    if not record.state.terminal and (end := launcher_for(entry).ended(ray_states)):
        # Re-read once: the driver may have written its final state between our read and its exit.
        record = JobRecord.load(store, entry.job_id)
        if not record.state.terminal:
            state, reason = end
            record.finish(state, f"{reason} (during stage {record.stage or 'start-up'})")
            record.save(store)
    return record


def _read_file(path: Path, position: int) -> tuple[str, int]:
    if not path.exists():
        return "", position
    with open(path, "rb") as f:
        f.seek(position)
        chunk = f.read()
    return chunk.decode(errors="replace"), position + len(chunk)

