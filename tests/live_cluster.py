"""A real Ray head (`ray start --head`, token auth, dashboard on 127.0.0.1, its own temp dir) and a real gateway
(`peftfleet serve`), each started as its own process and stopped by PID — never `ray stop`, which would stop every
Ray on the machine. Shared by the remote-job tests and the benchmark."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import requests
import yaml

from orchestrator.api.gateway import hash_token
from tests.helpers import free_port

BIN = Path(sys.executable).parent


def _wait_http(url: str, ok, what: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{what} exited:\n{log.read_text()[-3000:]}"
        with contextlib.suppress(requests.RequestException):
            if ok(requests.get(url, timeout=5)):
                return
        time.sleep(0.5)
    raise AssertionError(f"{what} did not come up:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process (`ray start` then drains and stops its node), SIGKILL to whatever is left of its
    session after 10 s (a drain waiting on queued Ray jobs would take 30)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def with_token(token: str | None, home: Path | None = None) -> dict:
    """This process's environment with only `token` as Ray's token (and, with `home`, no ~/.ray/auth_token)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    if home is not None:
        env["HOME"] = str(home)
    return {**env, "RAY_AUTH_TOKEN": token} if token else env


@contextlib.contextmanager
def ray_head(log_dir: Path, num_cpus: int = 4, nice: int = 0, env: dict | None = None) -> Iterator[SimpleNamespace]:
    """`nice`: run Ray (and so every job's processes) at this niceness, as if the gateway had CPUs of its own;
    `env`: more of the head's environment (a bucket endpoint, as infra/ gives every Ray pod)."""
    token = secrets.token_hex(32)
    temp_dir = tempfile.mkdtemp(prefix="pfray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    log = log_dir / "ray-start.log"
    port = free_port()
    # As infra/ deploys it: the token in a file only its owner can read, so that no process Ray starts (drivers,
    # workers) has it in its environment, where /proc/self/environ would show it.
    token_file = log_dir / "ray-token"
    token_file.write_text(token)
    token_file.chmod(0o400)
    env = {**with_token(None), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
           "PATH": f"{BIN}:{os.environ['PATH']}",
           "RAY_JOB_STOP_WAIT_TIME_S": "30", **(env or {})}  # let a cancelled driver record its end first
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*(["nice", "-n", str(nice)] if nice else []), str(BIN / "ray"), "start", "--head", "--block",
             f"--port={free_port()}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={port}", f"--num-cpus={num_cpus}", f"--object-store-memory={200 * 1024**2}",
             f"--temp-dir={temp_dir}", "--disable-usage-stats",
             # Ray's fixed default ports would collide with any other Ray on the machine (the job agent's
             # especially: without it the head answers every submission "No available agent").
             *(f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                      "runtime-env-agent-port", "metrics-export-port",
                                                      "ray-client-server-port"))],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{port}"
    try:
        # Up when the job API answers; without the token it must refuse.
        _wait_http(f"{address}/api/jobs/", lambda r: r.status_code == 401, "ray head", proc, log)
        yield SimpleNamespace(address=address, token=token, log=log)
    finally:
        _stop(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def gateway(head: SimpleNamespace, root: Path, data_root: Path, storage: dict,
            users: tuple[str, ...] = ("alice", "bob"), env: dict | None = None,
            **settings) -> Iterator[SimpleNamespace]:
    """`peftfleet serve` with a fresh token per user (`env`: more of its environment); `settings`: more
    GatewayConfig fields."""
    tokens = {user: secrets.token_urlsafe(32) for user in users}
    (root / "users.yaml").write_text(yaml.safe_dump({"users": {u: hash_token(t) for u, t in tokens.items()}}))
    port = free_port()
    config = {"ray_address": head.address, "users_file": str(root / "users.yaml"), "data_root": str(data_root),
              "storage": storage, "state_dir": str(root / "state"), "port": port, "max_body_kb": 64, **settings}
    (root / "gateway.yaml").write_text(yaml.safe_dump(config))
    log = root / "gateway.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.api.cli", "serve", str(root / "gateway.yaml")],
                                env={**with_token(head.token), **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/readyz", lambda r: r.ok, "gateway", proc, log)
        yield SimpleNamespace(url=url, tokens=tokens, log=log, pid=proc.pid, root=root)
    finally:
        _stop(proc)


def call(gw: SimpleNamespace, method: str, path: str, user: str | None = "alice", timeout: float = 120,
         **kwargs) -> requests.Response:
    """An HTTP request to the gateway as `user` (None: without a token)."""
    headers = {"Authorization": f"Bearer {gw.tokens[user]}"} if user else {}
    return requests.request(method, f"{gw.url}{path}", headers={**headers, **kwargs.pop("headers", {})},
                            timeout=timeout, **kwargs)


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server in its own process on loopback (so the process under test does not share its interpreter);
    yields its endpoint."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(endpoint, timeout=2)
                break
            except requests.RequestException:
                assert time.monotonic() < deadline and server.poll() is None, "moto's server did not come up"
                time.sleep(0.2)
        yield endpoint
    finally:
        server.terminate()
        server.wait()
