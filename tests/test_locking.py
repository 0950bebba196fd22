"""Storage locks (indusfactory/infra/locking.py): one holder at a time locally and on S3, heartbeats, a holder
that died on this host taken over at once, anything uncertain waited for; training under Prefect takes them."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import race_behind_a_lock

from indusfactory.infra.locking import LockInfo, LockTimeout, StorageLock, holder_died_here, process_identity
from indusfactory.layout import FactoryLayout

REPO = Path(__file__).resolve().parents[1]
POOLS = REPO / "deployments" / "pools"
PREFECT = str(Path(sys.executable).parent / "prefect")
PLACEHOLDER = re.compile(r"\{\{\s*([\w.$]+)\s*\}\}")


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
    uri = FactoryLayout.of(str(tmp_path)).lock("train-concept")
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
    uri = FactoryLayout.of(str(tmp_path)).lock("zombie")
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
    uri = FactoryLayout.of(str(tmp_path)).lock("planted")
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
    uri = FactoryLayout.of(str(tmp_path)).lock("dataset-demo-v1")
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


def _stale_lock(owner: str, age: float) -> bytes:
    from indusfactory.infra.locking import LockInfo

    now = time.time()
    return LockInfo(
        owner=owner,
        token=uuid.uuid4().hex,
        host="gone",
        pid=1,
        acquired_at=now - age - 60,
        heartbeat_at=now - age,
        stale_after=600,
    ).dumps()


@pytest.fixture(params=["local", "s3"])
def lock_root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "factory")
    import s3fs

    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = f"locks-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True).mkdir(bucket)
    s3fs.S3FileSystem.clear_instance_cache()
    return f"s3://{bucket}/factory"


def test_lock_excludes_concurrent_holders(lock_root):
    from indusfactory.infra.locking import StorageLock

    uri = FactoryLayout.of(lock_root).lock("learn-concept-abc")
    inside, most, guard = [], [0], threading.Lock()

    def hold(i: int) -> None:
        with StorageLock(uri, owner=f"holder-{i}", stale_after=30, poll_every=0.02):
            with guard:
                inside.append(i)
                most[0] = max(most[0], len(inside))
            time.sleep(0.15)
            with guard:
                inside.remove(i)

    threads = [threading.Thread(target=hold, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1


def test_a_lock_just_created_by_another_thread_is_not_taken_for_a_dead_one(lock_root):
    """The window between a holder's create and its return (a slow S3 response) must not look like a lock left
    behind in this process: the CI failure of a run where two of four threads held the lock at once."""
    from indusfactory.infra.locking import LockTimeout, StorageLock

    uri = FactoryLayout.of(lock_root).lock("learn-concept-window")
    slow = StorageLock(uri, owner="slow-creator", stale_after=30, poll_every=0.02)
    created = threading.Event()
    create = slow._backend.create

    def create_then_stall(data: bytes):
        version = create(data)
        created.set()
        time.sleep(0.6)
        return version

    slow._backend.create = create_then_stall
    thread = threading.Thread(target=slow.acquire)
    thread.start()
    assert created.wait(10)
    waiter = StorageLock(uri, owner="waiter", stale_after=30, poll_every=0.02, wait_timeout=0.3)
    with pytest.raises(LockTimeout, match="slow-creator"):
        waiter.acquire()
    thread.join()
    assert slow.took_over is None and not slow.lost
    slow.release()


def test_lock_heartbeat_keeps_a_live_holder_and_a_stale_lock_is_taken_over(lock_root, caplog):
    from indusfactory.infra import storage
    from indusfactory.infra.locking import LockTimeout, StorageLock

    uri = FactoryLayout.of(lock_root).lock("learn-condition-def")
    holder = StorageLock(uri, owner="live-worker", stale_after=2.0, poll_every=0.05).acquire()
    try:
        waiter = StorageLock(uri, owner="waiter", stale_after=2.0, poll_every=0.05, wait_timeout=5.0)
        with caplog.at_level(logging.INFO, logger="indusfactory.locking"), pytest.raises(LockTimeout):
            waiter.acquire()  # 5 s > 2 x stale_after: only the heartbeat kept the lock alive
        assert f"waiting for {uri} held by live-worker" in caplog.text
        assert not holder.lost
    finally:
        holder.release()
    assert not storage.exists(uri), "released locks are deleted"

    storage.write_bytes_atomic(uri, _stale_lock("crashed-worker", age=3600))
    with caplog.at_level(logging.WARNING, logger="indusfactory.locking"):
        with StorageLock(uri, owner="new-worker", stale_after=600) as lock:
            assert lock.took_over == "crashed-worker"
            assert json.loads(storage.read_bytes(uri))["owner"] == "new-worker"
    assert f"took over stale lock {uri} from crashed-worker" in caplog.text


def test_a_lock_with_a_frozen_heartbeat_is_taken_over_by_the_waiters_own_clock(tmp_path):
    """A holder whose clock runs far ahead still loses a dead lock: the waiter times the silence itself."""
    from indusfactory.infra import storage
    from indusfactory.infra.locking import LockInfo, StorageLock

    uri = FactoryLayout.of(str(tmp_path)).lock("x")
    future = time.time() + 3600
    storage.write_bytes_atomic(
        uri, LockInfo(owner="skewed", token="t", acquired_at=future, heartbeat_at=future, stale_after=0.3).dumps()
    )
    started = time.monotonic()
    with StorageLock(uri, owner="me", stale_after=0.3, poll_every=0.05) as lock:
        assert lock.took_over == "skewed" and 0.3 <= time.monotonic() - started < 5


SCRIPT = """
import json, sys
from indusfactory.config import parse_config
from flows.learn_concept import learn_concept
record = learn_concept(config=parse_config(json.loads(sys.argv[1])))
print("RESULT " + json.dumps({"reused": record.reused, "fingerprint": record.fingerprint}), flush=True)
"""


def test_two_runs_of_one_config_train_it_once(prefect_api, make_config, tmp_path):
    """Two processes run learn-concept on the same config at the same time: one trains, the other waits for
    its lock and then reuses the model."""
    from prefect.client.orchestration import get_client

    from indusfactory.learning.concept import concept_folder_for
    from indusfactory.sources.ingest import catalog_folder_for, ingest

    config = make_config(execution={"torch_threads": 1})
    catalog = ingest(config.source, catalog_folder_for(config))
    uri = FactoryLayout.of(config.factory_root).lock(f"learn-concept-{concept_folder_for(config, catalog).fingerprint}")
    outputs, status = race_behind_a_lock(SCRIPT, config, uri, tmp_path)
    assert all(code == 0 for code in status.values()), outputs
    results = {name: json.loads(re.search(r"RESULT (.*)", out).group(1)) for name, out in outputs.items()}
    assert sorted(r["reused"] for r in results.values()) == [False, True], results
    assert len({r["fingerprint"] for r in results.values()}) == 1
    models = [p for p in (Path(config.factory_root) / "models" / "concept").iterdir()]
    assert [p.name for p in models] == [results["run-a"]["fingerprint"]], "one model folder, nothing left over"
    reuser = next(name for name, r in results.items() if r["reused"])
    assert "not trained again" in outputs[reuser]

    # The wait is in the runs' Prefect logs, not only on the workers' consoles.
    from prefect.client.schemas.filters import LogFilter, LogFilterTextSearch

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(text=LogFilterTextSearch(query='"held by test-holder"')))
    waits = {log.flow_run_id for log in logs if f"waiting for {uri} held by test-holder" in log.message}
    assert len(waits) == 2, "each run's wait is in its own Prefect logs"
    assert not Path(uri).exists()


def test_a_stale_training_lock_left_by_a_crashed_worker_is_taken_over(prefect_api, make_config):
    from flows.learn_concept import learn_concept
    from indusfactory.infra import storage
    from indusfactory.learning.concept import concept_folder_for
    from indusfactory.sources.ingest import catalog_folder_for, ingest

    config = make_config(execution={"lock_stale_seconds": 120})
    catalog = ingest(config.source, catalog_folder_for(config))
    uri = FactoryLayout.of(config.factory_root).lock(f"learn-concept-{concept_folder_for(config, catalog).fingerprint}")
    storage.write_bytes_atomic(uri, _stale_lock("gpu-box-gpu3 pid 4242", age=3600))
    started = time.monotonic()
    record = learn_concept(config=config)
    assert not record.reused and time.monotonic() - started < 120
    assert not storage.exists(uri)
