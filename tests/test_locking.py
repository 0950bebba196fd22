"""A storage lock whose holder died on this host is taken over at once; anything uncertain still waits."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from indusfactory.infra.locking import LockInfo, LockTimeout, StorageLock, holder_died_here, lock_uri, process_identity

HOLDER = """
import sys, time
from indusfactory.infra.locking import StorageLock
lock = StorageLock(sys.argv[1], owner="doomed-worker", stale_after=600).acquire()
print("held", flush=True)
time.sleep(3600)
"""


def _holder(uri: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    process = subprocess.Popen([sys.executable, "-c", HOLDER, uri], stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_lock_whose_holder_was_killed_on_this_host_is_taken_over_at_once(tmp_path):
    uri = lock_uri(str(tmp_path), "train-concept")
    process = _holder(uri)
    try:
        with pytest.raises(LockTimeout, match="doomed-worker"):  # alive: waited for, not taken
            StorageLock(uri, owner="waiter", stale_after=600, poll_every=0.05, wait_timeout=0.5).acquire()
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    started = time.monotonic()
    with StorageLock(uri, owner="next-worker", stale_after=600, poll_every=0.05, wait_timeout=30) as lock:
        assert lock.took_over == "doomed-worker"
    assert time.monotonic() - started < 5, "taken over at once, not after the 600 s stale timeout"


def test_a_zombie_holder_counts_as_dead(tmp_path):
    uri = lock_uri(str(tmp_path), "zombie")
    process = _holder(uri)
    process.send_signal(signal.SIGKILL)
    time.sleep(0.5)  # killed, not yet reaped: a zombie whose pid still answers kill(pid, 0)
    try:
        with StorageLock(uri, owner="next", stale_after=600, poll_every=0.05, wait_timeout=10) as lock:
            assert lock.took_over == "doomed-worker"
    finally:
        process.wait()


def _planted(path: str, **fields) -> LockInfo:
    info = LockInfo(
        owner="planted",
        token="t",
        host=socket.gethostname(),
        pid=os.getppid(),
        acquired_at=time.time(),
        heartbeat_at=time.time(),
        stale_after=600,
        extra=process_identity(os.getppid()),
    )
    for name, value in fields.items():
        setattr(info, name, value)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(info.dumps())
    return info


def test_only_a_holder_known_to_be_gone_from_this_host_is_taken_over_at_once(tmp_path):
    uri = lock_uri(str(tmp_path), "planted")
    dead_pid = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    ).stdout.strip()
    alive = _planted(uri)
    assert not holder_died_here(alive)  # our parent process: alive, same start time
    cases = {
        "another host": dict(host="elsewhere.example", pid=int(dead_pid)),
        "another container": dict(pid=int(dead_pid), extra={**process_identity(os.getpid()), "pid_namespace": "x"}),
        "an old lock file without identity": dict(pid=int(dead_pid), extra={}),
    }
    for name, fields in cases.items():
        info = _planted(uri, **fields)
        assert not holder_died_here(info), name
        with pytest.raises(LockTimeout):
            StorageLock(uri, owner="waiter", stale_after=600, poll_every=0.05, wait_timeout=0.3).acquire()
    reused = _planted(uri, extra={**process_identity(os.getppid()), "started": "1"})  # the pid now runs another
    assert holder_died_here(reused)
    dead = _planted(uri, pid=int(dead_pid), extra=process_identity(os.getpid()))
    assert holder_died_here(dead)
    with StorageLock(uri, owner="next", stale_after=600, poll_every=0.05, wait_timeout=5) as lock:
        assert lock.took_over == "planted"


def test_a_lock_this_process_could_not_delete_is_taken_over_at_once(tmp_path, monkeypatch):
    uri = lock_uri(str(tmp_path), "dataset-demo-v1")
    first = StorageLock(uri, owner="first run", stale_after=600).acquire()
    monkeypatch.setattr(first._backend, "delete_if", lambda version: False)  # storage down during the release
    first.release()
    assert Path(uri).exists()  # left behind
    started = time.monotonic()
    with StorageLock(uri, owner="rerun", stale_after=600, poll_every=0.05, wait_timeout=5) as again:
        assert again.took_over == "first run"
    assert time.monotonic() - started < 5
    # a lock this process holds right now is still waited for
    held = StorageLock(uri, owner="holder", stale_after=600).acquire()
    try:
        with pytest.raises(LockTimeout):
            StorageLock(uri, owner="waiter", stale_after=600, poll_every=0.05, wait_timeout=0.3).acquire()
    finally:
        held.release()
