"""Inputs in S3-compatible object storage: `s3://bucket/prefix` wherever a spec names a model, tokenizer, data
source or covariance folder.

The endpoint and credentials come from the standard AWS chain (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, profiles,
instance roles), never from the spec, so the same spec reads MinIO on-prem and S3 on AWS. Validation here only
lists and reads small objects (config.json): what a process needs is fetched on its own node, through the node
cache (workers/storage/inputs.py).

A location is a local `Path` or an `S3Uri`; `top_files` and `read_small` answer the few questions validation and
planning ask of either (which files a folder holds, what a small file says).
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_LOCK = threading.Lock()


class S3Uri(str):
    """`s3://bucket/key-or-prefix`, without a trailing slash."""

    __slots__ = ()

    @classmethod
    def parse(cls, text: str) -> S3Uri:
        rest = text.removeprefix("s3://")
        bucket, _, key = rest.partition("/")
        if not _BUCKET.match(bucket):
            raise ValueError(f"{text!r}: {bucket!r} is not a valid S3 bucket name (3-63 chars: a-z 0-9 . -)")
        key = key.strip("/")
        if key and any(part in ("", ".", "..") for part in key.split("/")):
            raise ValueError(f"{text!r}: the key must be a clean path (no empty, '.' or '..' parts)")
        return cls(f"s3://{bucket}/{key}" if key else f"s3://{bucket}")

    @property
    def bucket(self) -> str:
        return self.removeprefix("s3://").partition("/")[0]

    @property
    def key(self) -> str:
        return self.removeprefix("s3://").partition("/")[2]

    @property
    def name(self) -> str:
        return self.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return Path(self.key).suffix

    def child(self, name: str) -> S3Uri:
        return S3Uri(f"{self}/{name}")

    def __truediv__(self, name: str) -> S3Uri:
        return self.child(name)

    def is_relative_to(self, prefix: str) -> bool:
        prefix = str(prefix).rstrip("/")
        return self == prefix or self.startswith(prefix + "/")


Location = Path | S3Uri


def is_remote(value: object) -> bool:
    return isinstance(value, str) and value.startswith("s3://")


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    etag: str  # without quotes; a single-part upload's is the MD5 of its bytes


def configured_endpoint() -> str | None:
    """The endpoint the AWS chain's environment names (MinIO, Ceph, a proxy), if any: such servers take
    path-style requests (bucket in the path), where AWS's virtual-host style would need DNS per bucket."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def client():
    """This process's boto3 client for inputs, configured by the AWS chain alone."""
    return _client(configured_endpoint())


@cache
def _client(endpoint: str | None):
    import boto3
    from botocore.config import Config

    with _LOCK:  # building clients is not thread-safe; using one is
        return boto3.client("s3", config=Config(retries={"max_attempts": 5, "mode": "standard"},
                                                connect_timeout=10, read_timeout=60,
                                                s3={"addressing_style": "path"} if endpoint else None))


def listing(uri: S3Uri) -> dict[str, ObjectInfo]:
    """The objects under `uri`, by path relative to it: {"": info} when `uri` is itself an object (a data file),
    else every key below the prefix. Raises ValueError with the bucket's answer when it cannot be listed."""
    from botocore.exceptions import BotoCoreError, ClientError

    prefix = uri.key
    found: dict[str, ObjectInfo] = {}
    try:
        pages = client().get_paginator("list_objects_v2").paginate(Bucket=uri.bucket, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                key, info = obj["Key"], ObjectInfo(obj["Size"], obj["ETag"].strip('"'))
                if key == prefix:
                    found[""] = info
                elif not prefix or key.startswith(prefix + "/"):
                    found[key.removeprefix(prefix + "/") if prefix else key] = info
    except (ClientError, BotoCoreError) as err:
        raise ValueError(f"cannot list {uri}: {err}") from None
    return {"": found[""]} if "" in found else found


def read_bytes(uri: S3Uri) -> bytes:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return client().get_object(Bucket=uri.bucket, Key=uri.key)["Body"].read()
    except (ClientError, BotoCoreError) as err:
        raise ValueError(f"cannot read {uri}: {err}") from None


def top_files(location: Location) -> dict[str, int]:
    """{name: size} of the files directly in a folder, local or in a bucket ({} when there is no such folder)."""
    if isinstance(location, S3Uri):
        return {name: info.size for name, info in listing(location).items() if name and "/" not in name}
    folder = Path(location)
    if not folder.is_dir():
        return {}
    return {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}


def read_small(location: Location, name: str) -> bytes:
    """A small file (config.json, an index) of a folder, local or in a bucket. Raises OSError or ValueError."""
    if isinstance(location, S3Uri):
        return read_bytes(location.child(name))
    return (Path(location) / name).read_bytes()


def read_head(location: Location, name: str, count: int) -> bytes:
    """The first `count` bytes of a file of a folder, local or in a bucket (one ranged GET)."""
    if isinstance(location, S3Uri):
        from botocore.exceptions import BotoCoreError, ClientError

        uri = location.child(name)
        try:
            return client().get_object(Bucket=uri.bucket, Key=uri.key, Range=f"bytes=0-{count - 1}")["Body"].read()
        except (ClientError, BotoCoreError) as err:
            raise ValueError(f"cannot read {uri}: {err}") from None
    with open(Path(location) / name, "rb") as f:
        return f.read(count)


def tensor_names(location: Location) -> list[str]:
    """The tensors of a model folder's safetensors weights, from its index or its file's header (no tensor read).
    Raises OSError or ValueError."""
    if "model.safetensors.index.json" in top_files(location):
        return sorted(read_json(location, "model.safetensors.index.json")["weight_map"])
    size = int.from_bytes(read_head(location, "model.safetensors", 8), "little")
    header = json.loads(read_head(location, "model.safetensors", 8 + size)[8:])
    return sorted(k for k in header if k != "__metadata__")


def read_json(location: Location, name: str) -> object:
    try:
        return json.loads(read_small(location, name))
    except json.JSONDecodeError as err:
        raise ValueError(f"{location}/{name} is not JSON: {err}") from None


# What validation asks of a location in a bucket: one listing each, errors naming the key.

def model_problem(uri: S3Uri) -> str | None:
    """Why `uri` is not a model folder peftfleet can read from a bucket (None: it is)."""
    files = top_files(uri)
    if not files:
        return f"no objects under {uri}/"
    if "config.json" not in files:
        return f"{uri} is not a Hugging Face model folder (no {uri}/config.json)"
    if "model.safetensors.index.json" in files:
        index = read_json(uri, "model.safetensors.index.json")
        wanted = set(index.get("weight_map", {}).values()) if isinstance(index, dict) else set()
        if missing := sorted(n for n in wanted if n not in files):
            return f"{uri}/model.safetensors.index.json names {missing[0]!r}, which is not an object of {uri}/"
        return None
    if "model.safetensors" not in files:
        other = sorted(n for n in files if n.endswith((".bin", ".pth", ".pt")))
        return (f"{uri} has no model.safetensors (or index): weights in a bucket are read as safetensors, by "
                "tensor and by shard" + (f"; it holds {other[0]}, convert it with save_pretrained" if other else ""))
    return None


def data_problem(location: Location, suffixes: tuple[str, ...]) -> str | None:
    """Why `location` is not a data source (a file with a known suffix, a save_to_disk folder, or a folder of data
    files of one type); None: it is."""
    if isinstance(location, S3Uri):
        found = listing(location)
        is_file = "" in found
        files = {n for n in found if n and "/" not in n}
    else:  # every entry, whatever its type: confinement (which runs next) says what is wrong with a FIFO
        is_file, files = location.is_file(), {p.name for p in location.iterdir()} if location.is_dir() else set()
    files = {n for n in files if not n.startswith(".")}  # hidden files are never read as data (workers skip them)
    if is_file:
        if location.suffix not in suffixes:
            return f"unsupported data file type {location.suffix!r} ({location}); use one of {', '.join(suffixes)}"
        return None
    if not files:
        return f"no data file {location} and no files in {location}/"
    if "state.json" in files:
        return None
    kinds = {Path(n).suffix for n in files if Path(n).suffix in suffixes}
    if len(kinds) != 1:
        return (f"{location}/ holds " + ("no data files" if not kinds else f"data files of {len(kinds)} types") +
                f": a folder source is a save_to_disk folder or data files of one type ({', '.join(suffixes)})")
    return None


def covariance_problem(uri: S3Uri) -> str | None:
    files = top_files(uri)
    if "groups.json" not in files:
        return f"{uri} is not a `covariance` artifact (no {uri}/groups.json)"
    rows = read_json(uri, "groups.json")
    names = [row.get("file") for row in rows] if isinstance(rows, list) else [None]
    if missing := [n for n in names if not isinstance(n, str) or n not in files]:
        return f"{uri}/groups.json names {missing[0]!r}, which is not an object of {uri}/"
    return None
