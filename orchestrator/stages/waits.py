"""Cancellable waits on Ray work. `peftfleet cancel` sends the driver SIGTERM; the handler only sets a flag
(raising inside Ray's C++ calls breaks them), and every wait here notices it within half a second, cancels the
remote work in flight and raises JobCancelled."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.stages.context import Context


class JobCancelled(Exception):
    pass


_cancel_requested = threading.Event()


def request_cancel() -> None:
    _cancel_requested.set()


def check_cancelled() -> None:
    if _cancel_requested.is_set():
        raise JobCancelled()


def wait_all(refs: list, on_progress: Callable[[int], None] | None = None, fetch: bool = False) -> list:
    """Wait for every ref, cancellable. Large results stay in the object store unless `fetch`
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




def run_in_thread(fn: Callable[[], Any]) -> Any:
    """Run a blocking driver-side call (Ray Train's fit) in a thread, so a cancel request is still noticed."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # re-raised in the caller's thread
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)
        check_cancelled()
    if "error" in box:
        raise box["error"]
    return box["value"]


def model_task(ctx: Context, stage: str, process: str, fn: Callable[..., Any], *args: Any, retries: int = 2) -> Any:
    """fn(*args) loads models: run it as a Ray task in a process of its own (the driver holds no model, and the
    memory goes back when it ends), reserving its planned memory, and record its peak. Cancellable; returns fn's
    result."""
    import ray

    from workers.process_memory import with_peak

    task = ray.remote(num_cpus=1, max_retries=retries, max_calls=1, **ctx.reserve(stage, process))(with_peak)
    (result, peak), = wait_all([task.remote(fn, *args)], fetch=True)
    ctx.record_peak(stage, process, [peak])
    return result


def reason_of(err: BaseException) -> str:
    """One line a user can act on: the remote exception itself, not Ray's wrapper with its traceback."""
    from ray.exceptions import RayTaskError

    cause = err.cause if isinstance(err, RayTaskError) and err.cause is not None else err
    text = str(cause).strip() or type(cause).__name__
    return f"{type(cause).__name__}: {text}"
