"""The node cache: one download per node however many processes ask, verified, refetched when damaged."""

from __future__ import annotations

import threading

import pytest

from workers.node_cache import NodeCache
from workers.store import LocalStore, StoreError


class CountingStore(LocalStore):
    def __init__(self, root):
        super().__init__(root)
        self.downloads: list[str] = []

    def download(self, key, dest):
        self.downloads.append(key)
        super().download(key, dest)


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
