"""The job's inputs on this node: what the spec names in a bucket (`s3://`), mirrored into the node cache.

A process that reads an input asks for its local form (`local`, or `on_node` for a whole spec): a local path is
returned as it is; an `s3://` object (a data file) is fetched into the node cache; an `s3://` folder (a model,
tokenizer, dataset folder, covariance artifact) becomes a mirror folder in the node cache:

    <cache>/<bucket id>/<prefix>/.peftfleet-listing.json   {"uri", "cache", "files": {name: [size, etag, sha256]}}
    <cache>/<bucket id>/<prefix>/config.json ...           small files: fetched at once
    <cache>/<bucket id>/<prefix>/model-0000k-of-0000n.safetensors   weights and data files: fetched when first
                                                           read (`present`); a header alone with one ranged GET
    <cache>/<bucket id>/<dir>/.<name>.peftfleet-object.json   the listing of a single object (a data file)

Weights are fetched only by a process that reads their tensors, one file at a time, so a layer-wise actor fetches
the shard files holding the blocks it walks and the driver none: it reads safetensors headers with one ranged GET
per file and node (kept beside the mirror). A streamed dataset's files are fetched by the worker whose turn they
are. Every file goes through workers/node_cache.py: once per node (a lock file), verified by size and ETag (MD5 for a
single-part upload) or, for an earlier job's artifact, by the sha256 its manifest records; resumed after a cut-off;
evicted by the cache's size limit. Only a folder's top-level files are mirrored, never names starting with a dot,
and never weights in formats we do not read (.bin, .pth, ...): a 16 GB `original/` checkpoint beside a model is not
downloaded.

The localized spec is for the process that made it: other processes get the spec with its `s3://` URIs and
localize on their own node.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from functools import cache
from pathlib import Path

from jobspecs.remote import S3Uri, is_remote, listing
from jobspecs.schema import DATA_SUFFIXES, JobSpec, StorageSpec
from workers.node_cache import NodeCache, locked, node_cache
from workers.store import NotInStore, S3Store, StoredFile

LISTING = ".peftfleet-listing.json"  # a mirrored folder's objects
_SIDECAR = ".peftfleet-object.json"  # `.<name>` + this: a single mirrored object's
# fetched when read: weights and data files (but .json, which configs and tokenizers are too)
LAZY = (".safetensors", *(s for s in DATA_SUFFIXES if s != ".json"))
SKIPPED = (".bin", ".pth", ".pt", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")  # weights we never read
_ARTIFACT = re.compile(r"^(?P<root>(?:.+/)?)jobs/(?P<job>[^/]+)/(?P<rel>artifacts/.+)$")


def input_store(bucket: str, cache_: NodeCache) -> S3Store:
    """The bucket through the artifact store's client (retries, ranged and resumable reads), configured by the
    AWS chain alone (the spec names no endpoint or credentials for inputs), as persistent as the spec's storage."""
    return _store(bucket, cache_.attempts, cache_.timeout_s)


@cache
def _store(bucket: str, attempts: int, timeout_s: float) -> S3Store:
    return S3Store(StorageSpec(uri=f"s3://{bucket}", max_attempts=attempts, timeout_s=timeout_s))


def local(location: str | Path | None, cache_: NodeCache) -> Path | None:
    """`location` on this node: a local path as it is; an s3:// folder mirrored (its small files fetched now, the
    rest when read); an s3:// object (a data file) listed beside where it will be, and fetched when read."""
    if location is None or not is_remote(location):
        return None if location is None else Path(location)
    uri = S3Uri.parse(str(location))
    store = input_store(uri.bucket, cache_)
    try:
        found = listing(uri)
    except ValueError as err:
        raise NotInStore(str(err)) from None
    if not found:
        raise NotInStore(f"{uri}: no such object or prefix")
    digests = _manifest_digests(uri, store)
    if "" in found:  # an object: its own listing, beside it
        path = cache_.path(store, uri.key)
        info = found[""]
        _write_listing(path.parent / f".{path.name}{_SIDECAR}", S3Uri(uri.rsplit("/", 1)[0]), cache_,
                       {path.name: [info.size, info.etag, digests.get("", "")]})
        return path
    mirror = cache_.path(store, uri.key) if uri.key else cache_.store_dir(store)
    files = {name: [info.size, info.etag, digests.get(name, "")] for name, info in sorted(found.items())
             if "/" not in name and not name.startswith(".") and not name.endswith(SKIPPED)}
    _write_listing(mirror / LISTING, uri, cache_, files)
    for name, (size, etag, sha256) in files.items():
        if not name.endswith(LAZY):
            cache_.file(store, StoredFile(uri.child(name).key, size, sha256, etag))
    return mirror


def _write_listing(path: Path, uri: S3Uri, cache_: NodeCache, files: dict[str, list]) -> None:
    _replace(path, json.dumps({"uri": str(uri), "cache": cache_.settings(), "files": files}).encode())


def _replace(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: readers on the node (other processes, other threads) see either."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _manifest_digests(uri: S3Uri, store: S3Store) -> dict[str, str]:
    """For an earlier job's artifact in a bucket (`.../jobs/<id>/artifacts/<kind>[/file]`): the sha256 of each file
    its manifest records, by name relative to `uri` ({} for anything else, or a job without a manifest)."""
    match = _ARTIFACT.match(uri.key)
    if not match:
        return {}
    try:
        raw = store.get_bytes(f"{match['root']}jobs/{match['job']}/manifest.json")
        files = json.loads(raw)["files"]
    except (NotInStore, ValueError, KeyError, TypeError):
        return {}
    rel, out = match["rel"], {}
    for f in files:
        path = f.get("path", "") if isinstance(f, dict) else ""
        if path == rel:
            out[""] = f.get("sha256", "")
        elif path.startswith(rel + "/"):
            out[path.removeprefix(rel + "/")] = f.get("sha256", "")
    return out


def on_node(spec: JobSpec, cache_: NodeCache | None = None) -> JobSpec:
    """The spec with each s3:// input replaced by its local form on this node (for this process only)."""
    sources = {k: s for k in ("train", "eval", "calibration") if (s := getattr(spec.data, k)) is not None}
    corda = spec.init.corda
    remote = [spec.model.path, spec.model.tokenizer, *(s.path for s in sources.values()),
              corda.covariance_from if corda else None]
    if not any(is_remote(value) for value in remote):
        return spec
    cache_ = cache_ or node_cache(spec)
    update: dict = {
        "model": spec.model.model_copy(update={"path": local(spec.model.path, cache_),
                                               "tokenizer": local(spec.model.tokenizer, cache_)}),
        "data": spec.data.model_copy(update={k: s.model_copy(update={"path": local(s.path, cache_)})
                                             for k, s in sources.items()}),
    }
    if corda is not None and corda.covariance_from is not None:
        corda = corda.model_copy(update={"covariance_from": local(corda.covariance_from, cache_)})
        update["init"] = spec.init.model_copy(update={"corda": corda})
    return spec.model_copy(update=update)


def confinement_root(data_root: Path | None, folder: Path) -> Path | None:
    """What a folder's files are confined to: a bucket's mirror in the node cache to itself (its files came from
    the bucket, which has no links; a link found there did not), any other folder to the spec's data root."""
    folder = Path(folder)
    return folder.resolve() if (folder / LISTING).is_file() else data_root


def _listed(path: Path) -> tuple[NodeCache, S3Store, StoredFile] | None:
    """The cache and bucket object behind a mirror's lazily fetched file, if `path` is one."""
    for listing_file in (path.parent / LISTING, path.parent / f".{path.name}{_SIDECAR}"):
        try:
            mirror = json.loads(listing_file.read_text())
        except (OSError, ValueError):
            continue
        if path.name in mirror["files"]:
            break
    else:
        return None
    uri = S3Uri.parse(mirror["uri"]).child(path.name)
    size, etag, sha256 = mirror["files"][path.name]
    cache_ = NodeCache(*mirror["cache"])
    return cache_, input_store(uri.bucket, cache_), StoredFile(uri.key, size, sha256, etag)


def present(path: Path) -> Path:
    """`path`, fetched first if it is a mirror's lazily fetched file (a no-op for any other path)."""
    behind = _listed(Path(path))
    if behind is None:
        return Path(path)
    cache_, store, entry = behind
    return cache_.file(store, entry)


def available(path: Path) -> bool:
    """On this node's disk, or listed in its mirror (fetched when read)."""
    return Path(path).is_file() or _listed(Path(path)) is not None


def listed_files(folder: Path) -> list[str]:
    """The files of a folder, a mirror's not yet fetched ones included, sorted by name."""
    folder = Path(folder)
    try:
        names = set(json.loads((folder / LISTING).read_text())["files"])
    except (OSError, ValueError):
        names = set()
    names |= {p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}
    return sorted(names)


def fetch_all(folder: Path) -> Path:
    """Every lazily fetched file of a mirror folder, before a library that opens files by itself reads it
    (transformers' from_pretrained, datasets' load_from_disk); a no-op for any other folder."""
    folder = Path(folder)
    try:
        names = json.loads((folder / LISTING).read_text())["files"]
    except (OSError, ValueError):
        return folder
    for name in names:
        present(folder / name)
    return folder


def read_head(path: Path, start: int, count: int) -> bytes:
    """Bytes [start, start + count) of a file: from disk, or for a mirror's not yet fetched file from one ranged
    GET per node (a safetensors header, without the tensors), kept as `.<name>.<etag>.head` beside it."""
    path = Path(path)
    if not path.exists() and (behind := _listed(path)) is not None:
        _, store, entry = behind
        head = path.with_name(f".{path.name}.{entry.etag or entry.size}.head")
        with locked(head):  # one GET for the node's readers
            try:
                cached = head.read_bytes()
            except OSError:
                cached = b""
            if start + count > len(cached) and len(cached) < entry.size:
                cached = store.get_range(entry.key, 0, start + count)
                _replace(head, cached)
        return cached[start : start + count]
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(count)
