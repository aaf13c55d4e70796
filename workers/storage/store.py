"""The artifact store: one interface, a local-folder backend (`file://`) and an S3-compatible one (`s3://`).

Keys are `/`-separated paths relative to the store root (`jobs/<id>/...`). Writes are whole-object: a local write
goes to a temporary file that is renamed into place, an S3 write is a PUT or a completed multipart upload, so a
reader never sees half a file. Integrity is ours, not the server's (S3 servers accept wrong checksums and a
multipart ETag is not a content hash): every upload records sha256, every fetch verifies it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from jobspecs.remote import configured_endpoint
from jobspecs.schema import StorageSpec

T = TypeVar("T")
_CHUNK = 1 << 20


class StoreError(Exception):
    """A store operation that failed for good (after retries); the message names the key and the cause."""


class NotInStore(StoreError):
    """The key does not exist."""


def safe_relpath(name: str) -> str:
    """`name` as a clean relative path, or ValueError: no absolute paths, no `..`, no empty parts, no backslashes."""
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        raise ValueError(f"artifact path {name!r} must be a relative path with '/' separators")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise ValueError(f"artifact path {name!r} escapes its folder or is not a clean file path")
    return name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class StoredFile:
    """One object a stage wrote to the store, as a reader verifies it."""

    key: str
    size: int
    sha256: str  # "" for an input the job did not write: then the server's ETag is what there is to check
    etag: str = ""  # unquoted; a single-part upload's is the MD5 of its bytes, a multipart one's ends in "-<parts>"


@dataclass(frozen=True)
class StoredFolder:
    """A folder a stage wrote to the store (`prefix`) and every file in it: what a consumer on another node fetches."""

    prefix: str
    files: tuple[StoredFile, ...]

    def relative(self, entry: StoredFile) -> str:
        return entry.key.removeprefix(self.prefix + "/")


class Store(ABC):
    uri: str

    @abstractmethod
    def put_file(self, key: str, local: Path) -> None: ...

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The object's content; NotInStore if absent."""

    @abstractmethod
    def download(self, key: str, dest: Path) -> None: ...

    @abstractmethod
    def download_rest(self, key: str, dest: Path) -> None:
        """Append the object's bytes past `dest`'s current size to it (all of them when `dest` does not exist): a
        download cut off resumes where it stopped, on every retry too."""

    @abstractmethod
    def get_range(self, key: str, start: int, count: int) -> bytes:
        """Bytes [start, start + count) of the object (fewer at its end)."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys under `prefix` (a folder path), sorted."""

    def publish(self, key: str, local: Path) -> StoredFile:
        """Upload `local` and say what was uploaded (hashed here, since the server's checksums are not ours)."""
        entry = StoredFile(key, local.stat().st_size, sha256_file(local))
        self.put_file(key, local)
        return entry

    def publish_folder(self, prefix: str, local: Path) -> StoredFolder:
        """Every file under `local` to `prefix/<its relative path>`."""
        files = sorted(p for p in Path(local).rglob("*") if p.is_file())
        return StoredFolder(prefix, tuple(self.publish(f"{prefix}/{p.relative_to(local).as_posix()}", p)
                                          for p in files))

    def exists(self, key: str) -> bool:
        try:
            self.get_bytes(key)
        except NotInStore:
            return False
        return True

    def url_of(self, key: str) -> str:
        return f"{self.uri}/{key}"

    @abstractmethod
    def presigned_get(self, key: str, expires_s: int = 900) -> str:
        """A URL that reads the object without credentials, for `expires_s` seconds."""


class LocalStore(Store):
    def __init__(self, root: Path):
        self.root = Path(root)
        self.uri = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / safe_relpath(key)

    def _atomic_write(self, key: str, write: Callable[[Path], None]) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            write(tmp)
            os.replace(tmp, target)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot write {self.url_of(key)}: {err}") from err

    def put_file(self, key: str, local: Path) -> None:
        self._atomic_write(key, lambda tmp: shutil.copyfile(local, tmp))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda tmp: tmp.write_bytes(data))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotInStore(f"{self.url_of(key)} does not exist") from None

    def download(self, key: str, dest: Path) -> None:
        try:
            shutil.copyfile(self._path(key), dest)
        except FileNotFoundError:
            raise NotInStore(f"{self.url_of(key)} does not exist") from None

    def download_rest(self, key: str, dest: Path) -> None:
        have = dest.stat().st_size if dest.exists() else 0
        try:
            with open(self._path(key), "rb") as src, open(dest, "ab") as out:
                src.seek(have)
                shutil.copyfileobj(src, out, _CHUNK)
        except FileNotFoundError:
            raise NotInStore(f"{self.url_of(key)} does not exist") from None

    def get_range(self, key: str, start: int, count: int) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                f.seek(start)
                return f.read(count)
        except FileNotFoundError:
            raise NotInStore(f"{self.url_of(key)} does not exist") from None

    def presigned_get(self, key: str, expires_s: int = 900) -> str:
        """A folder has no signed URLs: its file:// URL, readable wherever the filesystem is shared."""
        return f"file://{self._path(key)}"

    def list(self, prefix: str) -> list[str]:
        base = self.root / safe_relpath(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file() and ".partial" not in p.name
        )


class S3Store(Store):
    """Any S3-compatible server through boto3: AWS, MinIO, Ceph. Credentials from the standard AWS chain only."""

    def __init__(self, storage: StorageSpec):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        bucket, _, prefix = storage.uri.removeprefix("s3://").partition("/")
        self.bucket, self.prefix, self.uri = bucket, prefix.strip("/"), storage.uri
        self.attempts = storage.max_attempts
        self.public_endpoint_url, self.region = storage.public_endpoint_url, storage.region
        part = storage.multipart_threshold_mb * 1024 * 1024
        self.transfer = TransferConfig(multipart_threshold=part, multipart_chunksize=part, use_threads=True)
        self.client = boto3.client(
            "s3",
            endpoint_url=storage.endpoint_url,
            region_name=storage.region,
            config=Config(
                retries={"max_attempts": storage.max_attempts, "mode": "standard"},
                connect_timeout=min(storage.timeout_s, 10),
                read_timeout=storage.timeout_s,  # a stalled server times out and the request is retried
                s3={"addressing_style": "path"} if storage.endpoint_url or configured_endpoint() else None,
            ),
        )

    def _key(self, key: str) -> str:
        key = safe_relpath(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _retry(self, what: str, op: Callable[[], T]) -> T:
        """Whole-operation retries with backoff, on top of botocore's per-request ones (a multipart upload whose
        part failed for good is aborted by boto3 and started again here)."""
        from boto3.exceptions import RetriesExceededError, S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        for attempt in range(1, self.attempts + 1):
            try:
                return op()
            except (ClientError, BotoCoreError, OSError, S3UploadFailedError, RetriesExceededError) as raised:
                # boto3's transfers wrap the request error that ended them (a 500, a 503 SlowDown, a read that kept
                # failing): judge that error, like any other request's
                err = raised.last_exception if isinstance(raised, RetriesExceededError) else raised
                if isinstance(err, S3UploadFailedError) and isinstance(err.__context__, ClientError):
                    err = err.__context__
            if isinstance(err, ClientError):
                code = err.response.get("Error", {}).get("Code", "")
                if code in ("NoSuchKey", "404", "NotFound"):
                    raise NotInStore(f"{what}: does not exist") from None
                if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket"):
                    raise StoreError(f"{what}: {code}: {err}") from err
            if attempt < self.attempts:
                time.sleep(min(0.2 * 2 ** (attempt - 1), 5.0))
        raise StoreError(f"{what}: failed after {self.attempts} attempts: {err}") from err

    def put_file(self, key: str, local: Path) -> None:
        self._retry(
            f"upload {self.url_of(key)}",
            lambda: self.client.upload_file(str(local), self.bucket, self._key(key), Config=self.transfer),
        )

    def put_bytes(self, key: str, data: bytes) -> None:
        self._retry(
            f"write {self.url_of(key)}",
            lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data),
        )

    def get_bytes(self, key: str) -> bytes:
        return self._retry(
            f"read {self.url_of(key)}",
            lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read(),
        )

    def exists(self, key: str) -> bool:
        try:
            self._retry(f"stat {self.url_of(key)}",
                        lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key)))
        except NotInStore:
            return False
        return True

    def download(self, key: str, dest: Path) -> None:
        self._retry(
            f"download {self.url_of(key)}",
            lambda: self.client.download_file(self.bucket, self._key(key), str(dest), Config=self.transfer),
        )

    def download_rest(self, key: str, dest: Path) -> None:
        """One streamed GET (ranged from where `dest` ends), not boto3's parallel parts: a part file of a parallel
        download has holes, so a cut-off one cannot be resumed."""

        def op() -> None:
            have = dest.stat().st_size if dest.exists() else 0
            ranged = {"Range": f"bytes={have}-"} if have else {}
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key), **ranged)["Body"]
            with open(dest, "ab") as out:
                for chunk in body.iter_chunks(_CHUNK):
                    out.write(chunk)

        self._retry(f"download {self.url_of(key)}", op)

    def get_range(self, key: str, start: int, count: int) -> bytes:
        return self._retry(
            f"read {self.url_of(key)}",
            lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(key),
                                           Range=f"bytes={start}-{start + count - 1}")["Body"].read(),
        )

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix) + "/" if prefix else (f"{self.prefix}/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0

        def op() -> list[str]:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
            return sorted(obj["Key"][strip:] for page in pages for obj in page.get("Contents", []))

        return self._retry(f"list {self.uri}/{prefix}", op)

    def presigned_get(self, key: str, expires_s: int = 900) -> str:
        # Signing sends nothing: a client for the public endpoint signs for the host the downloader will reach.
        client = self.client
        if self.public_endpoint_url:
            import boto3
            from botocore.config import Config

            client = boto3.client("s3", endpoint_url=self.public_endpoint_url, region_name=self.region,
                                  config=Config(s3={"addressing_style": "path"}))
        return client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires_s
        )


def train_storage(storage: StorageSpec, job_id: str):
    """(storage_path, pyarrow filesystem or None) for Ray Train's checkpoints under `jobs/<id>/`: a local folder,
    or the same S3-compatible bucket through pyarrow's native S3 client (credentials from the environment)."""
    if not storage.is_s3:
        return str(Path(storage.uri.removeprefix("file://")) / "jobs" / safe_relpath(job_id)), None
    from pyarrow import fs

    bucket, _, prefix = storage.uri.removeprefix("s3://").partition("/")
    options = {"region": storage.region or "us-east-1"}
    if storage.endpoint_url:
        scheme, _, host = storage.endpoint_url.partition("://")
        options.update(endpoint_override=host.rstrip("/"), scheme=scheme)
    path = "/".join(p for p in (bucket, prefix.strip("/"), "jobs", safe_relpath(job_id)) if p)
    return path, fs.S3FileSystem(**options)


def open_store(storage: StorageSpec) -> Store:
    if storage.is_s3:
        return S3Store(storage)
    return LocalStore(Path(storage.uri.removeprefix("file://")))
