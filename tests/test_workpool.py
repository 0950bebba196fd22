"""Operating it like production: a real ``prefect server`` on loopback, process work pools, workers,
``prefect deploy --all`` from ``deployments/prefect.yaml`` and ``prefect deployment run`` with
the work-pool fan-out. Slow (a couple of minutes) but runs in CI; it stops everything it starts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
from conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Processes:
    """Background processes started by the test, each in its own process group, all stopped at the end."""

    def __init__(self, logs: Path):
        self.logs, self.started = logs, []

    def start(self, name: str, args: list[str], env: dict) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed in stop_all
        proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.started.append((proc, log))
        return proc

    def stop_all(self) -> None:
        for proc, _ in reversed(self.started):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.time() + 20
        for proc, log in self.started:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()


@contextmanager
def running_prefect_server(tmp_path: Path, ui: bool = False):
    """``prefect server start`` on a free loopback port with its own home and database (and its UI with ``ui``);
    yields (environment for the CLI and workers, the process starter, the logs folder)."""
    port = _free_port()
    home = tmp_path / "prefect-home"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "true" if ui else "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "1",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "INDUSFACTORY_HOME": str(REPO),
        "PYTHONPATH": str(REPO),
    }
    for key in ("PREFECT_PROFILES_PATH", "PREFECT_TEST_MODE", "PREFECT_UNIT_TEST_MODE"):
        env.pop(key, None)
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Processes(logs)
    procs.start(
        "server",
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), *([] if ui else ["--no-ui"])],
        env,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("prefect server did not start:\n" + (logs / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield env, procs, logs
    finally:
        procs.stop_all()


@pytest.fixture
def prefect_server(tmp_path):
    """``prefect server start`` on a free loopback port with its own home and database."""
    with running_prefect_server(tmp_path) as server:
        yield server


def _cli(env: dict, *args: str, timeout: int = 300) -> str:
    result = subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"prefect {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _logs_tail(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(logs.glob("*.log")))


def test_deploy_all_and_fan_out_to_two_workers(prefect_server, sample_root, tiny_model_path, tmp_path):
    env, procs, logs = prefect_server
    _cli(env, "work-pool", "create", "local-process", "--type", "process")
    # The GPU pool from its job template, as docs/OPERATIONS.md creates it.
    _cli(
        env,
        "work-pool",
        "create",
        "gpu-pool",
        "--type",
        "process",
        "--base-job-template",
        "deployments/pools/process.json",
    )
    _cli(env, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        deployments = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()}
    expected = {
        "generate-dataset/local",
        "generate-dataset/nightly",
        "generate-shards/gpu",
        "generate-shards/local",
        "ingest/local",
        "learn-concept/local",
        "learn-condition/local",
        "evaluate-dataset/local",
    }
    assert expected <= set(deployments), sorted(deployments)
    nightly = deployments["generate-dataset/nightly"]
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert all(d.enforce_parameter_schema for d in deployments.values())
    assert "config" in nightly.parameter_openapi_schema["properties"], "the UI renders the config as a form"
    for name, deployment in deployments.items():  # the run form: the short parameters first, the full config last
        properties = deployment.parameter_openapi_schema["properties"]
        ordered = sorted(properties, key=lambda p: properties[p]["position"])
        if name.startswith("generate-shards/"):
            assert ordered[0] == "config" and "catalog" in ordered, name  # a child run takes exact records
        else:
            assert ordered[0] == "dataset_name" and ordered[-2:] == ["config_file", "config"], name

    # One worker for the parent run, two "GPU" workers with a concurrency of one each.
    procs.start("worker-parent", [PREFECT, "worker", "start", "--pool", "local-process", "--name", "parent"], env)
    for gpu in ("0", "1"):
        procs.start(
            f"worker-gpu{gpu}",
            [PREFECT, "worker", "start", "--pool", "gpu-pool", "--limit", "1", "--name", f"gpu-{gpu}"],
            {**env, "INDUSFACTORY_WORKER_NAME": f"gpu-worker-{gpu}"},
        )

    factory = tmp_path / "factory"
    config = tiny_config(
        sample_root,
        factory,
        tiny_model_path,
        plan={"augmentations_per_image": 1, "images_per_driver": 4, "max_defect_free_images": 2},
        generation={"steps": 2, "shard_size": 2, "batch_size": 2},
        execution={
            "fan_out": "work_pool",
            "shard_deployment": "generate-shards/gpu",
            "shards_per_run": 1,
            "torch_threads": 1,
        },
    )
    params = json.dumps({"config": config.model_dump(mode="json")})
    try:
        out = _cli(
            env,
            "deployment",
            "run",
            "generate-dataset/local",
            "--params",
            params,
            "--watch",
            "--watch-timeout",
            "540",
            timeout=600,
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_logs_tail(logs)}") from None
    assert "Completed" in out, out + _logs_tail(logs)

    dataset = next((factory / "datasets" / "demo-cracks").glob("v-*"))
    manifest = json.loads((dataset / "manifest.json").read_text())
    frame = pd.read_parquet(dataset / "data")
    assert manifest["counts"]["samples"] == len(frame) == 8 and manifest["counts"]["shards"] == 4
    assert frame["sample_id"].is_unique
    workers = set(frame["worker"])
    assert workers == {"gpu-worker-0", "gpu-worker-1"}, f"shards must come from both GPU workers, got {workers}"
    assert not [p for p in dataset.rglob("*") if ".tmp-" in p.name]

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        artifacts = client.read_artifacts()
    children = [r for r in runs if r.deployment_id == deployments["generate-shards/gpu"].id]
    assert len(children) == 4 and all(r.state.is_completed() for r in children)
    parent = next(r for r in runs if r.deployment_id == deployments["generate-dataset/local"].id)
    assert all(r.parent_task_run_id for r in children), "children are linked to the parent run as subflows"
    parent_artifacts = {a.type for a in artifacts if a.flow_run_id == parent.id}
    assert {"markdown", "table", "progress"} <= parent_artifacts
    progress = [a for a in artifacts if a.type == "progress" and a.flow_run_id == parent.id]
    assert progress and progress[-1].data == 100.0
