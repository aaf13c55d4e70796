"""A job's driver as a Ray job: submitted to a cluster's job API (the dashboard port, e.g. http://HEAD:8265).

Ray 2.60 protects that API with one cluster-wide token (RAY_AUTH_MODE=token). We find it the way Ray's own CLI
does — RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token — and send it ourselves, so a
missing or wrong token is an error that says which and where, not a bare 401.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import threading
import time
from dataclasses import dataclass
from pathlib import Path

RAY_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_S = 60


class RayJobsError(Exception):
    """The cluster's job API refused or could not be reached; the message says what to do."""


def find_token() -> tuple[str | None, str]:
    """(token or None, where it came from) — the same sources and order as Ray's token loader."""
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token, "RAY_AUTH_TOKEN"
    path_var = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(path_var).expanduser() if path_var else Path.home() / ".ray" / "auth_token"
    source = f"RAY_AUTH_TOKEN_PATH ({path})" if path_var else str(path)
    if path.is_file() and (token := path.read_text().strip()):
        return token, source
    return None, source


@functools.lru_cache(maxsize=16)
def _connect(address: str, token: str | None):
    """One client per cluster and token: making one costs a round trip (Ray checks the server's version)."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"} if token else {})


@dataclass(frozen=True)
class RayCluster:
    address: str  # http(s)://HEAD:8265

    def _explain(self, err: Exception, token: str | None, source: str) -> RayJobsError:
        from ray.exceptions import AuthenticationError

        if isinstance(err, AuthenticationError) and token is None:
            return RayJobsError(
                f"the Ray cluster at {self.address} requires its auth token and none was found: set RAY_AUTH_TOKEN, "
                f"or RAY_AUTH_TOKEN_PATH to a file holding it (looked in {source})")
        if isinstance(err, AuthenticationError):
            return RayJobsError(f"the Ray cluster at {self.address} rejected the auth token from {source}")
        if isinstance(err, ConnectionError):
            return RayJobsError(f"cannot reach the Ray job API at {self.address}: is the head up and the port "
                                f"forwarded? ({err})")
        return RayJobsError(f"Ray job API at {self.address}: {err}")

    def _call(self, op: str, *args, **kwargs):
        token, source = find_token()
        try:  # making the client is a request too (it may be the one refused)
            return getattr(_connect(self.address, token), op)(*args, **kwargs)
        except Exception as err:
            raise self._explain(err, token, source) from None

    def submit_driver(self, job_id: str, storage_json: str, metadata: dict[str, str], driver_cpus: float) -> None:
        """Start `python -m orchestrator.control.driver` on the cluster as Ray job `job_id`; it joins the cluster it
        runs on.
        Nothing but our own driver command is ever submitted (no user entrypoint, no runtime_env from users)."""
        entrypoint = shlex.join(["python", "-m", "orchestrator.control.driver", job_id, storage_json,
                                 "--ray-address", "auto"])
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                self._call("submit_job", entrypoint=entrypoint, submission_id=job_id, metadata=metadata,
                           runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}}, entrypoint_num_cpus=driver_cpus)
                return
            except RayJobsError as err:
                # A head that has just started answers before its job agent has registered: worth waiting for.
                if "No available agent" not in str(err) or time.monotonic() > deadline:
                    raise
            time.sleep(1.0)

    def status(self, job_id: str) -> tuple[str, str]:
        """(Ray's job status, its message)."""
        info = self._call("get_job_info", job_id)
        return str(info.status), info.message or ""

    def states(self) -> dict[str, tuple[str, str]]:
        """(Ray's job status, its message) of every job on the cluster, in one request."""
        return {job.submission_id: (str(job.status), job.message or "") for job in self._call("list_jobs")
                if job.submission_id}

    def logs(self, job_id: str) -> str:
        return self._call("get_job_logs", job_id)

    def stop(self, job_id: str) -> None:
        self._call("stop_job", job_id)

    def forget(self, job_id: str) -> None:
        """Delete a finished Ray job's entry, if the cluster still has it."""
        with contextlib.suppress(RayJobsError):
            self._call("delete_job", job_id)


class RayStates:
    """Ray's view of every job, refreshed by a thread of its own every `every_s`: callers (every listing, every
    log stream's poll) take the latest view at once instead of waiting on Ray's job API — one process, which a
    busy cluster answers slowly. A job newer than the view is not in it, and counts as still running."""

    def __init__(self, cluster: RayCluster, every_s: float):
        self.cluster, self.every_s = cluster, every_s
        self.fresh = threading.Event()
        self.states: dict[str, tuple[str, str]] = {}
        threading.Thread(target=self._refresh, daemon=True, name="ray-states").start()

    def _refresh(self) -> None:
        while True:
            try:
                self.states = self.cluster.states()
            except RayJobsError:  # the cluster does not answer: the stored records are all there is
                self.states = {}
            self.fresh.set()
            time.sleep(self.every_s)

    def __call__(self) -> dict[str, tuple[str, str]]:
        self.fresh.wait()  # the first view only
        return self.states
