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
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from indusfactory.infra.errors import BadInputError, IncompleteOutputError

TMP_PREFIX = ".tmp-"
FILES_LISTING = "files.json"
"""Written into every folder ``local_copy_for_write`` writes: each file's size and MD5 (what S3 gives as the
ETag of a single-part upload), so a reader tells a complete folder from one whose upload was cut."""
COMPLETION_MARKERS = ("record.json", "class_images.json")
"""Top-level files that say a folder is complete: uploaded last, each in its own write, once every other
file is in place and verified. The default of a folder written without naming its marker; the stages name
theirs (``indusfactory.layout``, each folder's ``marker_name``)."""
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
    from indusfactory.infra.redact import scrub

    protocol = uri.split("://", 1)[0]
    if protocol not in ("s3", "s3a"):
        return f"{protocol}://"
    fs, _ = filesystem(uri)
    endpoint = (
        getattr(fs, "endpoint_url", None)
        or (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
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


def read_json_many(uris: list[str], window: int = 16) -> Iterator[Any]:
    """``read_json`` of each URI, in order, ``window`` requests at a time (latency-bound on object stores);
    at most ``window`` documents are held at once."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=window) as pool:
        for start in range(0, len(uris), window):
            yield from pool.map(read_json, uris[start : start + window])


def is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return any(p in OBJECT_STORES for p in protocols)


def range_read_options(fs: fsspec.AbstractFileSystem) -> dict:
    """``fs.open`` options for reading parts of a large file (a parquet footer, one row group): on an object
    store no read-ahead block (s3fs fetches 50 MB after each read position by default), each read one ranged
    GET; elsewhere none."""
    return {"cache_type": "none"} if is_object_store(fs) else {}


def _temporary_sibling(fs, uri: str, path: str) -> str:
    """A fresh temporary name next to ``path`` (its folder made), to write into and then move into place."""
    folder = posixpath.dirname(path) if is_remote(uri) else os.path.dirname(path)
    fs.makedirs(folder, exist_ok=True)
    return posixpath.join(folder, f"{TMP_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(path)}")


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically: one PUT on an object store, else a temporary sibling moved
    into place."""
    fs, path = filesystem(uri)
    if is_object_store(fs):
        fs.pipe_file(path, data)
        return
    tmp = _temporary_sibling(fs, uri, path)
    try:
        with fs.open(tmp, "wb") as handle:
            handle.write(data)
        fs.mv(tmp, path)
    except BaseException as exc:  # a full disk, a stop request: never leave a partial file behind
        _remove_quietly(fs, tmp)
        if isinstance(exc, OSError):
            _raise_naming(exc, uri)
        raise


def _remove_quietly(fs: fsspec.AbstractFileSystem, path: str) -> None:
    try:
        if fs.exists(path):
            fs.rm_file(path)
    except OSError:  # best effort: what is left is a .tmp- file that readers skip
        pass


def _raise_naming(exc: OSError, uri: str) -> None:
    """Re-raise a failed write naming ``uri`` (a full disk says no path): permanent failures (no space,
    access denied, read-only) as the ``StorageAccessError`` that says what to check, and that is not retried."""
    from indusfactory.infra import failures

    if failures.is_permanent(exc):
        if not exc.filename:
            exc.filename = uri
        raise failures.permanent_error(exc) from exc
    raise exc


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


def _s3_error_code(exc: BaseException) -> str | None:
    for candidate in (exc, exc.__cause__, exc.__context__):
        response = getattr(candidate, "response", None)
        if isinstance(response, dict):
            return str(
                response.get("Error", {}).get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            )
    return None


def write_bytes_exclusive(uri: str, data: bytes) -> bool:
    """Write ``data`` to ``uri`` only if nothing is there yet; False (nothing written) when something is.

    S3: one conditional PUT (``If-None-Match: *``), exclusive against any other writer. Other
    filesystems: an existence check, then ``write_bytes_atomic``; exclusive among writers that hold
    the dataset version's storage lock (a file once written is never replaced by this function).
    """
    fs, path = filesystem(uri)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    if {"s3", "s3a"} & set(protocols):
        bucket, key, _ = fs.split_path(path)
        try:
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except FileExistsError:
            return False
        except OSError as exc:
            if _s3_error_code(exc) in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                return False
            raise
        finally:
            fs.invalidate_cache(path)
        return True
    if fs.exists(path):
        return False
    write_bytes_atomic(uri, data)
    return True


def parent(uri: str) -> str:
    """The folder holding ``uri``."""
    return posixpath.dirname(uri) if is_remote(uri) else os.path.dirname(uri)


def remove_temporaries(uri: str) -> list[str]:
    """Delete the ``.tmp-`` files a crashed writer left anywhere under ``uri``; returns their paths.

    Only call it when no writer can still be working under ``uri`` (e.g. once every shard is done). On an object
    store nothing is listed (a listing of every image of a dataset): writes there make no temporary object.
    """
    fs, path = filesystem(uri)
    if is_object_store(fs) or not fs.exists(path):
        return []
    stale = [p for p in fs.find(path) if posixpath.basename(p).startswith(TMP_PREFIX)]
    for p in stale:
        fs.rm_file(p)
    return stale


@contextmanager
def open_atomic(uri: str) -> Iterator[Any]:
    """A binary handle whose bytes appear at ``uri`` whole, only when the block ends without an error: written
    piece by piece (never all in memory). Object stores: a streamed (multipart) upload, completed at the end
    and aborted on an error; elsewhere a temporary sibling moved into place."""
    fs, path = filesystem(uri)
    if is_object_store(fs):
        handle = fs.open(path, "wb")
        try:
            yield handle
        except BaseException:
            handle.discard()  # abort the upload: nothing appears
            raise
        handle.close()
        return
    tmp = _temporary_sibling(fs, uri, path)
    try:
        with fs.open(tmp, "wb") as handle:
            yield handle
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm_file(tmp)


def write_json_atomic(uri: str, obj: Any) -> None:
    write_bytes_atomic(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def md5_bytes(data: bytes) -> str:
    """What S3 gives as the ETag of a single-part upload of ``data``."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def listing(uri: str) -> dict[str, dict]:
    """``{name: info}`` of the files directly in the folder at ``uri`` (one listing; S3 gives size and ETag);
    {} when there is no such folder."""
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    return {posixpath.basename(e["name"].rstrip("/")): e for e in entries if e.get("type") != "directory"}


def info(uri: str) -> dict | None:
    """The file's metadata (size, ETag or mtime; no byte of it read), or None when it is absent."""
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)
    try:
        found = fs.info(path)
    except FileNotFoundError:
        return None
    return found if found.get("type") != "directory" else None


def differs_from_write(found: dict | None, size: int, md5: str, version: str) -> str | None:
    """Why a file's metadata ``found`` (``info``, or an entry of ``listing``) is not what was written (recorded
    at the write: ``size``, ``md5`` of the bytes, the file's ``version`` right after: its ETag on S3, its mtime
    elsewhere); None when it matches. Without a version, an MD5 ETag (S3 single-part) is compared with the MD5.
    Nothing is downloaded."""
    if found is None:
        return "is missing"
    if int(found.get("size") or 0) != size:
        return f"has {int(found.get('size') or 0)} bytes, not the {size} written"
    if version:
        now = file_version(found).strip('"')
        return None if now == version.strip('"') else f"was rewritten after it was written ({now}, not {version})"
    etag = str(found.get("ETag") or found.get("etag") or "").strip('"')
    if len(etag) == 32 and md5 and etag != md5:
        return f"has MD5 {etag}, not the {md5} written"
    return None


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
    return sorted(
        (posixpath.relpath(p, path), int(info.get("size") or 0), file_version(info))
        for p, info in fs.find(path, detail=True).items()
    )


def _md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_files(folder: str, markers: tuple[str, ...] = COMPLETION_MARKERS) -> dict[str, dict]:
    """``{relative path: {"size", "md5"}}`` of every file of a local folder but its markers and listing."""
    root = Path(folder)
    return {
        p.relative_to(root).as_posix(): {"size": p.stat().st_size, "md5": _md5_file(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() not in (*markers, FILES_LISTING)
    }


def missing_files(uri: str) -> list[str] | None:
    """What the folder at ``uri`` lacks against its ``files.json``: [] when every listed file is there at its
    size (and MD5, where the store's ETag is one); None when the folder has no listing."""
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)
    try:
        listing = json.loads(fs.cat_file(posixpath.join(path, FILES_LISTING)))["files"]
    except FileNotFoundError:
        return None
    found = {posixpath.relpath(p, path): info for p, info in fs.find(path, detail=True).items()}
    problems = []
    for name, want in listing.items():
        info = found.get(name)
        size = None if info is None else int(info.get("size") or 0)
        etag = "" if info is None else str(info.get("ETag") or "").strip('"')
        if info is None:
            problems.append(f"{name} is missing")
        elif size != want["size"]:
            problems.append(f"{name} has {size} bytes, not {want['size']}")
        elif len(etag) == 32 and etag != want["md5"]:  # a multipart ETag ("...-3") is no MD5: size only
            problems.append(f"{name} has MD5 {etag}, not {want['md5']}")
    return problems


def incomplete(uri: str, required_suffix: str | None = None) -> list[str]:
    """Why the folder at ``uri`` is not complete ([] when it is): a file its ``files.json`` lists is missing or
    differs; a folder without a listing (written before listings existed) needs a ``required_suffix`` file."""
    problems = missing_files(uri)
    if problems is not None:
        return problems
    if required_suffix:
        fs, path = filesystem(uri)
        if not any(p.endswith(required_suffix) for p in fs.find(path)):
            return [f"no *{required_suffix} file"]
    return []


def upload_folder(folder: str, uri: str, markers: tuple[str, ...] = COMPLETION_MARKERS) -> None:
    """Upload a local folder to ``uri`` so that its markers say it is complete only when it is.

    First any marker left at ``uri`` by an earlier, cut upload is removed; then every other file goes up,
    then ``files.json``; the upload is verified against it (sizes, MD5 where the ETag is one); the markers
    go last, each in its own write.
    """
    fs, path = filesystem(uri)
    files = folder_files(folder, markers)
    for name in (*markers, FILES_LISTING):
        if fs.exists(posixpath.join(path, name)):
            fs.rm_file(posixpath.join(path, name))
    if files:
        fs.put([os.path.join(folder, name) for name in files], [posixpath.join(path, name) for name in files])
    write_json_atomic(join(uri, FILES_LISTING), {"files": files})
    problems = missing_files(uri)
    if problems:
        raise IncompleteOutputError(
            f"upload of {uri} is incomplete ({'; '.join(problems)}); its completion marker was not written"
        )
    for name in markers:
        local = os.path.join(folder, name)
        if os.path.isfile(local):
            write_bytes_atomic(join(uri, name), Path(local).read_bytes())


@contextmanager
def local_copy_for_write(uri: str, markers: tuple[str, ...] = COMPLETION_MARKERS) -> Iterator[str]:
    """Yield a local folder to write a directory tree into; it is put at ``uri`` on success, with a
    ``files.json`` listing.

    Local roots write in a temporary sibling folder that is renamed into place, so a crash never
    leaves a half-written model folder under its final name. Remote roots upload through
    ``upload_folder``: the completion ``markers`` go last, after the rest is verified.
    """
    import shutil
    import tempfile

    if is_remote(uri):
        with tempfile.TemporaryDirectory() as tmp:
            yield tmp
            upload_folder(tmp, uri, markers)
        return
    target = Path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}-{target.name}"
    staging.mkdir()
    try:
        yield str(staging)
        (staging / FILES_LISTING).write_text(
            json.dumps({"files": folder_files(str(staging), markers)}, indent=2, sort_keys=True)
        )
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _name_storage_uri(exc: BaseException, local: str, uri: str) -> None:
    """Make an error about a local copy name the storage URI it was copied from."""
    exc.args = tuple(a.replace(local, uri) if isinstance(a, str) else a for a in exc.args)
    for attribute in ("filename", "filename2"):  # OSError shows these, not its args
        value = getattr(exc, attribute, None)
        if isinstance(value, str):
            setattr(exc, attribute, value.replace(local, uri))
    if sys.version_info >= (3, 11):  # exception notes are 3.11+; on 3.10 the message alone names the URI
        exc.add_note(f"(read from a local copy of {uri})")


@contextmanager
def local_copy_for_read(uri: str) -> Iterator[str]:
    """Yield a local path holding the tree at ``uri`` (downloaded first when remote).

    A remote folder that lacks a file its ``files.json`` lists is refused, naming ``uri``; errors raised
    about the local copy name ``uri`` too."""
    import tempfile

    if not is_remote(uri):
        yield uri
        return
    problems = missing_files(uri)
    if problems:
        raise IncompleteOutputError(
            f"{uri} is incomplete ({'; '.join(problems)}): rerun the stage that makes it to rebuild it"
        )
    with tempfile.TemporaryDirectory() as tmp:
        fs, path = filesystem(uri)
        fs.get(path.rstrip("/") + "/", tmp, recursive=True)
        try:
            yield tmp
        except Exception as exc:
            _name_storage_uri(exc, tmp, uri)
            raise
