"""The factory root: one URI (local path or ``s3://bucket/prefix``) opened with fsspec everywhere.

Writes are atomic. On a local (or any file-like) filesystem, bytes go to a temporary name next to
the target and are moved into place, so a reader never sees half a file and a crash leaves only a
``.tmp-`` file that readers skip (``remove_temporaries`` clears them). On an object store (S3, GCS,
Azure) an object becomes visible only when its upload completes, so one PUT is already atomic:
no temporary object, no copy and no delete (three requests saved per file).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from indusfactory.errors import BadInputError

TMP_PREFIX = ".tmp-"
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})
"""Protocols whose uploads are atomic: an object appears whole or not at all."""


def is_remote(uri: str) -> bool:
    """True for URIs with a scheme other than ``file`` (``s3://``, ``memory://``...)."""
    return "://" in uri and not uri.startswith("file://")


def normalise_uri(uri: str) -> str:
    """Absolute local paths for local roots; remote URIs unchanged (minus a trailing slash)."""
    if is_remote(uri):
        return uri.rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return str(Path(uri).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    """Join URI parts with ``/`` and refuse parts that would escape ``base``."""
    for part in parts:
        if part.startswith("/") or ".." in part.split("/"):
            raise BadInputError(f"path part {part!r} would escape {base}")
    return posixpath.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the path inside it. Credentials come from the environment."""
    return url_to_fs(uri)


def endpoint_of(uri: str) -> str | None:
    """The service endpoint a remote URI is read from (for messages; credentials in it scrubbed); None if local.

    For ``s3://`` the endpoint s3fs uses: ``endpoint_url`` of the filesystem, else ``AWS_ENDPOINT_URL_S3`` /
    ``AWS_ENDPOINT_URL``, else AWS's own endpoint of the region.
    """
    if not is_remote(uri):
        return None
    from indusfactory.redact import scrub

    protocol = uri.split("://", 1)[0]
    if protocol not in ("s3", "s3a"):
        return f"{protocol}://"
    fs, _ = filesystem(uri)
    endpoint = (getattr(fs, "endpoint_url", None) or (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url")
                or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    if endpoint:
        return scrub(str(endpoint))
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "default region"
    return f"AWS S3 ({region})"


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri).decode("utf-8"))


def is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return any(p in OBJECT_STORES for p in protocols)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically: one PUT on an object store, else a temporary sibling moved
    into place."""
    fs, path = filesystem(uri)
    if is_object_store(fs):
        fs.pipe_file(path, data)
        return
    parent = posixpath.dirname(path) if is_remote(uri) else os.path.dirname(path)
    fs.makedirs(parent, exist_ok=True)
    tmp = posixpath.join(parent, f"{TMP_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(path)}")
    with fs.open(tmp, "wb") as handle:
        handle.write(data)
    fs.mv(tmp, path)


def write_many_atomic(files: dict[str, bytes]) -> None:
    """Write several files, each atomically; on an object store as one concurrent batch of PUTs."""
    if not files:
        return
    fs, _ = filesystem(next(iter(files)))
    if is_object_store(fs):
        paths = {filesystem(uri)[1]: data for uri, data in files.items()}
        fs.pipe(paths)
        return
    for uri, data in files.items():
        write_bytes_atomic(uri, data)


def remove_temporaries(uri: str) -> list[str]:
    """Delete the ``.tmp-`` files a crashed writer left anywhere under ``uri``; returns their paths.

    Only call it when no writer can still be working under ``uri`` (e.g. once every shard is done).
    """
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    stale = [p for p in fs.find(path) if posixpath.basename(p).startswith(TMP_PREFIX)]
    for p in stale:
        fs.rm_file(p)
    return stale


def write_json_atomic(uri: str, obj: Any) -> None:
    write_bytes_atomic(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


VERSION_KEYS = ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified", "updated", "created")
"""fsspec ``info`` keys that change when a file is rewritten: object stores' ETag first, else a time."""


def file_version(info: dict) -> str:
    """What changes when a file is rewritten in place, even at the same size (ETag or modification time)."""
    for key in VERSION_KEYS:
        if info.get(key) is not None:
            return str(info[key])
    return ""


def folder_listing(uri: str) -> list[tuple[str, int, str]]:
    """Every file under ``uri`` as (relative path, size, version): a cheap fingerprint of its contents.

    A file rewritten in place changes its version, so a cache keyed by the listing is not trusted
    for it; a file merely copied elsewhere changes it too (the work is then redone, not skipped)."""
    fs, path = filesystem(uri)
    return sorted((posixpath.relpath(p, path), int(info.get("size") or 0), file_version(info))
                  for p, info in fs.find(path, detail=True).items())


@contextmanager
def local_copy_for_write(uri: str) -> Iterator[str]:
    """Yield a local folder to write a directory tree into; it is uploaded to ``uri`` on success.

    Local roots write in a temporary sibling folder that is renamed into place, so a crash never
    leaves a half-written model folder under its final name.
    """
    import shutil
    import tempfile

    if is_remote(uri):
        with tempfile.TemporaryDirectory() as tmp:
            yield tmp
            fs, path = filesystem(uri)
            fs.put(tmp.rstrip("/") + "/", path, recursive=True)
        return
    target = Path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}-{target.name}"
    tmp.mkdir()
    try:
        yield str(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def local_copy_for_read(uri: str) -> Iterator[str]:
    """Yield a local path holding the tree at ``uri`` (downloaded first when remote)."""
    import tempfile

    if not is_remote(uri):
        yield uri
        return
    with tempfile.TemporaryDirectory() as tmp:
        fs, path = filesystem(uri)
        fs.get(path.rstrip("/") + "/", tmp, recursive=True)
        yield tmp


@dataclass(frozen=True)
class FactoryLayout:
    """Where each stage writes under the factory root."""

    root: str

    @classmethod
    def of(cls, root: str) -> "FactoryLayout":
        return cls(normalise_uri(root))

    def catalog(self, fingerprint: str) -> str:
        return join(self.root, "catalog", fingerprint)

    def model(self, kind: str, fingerprint: str) -> str:
        return join(self.root, "models", kind, fingerprint)

    def plan(self, fingerprint: str) -> str:
        return join(self.root, "plans", fingerprint)

    def dataset(self, name: str, version: str) -> str:
        return join(self.root, "datasets", name, version)
