"""Cancellable waits on Ray work. `peftfleet cancel` sends the driver SIGTERM; the handler only sets a flag
(raising inside Ray's C++ calls breaks them), and every wait here notices it within half a second, cancels the
remote work in flight and raises JobCancelled."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class JobCancelled(Exception):
    pass


_cancel_requested = threading.Event()


def request_cancel() -> None:
    _cancel_requested.set()


def check_cancelled() -> None:
    if _cancel_requested.is_set():
        raise JobCancelled()


def wait_for(ref: Any) -> Any:
    """ray.get that notices a cancel request (SIGTERM) within half a second and cancels the remote work."""
    import ray

    while True:
        ready, _ = ray.wait([ref], timeout=0.5)
        if ready:
            return ray.get(ref)
        if _cancel_requested.is_set():
            ray.cancel(ref, force=True)
            raise JobCancelled()


def wait_all(refs: list, on_progress: Callable[[int], None] | None = None, fetch: bool = False) -> list:
    """Wait for every ref, cancellable like wait_for. Large results stay in the object store unless `fetch`
    (then they are returned, and a failed task raises here with its own error)."""
    import ray

    pending, done = list(refs), 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5, fetch_local=False)
        if ready:
            if fetch:
                ray.get(ready)  # surfaces a task's error as soon as it is known
            done += len(ready)
            if on_progress:
                on_progress(done)
        if _cancel_requested.is_set():
            for ref in pending:
                ray.cancel(ref, force=True)
            raise JobCancelled()
    return ray.get(refs) if fetch else refs


