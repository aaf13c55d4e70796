"""A job's artifacts in the store: upload with checksums, the manifest written last, verified fetch.

Layout under the store root:

    jobs/<id>/job.json          the job record (state, stages, error)
    jobs/<id>/spec.yaml         the frozen spec, written before any compute
    jobs/<id>/artifacts/<kind>/...
    jobs/<id>/manifest.json     written LAST: its presence means every listed file is complete
    jobs/<id>/verbose.log       the driver's verbose log (library output), uploaded when the driver ends
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from workers.storage.store import NotInStore, Store, StoredFolder, safe_relpath, sha256_file

MANIFEST = "manifest.json"
VERBOSE_LOG = "verbose.log"  # the driver's library output, uploaded when it ends (not an artifact)
TRIALS_BOARD = "trials.json"  # a sweep's trials as they stand (state, step, metric), rewritten as they move
CANCEL_REASON = "cancel-reason.txt"  # why whoever cancelled the job did, for the record the driver writes


def job_key(job_id: str, rel: str = "") -> str:
    """Store key of `rel` inside the job's prefix; refuses anything that would leave it."""
    prefix = f"jobs/{safe_relpath(job_id)}"
    return f"{prefix}/{safe_relpath(rel)}" if rel else prefix


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to jobs/<id>/
    size: int
    sha256: str
    kind: str


@dataclass
class Manifest:
    job_id: str
    files: list[FileEntry]
    artifacts: dict[str, str]  # kind -> folder relative to jobs/<id>/
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, source: str) -> Manifest:
        try:
            raw = json.loads(text)
            files = [FileEntry(**f) for f in raw["files"]]
            for f in files:
                safe_relpath(f.path)
            return cls(job_id=raw["job_id"], files=files, artifacts=dict(raw["artifacts"]),
                       created_at=raw["created_at"])
        except (ValueError, KeyError, TypeError) as err:
            raise IntegrityError(f"{source}: malformed manifest: {err}") from None


class IntegrityError(Exception):
    """A fetched file does not match its manifest entry, or the manifest itself is unusable."""


class IncompleteJob(Exception):
    """The job has no manifest: its artifacts were never completely uploaded."""


class NoSuchKind(LookupError):
    """The manifest lists no artifact of the kind asked for."""


UPLOAD_THREADS = 4  # files in flight at once: hashing one overlaps sending others (large files also go in parts)


def upload_artifacts(
    store: Store, job_id: str, staging: Path, on_file: Callable[[FileEntry, int, int], None] | None = None,
    published: Iterable[StoredFolder] = (),
) -> Manifest:
    """Upload every file under `staging/<kind>/...` to `jobs/<id>/artifacts/<kind>/...`, then write the manifest,
    which also lists the `published` folders: artifacts that workers already wrote there, with their checksums.

    Any failure raises before the manifest exists, so a manifest is never written for an incomplete upload.
    """
    artifacts = job_key(job_id, "artifacts") + "/"
    earlier = []
    for folder in published:
        for entry in folder.files:
            if not entry.key.startswith(artifacts):
                raise ValueError(f"{entry.key} is not an artifact of job {job_id}")
            rel = entry.key.removeprefix(artifacts)
            earlier.append(FileEntry(path=f"artifacts/{rel}", size=entry.size, sha256=entry.sha256,
                                     kind=rel.split("/", 1)[0]))
    local_files = sorted(p for p in staging.rglob("*") if p.is_file())

    def upload(local: Path) -> FileEntry:
        rel = local.relative_to(staging).as_posix()
        path = f"artifacts/{safe_relpath(rel)}"
        entry = FileEntry(path=path, size=local.stat().st_size, sha256=sha256_file(local), kind=rel.split("/", 1)[0])
        store.put_file(job_key(job_id, path), local)
        return entry

    files: list[FileEntry] = []
    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        pending = [pool.submit(upload, local) for local in local_files]
        try:
            for i, done in enumerate(as_completed(pending), 1):
                files.append(done.result())
                if on_file:
                    on_file(files[-1], i, len(local_files))
        except BaseException:
            pool.shutdown(cancel_futures=True)  # what has not started never will; what runs finishes, unlisted
            raise
    files = sorted(files + earlier, key=lambda f: f.path)
    manifest = Manifest(job_id=job_id, files=files, artifacts={f.kind: f"artifacts/{f.kind}" for f in files})
    store.put_bytes(job_key(job_id, MANIFEST), manifest.to_json().encode())
    return manifest


def read_manifest(store: Store, job_id: str) -> Manifest:
    key = job_key(job_id, MANIFEST)
    try:
        text = store.get_bytes(key)
    except NotInStore:
        raise IncompleteJob(
            f"job {job_id} has no manifest at {store.url_of(key)}: its artifacts are incomplete "
            "(the job has not finished, or it failed before the upload completed)"
        ) from None
    return Manifest.from_json(text.decode(), store.url_of(key))


def fetch_artifacts(
    store: Store,
    job_id: str,
    dest: Path,
    kind: str | None = None,
    on_file: Callable[[FileEntry, int, int], None] | None = None,
) -> list[Path]:
    """Download the job's files (or one kind) into `dest/<kind>/...`, verifying size and sha256 of each.

    A kind is written whole or not at all: its files are downloaded into a hidden staging folder beside it and the
    folder is moved into place only when every one of them verified (replacing an earlier fetch of that kind).
    A kind with a bad file leaves nothing under its name; the error lists the bad files and what was written.
    """
    manifest = read_manifest(store, job_id)
    files = manifest.files
    if kind is not None:
        if kind not in manifest.artifacts:
            have = ", ".join(sorted(manifest.artifacts))
            raise NoSuchKind(f"job {job_id} has no artifact kind {kind!r}; it has: {have}")
        files = [f for f in files if f.kind == kind]
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    by_kind: dict[str, list[FileEntry]] = {}
    for entry in files:
        by_kind.setdefault(entry.kind, []).append(entry)
    written, bad, refused = [], [], []
    done = 0
    for name, entries in by_kind.items():
        final = dest / safe_relpath(name)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.fetching-", dir=dest))
        try:
            problems, placed = [], []
            for entry in entries:
                rel = safe_relpath(entry.path.removeprefix(f"artifacts/{name}/"))
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                store.download(job_key(job_id, entry.path), target)
                size, digest = target.stat().st_size, sha256_file(target)
                if size != entry.size or digest != entry.sha256:
                    problems.append(f"{entry.path}: expected {entry.size} bytes sha256 {entry.sha256[:12]}…, "
                                    f"got {size} bytes sha256 {digest[:12]}…")
                    continue
                placed.append(final / rel)
                done += 1
                if on_file:
                    on_file(entry, done, len(files))
            if problems:
                bad += problems
                refused.append(name)
                continue
            if final.exists():
                shutil.rmtree(final) if final.is_dir() else final.unlink()
            os.replace(staging, final)
            written += placed
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if bad:
        kept = ", ".join(sorted(set(by_kind) - set(refused)))
        raise IntegrityError(
            f"job {job_id}: {len(bad)} file(s) failed verification, so nothing of kind(s) {', '.join(refused)} was "
            f"written{f' (verified and written: {kept})' if kept else ''}:\n  " + "\n  ".join(bad))
    return written
