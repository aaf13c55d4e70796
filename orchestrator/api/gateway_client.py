"""The gateway's HTTP API as the CLI uses it (`peftfleet --gateway URL ...`): the same records, logs and verified
fetches as against a store or a Ray address, through a user's bearer token.

The token comes from PEFTFLEET_TOKEN or a token file, never from an argument (arguments land in shell history and
in every user's `ps`).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import requests

from orchestrator.control.jobs import JobError, JobRecord, JobState, StageRecord, UnknownJob
from orchestrator.storage.artifacts import MANIFEST, FileEntry, Manifest, job_key

TOKEN_ENV = "PEFTFLEET_TOKEN"
DEFAULT_TOKEN_FILE = Path("~/.peftfleet/token")
_RESUME = re.compile(r"\n\[peftfleet gateway\] a log stream lasts at most \d+ s; follow again from offset=(\d+)\n$")


def find_token(token_file: Path | None) -> str:
    """The user's gateway token: PEFTFLEET_TOKEN, else the token file (refused if others may read it)."""
    if token := os.environ.get(TOKEN_ENV, "").strip():
        return token
    path = (token_file or DEFAULT_TOKEN_FILE).expanduser()
    if not path.is_file():
        raise JobError(f"no gateway token: set {TOKEN_ENV}, or put it in {path} (chmod 600)", code=2)
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise JobError(f"{path}: others may read this token file; chmod 600 {path}", code=2)
    return path.read_text().strip()


def _record(view: dict) -> JobRecord:
    data = dict(view)
    data["id"] = data.pop("job_id")
    data["stages"] = [StageRecord(**s) for s in data["stages"]]
    data["state"] = JobState(data["state"])
    return JobRecord(**data)


class Gateway:
    def __init__(self, url: str, token: str, timeout_s: float = 120):
        self.url, self.timeout_s = url.rstrip("/"), timeout_s
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"

    def _call(self, method: str, path: str, ok: tuple[int, ...] = (200,), **kwargs) -> requests.Response:
        try:
            response = self.session.request(method, f"{self.url}{path}", timeout=self.timeout_s, **kwargs)
        except requests.RequestException as err:
            raise JobError(f"cannot reach the gateway at {self.url}: {err}") from None
        if response.status_code in ok:
            return response
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        if response.status_code == 404:
            raise UnknownJob(f"{detail} (at {self.url})")
        if isinstance(detail, list):  # 422: each problem at its field
            detail = "\n".join(f"  {'.'.join(map(str, p['loc'][2:] or p['loc']))}: {p['msg']}" for p in detail)
            detail = f"the gateway refused the spec:\n{detail}"
        elif isinstance(detail, dict):  # a job recorded but not started
            detail = detail.get("msg", str(detail))
        code = 2 if response.status_code in (401, 403, 409, 413, 422) else 1
        raise JobError(f"gateway {response.status_code}: {detail}", code=code)

    def submit(self, spec: dict) -> str:
        return self._call("POST", "/v1/jobs", ok=(201,), json={"spec": spec}).json()["job_id"]

    def retry(self, job_id: str) -> str:
        return self._call("POST", f"/v1/jobs/{job_id}/retry", ok=(201,)).json()["job_id"]

    def record(self, job_id: str) -> JobRecord:
        return _record(self._call("GET", f"/v1/jobs/{job_id}").json())

    def jobs(self) -> list[JobRecord]:
        return [_record(view) for view in self._call("GET", "/v1/jobs").json()]

    def read_log(self, job_id: str, offset: int = 0) -> tuple[str, int]:
        response = self._call("GET", f"/v1/jobs/{job_id}/logs", params={"offset": offset})
        return response.text, int(response.headers["X-Next-Offset"])

    def tail(self, job_id: str) -> Iterator[str]:
        """The log as it grows until the job ends, across the gateway's stream lifetimes (each stream's last
        line says where the next one starts)."""
        offset = 0
        while True:
            tail, quiet = "", False
            with self._call("GET", f"/v1/jobs/{job_id}/logs", params={"offset": offset, "follow": "true"},
                            stream=True) as response:
                try:
                    for chunk in response.iter_content(chunk_size=None, decode_unicode=True):
                        text = tail + chunk
                        tail = text[-200:]  # held back until the next chunk: it may be the resume line
                        if text[:-200]:
                            offset += len(text[:-200])
                            yield text[:-200]
                except requests.ConnectionError:  # no byte for timeout_s (a quiet log), or a dropped connection
                    quiet = True
            resume = _RESUME.search(tail)
            if resume is not None:
                tail, offset = tail[: resume.start()], int(resume.group(1)) - len(tail[: resume.start()])
            if tail:
                offset += len(tail)
                yield tail
            if resume is None and not quiet:
                return

    def follow(self, job_id: str, sink: TextIO) -> JobRecord:
        for chunk in self.tail(job_id):
            sink.write(chunk)
            sink.flush()
        return self.record(job_id)

    def cancel(self, job_id: str) -> JobRecord:
        return _record(self._call("POST", f"/v1/jobs/{job_id}/cancel").json())

    def files(self, job_id: str) -> PresignedFiles:
        """The finished job's files, read through their presigned URLs (verified by the caller's fetch)."""
        listing = self._call("GET", f"/v1/jobs/{job_id}/artifacts").json()
        return PresignedFiles(job_id, listing, self.timeout_s)


class PresignedFiles:
    """What `fetch_artifacts` reads of a store, over the gateway's presigned URLs: the manifest, and each file."""

    def __init__(self, job_id: str, listing: dict, timeout_s: float):
        self.job_id, self.timeout_s = job_id, timeout_s
        files = [FileEntry(**{k: f[k] for k in ("path", "size", "sha256", "kind")}) for f in listing["files"]]
        self.manifest = Manifest(job_id=job_id, files=files, artifacts=listing["artifacts"])
        self.urls = {job_key(job_id, f["path"]): f["url"] for f in listing["files"]}
        self.uri = f"the gateway's presigned URLs for {job_id}"

    def url_of(self, key: str) -> str:
        return self.urls.get(key, f"{self.uri}: {key}")

    def get_bytes(self, key: str) -> bytes:
        if key != job_key(self.job_id, MANIFEST):
            raise KeyError(key)
        return self.manifest.to_json().encode()

    def download(self, key: str, dest: Path) -> None:
        url = self.urls[key]
        if url.startswith("file://"):  # a gateway whose store is a folder this machine shares
            shutil.copyfile(url.removeprefix("file://"), dest)
            return
        try:
            with requests.get(url, stream=True, timeout=self.timeout_s) as response:
                response.raise_for_status()
                with open(dest, "wb") as out:
                    for block in response.iter_content(chunk_size=1 << 20):
                        out.write(block)
        except requests.RequestException as err:
            raise JobError(f"download of {key.rsplit('/', 1)[-1]} failed: {err}") from None
