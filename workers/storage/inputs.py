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
are. Every file goes through workers/storage/node_cache.py: once per node (a lock file), verified by size and ETag
(MD5 for a single-part upload) or, for an earlier job's artifact, by the sha256 its manifest records; resumed after a
cut-off; evicted by the cache's size limit. Only a folder's top-level files are mirrored, never names starting with a
dot, and never weights in formats we do not read (.bin, .pth, ...): a 16 GB `original/` checkpoint beside a model is not
downloaded.

The localized spec is for the process that made it: other processes get the spec with its `s3://` URIs and
localize on their own node.

A listing is trusted only where this node's processes wrote it: each is signed (HMAC) with a key only this user
on this node can read (`node_key`), over its content and its own path, and every name in it must be a file of
its folder. A `.peftfleet-listing.json` found anywhere else — one a user put in a folder they name, or one copied
from a mirror — is no listing at all: the folder is an ordinary one, confined to the spec's data root. The URI a
listing names must be under the job's `input_prefixes` (the gateway's per-user limit) like every input.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import tempfile
from functools import cache
from pathlib import Path

from jobspecs.confinement import Outside, entry
from jobspecs.remote import S3Uri, is_remote, listing
from jobspecs.schema import DATA_SUFFIXES, JobSpec, StorageSpec
from workers.storage.node_cache import NodeCache, locked, node_cache
from workers.storage.store import NotInStore, S3Store, StoredFile

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
    cache_.check_prefix(uri)
    store = input_store(uri.bucket, cache_)
    try:
        found = listing(uri)
    except ValueError as err:
        raise NotInStore(str(err)) from None
    if not found:
        raise NotInStore(f"{uri}: no such object or prefix")
    digests = _manifest_digests(uri, store, cache_)
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
    body = {"uri": str(uri), "cache": cache_.settings(), "files": files}
    _replace(path, json.dumps({**body, "mac": _mac(path, body)}).encode())


def _read_listing(path: Path) -> dict | None:
    """The listing at `path` if this node's processes wrote it there (signed with the node's key, for this very
    path, and naming only plain files of its folder); None for anything else, which is then no listing at all."""
    try:
        raw = json.loads(path.read_text())
        mac = raw.pop("mac")
        files = raw["files"]
        if not (isinstance(mac, str) and hmac.compare_digest(mac, _mac(path, raw))):
            return None
        for name in files:
            if "/" in name or name.startswith("."):
                return None
            entry(path.parent, name, str(path))
        S3Uri.parse(raw["uri"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, Outside):
        return None
    return raw


def _mac(path: Path, body: dict) -> str:
    signed = json.dumps({"at": str(Path(path).resolve()), **body}, sort_keys=True).encode()
    return hmac.new(node_key(), signed, hashlib.sha256).hexdigest()


@cache
def node_key() -> bytes:
    """This node's secret for signing listings: 32 random bytes in the node's temp folder (the pod's own, on a
    cluster), readable by this user alone, made by the first process that needs it."""
    path = Path(tempfile.gettempdir()) / f"peftfleet-node-{os.geteuid()}.key"
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        try:
            os.link(tmp, path)  # whole or not at all; the first process's key wins
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise PermissionError(f"{path}: the node key must be a file of this user's that no one else can read")
        key = f.read()
    if len(key) != 32:
        raise PermissionError(f"{path}: not a node key (32 bytes)")
    return key


def _replace(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: readers on the node (other processes, other threads) see either."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _manifest_digests(uri: S3Uri, store: S3Store, cache_: NodeCache) -> dict[str, str]:
    """For an earlier job's artifact in a bucket (`.../jobs/<id>/artifacts/<kind>[/file]`): the sha256 of each file
    its manifest records, by name relative to `uri` ({} for anything else, or a job without a manifest)."""
    match = _ARTIFACT.match(uri.key)
    if not match:
        return {}
    manifest = f"{match['root']}jobs/{match['job']}/manifest.json"
    if not cache_.may_read(S3Uri(f"s3://{uri.bucket}/{manifest}")):
        return {}  # outside what the job may read: its objects are checked by ETag and size instead
    try:
        raw = store.get_bytes(manifest)
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
    return folder.resolve() if _read_listing(folder / LISTING) is not None else data_root


def _listed(path: Path) -> tuple[NodeCache, S3Store, StoredFile] | None:
    """The cache and bucket object behind a mirror's lazily fetched file, if `path` is one."""
    for listing_file in (path.parent / LISTING, path.parent / f".{path.name}{_SIDECAR}"):
        mirror = _read_listing(listing_file)
        if mirror is not None and path.name in mirror["files"]:
            break
    else:
        return None
    uri = S3Uri.parse(mirror["uri"]).child(path.name)
    size, etag, sha256 = mirror["files"][path.name]
    cache_ = NodeCache(*mirror["cache"])
    cache_.check_prefix(uri)
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
    names = set((_read_listing(folder / LISTING) or {"files": {}})["files"])
    names |= {p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}
    return sorted(names)


def fetch_all(folder: Path) -> Path:
    """Every lazily fetched file of a mirror folder, before a library that opens files by itself reads it
    (transformers' from_pretrained, datasets' load_from_disk); a no-op for any other folder."""
    folder = Path(folder)
    for name in (_read_listing(folder / LISTING) or {"files": {}})["files"]:
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
