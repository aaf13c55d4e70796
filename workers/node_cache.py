"""The node-local cache: what a node's processes read from the store, fetched once per node and verified.

Stages hand each other model-sized outputs (residual_base, corda_init, the trained adapter) through the job's store,
never as a path on the driver's disk: on a cluster of pods no process sees another's /tmp. A consumer asks the
cache for the files; the first process on a node downloads each one (under a lock file, so two processes never
fetch the same object), checks its size and sha256 against what the producer recorded, and moves it into place;
the others wait for the lock and find it there. A verified file is stamped with its size and mtime, so a later
reader trusts it without re-hashing gigabytes, while a file replaced or truncated since is fetched again.

    <cache_dir>/<store id>/<store key>            the file, under its own key
    <cache_dir>/<store id>/.../.<name>.verified   {"sha256", "size", "mtime_ns"} once it checked out
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path

from jobspecs.schema import JobSpec
from workers.store import Store, StoredFile, StoredFolder, StoreError, open_store, safe_relpath, sha256_file

DEFAULT_DIR = "peftfleet-cache"  # under the system temp folder when the spec names none


class NodeCache:
    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root else Path(tempfile.gettempdir()) / DEFAULT_DIR

    def path(self, store: Store, key: str) -> Path:
        store_id = hashlib.sha256(store.uri.encode()).hexdigest()[:16]
        return self.root / store_id / safe_relpath(key)

    def file(self, store: Store, entry: StoredFile) -> Path:
        """The local copy of `entry`, downloaded and verified if this node has no good copy yet."""
        local = self.path(store, entry.key)
        local.parent.mkdir(parents=True, exist_ok=True)
        stamp = local.with_name(f".{local.name}.verified")
        with open(local.with_name(f".{local.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
            if not _verified(local, stamp, entry):
                self._fetch(store, entry, local, stamp)
        return local

    def folder(self, store: Store, folder: StoredFolder) -> Path:
        """The local copy of a folder of the store, with every one of its files in it."""
        for entry in folder.files:
            if not entry.key.startswith(folder.prefix + "/"):
                raise ValueError(f"{entry.key} is not inside {folder.prefix}")
            self.file(store, entry)
        return self.path(store, folder.prefix)


    @staticmethod
    def _fetch(store: Store, entry: StoredFile, local: Path, stamp: Path) -> None:
        stamp.unlink(missing_ok=True)
        tmp = local.with_name(f".{local.name}.{os.getpid()}.part")
        try:
            for attempt in (1, 2):  # a bad copy is fetched once more before the stage fails with the key
                store.download(entry.key, tmp)
                size, digest = tmp.stat().st_size, sha256_file(tmp)
                if (size, digest) == (entry.size, entry.sha256):
                    break
                if attempt == 2:
                    raise StoreError(f"{store.url_of(entry.key)}: fetched {size} bytes with sha256 {digest[:16]}…, "
                                     f"but {entry.size} bytes with sha256 {entry.sha256[:16]}… were written")
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)
        st = local.stat()
        stamp.write_text(json.dumps({"sha256": entry.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))


def _verified(local: Path, stamp: Path, entry: StoredFile) -> bool:
    try:
        seen = json.loads(stamp.read_text())
        st = local.stat()
    except (OSError, ValueError):
        return False
    return seen == {"sha256": entry.sha256, "size": entry.size, "mtime_ns": st.st_mtime_ns} and st.st_size == entry.size


def local_folder(spec: JobSpec, folder: StoredFolder) -> Path:
    """`folder` of the job's store on this node's disk, through this node's cache (the spec names both)."""
    return NodeCache(spec.cluster.node_cache_dir).folder(open_store(spec.storage), folder)
