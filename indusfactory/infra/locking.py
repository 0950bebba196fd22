"""A lock on the factory's storage, so two runs never do the same expensive work at once.

``StorageLock(uri)`` is a small JSON file (owner, host, pid, token, heartbeat) created
*exclusively*: on a local path through ``os.link`` of a finished temporary file (atomic, and
safe on NFS), on S3 through a conditional ``PutObject`` (``If-None-Match: *``). While held, a
background thread rewrites the heartbeat every ``heartbeat_every`` seconds with a
compare-and-swap (local: under an ``flock`` guard; S3: ``If-Match`` on the ETag). A waiter logs
``waiting for <lock> held by <owner>`` and polls; a lock whose heartbeat is older than
``stale_after`` (by the holder's clock, or unchanged that long by the waiter's own clock, which
does not depend on clock skew) belongs to a dead process and is taken over with the same
compare-and-swap, so two waiters never both take it. A holder that ran on this host (same host name,
boot and pid namespace) and whose process is gone is taken over at once, without waiting for its
heartbeat to go stale; so is a lock this very process left behind when its release could not delete it
(storage down at that moment).

The lock guards work, not correctness: outputs are still written atomically, so a holder that
lost its lock (``lock.lost``) only wastes work. Other fsspec filesystems get a best-effort lock
(create if absent, no atomic compare-and-swap) and a warning saying so.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from indusfactory.infra import storage

log = logging.getLogger("indusfactory.locking")  # the name operators filter on, kept from the flat layout

DEFAULT_STALE_AFTER = 600.0
GUARD_FILE = ".guard"


class LockTimeout(TimeoutError):
    """The lock was still held by someone else after ``wait_timeout`` seconds."""


def default_owner() -> str:
    """``<worker name or host> pid <pid>``; the worker name comes from ``INDUSFACTORY_WORKER_NAME``."""
    return f"{os.environ.get('INDUSFACTORY_WORKER_NAME') or socket.gethostname()} pid {os.getpid()}"


@dataclass
class LockInfo:
    """What a lock file says about its holder."""

    owner: str
    token: str
    host: str = ""
    pid: int = 0
    acquired_at: float = 0.0
    heartbeat_at: float = 0.0
    heartbeats: int = 0
    stale_after: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def dumps(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode("utf-8")

    @classmethod
    def loads(cls, data: bytes) -> "LockInfo | None":
        try:
            raw = json.loads(data.decode("utf-8"))
            known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
            return cls(**known)
        except (ValueError, TypeError, UnicodeDecodeError):
            return None


class StorageLock:
    """An exclusive lock at ``uri`` (local path or ``s3://``), with owner info, heartbeat and stale takeover.

    Use as a context manager; ``waited`` (seconds) and ``waited_for`` (owners seen) say what
    happened, ``took_over`` names the stale owner that was replaced, ``lost`` turns true if
    someone took the lock away while it was held (the heartbeat stopped for ``stale_after``).
    """

    def __init__(
        self,
        uri: str,
        owner: str | None = None,
        stale_after: float = DEFAULT_STALE_AFTER,
        heartbeat_every: float | None = None,
        poll_every: float = 1.0,
        wait_timeout: float | None = None,
        log_every: float = 60.0,
        logger: logging.Logger | logging.LoggerAdapter | None = None,
    ):
        if stale_after <= 0:
            raise ValueError("stale_after must be positive")
        self.uri = uri
        self.owner = owner or default_owner()
        self.stale_after = float(stale_after)
        self.heartbeat_every = float(heartbeat_every) if heartbeat_every else max(self.stale_after / 4, 0.05)
        if self.heartbeat_every >= self.stale_after:
            raise ValueError(
                f"heartbeat_every ({self.heartbeat_every}) must be shorter than stale_after ({self.stale_after})"
            )
        self.poll_every = poll_every
        self.wait_timeout = wait_timeout
        self.log_every = log_every
        self.log = logger or log
        self.token = uuid.uuid4().hex
        self.waited = 0.0
        self.waited_for: list[str] = []
        self.took_over: str | None = None
        self.lost = False
        self._backend = _backend_for(uri)
        self._version: Any = None
        self._info: LockInfo | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state_lock = threading.Lock()

    # -- public -------------------------------------------------------------------------------------
    def acquire(self) -> "StorageLock":
        # the token counts as live from before the first create: another thread of this process that reads our
        # freshly created file must not take it for one left behind by a failed release
        _LIVE_TOKENS.add(self.token)
        try:
            return self._acquire()
        except BaseException:
            _LIVE_TOKENS.discard(self.token)
            raise

    def _acquire(self) -> "StorageLock":
        started = time.monotonic()
        first_seen: dict[Any, float] = {}
        last_logged: tuple[str, float] | None = None
        while True:
            info = self._new_info()
            version = self._backend.create(info.dumps())
            if version is not None:
                return self._held(info, version, started)
            current = self._backend.read()
            if current is None:
                continue  # released between our create and our read: try again at once
            data, version = current
            holder = LockInfo.loads(data)
            seen = first_seen.setdefault(version, time.monotonic())
            owner = holder.owner if holder else "an unreadable lock file"
            stale_after = max(self.stale_after, holder.stale_after if holder else 0.0)
            silent_for = time.monotonic() - seen
            heartbeat_age = time.time() - holder.heartbeat_at if holder and holder.heartbeat_at else None
            dead = holder is not None and holder_died_here(holder)
            if dead or silent_for > stale_after or (heartbeat_age is not None and heartbeat_age > stale_after):
                info = self._new_info()
                new_version = self._backend.replace_if(version, info.dumps())
                if new_version is not None:
                    age = heartbeat_age if heartbeat_age is not None else silent_for
                    if dead and holder is not None:
                        self.log.warning(
                            "took over lock %s from %s at once: its process %d on this host (%s) is gone",
                            self.uri,
                            owner,
                            holder.pid,
                            holder.host,
                        )
                    else:
                        self.log.warning(
                            "took over stale lock %s from %s (no heartbeat for %.0f s, limit %.0f s)",
                            self.uri,
                            owner,
                            age,
                            stale_after,
                        )
                    self.took_over = owner
                    return self._held(info, new_version, started)
                continue  # someone else changed it first (a heartbeat, or another waiter took it over)
            if owner not in self.waited_for:
                self.waited_for.append(owner)
            now = time.monotonic()
            if last_logged is None or last_logged[0] != owner or now - last_logged[1] >= self.log_every:
                since = _ago(holder.acquired_at) if holder and holder.acquired_at else "unknown"
                beat = f"{heartbeat_age:.0f} s ago" if heartbeat_age is not None else "unknown"
                self.log.info(
                    "waiting for %s held by %s (held for %s, last heartbeat %s)", self.uri, owner, since, beat
                )
                last_logged = (owner, now)
            if self.wait_timeout is not None and now - started > self.wait_timeout:
                raise LockTimeout(f"{self.uri} still held by {owner} after {self.wait_timeout:.0f} s")
            time.sleep(self.poll_every)

    def release(self) -> None:
        _LIVE_TOKENS.discard(self.token)  # even if the delete below fails, this process no longer holds it
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._state_lock:
            if self._version is None:
                return
            if not self.lost and not self._backend.delete_if(self._version):
                self.lost = True
            if self.lost:
                self.log.error("lock %s was taken over by another process while %s held it", self.uri, self.owner)
            self._version = None

    def __enter__(self) -> "StorageLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()

    # -- internals ----------------------------------------------------------------------------------
    def _new_info(self) -> LockInfo:
        now = time.time()
        return LockInfo(
            owner=self.owner,
            token=self.token,
            host=socket.gethostname(),
            pid=os.getpid(),
            acquired_at=now,
            heartbeat_at=now,
            stale_after=self.stale_after,
            extra=process_identity(os.getpid()),
        )

    def _held(self, info: LockInfo, version: Any, started: float) -> "StorageLock":
        _LIVE_TOKENS.add(self.token)
        self.waited = time.monotonic() - started
        self._info, self._version = info, version
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name=f"heartbeat {self.uri}", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_every):
            with self._state_lock:
                if self._version is None or self._info is None:
                    return
                self._info.heartbeat_at = time.time()
                self._info.heartbeats += 1
                try:
                    version = self._backend.replace_if(self._version, self._info.dumps())
                except Exception as exc:  # noqa: BLE001 - a network blip: the next beat tries again
                    self.log.warning("heartbeat of lock %s failed (%s); retrying", self.uri, type(exc).__name__)
                    continue
                if version is not None:
                    self._version = version
                    continue
                current = self._backend.read()
                holder = LockInfo.loads(current[0]) if current else None
                if holder is not None and holder.token == self.token:
                    self._version = current[1]  # our own file under a version we did not know: carry on
                    continue
                self.lost = True
                self.log.error(
                    "lock %s was taken over by %s while %s held it (heartbeat missed for more than %.0f s?)",
                    self.uri,
                    holder.owner if holder else "nobody",
                    self.owner,
                    self.stale_after,
                )
                return


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), or None (no such process,
    or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    return data[data.rfind(")") + 2 :].split()


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def process_identity(pid: int) -> dict[str, str]:
    """What tells this process apart from a later one with the same pid on the same host: the boot, the pid
    namespace (a container) and the process's start time (Linux; empty elsewhere)."""
    stat = _proc_stat(pid)
    return {
        "boot_id": _boot_id(),
        "pid_namespace": _pid_namespace(),
        "started": stat[19] if stat and len(stat) > 19 else "",
    }


_LIVE_TOKENS: set[str] = set()
"""Tokens of the locks this process holds right now."""


def holder_died_here(holder: LockInfo) -> bool:
    """True when the lock's holder ran on this host, in this boot and pid namespace, and its process is gone
    (no such pid, a zombie, or another process that reused the pid). Anything uncertain is False: the lock then
    waits for its heartbeat to go stale."""
    if not holder.pid or holder.host != socket.gethostname():
        return False
    mine = process_identity(os.getpid())
    for key in ("boot_id", "pid_namespace"):
        if holder.extra.get(key, "") != mine[key]:
            return False  # another boot, or another container with the same host name: the pid says nothing
    if holder.pid == os.getpid():
        # this process: held by a live lock object, or left behind when a release could not delete it
        # (storage down at that moment), in which case nobody holds it any more
        return holder.token not in _LIVE_TOKENS
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's process
    stat = _proc_stat(holder.pid)
    if stat is None:
        return False
    if stat[0] in ("Z", "X"):
        return True
    started = holder.extra.get("started")
    return bool(started) and len(stat) > 19 and stat[19] != started


def _ago(timestamp: float) -> str:
    seconds = max(0.0, time.time() - timestamp)
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"


# -- backends: create exclusively, read with a version, compare-and-swap, compare-and-delete -----------


def _backend_for(uri: str):
    if not storage.is_remote(uri):
        return _LocalBackend(storage.normalise_uri(uri))
    fs, path = storage.filesystem(uri)
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if {"s3", "s3a"} & set(protocols):
        return _S3Backend(fs, path)
    return _FsspecBackend(fs, path, uri)


class _LocalBackend:
    """Local (or NFS) path: exclusive create by ``os.link``; swaps and deletes under an ``flock`` guard."""

    def __init__(self, path: str):
        self.path = path
        self.folder = os.path.dirname(path)

    @contextmanager
    def _guard(self) -> Iterator[None]:
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(os.path.join(self.folder, GUARD_FILE), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            try:
                import fcntl
            except ImportError:  # not POSIX: exclusive create still holds, swaps are best effort
                yield
                return
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _tmp(self, data: bytes) -> str:
        tmp = os.path.join(self.folder, f"{storage.TMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(self.path)}")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return tmp

    def _read(self) -> bytes | None:
        try:
            with open(self.path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def create(self, data: bytes) -> bytes | None:
        os.makedirs(self.folder, exist_ok=True)
        tmp = self._tmp(data)
        try:
            with self._guard():
                os.link(tmp, self.path)  # atomic; fails if the lock exists, on NFS too
            return data
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)

    def read(self) -> tuple[bytes, bytes] | None:
        data = self._read()
        return None if data is None else (data, data)

    def replace_if(self, version: bytes, data: bytes) -> bytes | None:
        tmp = self._tmp(data)
        try:
            with self._guard():
                if self._read() != version:
                    return None
                os.replace(tmp, self.path)
                return data
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def delete_if(self, version: bytes) -> bool:
        with self._guard():
            if self._read() != version:
                return False
            os.unlink(self.path)
            return True


def _s3_error_code(exc: BaseException) -> str | None:
    for candidate in (exc, exc.__cause__, exc.__context__):
        response = getattr(candidate, "response", None)
        if isinstance(response, dict):
            return str(
                response.get("Error", {}).get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            )
    return None


_LOST_RACE = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}


class _S3Backend:
    """S3 conditional writes: ``If-None-Match: *`` to create, ``If-Match: <ETag>`` to swap and delete."""

    def __init__(self, fs, path: str):
        self.fs = fs
        self.bucket, self.key, _ = fs.split_path(path)

    def _put(self, data: bytes, **condition: str) -> str | None:
        try:
            response = self.fs.call_s3(
                "put_object", Bucket=self.bucket, Key=self.key, Body=data, ContentType="application/json", **condition
            )
        except FileExistsError:
            return None
        except OSError as exc:
            if _s3_error_code(exc) in _LOST_RACE or isinstance(exc, FileNotFoundError):
                return None
            raise
        finally:
            self.fs.invalidate_cache(f"{self.bucket}/{self.key}")
        return response["ETag"]

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def read(self) -> tuple[bytes, str] | None:
        from fsspec.asyn import sync

        async def get():
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with response["Body"] as body:
                return await body.read(), response["ETag"]

        try:
            return sync(self.fs.loop, get)
        except FileNotFoundError:
            return None

    def replace_if(self, version: str, data: bytes) -> str | None:
        return self._put(data, IfMatch=version)

    def delete_if(self, version: str) -> bool:
        current = self.read()
        if current is None or current[1] != version:
            return False
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=version)
        except OSError as exc:
            if _s3_error_code(exc) in _LOST_RACE:
                return False
            if _s3_error_code(exc) not in ("NotImplemented", "501", "InvalidArgument", "400"):
                raise
            # A store without conditional deletes: the ETag was checked just above.
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)
        finally:
            self.fs.invalidate_cache(f"{self.bucket}/{self.key}")
        return True


class _FsspecBackend:
    """Any other fsspec filesystem: exclusive create where the filesystem has one, swaps are best effort."""

    warned: set[str] = set()

    def __init__(self, fs, path: str, uri: str):
        self.fs, self.path = fs, path
        if type(fs).__name__ not in self.warned:
            self.warned.add(type(fs).__name__)
            log.warning("%s has no atomic compare-and-swap: the lock at %s is best effort", type(fs).__name__, uri)

    def create(self, data: bytes) -> bytes | None:
        parent = self.path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        try:
            with self.fs.open(self.path, "xb") as handle:
                handle.write(data)
            return data
        except FileExistsError:
            return None
        except (ValueError, NotImplementedError):  # no exclusive mode: check, then write
            if self.fs.exists(self.path):
                return None
            self.fs.pipe_file(self.path, data)
            return data

    def read(self) -> tuple[bytes, bytes] | None:
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return data, data

    def replace_if(self, version: bytes, data: bytes) -> bytes | None:
        current = self.read()
        if current is None or current[1] != version:
            return None
        self.fs.pipe_file(self.path, data)
        return data

    def delete_if(self, version: bytes) -> bool:
        current = self.read()
        if current is None or current[1] != version:
            return False
        self.fs.rm_file(self.path)
        return True
