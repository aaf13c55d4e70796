"""The node cache: one download per node however many processes ask, verified, refetched when damaged, resumed
after a cut-off, evicted least-recently-used past its size limit."""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading

import pytest

from workers.storage.node_cache import NodeCache
from workers.storage.store import LocalStore, StoredFile, StoreError

MiB = 1 << 20


class CountingStore(LocalStore):
    def __init__(self, root):
        super().__init__(root)
        self.downloads: list[str] = []
        self.bytes = 0

    def download_rest(self, key, dest):
        self.downloads.append(key)
        before = dest.stat().st_size if dest.exists() else 0
        super().download_rest(key, dest)
        self.bytes += dest.stat().st_size - before


@pytest.fixture
def published(tmp_path):
    store = CountingStore(tmp_path / "store")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"a" * 4096)
    (src / "sub" / "b.json").write_text('{"b": 1}')
    return store, store.publish_folder("jobs/j/artifacts/thing", src)


def test_a_folder_is_fetched_once_for_many_readers(published, tmp_path):
    store, folder = published
    cache = NodeCache(tmp_path / "cache")
    paths = []
    readers = [threading.Thread(target=lambda: paths.append(cache.folder(store, folder))) for _ in range(6)]
    for r in readers:
        r.start()
    for r in readers:
        r.join()
    assert len(set(paths)) == 1 and len(store.downloads) == 2  # two files, each downloaded once
    local = paths[0]
    assert (local / "a.bin").read_bytes() == b"a" * 4096 and (local / "sub" / "b.json").read_text() == '{"b": 1}'
    NodeCache(tmp_path / "cache").folder(store, folder)  # another process on the node: nothing fetched
    assert len(store.downloads) == 2


def test_a_damaged_copy_is_fetched_again(published, tmp_path):
    store, folder = published
    cache = NodeCache(tmp_path / "cache")
    local = cache.folder(store, folder)
    (local / "a.bin").write_bytes(b"x" * 4096)  # same size, other bytes, new mtime
    assert (cache.folder(store, folder) / "a.bin").read_bytes() == b"a" * 4096
    assert store.downloads.count("jobs/j/artifacts/thing/a.bin") == 2


def test_an_object_that_does_not_match_what_was_written_fails_with_its_key(published, tmp_path):
    store, folder = published
    (tmp_path / "store" / "jobs/j/artifacts/thing/a.bin").write_bytes(b"evil")  # changed in the store
    with pytest.raises(StoreError, match=r"thing/a\.bin: fetched 4 bytes .* but 4096 bytes"):
        NodeCache(tmp_path / "cache").folder(store, folder)
    leftovers = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.name.endswith(".bin")]
    assert leftovers == []  # nothing half-verified left in place


def test_a_cut_off_download_resumes_where_it_stopped(published, tmp_path):
    store, folder = published
    cache = NodeCache(tmp_path / "cache")
    entry = next(f for f in folder.files if f.key.endswith("a.bin"))
    local = cache.path(store, entry.key)
    local.parent.mkdir(parents=True)
    local.with_name(".a.bin.part").write_bytes(b"a" * 1000)  # what a killed fetch left
    assert cache.file(store, entry).read_bytes() == b"a" * 4096
    assert store.bytes == 4096 - 1000  # only the rest was transferred
    assert not local.with_name(".a.bin.part").exists()


def test_past_its_size_limit_the_least_recently_used_big_files_go(tmp_path):
    store = CountingStore(tmp_path / "store")
    entries = {}
    for name in ("one", "two", "three"):
        data = os.urandom(2 * MiB)
        store.put_bytes(f"in/{name}.bin", data)
        entries[name] = StoredFile(f"in/{name}.bin", len(data), hashlib.sha256(data).hexdigest())
    store.put_bytes("in/config.json", b"{}")
    small = StoredFile("in/config.json", 2, hashlib.sha256(b"{}").hexdigest())
    cache = NodeCache(tmp_path / "cache", max_bytes=5 * MiB)
    cache.file(store, small)
    cache.file(store, entries["one"])
    cache.file(store, entries["two"])
    cache.file(store, entries["one"])  # used again: now "two" is the least recently used
    with open(cache.path(store, "in/two.bin").with_name(".two.bin.lock"), "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process is fetching it: it stays, "one" goes instead
        cache.file(store, entries["three"])
        assert {p.name for p in (cache.path(store, "in")).glob("*.bin")} == {"two.bin", "three.bin"}
    cache.file(store, entries["one"])  # fetched again; now "two" (least recently used, free) goes
    assert {p.name for p in (cache.path(store, "in")).glob("*.bin")} == {"one.bin", "three.bin"}
    assert cache.path(store, "in/config.json").is_file()  # small files are never evicted
    assert store.downloads.count("in/one.bin") == 2


def test_an_input_is_checked_against_its_etag(tmp_path):
    """A bucket's object has no sha256 of ours: its size, and the MD5 a single-part upload's ETag is."""
    store = CountingStore(tmp_path / "store")
    store.put_bytes("in/data.jsonl", b'{"text": "hi"}\n')
    etag = hashlib.md5(b'{"text": "hi"}\n').hexdigest()
    cache = NodeCache(tmp_path / "cache")
    assert cache.file(store, StoredFile("in/data.jsonl", 15, "", etag)).read_bytes() == b'{"text": "hi"}\n'
    store.put_bytes("in/data.jsonl", b'{"text": "ho"}\n')  # same size, other bytes
    with pytest.raises(StoreError, match=r"in/data\.jsonl: fetched 15 bytes with MD5 .*, but the server's ETag"):
        NodeCache(tmp_path / "other").file(store, StoredFile("in/data.jsonl", 15, "", etag))
    assert store.downloads.count("in/data.jsonl") == 3  # a bad copy is fetched once more before failing
