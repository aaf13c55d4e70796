"""`peftfleet serve`: an HTTP API in front of a Ray cluster that starts peftfleet jobs and nothing else.

Ray's job API has one cluster-wide token, and whoever holds it can run any command on every node. The gateway
holds that token (RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH, from a Secret); users hold their own bearer tokens and can
only send job specs. The entrypoint is always our driver, the runtime_env always ours, the storage always the
gateway's, and every path a spec names must lie under the gateway's data root. A user sees, follows, cancels and
fetches only their own jobs. OpenAPI: /openapi.json (browsable at /docs).
"""

import hashlib
import hmac
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import yaml
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jobspecs import SpecError, parse_spec
from jobspecs.schema import StorageSpec
from orchestrator.control.jobs import IndexEntry, JobError, JobRecord, LocalIndex, UnknownJob
from orchestrator.control.launchers import current_record
from orchestrator.control.ray_jobs import RayJobsError
from orchestrator.control.submission import cancel, read_log, submit, tail
from orchestrator.storage.artifacts import IncompleteJob, job_key, read_manifest
from workers.store import StoreError


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
                                                                      "owns which job. Keep it on a volume.")
    max_body_kb: int = Field(256, gt=0, description="Larger request bodies are refused with 413.")
    url_expiry_s: int = Field(900, gt=0, le=7 * 24 * 3600, description="Lifetime of presigned artifact URLs.")
    host: str = Field("127.0.0.1", description="Interface to listen on (0.0.0.0 inside a pod).")
    port: int = Field(8000, gt=0, lt=65536)


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


def create_app(config: GatewayConfig) -> FastAPI:
    users = load_users(config.users_file)
    index = LocalIndex(config.state_dir.expanduser())
    data_root = config.data_root.expanduser().resolve()
    storage = config.storage.model_dump(mode="json")
    app = FastAPI(title="peftfleet gateway", version="1",
                  description="Start, follow, cancel and fetch peftfleet jobs. Authenticate with "
                              "`Authorization: Bearer <your token>`.")

    def user_of(request: Request) -> str:
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

    def own(job_id: str, user: str) -> IndexEntry:
        try:
            entry = index.get(job_id)
        except UnknownJob:
            raise HTTPException(404, f"no job {job_id!r}") from None
        if entry.owner != user:
            raise HTTPException(403, f"job {job_id!r} belongs to another user")
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

    @app.post("/v1/jobs", status_code=201, summary="Validate a job spec and start the job")
    def submit_job(body: SubmitRequest, user: User) -> dict:
        data = dict(body.spec)
        if "storage" in data:  # where jobs live, and with whose credentials, is the gateway's business
            raise spec_problems(("storage", f"set by the gateway ({config.storage.uri}); leave it out"))
        data["storage"] = storage
        try:
            spec = parse_spec(data, source="spec", base_dir=data_root, check_files=True)
        except SpecError as err:
            raise spec_problems(*err.problems) from None
        for where, value in _paths(spec.model_dump(exclude={"storage"})):
            if not value.is_relative_to(data_root):
                raise spec_problems((where, f"{value} is outside the gateway's data root {data_root}"))
        try:
            job_id = submit(spec, index, address=config.ray_address, owner=user)
        except JobError as err:
            raise HTTPException(409 if err.code == 2 else 503, str(err)) from None
        return {"job_id": job_id, "state": "PENDING"}

    @app.get("/v1/jobs", summary="Your jobs")
    def list_jobs(user: User) -> list[dict]:
        entries = [index.get(job_id) for job_id in index.ids()]
        return [view(current_record(e)) for e in entries if e.owner == user]

    @app.get("/v1/jobs/{job_id}", summary="A job's state, stages and error")
    def get_job(job_id: str, user: User) -> dict:
        return view(current_record(own(job_id, user)))

    @app.get("/v1/jobs/{job_id}/logs", response_class=PlainTextResponse,
             summary="The driver's log from `offset` on (X-Next-Offset says where to go on); follow=true streams "
                     "it until the job ends")
    def logs(job_id: str, user: User, offset: Annotated[int, Query(ge=0)] = 0, follow: bool = False):
        entry = own(job_id, user)
        if follow:
            return StreamingResponse(tail(entry, offset, poll_s=1.0), media_type="text/plain")
        text, position = read_log(entry, offset)
        return PlainTextResponse(text, headers={"X-Next-Offset": str(position)})

    @app.post("/v1/jobs/{job_id}/cancel", summary="Stop a running job; it ends CANCELLED")
    def cancel_job(job_id: str, user: User) -> dict:
        return view(cancel(own(job_id, user), timeout=60))

    @app.get("/v1/jobs/{job_id}/artifacts", summary="A finished job's manifest, with short-lived download URLs")
    def artifacts(job_id: str, user: User) -> dict:
        entry = own(job_id, user)
        store = entry.store()
        try:
            manifest = read_manifest(store, job_id)
        except IncompleteJob as err:
            raise HTTPException(409, str(err)) from None
        return {"job_id": job_id, "expires_in_s": config.url_expiry_s, "artifacts": manifest.artifacts,
                "files": [{**f.__dict__, "url": store.presigned_get(job_key(job_id, f.path), config.url_expiry_s)}
                          for f in manifest.files]}

    app.add_middleware(BodyLimit, max_bytes=config.max_body_kb * 1024)
    return app


def serve(config_path: Path) -> None:
    import uvicorn

    config = load_config(config_path)
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="info")
