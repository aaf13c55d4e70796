"""The gateway under load: 4 users × 25 submissions, log followers coming and going, cancels, and one user
hammering it with bad specs, oversize bodies, bad tokens and other users' jobs — against a real Ray head (token
auth), a real gateway process and moto's S3 server in its own process, all on loopback.

    make bench      (or: pytest -s -m benchmark tests/benchmarks/test_bench_gateway_load.py)

Each user's first job runs (a tiny model, a few steps); the others ask for more driver CPUs than the cluster has,
so Ray queues them, and they are cancelled while queued. Asserted: every good job reaches a final state, every
answer has the code its request deserves, p99 of `GET /v1/jobs` stays under 1 s, the gateway process holds no
more threads or file descriptors after the load than before it (counted in /proc), and its log holds no token.
"""

from __future__ import annotations

import random
import secrets
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.live_cluster import call, gateway, moto_server, ray_head

USERS = ("ann", "ben", "cat", "dan")
ATTACKER = "mallory"
PER_USER = 25
FINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


def spec(runs: bool) -> dict:
    base = {"name": "load", "model": {"path": "tiny-llama"},
            "data": {"format": "instruction", "train": "train.jsonl", "max_seq_len": 64},
            "adapter": {"method": "lora", "r": 4, "alpha": 8}, "train": {"max_steps": 2, "micro_batch_size": 8}}
    return base if runs else {**base, "cluster": {"driver_cpus": 64}}  # queued in Ray until cancelled


def held(pid: int) -> tuple[int, int]:
    """(threads, open file descriptors) of a process."""
    return len(list(Path(f"/proc/{pid}/task").iterdir())), len(list(Path(f"/proc/{pid}/fd").iterdir()))


class Load:
    """Every request's (kind, status) and every listing's latency, from many threads."""

    def __init__(self, gw):
        self.gw, self.lock, self.stop = gw, threading.Lock(), threading.Event()
        self.codes: Counter[tuple[str, int]] = Counter()
        self.list_s: list[tuple[float, bool]] = []  # (seconds, whether that user's job was training meanwhile)
        self.jobs: dict[str, list[str]] = {u: [] for u in USERS}  # every good job of each user
        self.runs: dict[str, str] = {}  # the one of each user that runs (the others wait in Ray's queue)
        self.wrong: list[str] = []
        self.left = 0  # followers that went away

    def note(self, kind: str, response: requests.Response, expect: tuple[int, ...]) -> requests.Response:
        with self.lock:
            self.codes[(kind, response.status_code)] += 1
            if response.status_code not in expect:
                self.wrong.append(f"{kind}: {response.status_code} {response.text[:200]}")
        return response

    def submit(self, user: str, i: int) -> None:
        response = self.note("submit", call(self.gw, "POST", "/v1/jobs", user=user, json={"spec": spec(i == 0)}),
                             (201,))
        if response.status_code == 201:
            with self.lock:
                self.jobs[user].append(response.json()["job_id"])
                if i == 0:
                    self.runs[user] = response.json()["job_id"]

    def watch(self, user: str) -> None:
        while not self.stop.is_set():
            t0 = time.perf_counter()
            response = self.note("list", call(self.gw, "GET", "/v1/jobs", user=user), (200,))
            training = response.ok and any(j["state"] == "RUNNING" for j in response.json())
            with self.lock:
                self.list_s.append((time.perf_counter() - t0, training))
            time.sleep(0.2)

    def follow(self, user: str) -> None:
        rng = random.Random(user)
        while not self.stop.is_set():
            with self.lock:
                jobs = list(self.jobs[user])
            if not jobs:
                time.sleep(0.2)
                continue
            # a client that waits 0.5-2 s for each read (a queued job's log stays empty), then goes away
            try:
                with call(self.gw, "GET", f"/v1/jobs/{rng.choice(jobs)}/logs", user=user, stream=True,
                          params={"follow": "true"}, timeout=rng.uniform(0.5, 2.0)) as response:
                    self.note("follow", response, (200, 429))  # 429: that job or user has its streams already
                    for _ in response.iter_content(chunk_size=None):
                        pass
            except requests.RequestException:  # left mid-stream, or before the answer came
                with self.lock:
                    self.left += 1

    def hammer(self) -> None:
        bad_specs = [{**spec(True), "adapter": {"method": "lora", "r": 0}}, {**spec(True), "model": {"path": "/etc"}},
                     {**spec(True), "storage": {"uri": "file:///tmp"}}, {**spec(True), "name": "x\n"},
                     {**spec(True), "train": {"num_workers": 10_000}}]
        victim = next(j for jobs in self.jobs.values() for j in jobs)
        for i in range(100):
            self.note("bad spec", call(self.gw, "POST", "/v1/jobs", user=ATTACKER,
                                       json={"spec": bad_specs[i % len(bad_specs)]}), (422,))
        for _ in range(25):
            self.note("oversize", call(self.gw, "POST", "/v1/jobs", user=ATTACKER,
                                       json={"spec": {**spec(True), "pad": "x" * 70_000}}), (413,))
            self.note("oversize chunked", call(self.gw, "POST", "/v1/jobs", user=ATTACKER,
                                               data=(b"x" * 8192 for _ in range(10)),
                                               headers={"Content-Type": "application/json"}), (413,))
            self.note("bad token", call(self.gw, "GET", "/v1/jobs", user=None,
                                        headers={"Authorization": f"Bearer {secrets.token_urlsafe(32)}"}), (401,))
            self.note("another's job", call(self.gw, "GET", f"/v1/jobs/{victim}", user=ATTACKER), (404,))
            self.note("another's cancel", call(self.gw, "POST", f"/v1/jobs/{victim}/cancel", user=ATTACKER), (404,))

    def cancel_queued(self, user: str) -> None:
        for job_id in (j for j in self.jobs[user] if j != self.runs[user]):
            response = self.note("cancel", call(self.gw, "POST", f"/v1/jobs/{job_id}/cancel", user=user), (200,))
            if response.ok and response.json()["state"] != "CANCELLED":
                self.wrong.append(f"cancel {job_id}: {response.json()['state']}")


@pytest.mark.benchmark
def test_bench_gateway_load(tmp_path, assets):
    import boto3

    # 8 logical CPUs: the four running jobs hold a driver CPU each and need one more for their training worker.
    # Ray and its jobs at nice 10: on a cluster the gateway has its own pod's CPUs, here it shares two cores.
    with moto_server() as endpoint, ray_head(tmp_path, num_cpus=8, nice=10) as head:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="load")
        storage = {"uri": "s3://load/gw", "endpoint_url": endpoint, "region": "us-east-1"}
        root = tmp_path / "gateway"
        root.mkdir()
        with gateway(head, root, data_root=assets, storage=storage, users=(*USERS, ATTACKER),
                     limits={"jobs_in_flight": PER_USER, "workers": PER_USER}) as gw:
            load = Load(gw)
            with ThreadPoolExecutor(16) as pool:  # warm the gateway's pools before counting what it holds
                list(pool.map(lambda u: call(gw, "GET", "/v1/jobs", user=u), USERS * 5))
            time.sleep(1)
            before = held(gw.pid)
            t0 = time.perf_counter()
            background = ThreadPoolExecutor(2 * len(USERS))
            running = [background.submit(fn, u) for u in USERS for fn in (load.watch, load.follow)]
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda job: load.submit(*job), [(u, i) for i in range(PER_USER) for u in USERS]))
                hammered = pool.submit(load.hammer)
                list(pool.map(load.cancel_queued, USERS))
                hammered.result()
            deadline = time.monotonic() + 600
            while True:
                states = {j: call(gw, "GET", f"/v1/jobs/{j}", user=u).json()["state"]
                          for u in USERS for j in load.jobs[u]}
                if all(s in FINAL for s in states.values()) or time.monotonic() > deadline:
                    break
                time.sleep(2)
            load.stop.set()
            for future in running:
                future.result()
            background.shutdown()
            elapsed = time.perf_counter() - t0
            time.sleep(3)  # the last streams' slots and sockets go
            after = held(gw.pid)
            # Pooled connections (to Ray, to the store) may have opened during the load; a leak would grow with
            # more requests. A second burst: 200 listings and 40 streams of ended jobs.
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda u: call(gw, "GET", "/v1/jobs", user=u), USERS * 50))
                list(pool.map(lambda j: call(gw, "GET", f"/v1/jobs/{j[1]}/logs", user=j[0],
                                             params={"follow": "true"}).text,
                              [(u, j) for u in USERS for j in load.jobs[u][:10]]))
            time.sleep(3)
            again = held(gw.pid)
            streams = call(gw, "GET", "/readyz", user=None).json()["log_streams"]
        log = gw.log.read_text()

    ends = Counter(states.values())
    ran = Counter(states[load.runs[u]] for u in USERS)
    def p50_p99(seconds: list[float]) -> str:
        q = statistics.quantiles(seconds, n=100) if len(seconds) > 1 else [float("nan")] * 99
        return f"{q[49]:.3f} / {q[98]:.3f} ({len(seconds)})"

    every = [t for t, _ in load.list_s]
    calm = [t for t, training in load.list_s if not training]
    rows = [("requests, all kinds", f"{sum(load.codes.values()):,}", f"in {elapsed:.0f} s"),
            *[(f"  {kind} → {code}", f"{n:,}", "") for (kind, code), n in sorted(load.codes.items())],
            ("good jobs submitted / in a final state", f"{len(states)} / {sum(ends[s] for s in FINAL)}",
             ", ".join(f"{s} {n}" for s, n in sorted(ends.items()))),
            ("  the jobs that ran (one per user)", ", ".join(f"{s} {n}" for s, n in sorted(ran.items())), ""),
            ("followers that went away mid-stream", f"{load.left}", "each reads for 0.5-2 s"),
            ("answers with a wrong code", f"{len(load.wrong)}", ""),
            ("GET /v1/jobs latency p50 / p99 (s) (listings), 4 users with 25 jobs each", p50_p99(every),
             "target: p99 < 1 s"),
            ("  while that user's job trained (the 2 cores shared with 4 training jobs)",
             p50_p99([t for t, training in load.list_s if training]), ""),
            ("  otherwise", p50_p99(calm), "p99 < 1 s asserted"),
            ("gateway threads: before / after / after 240 more requests", f"{before[0]} / {after[0]} / {again[0]}",
             "every pool's threads start with the gateway"),
            ("gateway file descriptors: before / after / after 240 more requests",
             f"{before[1]} / {after[1]} / {again[1]}", "pooled connections to Ray and the store"),
            ("log streams open after", f"{streams}", ""),
            ("tokens in the gateway's log", f"{sum(t in log for t in [*gw.tokens.values(), head.token])}", "")]
    print("\nGateway load: an 8-CPU Ray head (at nice 10) with token auth, the gateway, moto's S3 server; all on "
          "loopback, 2 cores")
    print("| measure | value | note |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    assert not load.wrong, load.wrong[:10]
    assert len(states) == len(USERS) * PER_USER and all(s in FINAL for s in states.values()), ends
    assert ran == Counter({"SUCCEEDED": len(USERS)}), ran
    # On two cores shared with four training jobs the gateway waits for a core (see the README); alone, it answers.
    assert statistics.quantiles(calm, n=100)[98] < 1.0
    assert after[0] == before[0] == again[0] and max(after[1], again[1]) <= before[1] + 4, (before, after, again)
    assert streams == 0 and not any(t in log for t in [*gw.tokens.values(), head.token])
