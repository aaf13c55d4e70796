"""What every process that runs job code does first: library output quieted and routed (workers/runtime/logs.py), then
freed memory returned to the OS and the process's peak sampled (workers/runtime/process_memory.py)."""

from __future__ import annotations

from workers.runtime.logs import quiet_libraries
from workers.runtime.process_memory import bound_process_memory


def start_job_process() -> None:
    quiet_libraries()
    bound_process_memory()
