"""A job process's memory: freed tensors handed back to the OS, and the peak each process reports, so the job
record shows each stage's peaks next to what `peftfleet plan` predicted."""

from __future__ import annotations

import os
import resource
import threading
import time
from collections.abc import Callable
from typing import Any

_peak = [0.0]
_sampler: list[threading.Thread] = []


def bound_process_memory(threshold: int = 2**20) -> None:
    """Called first thing in every job process (idempotent).

    Freed tensors go back to the OS: glibc raises its mmap threshold each time a large block is freed (up to
    32 MiB), after which tensors below it are carved from the heap and stay resident when freed — a ZeRO-3 worker
    that loads and partitions a model then keeps most of it. A fixed threshold (which turns the adjustment off)
    maps each tensor of at least 1 MiB on its own and unmaps it on free.

    And a sampler starts: every 10 ms it records this process's resident memory."""
    import ctypes
    import ctypes.util

    m_trim_threshold, m_mmap_threshold = -1, -3
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(m_mmap_threshold, threshold)
        libc.mallopt(m_trim_threshold, threshold)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        pass
    if not _sampler and os.path.exists("/proc/self/status"):
        _sampler.append(threading.Thread(target=_sample, name="peak-memory", daemon=True))
        _sampler[0].start()


def _resident_mib() -> float:
    """Resident anonymous + file pages: RSS without shared memory (RssShmem: Ray's object store)."""
    kib = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                kib += int(line.split()[1])
    return kib / 1024


def _sample() -> None:
    while True:
        _peak[0] = max(_peak[0], _resident_mib())
        time.sleep(0.01)


def peak_memory_mib() -> float:
    """This process's peak resident memory in MiB: heap, tensors, memory-mapped weights and libraries — without
    the pages of Ray's object store it wrote into (shared memory, which Ray accounts for per node). Without a
    sampler (no /proc) it is the peak resident set, shared memory included."""
    if not _sampler:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    _peak[0] = max(_peak[0], _resident_mib())
    return _peak[0]


def with_peak(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """fn(*args) and this process's peak once it returns: run as a Ray task with max_calls=1, the process is the
    task's own, so the peak is the task's."""
    bound_process_memory()
    return fn(*args), peak_memory_mib()
