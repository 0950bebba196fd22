"""``indusfactory run`` as a real process, without PREFECT_API_URL (so it starts its own temporary Prefect
API), stopped by SIGINT and SIGTERM in training and in generation: it exits within ``STOP_SECONDS`` with
130 / 143 and a line saying how to resume, leaves no temporary Prefect server process and no partial
file, and the rerun resumes (training from its last checkpoint, generation from the shards written).

Before: SIGINT did not stop a training task within 15 s, a SIGTERM in generation hung (the flow waited for
the shard threads to finish their shard), and every killed run left its temporary Prefect API running."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STOP_SECONDS = 30
"""From the signal to the process's end (the stop itself takes about 2 s; the rest is a loaded CI machine)."""
START_SECONDS = 900
"""Until the run reaches the point where the signal is sent (imports, server start, ingest, training)."""


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    """One Prefect home for the runs of this module: its database is made (migrated) once."""
    return tmp_path_factory.mktemp("prefect-home")


def _start(config, tmp_path: Path, stage: str, name: str, home: Path) -> tuple[subprocess.Popen, Path]:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_defaults=True)))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        PREFECT_HOME=str(home),
        # the first start migrates a new database: minutes on a loaded CI machine
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=env.get(
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "900"
        ),
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    )
    log = tmp_path / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", str(path), "--stage", stage],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, log


def _wait_until(proc: subprocess.Popen, log: Path, condition, timeout: float = START_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before the signal (rc {proc.returncode}):\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run never reached the point of the signal:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


def _servers(proc: subprocess.Popen) -> list[psutil.Process]:
    """The temporary Prefect API processes the run started."""
    return [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if "prefect.server.api.server" in " ".join(p.cmdline())
    ]


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _stop(proc: subprocess.Popen, log: Path, signum: int) -> str:
    """Send ``signum``; assert the run ends within STOP_SECONDS, cleanly, and its temporary API with it."""
    servers = _servers(proc)
    assert len(servers) == 1, "the run started one temporary Prefect API"
    sent = time.monotonic()
    proc.send_signal(signum)
    try:
        proc.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still running {STOP_SECONDS} s after {signum!r}:\n{log.read_text()[-4000:]}")
    seconds = time.monotonic() - sent
    output = log.read_text()
    assert proc.returncode == 128 + signum, output[-4000:]
    assert f"stopped by {signal.Signals(signum).name}" in output and "run the same command again" in output
    assert "Traceback" not in output, output[-4000:]
    deadline = time.monotonic() + 10
    while not all(_gone(s) for s in servers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(s) for s in servers), "no temporary Prefect server is left behind"
    print(f"{signal.Signals(signum).name}: ended {seconds:.1f} s after the signal")
    return output


def _partial_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


def test_ctrl_c_and_sigterm_stop_training_within_seconds_and_the_rerun_resumes_from_its_checkpoint(
    make_config, tmp_path, prefect_home
):
    from indusfactory.layout import CHECKPOINT_FILE
    from indusfactory.learning.training import load_checkpoint

    config = make_config(
        concept={"steps": 100_000, "checkpoint_every": 2, "validation_images": 0},
        execution={"torch_threads": 1},
    )
    root = Path(config.factory_root)

    def checkpoint() -> Path | None:
        found = list(root.glob(f"models/concept/*.checkpoint/{CHECKPOINT_FILE}"))
        return found[0] if found else None

    proc, log = _start(config, tmp_path, "learn-concept", "first", prefect_home)
    _wait_until(proc, log, lambda: checkpoint() is not None)
    _stop(proc, log, signal.SIGINT)
    path = checkpoint()
    assert path is not None and not _partial_files(root)
    step = int(load_checkpoint(str(path.parent))["step"])

    proc, log = _start(config, tmp_path, "learn-concept", "rerun", prefect_home)
    _wait_until(proc, log, lambda: "resuming from the checkpoint at step" in log.read_text())
    assert f"resuming from the checkpoint at step {step} of 100000" in log.read_text()
    _stop(proc, log, signal.SIGTERM)
    assert not _partial_files(root)
    assert int(load_checkpoint(str(path.parent))["step"]) >= step


def _snapshot(paths: list[Path]) -> dict[str, tuple[int, str]]:
    return {str(p): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in paths}


def test_sigterm_stops_generation_within_seconds_and_the_rerun_keeps_the_shards_written(
    make_config, tmp_path, prefect_home
):
    config = make_config(
        generation={"steps": 40, "shard_size": 1, "batch_size": 1},
        execution={"torch_threads": 1},
    )
    root = Path(config.factory_root)

    def shards() -> list[Path]:
        return sorted(root.glob("datasets/*/*/data/*.parquet"))

    proc, log = _start(config, tmp_path, "generate-dataset", "first", prefect_home)
    _wait_until(proc, log, lambda: len(shards()) >= 1)
    _stop(proc, log, signal.SIGTERM)
    written = shards()
    planned = int(written[0].stem.rsplit("-of-", 1)[1])
    assert 1 <= len(written) < planned, "stopped mid-generation"
    assert not _partial_files(root)
    before = _snapshot(written)

    proc, log = _start(config, tmp_path, "generate-dataset", "rerun", prefect_home)
    assert proc.wait(timeout=START_SECONDS) == 0, log.read_text()[-4000:]
    assert _snapshot(written) == before, "the shards written before the stop were not generated again"
    manifest = json.loads(next(root.glob("datasets/*/*/manifest.json")).read_text())
    assert len(manifest["shards"]) == planned and manifest["counts"]["samples"] == manifest["counts"]["planned"]
