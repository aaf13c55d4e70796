"""The node-local cache: what a node's processes read from the store, fetched once per node and verified.

Stages hand each other model-sized outputs (residual_base, corda_init, the trained adapter) through the job's store,
never as a path on the driver's disk: on a cluster of pods no process sees another's /tmp. A consumer asks the
cache for the files; the first process on a node downloads each one (under a lock file, so two processes never
fetch the same object), checks its size and sha256 against what the producer recorded, and moves it into place;
the others wait for the lock and find it there. A verified file is stamped with its size and mtime, so a later
reader trusts it without re-hashing gigabytes, while a file replaced or truncated since is fetched again.

The job's inputs in a bucket (workers/storage/inputs.py) come through the same cache: their StoredFile has the server's
ETag instead of a sha256 (a single-part upload's ETag is the MD5 of its bytes; a multipart one's is not a content
hash, and only the size is checked). A download cut off (an outage, a killed process) leaves its `.part` file,
and the next fetch resumes from where it ends. With a size limit (cluster.node_cache_max_gib), the least recently
used files are evicted after each fetch, never one a process is fetching.

    <cache_dir>/<store id>/<store key>            the file, under its own key
    <cache_dir>/<store id>/.../.<name>.part       a download in progress (or cut off: resumed)
    <cache_dir>/<store id>/.../.<name>.verified   {"sha256", "etag", "size", "mtime_ns"} once it checked out;
                                                  its mtime is the file's last use, for eviction
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from jobspecs.schema import JobSpec
from workers.storage.store import Store, StoredFile, StoredFolder, StoreError, open_store, safe_relpath, sha256_file

DEFAULT_DIR = "peftfleet-cache"  # under the system temp folder when the spec names none
_SMALL = 1 << 20  # never evicted


class NodeCache:
    """Picklable (a folder, a size limit, how hard to try a bucket, which prefixes it may read inputs from): the
    driver hands one to the processes it starts. Without a folder, the root is the system temp folder of the
    process using it (resolved there: each node has its own). `attempts` and `timeout_s` are the spec's storage
    settings, which inputs read from a bucket follow too (workers/storage/inputs.py); `prefixes` its input_prefixes
    (None: any)."""

    def __init__(self, root: Path | str | None = None, max_bytes: int | None = None, attempts: int = 5,
                 timeout_s: float = 60, prefixes: list[str] | None = None):
        self.configured = Path(root) if root else None
        self.max_bytes, self.attempts, self.timeout_s = max_bytes, attempts, timeout_s
        self.prefixes = None if prefixes is None else [str(p) for p in prefixes]

    def settings(self) -> list:
        """What rebuilds this cache elsewhere on the node: NodeCache(*settings)."""
        return [str(self.root), self.max_bytes, self.attempts, self.timeout_s, self.prefixes]

    def may_read(self, uri: str) -> bool:
        """Whether an input at `uri` (s3://bucket/key) is under the job's input_prefixes."""
        uri = str(uri)
        return self.prefixes is None or any(uri == p or uri.startswith(p.rstrip("/") + "/") for p in self.prefixes)

    def check_prefix(self, uri: str) -> None:
        if not self.may_read(uri):
            raise PermissionError(f"{uri} is not under the job's input_prefixes ({', '.join(self.prefixes) or 'none'})")

    @property
    def root(self) -> Path:
        return self.configured or Path(tempfile.gettempdir()) / DEFAULT_DIR

    def store_dir(self, store: Store) -> Path:
        return self.root / hashlib.sha256(store.uri.encode()).hexdigest()[:16]

    def path(self, store: Store, key: str) -> Path:
        return self.store_dir(store) / safe_relpath(key)

    def file(self, store: Store, entry: StoredFile) -> Path:
        """The local copy of `entry`, downloaded and verified if this node has no good copy yet."""
        local = self.path(store, entry.key)
        local.parent.mkdir(parents=True, exist_ok=True)
        stamp = local.with_name(f".{local.name}.verified")
        with locked(local, blocking=True):
            if _verified(local, stamp, entry):
                os.utime(stamp)  # used now: the last to be evicted
                return local
            self._fetch(store, entry, local, stamp)
        if self.max_bytes is not None:
            self.evict(keep=local)
        return local

    def folder(self, store: Store, folder: StoredFolder) -> Path:
        """The local copy of a folder of the store, with every one of its files in it."""
        for entry in folder.files:
            if not entry.key.startswith(folder.prefix + "/"):
                raise ValueError(f"{entry.key} is not inside {folder.prefix}")
            self.file(store, entry)
        return self.path(store, folder.prefix)

    def evict(self, keep: Path) -> None:
        """Least recently used files out until the cache fits max_bytes; `keep` (just fetched), files being
        fetched and small files (configs, tokenizers, indexes: read by path long after they were fetched) stay.
        A process still reading an evicted file keeps reading it (Linux frees it at the last close); the next
        reader fetches it again."""
        stamps = sorted(self.root.rglob(".*.verified"), key=_mtime)
        files = [(s, s.with_name(s.name[1 : -len(".verified")])) for s in stamps]
        total = sum(_size(f) for _, f in files)
        for stamp, local in files:
            if total <= self.max_bytes:
                return
            if local == keep or _size(local) < _SMALL:
                continue
            with locked(local, blocking=False) as free:
                if free:
                    total -= _size(local)
                    local.unlink(missing_ok=True)
                    stamp.unlink(missing_ok=True)

    @staticmethod
    def _fetch(store: Store, entry: StoredFile, local: Path, stamp: Path) -> None:
        stamp.unlink(missing_ok=True)
        part = local.with_name(f".{local.name}.part")  # one writer: this process holds the file's lock
        for attempt in (1, 2):  # a bad copy is fetched once more before the stage fails with the key
            if part.exists() and part.stat().st_size > entry.size:
                part.unlink()
            if not part.exists() or part.stat().st_size < entry.size:
                store.download_rest(entry.key, part)  # resumes a part an earlier fetch left (an error leaves it)
            problem = _mismatch(part, entry)
            if problem is None:
                break
            part.unlink()
            if attempt == 2:
                raise StoreError(f"{store.url_of(entry.key)}: {problem}")
        os.replace(part, local)
        st = local.stat()
        stamp.write_text(json.dumps({"sha256": entry.sha256, "etag": entry.etag, "size": st.st_size,
                                     "mtime_ns": st.st_mtime_ns}))


@contextlib.contextmanager
def locked(local: Path, blocking: bool = True) -> Iterator[bool]:
    """The file's lock for this node's processes (released when closed, also if this process dies); yields False
    if `blocking` is off and another process holds it."""
    with open(local.with_name(f".{local.name}.lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def _mismatch(path: Path, entry: StoredFile) -> str | None:
    """Why the downloaded bytes are not what was written (None: they are)."""
    size = path.stat().st_size
    if entry.sha256:
        digest = sha256_file(path)
        if (size, digest) != (entry.size, entry.sha256):
            return (f"fetched {size} bytes with sha256 {digest[:16]}…, but {entry.size} bytes with sha256 "
                    f"{entry.sha256[:16]}… were written")
        return None
    if size != entry.size:
        return f"fetched {size} bytes, but the server lists {entry.size}"
    if entry.etag and "-" not in entry.etag:
        digest = _md5_file(path)
        if digest != entry.etag:
            return f"fetched {size} bytes with MD5 {digest}, but the server's ETag is {entry.etag}"
    return None


def _md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _verified(local: Path, stamp: Path, entry: StoredFile) -> bool:
    try:
        seen = json.loads(stamp.read_text())
        st = local.stat()
    except (OSError, ValueError):
        return False
    want = {"sha256": entry.sha256, "etag": entry.etag, "size": entry.size, "mtime_ns": st.st_mtime_ns}
    return seen == want and st.st_size == entry.size


def node_cache(spec: JobSpec) -> NodeCache:
    """This node's cache as the spec configures it."""
    limit = spec.cluster.node_cache_max_gib
    return NodeCache(spec.cluster.node_cache_dir, None if limit is None else int(limit * 2**30),
                     spec.storage.max_attempts, spec.storage.timeout_s, spec.input_prefixes)


def local_folder(spec: JobSpec, folder: StoredFolder) -> Path:
    """`folder` of the job's store on this node's disk, through this node's cache (the spec names both)."""
    return node_cache(spec).folder(open_store(spec.storage), folder)
