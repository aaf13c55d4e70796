"""Followed logs on the gateway: streams that cost no thread while they wait, end when their client leaves or
their time is up, and are capped per user and per job so that no one can hold the server.

A stream is a coroutine: each poll reads the log once on the gateway's call pool and then sleeps on the event
loop, so a thousand idle followers hold a thousand small objects, not a thousand threads. A follower's slot is
given back when its stream ends, is cancelled (the client went away: Starlette cancels the response), or is
collected without having been started (a response never sent).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor

from fastapi import HTTPException, Request

from orchestrator.control.jobs import IndexEntry
from orchestrator.control.ray_jobs import RayStates
from orchestrator.control.submission import poll_log


class Followers:
    """How many streams each user and each job has open, refusing (429) past the caps."""

    def __init__(self, per_user: int, per_job: int):
        self.per_user, self.per_job = per_user, per_job
        self._users: Counter[str] = Counter()
        self._jobs: Counter[str] = Counter()
        self._lock = threading.Lock()  # finalizers may release from any thread

    def take(self, user: str, job_id: str) -> Callable[[], None]:
        """A slot for one stream of `job_id` by `user`; returns its release (idempotent)."""
        with self._lock:
            if self._users[user] >= self.per_user:
                raise HTTPException(429, f"you follow {self._users[user]} logs already, the most one user may "
                                         f"(max_followers_per_user); close one, or read with offset= instead")
            if self._jobs[job_id] >= self.per_job:
                raise HTTPException(429, f"job {job_id} has {self._jobs[job_id]} followers already, the most one "
                                         f"job may have (max_followers_per_job)")
            self._users[user] += 1
            self._jobs[job_id] += 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                for counts, key in ((self._users, user), (self._jobs, job_id)):
                    counts[key] -= 1
                    if counts[key] <= 0:
                        del counts[key]

        return release

    def open(self) -> int:
        with self._lock:
            return sum(self._users.values())


async def _stream(entry: IndexEntry, position: int, request: Request, pool: Executor, ray_states: RayStates,
                  max_s: float, poll_s: float, release: Callable[[], None]) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_s
    try:
        while not await request.is_disconnected():
            ended, chunk, position = await loop.run_in_executor(
                pool, lambda at=position: poll_log(entry, at, ray_states=ray_states()))
            if chunk:
                yield chunk
            if ended:
                return
            if loop.time() >= deadline:
                yield (f"\n[peftfleet gateway] a log stream lasts at most {max_s:.0f} s; follow again from "
                       f"offset={position}\n")
                return
            await asyncio.sleep(poll_s)
    finally:
        release()


def follow(entry: IndexEntry, position: int, request: Request, user: str, followers: Followers,
           pool: Executor, ray_states: RayStates, max_s: float, poll_s: float = 1.0) -> AsyncIterator[str]:
    """The job's log from `position` as it grows, until the job ends, the client leaves or `max_s` is up."""
    release = followers.take(user, entry.job_id)
    stream = _stream(entry, position, request, pool, ray_states, max_s, poll_s, release)
    weakref.finalize(stream, release)  # a stream never iterated never reaches its `finally`
    return stream


async def answers(pool: Executor, timeout_s: float) -> bool:
    """Whether `pool` runs a no-op within `timeout_s`: a server whose pool is wedged is not ready."""
    noop: Awaitable[None] = asyncio.get_running_loop().run_in_executor(pool, lambda: None)
    try:
        await asyncio.wait_for(noop, timeout_s)
    except TimeoutError:
        return False
    return True
