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

    from workers.runtime.process_memory import with_peak

    task = ray.remote(num_cpus=1, max_retries=retries, max_calls=1, **ctx.reserve(stage, process))(with_peak)
    (result, peak), = wait_all([task.remote(fn, *args)], fetch=True)
    ctx.record_peak(stage, process, [peak])
    return result


MAX_REASON = 600  # characters of an error a user is shown; the whole of it is in the verbose log


def root_cause(err: BaseException) -> BaseException:
    """The exception behind Ray's and Ray Train's wrappers: a remote task's own, the lowest failed rank's."""
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError, WorkerGroupError

    while True:
        if isinstance(err, RayTaskError) and err.cause is not None and err.cause is not err:
            err = err.cause
        elif isinstance(err, WorkerGroupError) and err.worker_failures:
            err = err.worker_failures[min(err.worker_failures)]
        elif isinstance(err, ControllerError):
            err = err.controller_failure
        else:
            return err


def reason_of(err: BaseException) -> str:
    """One line a user can act on: the remote exception itself, never a traceback (with its host paths and package
    versions): for a message that carries one, its last line, the exception it ended in."""
    cause = root_cause(err)
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        lines = lines[-1:]
    text = "; ".join(lines) or type(cause).__name__
    if not text.startswith(f"{type(cause).__name__}:"):
        text = f"{type(cause).__name__}: {text}"
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 1] + "…"
