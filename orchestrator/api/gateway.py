"""`peftfleet serve`: an HTTP API in front of a Ray cluster that starts peftfleet jobs and nothing else.

Ray's job API has one cluster-wide token, and whoever holds it can run any command on every node. The gateway
holds that token (RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH, from a Secret); users hold their own bearer tokens and can
only send job specs. The entrypoint is always our driver, the runtime_env always ours, the storage always the
gateway's, and every path a spec names must lie under the gateway's data root. A user sees, follows, cancels and
fetches only their own jobs. OpenAPI: /openapi.json (browsable at /docs).
"""

import asyncio
import contextlib
import functools
import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import yaml
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from jobspecs import JobSpec, SpecError, parse_spec, spec_from_frozen
from jobspecs.confinement import Outside, inside
from jobspecs.schema import StorageSpec
from orchestrator.api.log_streams import Followers, answers, follow
from orchestrator.api.quotas import Limits, in_flight_problem, job_problems, sweep_size_problem
from orchestrator.control.jobs import IndexEntry, JobError, JobRecord, LocalIndex, UnknownJob
from orchestrator.control.launchers import current_record
from orchestrator.control.ray_jobs import RayCluster, RayJobsError, RayStates
from orchestrator.control.submission import NotStarted, cancel, read_log, submit
from orchestrator.storage.artifacts import IncompleteJob, job_key, read_manifest
from workers.storage.store import StoreError

log = logging.getLogger("peftfleet.gateway")


class GatewayConfig(BaseModel):
    """The gateway's one configuration file (YAML). Secrets are not in it: user tokens are hashed in
    `users_file`, Ray's token and the storage credentials come from the environment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ray_address: str = Field(description="The Ray job API the gateway submits to, e.g. http://ray-head:8265.")
    storage: StorageSpec = Field(description="Where every job of this gateway lives (specs may not choose).")
    users_file: Path = Field(description="YAML `users: {NAME: SHA256_HEX_OF_TOKEN}`; `peftfleet token NAME` "
                                         "makes an entry. Read at start-up.")
    data_root: Path = Field(description="Every path in a submitted spec must lie under this folder (as the "
                                        "cluster sees it); relative spec paths resolve against it.")
    state_dir: Path = Field(Path("~/.peftfleet-gateway"), description="The gateway's job index: which user "
                                                                      "owns which job (files only the gateway's "
                                                                      "user can read). Keep it on a volume.")
    node_cache_dir: Path | None = Field(None, description="cluster.node_cache_dir of every job (specs may not "
                                        "set it): each node's cache of stage outputs and bucket inputs, and where "
                                        "layer-wise calibration spills. Default: the nodes' temp folder. Never "
                                        "inside data_root: jobs trust what they find there.")
    max_body_kb: int = Field(256, gt=0, description="Larger request bodies are refused with 413.")
    url_expiry_s: int = Field(900, gt=0, le=7 * 24 * 3600, description="Lifetime of presigned artifact URLs.")
    host: str = Field("127.0.0.1", description="Interface to listen on (0.0.0.0 inside a pod).")
    port: int = Field(8000, gt=0, lt=65536)
    call_threads: int = Field(16, gt=0, description="Threads for the blocking calls requests make (the store, "
                                                   "Ray's job API); cancels wait on a pool of their own.")
    max_followers_per_user: int = Field(6, gt=0, description="Log streams (follow=true) one user may hold open; "
                                                            "more are refused with 429.")
    max_followers_per_job: int = Field(2, gt=0, description="Log streams one job may have open at once.")
    follow_max_s: int = Field(3600, gt=0, description="A log stream ends after this long, saying the offset to "
                                                      "follow again from.")
    limits: Limits = Field(default_factory=Limits, description="Every user's limits (orchestrator/api/quotas.py).")
    user_limits: dict[str, Limits] = Field(default_factory=dict, description="Limits of particular users, in "
                                                                             "place of `limits`.")
    min_driver_cpus: float = Field(1.0, gt=0, description="CPUs every job's driver reserves at least (a spec's "
                                   "cluster.driver_cpus is raised to it): drivers that reserve nothing pile onto "
                                   "the head without bound.")
    deadline_poll_s: float = Field(15.0, gt=0, description="How often jobs past their deadline are looked for.")
    request_timeout_s: float = Field(10.0, gt=0, description="A connection must send a whole request (line, "
                                     "headers, body) within this of connecting or of its last response, or it is "
                                     "closed (slow clients hold no socket).")
    keep_alive_s: float = Field(5.0, gt=0, description="An idle keep-alive connection is closed after this.")
    max_connections: int = Field(1024, gt=0, description="Open sockets past this are closed at once; requests "
                                 "arriving while this many are open are answered 503.")

    @model_validator(mode="after")
    def _outside_data_root(self) -> "GatewayConfig":
        """What the gateway and its jobs trust (the store, the job index, the node cache) is no user's to write."""
        root = self.data_root.expanduser().resolve()
        store = Path(self.storage.uri.removeprefix("file://")) if self.storage.uri.startswith("file://") else None
        for name, path in (("storage.uri", store), ("state_dir", self.state_dir), ("node_cache_dir",
                                                                                   self.node_cache_dir)):
            if path is not None and (where := path.expanduser().resolve()).is_relative_to(root):
                raise ValueError(f"{name}: {where} is inside data_root {root}, where users put files; the gateway "
                                 "and its jobs trust what they find there")
        return self


def load_config(path: Path) -> GatewayConfig:
    try:
        return GatewayConfig.model_validate(yaml.safe_load(Path(path).read_text()))
    except (OSError, yaml.YAMLError, ValidationError) as err:
        raise SpecError(str(path), [("", f"not a valid gateway config: {err}")]) from None


def hash_token(token: str) -> str:
    # Tokens are 256-bit random strings, so one SHA-256 is enough: there is nothing to brute-force.
    return hashlib.sha256(token.encode()).hexdigest()


def load_users(path: Path) -> dict[str, str]:
    users = (yaml.safe_load(Path(path).read_text()) or {}).get("users") or {}
    bad = [name for name, digest in users.items() if not (isinstance(digest, str) and len(digest) == 64)]
    if bad:
        raise SpecError(str(path), [(f"users.{name}", "must be the sha256 hex digest of the token") for name in bad])
    return {str(name): digest.lower() for name, digest in users.items()}


class SubmitRequest(BaseModel):
    """Only a spec: an entrypoint, a runtime_env or anything else is refused (422)."""

    model_config = ConfigDict(extra="forbid")
    spec: dict[str, Any] = Field(description="A job spec as a JSON object (the YAML file's content).")


class BodyLimit:
    """ASGI middleware: 413 for a body over the limit, by Content-Length or, for chunked bodies, as it streams."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > self.max_bytes:
            return await self._refuse(send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, f"request body over {self.max_bytes} bytes")
            return message

        return await self.app(scope, limited, send)

    async def _refuse(self, send):
        body = b'{"detail":"request body over %d bytes"}' % self.max_bytes
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _paths(value: Any, where: str = "") -> Iterator[tuple[str, Path]]:
    """(field path, path) of every filesystem path in a spec's `model_dump()` (paths keep their type there)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, f"{where}.{key}" if where else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, f"{where}.{i}")
    elif isinstance(value, Path):
        yield where, value


def _pool(threads: int, name: str) -> ThreadPoolExecutor:
    """A pool with all its threads running from the start (a pool starts them as work comes): the gateway's
    thread count is the same idle as under load, so a leak shows."""
    pool, barrier = ThreadPoolExecutor(threads, thread_name_prefix=name), threading.Barrier(threads)
    for _ in range(threads):
        pool.submit(barrier.wait)
    return pool


def create_app(config: GatewayConfig) -> FastAPI:
    users = load_users(config.users_file)
    index = LocalIndex(config.state_dir.expanduser())
    data_root = config.data_root.expanduser().resolve()
    storage = config.storage.model_dump(mode="json")
    app = FastAPI(title="peftfleet gateway", version="1",
                  description="Start, follow, cancel and fetch peftfleet jobs. Authenticate with "
                              "`Authorization: Bearer <your token>`.")

    calls = _pool(config.call_threads, "gateway-call")
    cancels = _pool(4, "gateway-cancel")  # a cancel waits up to 60 s
    reads = _pool(8, "gateway-read")  # a listing's records, read side by side
    polls = _pool(8, "gateway-poll")  # log streams' polls: reading a log waits on Ray, listings must not
    finished: dict[str, JobRecord] = {}  # ended jobs' records never change (a retry drops its job's)
    ray_states = RayStates(RayCluster(config.ray_address), every_s=1.0)
    followers = Followers(config.max_followers_per_user, config.max_followers_per_job)
    submitting = {user: threading.Lock() for user in users}

    async def blocking(fn, *args, pool: ThreadPoolExecutor = calls, **kwargs):
        """Run a blocking call (store, Ray) on the gateway's own pool, never on the event loop."""
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args, **kwargs))

    async def user_of(request: Request) -> str:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        digest, found = hash_token(token.strip()), None
        for name, known in users.items():  # compare with every user: the time taken says nothing about who
            if hmac.compare_digest(digest, known):
                found = name
        if found is None:
            raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})
        return found

    User = Annotated[str, Depends(user_of)]

    async def own(job_id: str, user: str) -> IndexEntry:
        """The user's job; another user's answers as an unknown one does (a 403 would confirm that it exists)."""
        try:
            entry = await blocking(index.get, job_id)
        except UnknownJob:
            entry = None
        if entry is None or entry.owner != user:
            raise HTTPException(404, f"no job {job_id!r}")
        return entry

    def view(record: JobRecord) -> dict:
        """What a user sees of a record: not its driver's host and pid, nor its owner."""
        data = record.to_dict()
        return {"job_id": data.pop("id"), **{k: v for k, v in data.items() if k not in ("driver", "owner")}}

    def spec_problems(*problems: tuple[str, str]) -> HTTPException:
        """422 in FastAPI's own shape, each problem located at its field inside the spec."""
        return HTTPException(422, [{"loc": ["body", "spec", *path.split(".")], "msg": reason, "type": "spec_error"}
                                   for path, reason in problems])

    @app.exception_handler(RayJobsError)
    async def ray_unavailable(request: Request, err: RayJobsError):
        return JSONResponse({"detail": f"the Ray cluster did not answer: {err}"}, status_code=503)

    @app.exception_handler(StoreError)
    async def store_unavailable(request: Request, err: StoreError):
        return JSONResponse({"detail": f"the job store did not answer: {err}"}, status_code=503)

    def validated(data: dict, limits: Limits) -> JobSpec:
        """The spec as the gateway runs it: its storage, its node cache, every path confined to the data root,
        every bucket input under the user's input prefixes (refused before the bucket is listed), a sweep no
        bigger than the user's limit (told before one trial is built)."""
        cluster = data.get("cluster")
        for key, value, given in (("storage", config.storage.uri, "storage" in data),
                                  ("data_root", data_root, "data_root" in data),
                                  ("input_prefixes", f"limits.input_prefixes: {limits.input_prefixes}",
                                   "input_prefixes" in data),
                                  ("cluster.node_cache_dir", config.node_cache_dir or "the nodes' temp folder",
                                   isinstance(cluster, dict) and "node_cache_dir" in cluster)):
            if given:  # where jobs live, what they may read and what they trust is the gateway's business
                raise spec_problems((key, f"set by the gateway ({value}); leave it out"))
        if problem := sweep_size_problem(data, limits):
            raise spec_problems(problem)
        # Into the frozen spec: the driver and every process that reads re-check against them.
        data = {**data, "storage": storage, "data_root": str(data_root), "input_prefixes": limits.input_prefixes}
        if config.node_cache_dir is not None and isinstance(cluster or {}, dict):
            data["cluster"] = {**(cluster or {}), "node_cache_dir": str(config.node_cache_dir)}
        try:
            parse_spec(data, source="spec", base_dir=data_root, check_files=False)  # before any bucket is listed
            spec = parse_spec(data, source="spec", base_dir=data_root, check_files=True)
        except SpecError as err:
            raise spec_problems(*err.problems) from None
        for where, value in _paths(spec.model_dump(exclude={"storage", "cluster"})):
            try:
                inside(data_root, value, where)
            except Outside as err:
                raise spec_problems((where, str(err).removeprefix(f"{where}: "))) from None
        return spec

    def records(user: str) -> list[tuple[IndexEntry, JobRecord]]:
        """The user's jobs and their current records: ended ones from memory, the others read from the store
        side by side, with Ray asked about all of them in one request."""
        entries = [e for e in (index.get(job_id) for job_id in index.ids()) if e.owner == user]
        todo = [e for e in entries if e.job_id not in finished]
        states = ray_states() if todo else {}
        current = dict(zip([e.job_id for e in todo], reads.map(lambda e: current_record(e, states), todo),
                           strict=True))
        finished.update({job_id: r for job_id, r in current.items() if r.state.terminal})
        return [(e, finished.get(e.job_id) or current[e.job_id]) for e in entries]

    def in_flight(user: str) -> list[JobSpec]:
        """The frozen specs of the user's jobs not yet ended."""
        return [spec_from_frozen(entry.store().get_bytes(job_key(entry.job_id, "spec.yaml")).decode())
                for entry, record in records(user) if not record.state.terminal]

    def start(data: dict, user: str, job_id: str | None = None) -> dict:
        limits = config.user_limits.get(user, config.limits)
        if job_id is not None:  # a retry: its record is about to change
            finished.pop(job_id, None)
        cluster = data.get("cluster") or {}
        if isinstance(cluster, dict) and isinstance(cluster.get("driver_cpus", 0), int | float):  # else: 422
            data = {**data, "cluster": {**cluster, "driver_cpus": max(cluster.get("driver_cpus", 0),
                                                                      config.min_driver_cpus)}}
        spec = validated(data, limits)
        if problems := job_problems(spec, limits):
            raise spec_problems(*problems)
        with submitting[user]:  # one count-then-submit at a time per user: concurrent submits cannot all fit
            if refusal := in_flight_problem(spec, in_flight(user), limits):
                raise HTTPException(429, refusal)
            try:
                job_id = submit(spec, index, job_id=job_id, address=config.ray_address, owner=user,
                                deadline=time.time() + limits.job_hours * 3600)
            except NotStarted as err:  # listed FAILED; the owner retries it once the cluster answers
                raise HTTPException(503, {"job_id": err.job_id, "msg": f"{err.reason}; the job is recorded FAILED: "
                                          f"start it again with POST /v1/jobs/{err.job_id}/retry"}) from None
            except JobError as err:
                raise HTTPException(409 if err.code == 2 else 503, str(err)) from None
        return {"job_id": job_id, "state": "PENDING"}

    def cancel_overdue() -> None:
        """Cancel every job past its deadline, and record why; a deadline is cleared once its job has ended."""
        for entry in (index.get(job_id) for job_id in index.ids()):
            if entry.deadline is None or entry.deadline > time.time():
                continue
            if not current_record(entry).state.terminal:
                when = datetime.fromtimestamp(entry.deadline, UTC).isoformat(timespec="seconds")
                record = cancel(entry, timeout=60, reason=f"past its deadline {when} (limits.job_hours)")
                log.warning("job %s of %s: past its deadline, %s", entry.job_id, entry.owner, record.state.value)
            entry.deadline = None
            index.add(entry)

    async def enforce_deadlines() -> None:
        while True:
            await asyncio.sleep(config.deadline_poll_s)
            try:
                await blocking(cancel_overdue, pool=cancels)
            except Exception as err:  # the store or Ray did not answer: the next round tries again
                log.warning("deadline check failed: %s", err)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        watcher = asyncio.create_task(enforce_deadlines())
        yield
        watcher.cancel()

    app.router.lifespan_context = lifespan

    @app.post("/v1/jobs", status_code=201, summary="Validate a job spec and start the job")
    async def submit_job(body: SubmitRequest, user: User) -> dict:
        return await blocking(start, dict(body.spec), user)

    @app.post("/v1/jobs/{job_id}/retry", status_code=201,
              summary="Start a job that failed, was cancelled or never started again, with its frozen spec; "
                      "training resumes from its checkpoints")
    async def retry_job(job_id: str, user: User) -> dict:
        entry = await own(job_id, user)

        def again() -> dict:
            frozen = yaml.safe_load(entry.store().get_bytes(job_key(job_id, "spec.yaml")))
            for key in ("storage", "data_root", "input_prefixes"):  # the gateway's, set again
                frozen.pop(key, None)
            frozen.get("cluster", {}).pop("node_cache_dir", None)
            return start(frozen, user, job_id)

        return await blocking(again)

    @app.get("/v1/jobs", summary="Your jobs")
    async def list_jobs(user: User) -> list[dict]:
        return [view(record) for _, record in await blocking(records, user)]

    @app.get("/v1/jobs/{job_id}", summary="A job's state, stages and error")
    async def get_job(job_id: str, user: User) -> dict:
        return view(await blocking(current_record, await own(job_id, user)))

    @app.get("/v1/jobs/{job_id}/logs", response_class=PlainTextResponse,
             summary="The driver's log from `offset` on (X-Next-Offset says where to go on); follow=true streams "
                     "it until the job ends (at most follow_max_s; the last line says where to go on)")
    async def logs(job_id: str, user: User, request: Request, offset: Annotated[int, Query(ge=0)] = 0,
                   follow_log: Annotated[bool, Query(alias="follow")] = False):
        entry = await own(job_id, user)
        if follow_log:
            stream = follow(entry, offset, request, user, followers, polls, ray_states, max_s=config.follow_max_s)
            return StreamingResponse(stream, media_type="text/plain")
        text, position = await blocking(read_log, entry, offset)
        return PlainTextResponse(text, headers={"X-Next-Offset": str(position)})

    @app.post("/v1/jobs/{job_id}/cancel", summary="Stop a running job; it ends CANCELLED")
    async def cancel_job(job_id: str, user: User) -> dict:
        return view(await blocking(cancel, await own(job_id, user), timeout=60, pool=cancels))

    @app.get("/v1/jobs/{job_id}/artifacts", summary="A finished job's manifest, with short-lived download URLs")
    async def artifacts(job_id: str, user: User) -> dict:
        entry = await own(job_id, user)

        def listing() -> dict:
            store = entry.store()
            try:
                manifest = read_manifest(store, job_id)
            except IncompleteJob as err:
                raise HTTPException(409, str(err)) from None
            return {"job_id": job_id, "expires_in_s": config.url_expiry_s, "artifacts": manifest.artifacts,
                    "files": [{**f.__dict__, "url": store.presigned_get(job_key(job_id, f.path),
                                                                        config.url_expiry_s)}
                              for f in manifest.files]}

        return await blocking(listing)

    @app.get("/readyz", summary="200 while the server answers requests; 503 when its call pool is wedged")
    async def ready() -> JSONResponse:
        if await answers(calls, timeout_s=2.0):
            return JSONResponse({"ready": True, "log_streams": followers.open()})
        return JSONResponse({"ready": False, "detail": "the gateway's call pool is busy"}, status_code=503)

    app.add_middleware(BodyLimit, max_bytes=config.max_body_kb * 1024)
    return app


def serve(config_path: Path) -> None:
    from orchestrator.api.server import run

    config = load_config(config_path)
    run(create_app(config), config.host, config.port, config.request_timeout_s, config.keep_alive_s,
        config.max_connections)
