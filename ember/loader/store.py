"""Remote checkpoint stores: `file:///abs/dir` and `s3://bucket/prefix`.

A store holds converted checkpoints, one per name: NAME/manifest.json, NAME/part-*.bin,
NAME/files/*. The manifest is written last, so a checkpoint whose manifest is present is
complete. boto3 is imported only when an s3:// store is opened.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ember.errors import CheckpointError, CheckpointNotFound, InvalidName, StoreAccessDenied, StoreError
from ember.loader.convert import convert_checkpoint, is_converted, read_manifest, verify_checkpoint
from ember.loader.format import MANIFEST_FILE, CheckpointManifest, parse_manifest
from ember.loader.locks import NodeLock
from ember.loader.names import validate_name
from ember.loader.pipeline import pread_full
from ember.loader.s3lock import LOCK_DIR, S3NameLock
from ember.loader.swap import replace_dir

S3_THREADS = 8


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint in a store."""

    name: str
    nbytes: int


def open_store(uri: str | None = None) -> CheckpointStore:
    """Open `file:///abs/dir` or `s3://bucket/prefix`; default EMBER_STORE_URL, then
    file://<EMBER_DATA_DIR>/store."""
    uri = uri or default_store_url()
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise StoreError(f"file store URI must be file:///absolute/path, got {uri!r}")
        return FileStore(Path(parsed.path))
    if parsed.scheme == "s3":
        if len(parsed.netloc) < 3:
            raise StoreError(f"s3 store URI needs a bucket name: {uri!r}")
        return S3Store(parsed.netloc, parsed.path.strip("/"))
    raise StoreError(f"unsupported store URI {uri!r} (use file:///abs/path or s3://bucket/prefix)")


def default_data_dir() -> Path:
    """EMBER_DATA_DIR, else `data` (the working directory's, as `ember up` and Settings default to:
    `ember checkpoint push` then writes to the store `ember up` serves from)."""
    return Path(os.environ.get("EMBER_DATA_DIR") or "data")


def default_store_url() -> str:
    """EMBER_STORE_URL, else file://<data dir>/store."""
    return os.environ.get("EMBER_STORE_URL") or f"file://{default_data_dir().resolve()}/store"


def split_ref(ref: str) -> tuple[str | None, str]:
    """(store URI or None, checkpoint name) of a ref: a name or a URI ending in the name."""
    if "://" not in ref:
        return None, validate_name(ref)
    head, _, name = ref.rstrip("/").rpartition("/")
    if head.endswith(":/") or head.endswith(":"):  # s3://NAME (a bucket, no checkpoint)
        raise CheckpointNotFound(f"{ref!r} names a store, not a checkpoint in it")
    return head, validate_name(name)


class CheckpointStore(ABC):
    """Where converted checkpoints live off the node."""

    uri: str

    def push(self, src_dir: Path | str, name: str, progress: bool = False) -> CheckpointInfo:
        """Upload a converted checkpoint directory, or convert an HF directory on the way."""
        validate_name(name)
        src = Path(src_dir)
        if is_converted(src):
            verify_checkpoint(src)
            return self._push_converted(src, name, progress, scratch=False)
        with tempfile.TemporaryDirectory(prefix="ember-push-", dir=self._scratch_dir()) as tmp:
            out = Path(tmp) / name
            convert_checkpoint(src, out)
            return self._push_converted(out, name, progress, scratch=True)

    @abstractmethod
    def list(self) -> list[CheckpointInfo]:
        """Every complete checkpoint in the store."""

    @abstractmethod
    def remove(self, name: str) -> None:
        """Delete a checkpoint; CheckpointNotFound if absent."""

    @abstractmethod
    def exists(self, name: str) -> bool:
        """Whether a complete checkpoint `name` is in the store."""

    @abstractmethod
    def read_bytes(self, name: str, relpath: str) -> bytes:
        """A whole (small) file of a checkpoint: manifest or model file."""

    @abstractmethod
    def object_size(self, name: str, relpath: str) -> int:
        """Size in bytes of one file of a checkpoint."""

    @abstractmethod
    def read_range(self, name: str, relpath: str, offset: int, dest: memoryview) -> None:
        """Fill `dest` with bytes offset..offset+len(dest) of a file."""

    def manifest(self, name: str) -> CheckpointManifest:
        """The parsed manifest of `name`."""
        return parse_manifest(self.read_bytes(validate_name(name), MANIFEST_FILE))

    def local_dir(self, name: str) -> Path | None:
        """A local directory holding the checkpoint, if the store is local."""
        return None

    @abstractmethod
    def _push_converted(self, src: Path, name: str, progress: bool, *, scratch: bool) -> CheckpointInfo:
        """Upload converted `src` as `name`; `scratch`: src is this push's own conversion (it may be
        moved or consumed); otherwise it is the user's and is only read."""

    def _scratch_dir(self) -> str | None:
        return None


class FileStore(CheckpointStore):
    """A directory on a (possibly shared) file system."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = f"file://{root}"

    def list(self) -> list[CheckpointInfo]:
        if not self.root.is_dir():
            return []
        out = []
        for d in sorted(self.root.iterdir()):
            if d.is_dir() and not d.name.startswith(".") and (d / MANIFEST_FILE).is_file():
                try:
                    out.append(CheckpointInfo(d.name, read_manifest(d).tensor_nbytes))
                except CheckpointError:
                    continue
        return out

    def remove(self, name: str) -> None:
        d = self.root / validate_name(name)
        if not self.root.is_dir():
            raise CheckpointNotFound(f"no checkpoint {name!r} in {self.uri}")
        trash = self.root / f".trash-{uuid.uuid4().hex[:8]}"
        with self._push_lock():  # a push installing the name meanwhile would find it gone under it
            if not d.is_dir():
                raise CheckpointNotFound(f"no checkpoint {name!r} in {self.uri}")
            os.replace(d, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def exists(self, name: str) -> bool:
        return (self.root / validate_name(name) / MANIFEST_FILE).is_file()

    def local_dir(self, name: str) -> Path | None:
        return self.root / name if self.exists(name) else None

    def read_bytes(self, name: str, relpath: str) -> bytes:
        try:
            return (self.root / validate_name(name) / relpath).read_bytes()
        except FileNotFoundError as e:
            raise CheckpointNotFound(f"{self.uri}/{name}/{relpath} does not exist") from e
        except PermissionError as e:
            raise StoreAccessDenied(f"cannot read {self.uri}/{name}/{relpath}: {e}") from e

    def object_size(self, name: str, relpath: str) -> int:
        try:
            return (self.root / name / relpath).stat().st_size
        except FileNotFoundError as e:
            raise CheckpointNotFound(f"{self.uri}/{name}/{relpath} does not exist") from e

    def read_range(self, name: str, relpath: str, offset: int, dest: memoryview) -> None:
        try:
            fd = os.open(self.root / name / relpath, os.O_RDONLY)
        except FileNotFoundError as e:
            raise CheckpointNotFound(f"{self.uri}/{name}/{relpath} does not exist") from e
        try:
            pread_full(fd, dest, offset, f"{self.uri}/{name}/{relpath}")
        finally:
            os.close(fd)

    def _scratch_dir(self) -> str | None:
        self.root.mkdir(parents=True, exist_ok=True)
        return str(self.root)

    def _push_converted(self, src: Path, name: str, progress: bool, *, scratch: bool) -> CheckpointInfo:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        try:
            if scratch:  # converted in our scratch space (inside the root): just move it
                os.replace(src, tmp)
            else:
                _copy_tree(src, tmp, progress)
            nbytes = read_manifest(tmp).tensor_nbytes  # once installed, a remove may take it at once
            with self._push_lock():
                replace_dir(tmp, self.root / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return CheckpointInfo(name, nbytes)

    @contextlib.contextmanager
    def _push_lock(self) -> Iterator[None]:
        """One change of a name (a push installing it, a remove) at a time, in any process."""
        lock = NodeLock(self.root / ".push.lock")
        try:
            with lock.held():
                yield
        finally:
            lock.close()


class S3Store(CheckpointStore):
    """An S3 (or S3-protocol) bucket and prefix. Endpoint from EMBER_S3_ENDPOINT_URL (or the
    usual AWS settings), region and credentials from the usual AWS settings."""

    def __init__(self, bucket: str, prefix: str) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._client = None
        self.lease_stale_s, self.lease_renew_s = 60.0, 10.0  # a push's or remove's lease on its name

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            # A session per store: credentials are read from the environment when the store opens.
            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=os.environ.get("EMBER_S3_ENDPOINT_URL") or None,
                config=Config(max_pool_connections=32, retries={"max_attempts": 3, "mode": "standard"}),
            )
        return self._client

    def key(self, name: str, relpath: str = "") -> str:
        parts = [p for p in (self.prefix, name, relpath) if p]
        return "/".join(parts)

    def list(self) -> list[CheckpointInfo]:
        out = []
        prefix = self.key("") + "/" if self.prefix else ""
        with self._errors("list"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, Delimiter="/"
            )
            names = [cp["Prefix"][len(prefix) :].rstrip("/") for page in pages for cp in page.get("CommonPrefixes", [])]
        for name in sorted(names):
            try:
                out.append(CheckpointInfo(name, self.manifest(name).tensor_nbytes))
            except (CheckpointError, CheckpointNotFound, InvalidName, ValueError):
                continue  # an incomplete upload or a foreign prefix (not a checkpoint name: _logs, .cache)
        return out

    def remove(self, name: str) -> None:
        validate_name(name)
        with self._errors(f"remove {name}"), self._lease(name, "remove"):
            if not self.exists(name):
                raise CheckpointNotFound(f"no checkpoint {name!r} in {self.uri}")
            # The manifest first, so a half-deleted checkpoint is never seen as complete.
            self.client.delete_object(Bucket=self.bucket, Key=self.key(name, MANIFEST_FILE))
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.key(name) + "/"
            )
            keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
            for i in range(0, len(keys), 1000):
                self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]}
                )

    def exists(self, name: str) -> bool:
        try:
            self.object_size(validate_name(name), MANIFEST_FILE)
        except CheckpointNotFound:
            return False
        return True

    def read_bytes(self, name: str, relpath: str) -> bytes:
        with self._errors(f"{name}/{relpath}"):
            return self.client.get_object(Bucket=self.bucket, Key=self.key(name, relpath))["Body"].read()

    def object_size(self, name: str, relpath: str) -> int:
        with self._errors(f"{name}/{relpath}"):
            return self.client.head_object(Bucket=self.bucket, Key=self.key(name, relpath))["ContentLength"]

    def read_range(self, name: str, relpath: str, offset: int, dest: memoryview) -> None:
        if not len(dest):
            return
        with self._errors(f"{name}/{relpath}"):
            body = self.client.get_object(
                Bucket=self.bucket, Key=self.key(name, relpath), Range=f"bytes={offset}-{offset + len(dest) - 1}"
            )["Body"]
            got = 0
            while got < len(dest):
                buf = body.read(min(4 << 20, len(dest) - got))
                if not buf:
                    raise CheckpointError(f"{self.uri}/{name}/{relpath} ended early at byte {offset + got}")
                dest[got : got + len(buf)] = buf
                got += len(buf)

    def _push_converted(self, src: Path, name: str, progress: bool, *, scratch: bool) -> CheckpointInfo:
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=16 << 20, max_concurrency=S3_THREADS)
        files = [p for p in sorted(src.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE]
        total = sum(p.stat().st_size for p in files)
        with _Progress(f"push {name}", total, progress) as bar, self._errors(f"push {name}"), \
                self._lease(name, "push") as lease:
            if self.exists(name):
                self.client.delete_object(Bucket=self.bucket, Key=self.key(name, MANIFEST_FILE))
            for p in files:
                rel = p.relative_to(src).as_posix()
                self.client.upload_file(str(p), self.bucket, self.key(name, rel), Config=config, Callback=bar.advance)
            lease.check()  # a push that lost the name to another never publishes over its files
            self.client.upload_file(str(src / MANIFEST_FILE), self.bucket, self.key(name, MANIFEST_FILE))
        return CheckpointInfo(name, read_manifest(src).tensor_nbytes)

    def _errors(self, what: str):
        return _S3Errors(self, what)

    def _lease(self, name: str, what: str) -> S3NameLock:
        """The name's lease (ember.loader.s3lock): one push or remove of a name at a time."""
        key = "/".join(p for p in (self.prefix, LOCK_DIR, name) if p)
        return S3NameLock(self.client, self.bucket, key, what=f"{what} of {self.uri}/{name}",
                          stale_s=self.lease_stale_s, renew_s=self.lease_renew_s)


class _S3Errors:
    """Maps botocore errors to Ember errors."""

    def __init__(self, store: S3Store, what: str) -> None:
        self.store, self.what = store, what

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if exc is None or not isinstance(exc, Exception):
            return False
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        where = f"{self.store.uri} ({self.what})"
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound") or (status == 404 and code != "NoSuchBucket"):
                raise CheckpointNotFound(f"not found in {where}") from exc
            if code == "NoSuchBucket":
                raise StoreError(f"bucket {self.store.bucket!r} does not exist: {where}") from exc
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden") or status == 403:
                raise StoreAccessDenied(f"access denied by {where}: {code}") from exc
            raise StoreError(f"{where} failed: {code or exc}") from exc
        if isinstance(exc, NoCredentialsError):
            raise StoreAccessDenied(f"no AWS credentials for {where}") from exc
        if isinstance(exc, BotoCoreError):
            raise StoreError(f"{where} failed: {exc}") from exc
        return False


class _Progress:
    """A rich progress bar when asked for, a no-op otherwise (thread-safe advance)."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self._progress = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

            self._progress = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn())
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=self.total)
        return self

    def advance(self, n: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=n)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()
        return False


def _copy_tree(src: Path, dst: Path, progress: bool) -> None:
    files = [p for p in sorted(src.rglob("*")) if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    with _Progress(f"copy {src.name}", total, progress) as bar:
        for p in files:
            rel = p.relative_to(src)
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            if rel.as_posix() == MANIFEST_FILE:
                continue
            shutil.copyfile(p, dst / rel)
            bar.advance(p.stat().st_size)
        shutil.copyfile(src / MANIFEST_FILE, dst / MANIFEST_FILE)
