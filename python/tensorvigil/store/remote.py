"""Runs in object storage: ``s3://bucket/prefix`` URLs and ``pyarrow.fs`` filesystems.

Object stores have no append and no rename, so the store format is mapped onto them as follows
(docs/FORMAT.md §3.7):

- **Writing.** A writer writes its rank's stream into a local *staging* directory exactly as it
  would write a local run. An :class:`Uploader` thread copies each shard to the object store
  once it is sealed (the native writer seals by size and by age, ``roll_seconds``), in
  ascending seq, plus ``manifest.json`` (first) and the small JSON files whenever they change.
  Sealed shards are immutable, so an object is written once and never rewritten; a failed
  upload is retried with back-off and the staged file stays until it is uploaded, so a
  committed step is never lost. ``stop_request.json`` is polled from the store and mirrored into
  the staging directory, so a watcher elsewhere can stop training.
- **Reading.** A :class:`Mirror` keeps a local cache directory shaped like a run. For a sealed
  shard it fetches only the footer and the INDEX frame (two ranged reads) into a sparse local
  file of the object's size; frame bytes are fetched on demand when a value is read. Every
  byte read is still verified by the native reader's checksums, so a range that was not
  fetched cannot be mistaken for data.

Credentials, region and endpoint come from the usual AWS environment variables and files
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` /
``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, profiles), so AWS S3,
MinIO and Ceph all work. ``s3://`` needs ``boto3`` (``pip install "tensorvigil[s3]"``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import socket
import struct
import tempfile
import threading
import time
import weakref
from typing import Any, Optional

from ..errors import (
    AccessDeniedError,
    InvalidArgumentError,
    NotFoundError,
    StoreIOError,
)

logger = logging.getLogger("tensorvigil")

FOOTER_SIZE = 32
FOOTER_MAGIC = b"TVFOOTER"
_SHARD_RE = re.compile(r"^shard-(\d{8})\.tvs$")
_RANK_RE = re.compile(r"^rank-(\d{5})$")
STOP_REQUEST_NAME = "stop_request.json"
#: Small files of a run that are re-uploaded whenever they change.
_SMALL_FILES = ("collections.json", "findings.jsonl", STOP_REQUEST_NAME)


# -- targets ----------------------------------------------------------------------------------


def is_remote(target: Any) -> bool:
    """Whether ``target`` names a run in object storage rather than a local directory."""
    if isinstance(target, str):
        return target.startswith("s3://")
    if isinstance(target, tuple) and len(target) == 2:
        return _is_arrow_fs(target[0])
    return _is_arrow_fs(target)


def _is_arrow_fs(obj: Any) -> bool:
    mod = type(obj).__module__
    if not mod.startswith("pyarrow"):
        return False
    import pyarrow.fs as pafs

    return isinstance(obj, pafs.FileSystem)


def describe(target: Any) -> str:
    """A printable name of a local or remote run target."""
    if isinstance(target, str):
        return target
    if isinstance(target, tuple):
        return f"{type(target[0]).__name__}:{target[1]}"
    return f"{type(target).__name__}:/"


def open_store(target: Any) -> ObjectStore:
    """The object store of a remote target (``s3://...``, a filesystem, or ``(fs, path)``)."""
    if isinstance(target, str):
        if not target.startswith("s3://"):
            raise InvalidArgumentError(f"not an object-store URL: '{target}'")
        rest = target[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise InvalidArgumentError(f"S3 URL without a bucket: '{target}'")
        return S3Store(bucket, prefix.strip("/"))
    if isinstance(target, tuple):
        fs, base = target
        if not isinstance(base, str):
            raise InvalidArgumentError(f"(filesystem, path): path must be a str, got {base!r}")
        return ArrowStore(fs, base.rstrip("/"))
    return ArrowStore(target, "")


def _local_dir(kind: str, store: ObjectStore, override: Optional[str]) -> str:
    """A stable local directory for one remote run (staging or cache)."""
    if override:
        return os.fspath(override)
    env = os.environ.get("TV_STAGING_DIR" if kind == "staging" else "TV_CACHE_DIR")
    root = env or os.path.join(tempfile.gettempdir(), f"tensorvigil-{kind}")
    digest = hashlib.sha1(store.url.encode()).hexdigest()[:16]
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", store.url.split("://")[-1])[-48:]
    return os.path.join(root, f"{tail}-{digest}")


# -- object stores ----------------------------------------------------------------------------


class ObjectStore:
    """The few object-store verbs a run needs; keys are relative to the run's prefix."""

    url: str

    def check(self) -> None:
        """Raises a typed error when the bucket/prefix cannot be used."""
        raise NotImplementedError

    def list(self) -> dict[str, int]:
        """Every object under the prefix: relative key -> size."""
        raise NotImplementedError

    def get(self, key: str, start: int = 0, length: Optional[int] = None) -> bytes:
        """Bytes ``[start, start + length)`` of an object (all of it by default)."""
        raise NotImplementedError

    def put_file(self, key: str, path: str) -> None:
        """Uploads a local file as one object."""
        raise NotImplementedError

    def put_bytes(self, key: str, data: bytes) -> None:
        """Writes one object."""
        raise NotImplementedError

    def size(self, key: str) -> Optional[int]:
        """The object's size, or None when it does not exist."""
        raise NotImplementedError


class S3Store(ObjectStore):
    """An S3-protocol bucket through ``boto3`` (AWS, MinIO, Ceph...)."""

    def __init__(self, bucket: str, prefix: str) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise StoreIOError("s3:// runs need boto3: pip install 'tensorvigil[s3]'") from e
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        config = Config(
            # Few client retries: the uploader retries itself, with back-off, keeping the file.
            retries={"max_attempts": 2, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
        )
        self._client = boto3.session.Session().client("s3", config=config)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, e: Exception, what: str) -> Exception:
        """A typed tensorvigil error for a boto3/botocore exception."""
        from botocore import exceptions as bx

        where = f"{what} ({self.url})"
        if isinstance(e, bx.NoCredentialsError):
            return AccessDeniedError(
                f"{where}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or a profile)"
            )
        if isinstance(e, bx.ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchBucket",) or (status == 404 and what == "bucket check"):
                return NotFoundError(f"{where}: bucket '{self.bucket}' does not exist")
            if code in ("NoSuchKey", "404", "NotFound"):
                return NotFoundError(f"{where}: no such object")
            if (
                code
                in (
                    "AccessDenied",
                    "InvalidAccessKeyId",
                    "SignatureDoesNotMatch",
                    "403",
                    "Forbidden",
                    "ExpiredToken",
                    "InvalidToken",
                )
                or status == 403
            ):
                return AccessDeniedError(
                    f"{where}: access denied ({code or status}); check the AWS credentials "
                    "and the bucket policy"
                )
            return StoreIOError(f"{where}: {code or status}: {err.get('Message', e)}")
        if isinstance(e, (bx.EndpointConnectionError, bx.ConnectTimeoutError)):
            return StoreIOError(f"{where}: cannot reach the endpoint: {e}")
        if isinstance(e, bx.BotoCoreError):
            return StoreIOError(f"{where}: {e}")
        return StoreIOError(f"{where}: {type(e).__name__}: {e}")

    def _call(self, what: str, fn: Any, **kw: Any) -> Any:
        try:
            return fn(**kw)
        except Exception as e:  # noqa: BLE001 - every client error becomes a typed one
            raise self._error(e, what) from e

    def check(self) -> None:
        """Raises a typed error when the store cannot be used."""
        self._call("bucket check", self._client.head_bucket, Bucket=self.bucket)
        # head_bucket passes with some permission sets that still refuse listing.
        self._call(
            "list",
            self._client.list_objects_v2,
            Bucket=self.bucket,
            Prefix=self._key(""),
            MaxKeys=1,
        )

    def list(self) -> dict[str, int]:
        """Every object under the prefix: relative key -> size."""
        out: dict[str, int] = {}
        base = self._key("")
        token = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": base}
            if token:
                kw["ContinuationToken"] = token
            page = self._call("list", self._client.list_objects_v2, **kw)
            for obj in page.get("Contents", ()):
                out[obj["Key"][len(base) :]] = int(obj["Size"])
            if not page.get("IsTruncated"):
                return out
            token = page.get("NextContinuationToken")

    def get(self, key: str, start: int = 0, length: Optional[int] = None) -> bytes:
        """Bytes ``[start, start + length)`` of an object (a ranged read)."""
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key)}
        if start or length is not None:
            end = "" if length is None else str(start + length - 1)
            kw["Range"] = f"bytes={start}-{end}"
        resp = self._call(f"get {key}", self._client.get_object, **kw)
        return resp["Body"].read()

    def put_file(self, key: str, path: str) -> None:
        """Uploads a local file as one object."""
        with open(path, "rb") as f:
            data = f.read()
        self.put_bytes(key, data)

    def put_bytes(self, key: str, data: bytes) -> None:
        """Writes one object."""
        self._call(
            f"put {key}", self._client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data
        )

    def size(self, key: str) -> Optional[int]:
        """The object's size, or None when it does not exist."""
        try:
            resp = self._call(
                f"head {key}", self._client.head_object, Bucket=self.bucket, Key=self._key(key)
            )
        except NotFoundError:
            return None
        return int(resp["ContentLength"])


class ArrowStore(ObjectStore):
    """Any ``pyarrow.fs.FileSystem`` (S3, GCS, HDFS, local...) under a base path."""

    def __init__(self, fs: Any, base: str) -> None:
        self.fs = fs
        self.base = base
        self.url = f"{fs.type_name}://{base}"

    def _path(self, key: str) -> str:
        return f"{self.base}/{key}" if self.base else key

    def _wrap(self, e: Exception, what: str) -> Exception:
        if isinstance(e, FileNotFoundError):
            return NotFoundError(f"{what} ({self.url}): not found")
        if isinstance(e, PermissionError):
            return AccessDeniedError(f"{what} ({self.url}): {e}")
        return StoreIOError(f"{what} ({self.url}): {e}")

    def check(self) -> None:
        """Raises a typed error when the store cannot be used."""
        import pyarrow.fs as pafs

        try:
            info = self.fs.get_file_info(self.base or "/")
        except Exception as e:  # noqa: BLE001
            raise self._wrap(e, "check") from e
        if self.base and info.type == pafs.FileType.File:
            raise InvalidArgumentError(f"{self.url} is a file, not a run directory")

    def list(self) -> dict[str, int]:
        """Every object under the prefix: relative key -> size."""
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self.base or "/", recursive=True, allow_not_found=True)
        try:
            infos = self.fs.get_file_info(sel)
        except Exception as e:  # noqa: BLE001
            raise self._wrap(e, "list") from e
        cut = len(self.base) + 1 if self.base else 0
        return {
            i.path[cut:].lstrip("/"): int(i.size) for i in infos if i.type == pafs.FileType.File
        }

    def get(self, key: str, start: int = 0, length: Optional[int] = None) -> bytes:
        """Bytes ``[start, start + length)`` of an object (a ranged read)."""
        try:
            with self.fs.open_input_file(self._path(key)) as f:
                if length is None:
                    length = f.size() - start
                return f.read_at(length, start)
        except Exception as e:  # noqa: BLE001
            raise self._wrap(e, f"get {key}") from e

    def put_file(self, key: str, path: str) -> None:
        """Uploads a local file as one object."""
        with open(path, "rb") as f:
            self.put_bytes(key, f.read())

    def put_bytes(self, key: str, data: bytes) -> None:
        """Writes one object."""
        path = self._path(key)
        try:
            parent = path.rsplit("/", 1)[0] if "/" in path else ""
            if parent:
                self.fs.create_dir(parent, recursive=True)
            with self.fs.open_output_stream(path) as f:
                f.write(data)
        except Exception as e:  # noqa: BLE001
            raise self._wrap(e, f"put {key}") from e

    def size(self, key: str) -> Optional[int]:
        """The object's size, or None when it does not exist."""
        import pyarrow.fs as pafs

        try:
            info = self.fs.get_file_info(self._path(key))
        except Exception as e:  # noqa: BLE001
            raise self._wrap(e, f"head {key}") from e
        return None if info.type == pafs.FileType.NotFound else int(info.size)


# -- shards -----------------------------------------------------------------------------------


def footer_of(tail: bytes) -> Optional[tuple[int, int]]:
    """``(index_offset, index_len)`` of a valid footer (last 32 bytes of a shard), else None."""
    if len(tail) != FOOTER_SIZE or tail[:8] != FOOTER_MAGIC:
        return None
    # The footer's CRC is checked by the native reader when it opens the shard.
    index_offset, index_len, _num, _crc = struct.unpack("<QQII", tail[8:])
    return index_offset, index_len


def _sealed_local(path: str) -> bool:
    try:
        size = os.path.getsize(path)
        if size < 2 * FOOTER_SIZE:
            return False
        with open(path, "rb") as f:
            f.seek(size - FOOTER_SIZE)
            return footer_of(f.read(FOOTER_SIZE)) is not None
    except OSError:
        return False


def _shards(rank_dir: str) -> list[tuple[int, str]]:
    try:
        names = os.listdir(rank_dir)
    except FileNotFoundError:
        return []
    out = [(int(m.group(1)), n) for n in names if (m := _SHARD_RE.match(n))]
    return sorted(out)


# -- writing ----------------------------------------------------------------------------------


class Uploader:
    """Copies one rank's staged stream (and the run's small files) to an object store.

    Args:
        store: Where the run lives.
        staging: The local run directory the native writer writes into.
        rank: The rank whose stream this process writes.
        interval: Seconds between scans of the staging directory.

    """

    def __init__(self, store: ObjectStore, staging: str, rank: int, interval: float = 1.0):
        self.store = store
        self.staging = staging
        self.rank = rank
        self.interval = interval
        self.rank_name = f"rank-{rank:05d}"
        self._uploaded: set[str] = set()
        self._small: dict[str, tuple[float, int]] = {}
        self._stop_seen: Optional[int] = None
        self._failures = 0
        self._last_error: Optional[BaseException] = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self.uploads = 0
        self.retries = 0
        #: Seconds :meth:`close` keeps retrying before it gives up.
        self.close_timeout = 120.0

    def prepare(self) -> None:
        """Checks the store and seeds the staging directory before the writer starts.

        Uploads the manifest, and makes the writer's first shard seq follow every shard of
        this rank already in the store (a restarted job never overwrites an uploaded shard).
        """
        self.store.check()
        from .writer import write_manifest

        write_manifest(self.staging)
        if self.store.size("manifest.json") is None:
            self.store.put_file("manifest.json", os.path.join(self.staging, "manifest.json"))
        remote = self.store.list()
        seqs = [
            int(m.group(1))
            for key in remote
            if key.startswith(self.rank_name + "/")
            and (m := _SHARD_RE.match(key[len(self.rank_name) + 1 :]))
        ]
        rank_dir = os.path.join(self.staging, self.rank_name)
        os.makedirs(rank_dir, exist_ok=True)
        local = _shards(rank_dir)
        for key in remote:
            if key.startswith(self.rank_name + "/"):
                self._uploaded.add(key)
        if seqs and (not local or local[-1][0] < max(seqs)):
            # An empty placeholder: readers skip it, the native writer starts after it.
            open(os.path.join(rank_dir, f"shard-{max(seqs):08d}.tvs"), "ab").close()

    def start(self) -> None:
        """Starts the background upload thread."""
        self._thread = threading.Thread(target=self._loop, name="tv-upload", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """Something was committed: scan soon."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._backoff())
            self._wake.clear()
            if self._stop.is_set():
                break
            self.sync_once(final=False)
            self._poll_stop_request()

    def _backoff(self) -> float:
        if not self._failures:
            return self.interval
        return min(30.0, self.interval * (2 ** min(self._failures, 6)))

    def pending(self) -> list[str]:
        """Staged files of this rank not yet in the store."""
        rank_dir = os.path.join(self.staging, self.rank_name)
        out = []
        for _seq, name in _shards(rank_dir):
            key = f"{self.rank_name}/{name}"
            path = os.path.join(rank_dir, name)
            if key not in self._uploaded and os.path.getsize(path) > 0:
                out.append(key)
        return out

    def sync_once(self, final: bool) -> bool:
        """Uploads what is ready; returns True when nothing is left to upload.

        Sealed shards are uploaded in ascending seq. With ``final`` (the writer is closed), an
        unsealed shard (a crashed predecessor's) is uploaded too: it will never grow.
        """
        with self._lock:
            try:
                done = self._sync(final)
            except Exception as e:  # noqa: BLE001 - retried; never breaks training
                self._failures += 1
                self.retries += 1
                if self._failures == 1 or type(e) is not type(self._last_error):
                    logger.warning(
                        "tensorvigil: upload to %s failed (will retry; staged data is kept "
                        "in %s): %s",
                        self.store.url,
                        self.staging,
                        e,
                    )
                self._last_error = e
                return False
            if self._failures:
                logger.warning("tensorvigil: upload to %s recovered", self.store.url)
            self._failures = 0
            self._last_error = None
            return done

    def _sync(self, final: bool) -> bool:
        rank_dir = os.path.join(self.staging, self.rank_name)
        shards = _shards(rank_dir)
        left = False
        for i, (_seq, name) in enumerate(shards):
            key = f"{self.rank_name}/{name}"
            path = os.path.join(rank_dir, name)
            if key in self._uploaded or os.path.getsize(path) == 0:
                continue
            newer = i < len(shards) - 1
            if not (_sealed_local(path) or final or newer):
                left = True
                break  # keep seq order: later shards wait for this one
            # Its tensor index first (FORMAT.md §3.8): whoever sees the shard finds it too.
            tindex = path[:-1] + "t"
            if os.path.exists(tindex):
                self.store.put_file(key[:-1] + "t", tindex)
            self.store.put_file(key, path)
            self._uploaded.add(key)
            self.uploads += 1
        for name in _SMALL_FILES:
            path = os.path.join(self.staging, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            sig = (st.st_mtime, st.st_size)
            if self._small.get(name) != sig:
                self.store.put_file(name, path)
                self._small[name] = sig
        return not left

    def _poll_stop_request(self) -> None:
        try:
            size = self.store.size(STOP_REQUEST_NAME)
            if size is None or size == self._stop_seen:
                return
            data = self.store.get(STOP_REQUEST_NAME)
        except Exception:  # noqa: BLE001 - polled again next time
            return
        self._stop_seen = size
        path = os.path.join(self.staging, STOP_REQUEST_NAME)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        st = os.stat(path)
        with self._lock:  # came from the store: not to be uploaded back
            self._small[STOP_REQUEST_NAME] = (st.st_mtime, st.st_size)

    def close(self, timeout: Optional[float] = None) -> None:
        """Uploads everything left (retrying up to ``timeout`` s) and stops the thread.

        Raises:
            StoreIOError: Something could not be uploaded in time; the staged files are kept
                and the message names them.

        """
        timeout = self.close_timeout if timeout is None else timeout
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        deadline = time.monotonic() + timeout
        while not self.sync_once(final=True) or self.pending():
            if time.monotonic() > deadline:
                raise StoreIOError(
                    f"could not upload {self.pending() or 'the run files'} to "
                    f"{self.store.url} within {timeout:.0f} s: {self._last_error}; the staged "
                    f"run is kept in {self.staging}"
                )
            time.sleep(min(2.0, self._backoff() / 4))
        # Everything of this rank is in the store: free the local copies (keep empty
        # placeholders, so a later writer on this machine continues the seq numbers).
        rank_dir = os.path.join(self.staging, self.rank_name)
        shards = _shards(rank_dir)
        for _seq, name in shards[:-1]:
            os.unlink(os.path.join(rank_dir, name))
        for _seq, name in shards:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(rank_dir, name[:-1] + "t"))
        if shards:
            open(os.path.join(rank_dir, shards[-1][1]), "wb").close()


def check_target(target: Any, staging_dir: Optional[str] = None) -> str:
    """Checks that a remote run target can be used; returns its local staging directory.

    Raises:
        NotFoundError: The bucket does not exist.
        AccessDeniedError: The credentials are refused.
        StoreIOError: The endpoint cannot be reached.

    """
    store = open_store(target)
    store.check()
    path = _local_dir("staging", store, staging_dir)
    os.makedirs(path, exist_ok=True)
    return path


def stage_for_writing(
    target: Any, rank: int, staging_dir: Optional[str] = None, interval: float = 1.0
) -> Uploader:
    """Checks a remote run target and returns its (prepared, not started) :class:`Uploader`."""
    store = open_store(target)
    staging = _local_dir("staging", store, staging_dir)
    os.makedirs(staging, exist_ok=True)
    up = Uploader(store, staging, rank, interval)
    up.prepare()
    return up


# -- reading ----------------------------------------------------------------------------------


class Mirror:
    """A local, partially fetched copy of a remote run that the native reader can open.

    Args:
        target: ``s3://bucket/prefix``, a ``pyarrow.fs`` filesystem or ``(filesystem, path)``.
        cache_dir: Local cache directory (default: ``$TV_CACHE_DIR`` or the temp directory); each
            reader fetches into its own subdirectory, removed when the reader is collected.

    """

    def __init__(self, target: Any, cache_dir: Optional[str] = None) -> None:
        self.store = open_store(target)
        # A private directory per reader: which byte ranges of a cached shard are present is
        # known only to the Mirror that fetched them, so caches are not shared between readers.
        root = _local_dir("cache", self.store, cache_dir)
        os.makedirs(root, exist_ok=True)
        self.path = tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root)
        weakref.finalize(self, shutil.rmtree, self.path, True)
        self.url = self.store.url
        self._sizes: dict[str, int] = {}
        self._fetched: dict[str, list[tuple[int, int]]] = {}
        self._lock = threading.Lock()
        self.bytes_fetched = 0
        self.store.check()
        if self.store.size("manifest.json") is None:
            raise NotFoundError(f"no run at '{self.url}': no manifest.json in the store")
        self.sync()

    def _fetch(self, key: str, start: int = 0, length: Optional[int] = None) -> bytes:
        data = self.store.get(key, start, length)
        self.bytes_fetched += len(data)
        return data

    def sync(self) -> int:
        """Brings the cache up to date with the store; returns the number of new objects."""
        with self._lock:
            listing = self.store.list()
            new = 0
            for key, size in sorted(listing.items()):
                parts = key.split("/")
                if len(parts) == 1 and (
                    key == "manifest.json"
                    or key in _SMALL_FILES
                    or (key.startswith("findings.") and key.endswith(".jsonl"))
                ):
                    if self._sizes.get(key) != size:
                        self._write_whole(key, self._fetch(key))
                        self._sizes[key] = size
                        new += 1
                elif (
                    len(parts) == 2
                    and _RANK_RE.match(parts[0])
                    and _SHARD_RE.match(parts[1])
                    and size > 0
                    and key not in self._sizes
                ):
                    self._add_shard(key, size)
                    self._sizes[key] = size
                    new += 1
            return new

    def _local(self, key: str) -> str:
        return os.path.join(self.path, *key.split("/"))

    def _write_whole(self, key: str, data: bytes) -> None:
        path = self._local(key)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def _add_shard(self, key: str, size: int) -> None:
        """Footer and INDEX frame of a sealed shard into a sparse file; unsealed: all of it."""
        path = self._local(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.part"
        footer = self._fetch(key, size - FOOTER_SIZE, FOOTER_SIZE) if size >= 64 else b""
        loc = footer_of(footer)
        ranges: list[tuple[int, int]]
        with open(tmp, "wb") as f:
            if loc is not None and loc[0] + loc[1] == size - FOOTER_SIZE and loc[0] >= 32:
                index_offset, index_len = loc
                header = self._fetch(key, 0, 32)
                f.write(header)
                f.seek(index_offset)
                f.write(self._fetch(key, index_offset, index_len))
                f.write(footer)
                ranges = [(0, 32), (index_offset, size)]
            else:
                f.write(self._fetch(key))  # unsealed (a crashed writer's): scanned whole
                ranges = [(0, size)]
            f.truncate(size)
        os.replace(tmp, path)
        self._fetched[key] = ranges

    def ensure(self, shard_path: str, start: int, end: int) -> None:
        """Fetches bytes ``[start, end)`` of a cached shard if they are not local yet."""
        rel = os.path.relpath(shard_path, self.path).replace(os.sep, "/")
        with self._lock:
            ranges = self._fetched.get(rel)
            if ranges is None or any(a <= start and end <= b for a, b in ranges):
                return
            data = self._fetch(rel, start, end - start)
            with open(shard_path, "r+b") as f:
                f.seek(start)
                f.write(data)
            ranges.append((start, end))

    def findings_key(self) -> str:
        """The object this process appends its findings to (one per producer)."""
        host = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname())[:32]
        return f"findings.{host}-{os.getpid()}.jsonl"

    def append_findings(self, lines: list[str]) -> None:
        """Appends findings (JSON lines) to this process's own findings object."""
        key = self.findings_key()
        path = self._local(key)
        with self._lock:
            with open(path, "a", encoding="utf-8") as f:
                for line in lines:
                    f.write(line if line.endswith("\n") else line + "\n")
            with open(path, "rb") as f:
                data = f.read()
            self.store.put_bytes(key, data)
            self._sizes[key] = len(data)
