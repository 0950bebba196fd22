"""Operating it like production: work-pool job templates, Prefect results and cache records under the
factory root, storage locks around training, library logs in the run's logs, secrets kept out of
logs, artifacts, files and errors, the Docker images and the operator's guide."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path

import pytest
from prefect import flow, get_run_logger, task

from indusfactory.config import FactoryConfig
from tasks._prefect import factory_run

REPO = Path(__file__).resolve().parents[1]
POOLS = REPO / "deployments" / "pools"
PREFECT = str(Path(sys.executable).parent / "prefect")
PLACEHOLDER = re.compile(r"\{\{\s*([\w.$]+)\s*\}\}")


def _template(kind: str) -> dict:
    return json.loads((POOLS / f"{kind}.json").read_text())


def _placeholders(obj) -> set[str]:
    return set(PLACEHOLDER.findall(json.dumps(obj)))


def _defaults(template: dict) -> dict:
    return {name: spec["default"] for name, spec in template["variables"]["properties"].items() if "default" in spec}


def _prefect_default_template(kind: str) -> dict:
    """Prefect's own default base job template of a worker type (process: the installed worker; kubernetes,
    docker: the metadata of prefect-kubernetes and prefect-docker bundled with the Prefect server)."""
    if kind == "process":
        from prefect.workers.process import ProcessWorker

        return ProcessWorker.get_default_base_job_template()
    import prefect

    bundled = Path(prefect.__file__).parent / "server/api/collections_data/views/aggregate-worker-metadata.json"
    for collection in json.loads(bundled.read_text()).values():
        for worker in collection.values():
            if worker.get("type") == kind:
                return worker["default_base_job_configuration"]
    raise LookupError(kind)


def _dockerfile(name: str) -> str:
    return (REPO / "docker" / name).read_text()


def _env_of(dockerfile: str) -> dict[str, str]:
    """The ``ENV`` key=value pairs of a Dockerfile (continuation lines joined)."""
    text = dockerfile.replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(dict(pair.split("=", 1) for pair in line[4:].split() if "=" in pair))
    return env


# -- 1. work-pool job templates ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["process", "kubernetes", "docker"])
def test_pool_template_extends_prefects_default_and_declares_every_placeholder(kind):
    template = _template(kind)
    assert set(template) == {"job_configuration", "variables"}
    declared = set(template["variables"]["properties"])
    used = _placeholders(template["job_configuration"])
    assert used <= declared, f"undeclared variables in {kind}.json: {used - declared}"
    assert not declared - used, f"variables of {kind}.json that nothing uses: {declared - used}"
    default = _prefect_default_template(kind)
    assert set(default["job_configuration"]) <= set(template["job_configuration"]), "a default job field was dropped"
    assert set(default["variables"]["properties"]) <= declared, "a default variable was dropped"
    env = _defaults(template)["env"]
    assert env["HF_HOME"] and env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_process_template_renders_into_prefects_process_job_configuration(prefect_api):
    import asyncio

    from prefect.workers.process import ProcessJobConfiguration

    template = _template("process")
    configuration = asyncio.run(ProcessJobConfiguration.from_template_and_values(template, {}))
    assert configuration.env["HF_HOME"] == "/var/cache/indusfactory/huggingface"
    override = asyncio.run(ProcessJobConfiguration.from_template_and_values(template, {"env": {"HF_HOME": "/big"}}))
    assert override.env["HF_HOME"] == "/big" and "PYTORCH_CUDA_ALLOC_CONF" in override.env


def test_kubernetes_template_requests_a_gpu_and_mounts_the_model_cache():
    from prefect.utilities.templating import apply_values

    template = _template("kubernetes")
    rendered = apply_values(template["job_configuration"], _defaults(template))
    pod = rendered["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert "node_selector" in _placeholders(template["job_configuration"]["job_manifest"]) and pod["nodeSelector"] == {}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == "indusfactory-models"
    assert container["env"]["HF_HOME"].startswith(mounts["model-cache"] + "/")
    assert container["image"] == "indusfactory:gpu"
    assert container["envFrom"] == [{"secretRef": {"name": "indusfactory-credentials", "optional": True}}]
    assert pod["securityContext"]["runAsUser"] == int(
        re.search(r"useradd .*--uid (\d+)", _dockerfile("Dockerfile.gpu")).group(1)
    )
    custom = apply_values(
        template["job_configuration"], {**_defaults(template), "gpu_count": 2, "node_selector": {"pool": "a100"}}
    )
    custom_pod = custom["job_manifest"]["spec"]["template"]["spec"]
    assert custom_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert custom_pod["nodeSelector"] == {"pool": "a100"}


def test_docker_template_requests_a_gpu_of_the_gpu_image_with_a_model_cache_volume():
    from prefect.utilities.templating import apply_values

    template = _template("docker")
    rendered = apply_values(template["job_configuration"], _defaults(template))
    request = rendered["container_create_kwargs"]["device_requests"][0]
    assert request["capabilities"] == [["gpu"]] and request["device_ids"] == ["0"]
    gpu_dockerfile = _dockerfile("Dockerfile.gpu")
    tag = re.search(r"docker build -f docker/Dockerfile.gpu -t (\S+) \.", gpu_dockerfile).group(1)
    assert rendered["image"] == tag
    volume, mount = rendered["volumes"][0].split(":")[:2]
    assert volume == "indusfactory-models" and f'VOLUME ["{mount}"]' in gpu_dockerfile
    assert rendered["env"]["HF_HOME"] == _env_of(gpu_dockerfile)["HF_HOME"]
    assert rendered["env"]["HF_HOME"].startswith(mount + "/")


def test_templates_are_accepted_by_a_real_server_and_a_broken_one_is_not(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "home")}
    suffix = uuid.uuid4().hex[:6]
    for kind in ("process", "kubernetes", "docker"):
        result = subprocess.run(
            [
                PREFECT,
                "work-pool",
                "create",
                f"gpu-{kind}-{suffix}",
                "--type",
                kind,
                "--base-job-template",
                str(POOLS / f"{kind}.json"),
            ],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    with get_client(sync_client=True) as client:
        for kind in ("process", "kubernetes", "docker"):
            pool = client.read_work_pool(f"gpu-{kind}-{suffix}")
            assert pool.type == kind and pool.base_job_template == _template(kind)

    broken = _template("process")
    broken["job_configuration"]["env"] = "{{ not_declared }}"
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    result = subprocess.run(
        [PREFECT, "work-pool", "create", f"broken-{suffix}", "--type", "process", "--base-job-template", str(path)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "not_declared" in result.stdout + result.stderr


# -- 2. Prefect results and cache records under the factory root -----------------------------------------


def _task_states(flow_state) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = flow_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}


def _tree(path: Path) -> set[str]:
    return {str(p) for p in path.rglob("*")} if path.exists() else set()


def test_results_and_cache_records_live_under_the_factory_root(prefect_api, make_config, tmp_path):
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    from flows.ingest import ingest

    config = make_config()
    results = Path(config.factory_root) / "prefect-results"
    default_storage = Path(PREFECT_RESULTS_LOCAL_STORAGE_PATH.value())
    before = _tree(default_storage)

    first = ingest(config=config, return_state=True)
    assert first.result().reused is False and _task_states(first) == {"preflight": "Completed", "ingest": "Completed"}
    records = [p for p in results.iterdir() if p.is_file()]
    assert len(records) == 1, "the cache record is written under <factory_root>/prefect-results with the output"
    record = json.loads(records[0].read_text())
    assert record["metadata"]["storage_key"] == str(records[0])
    assert json.loads(record["result"])["data"]["reused"] is True, "a later run that hits it reuses the catalog"
    assert _tree(default_storage) == before, "nothing is written to Prefect's default local storage"

    # Another machine: its own (empty) Prefect storage, the same factory root -> a cache hit, nothing written.
    mtimes = {p: p.stat().st_mtime_ns for p in Path(config.factory_root).rglob("*")}
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path / "other-machine"}):
        second = ingest(config=config, return_state=True)
    assert _task_states(second) == {"preflight": "Completed", "ingest": "Cached"}
    assert second.result().fingerprint == first.result().fingerprint and second.result().reused
    assert {p: p.stat().st_mtime_ns for p in Path(config.factory_root).rglob("*")} == mtimes
    assert not (tmp_path / "other-machine").exists() and _tree(default_storage) == before

    # The record is only trusted while the output exists: a deleted catalog is rebuilt.
    import shutil

    shutil.rmtree(Path(config.factory_root) / "catalog")
    third = ingest(config=config, return_state=True)
    assert _task_states(third) == {"preflight": "Completed", "ingest": "Completed"} and third.result().reused is False


def test_results_on_an_s3_factory_root(prefect_api, make_config, s3_bucket):
    import s3fs

    from flows.ingest import ingest

    config = make_config(factory_root=f"{s3_bucket}/factory")
    ingest(config=config)
    second = ingest(config=config, return_state=True)
    assert _task_states(second) == {"preflight": "Completed", "ingest": "Cached"}
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    stored = fs.find(f"{s3_bucket}/factory/prefect-results")
    assert len(stored) == 1 and json.loads(json.loads(fs.cat_file(stored[0]))["result"])["data"]["reused"]


# -- 3. storage locks ------------------------------------------------------------------------------------


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
    from indusfactory.infra.locking import StorageLock, lock_uri

    uri = lock_uri(lock_root, "learn-concept-abc")
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
    from indusfactory.infra.locking import LockTimeout, StorageLock, lock_uri

    uri = lock_uri(lock_root, "learn-concept-window")
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
    from indusfactory.infra.locking import LockTimeout, StorageLock, lock_uri

    uri = lock_uri(lock_root, "learn-condition-def")
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
    from indusfactory.infra.locking import LockInfo, StorageLock, lock_uri

    uri = lock_uri(str(tmp_path), "x")
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
    from prefect.settings import PREFECT_API_URL

    from indusfactory.infra.locking import StorageLock, lock_uri
    from indusfactory.infra.storage import basename as storage_basename
    from indusfactory.learning.concept import concept_uri_for
    from indusfactory.sources.ingest import catalog_uri_for, ingest

    config = make_config(execution={"torch_threads": 1})
    catalog = ingest(config.source, catalog_uri_for(config))
    uri = lock_uri(config.factory_root, f"learn-concept-{storage_basename(concept_uri_for(config, catalog))}")
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_HOME": str(tmp_path / "home"),
        "PYTHONPATH": str(REPO),
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    for key in ("PREFECT_TEST_MODE", "PREFECT_UNIT_TEST_MODE", "PREFECT_PROFILES_PATH"):
        env.pop(key, None)
    logs = {name: tmp_path / f"{name}.log" for name in ("run-a", "run-b")}
    gate = StorageLock(uri, owner="test-holder", stale_after=600).acquire()  # both runs must meet the lock
    procs = {}
    try:
        for name, log in logs.items():
            with open(log, "w") as out:
                procs[name] = subprocess.Popen(
                    [sys.executable, "-c", SCRIPT, config.model_dump_json()],
                    cwd=REPO,
                    env={**env, "INDUSFACTORY_WORKER_NAME": name},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
        deadline = time.time() + 420
        while not all("held by test-holder" in log.read_text() for log in logs.values()):
            assert time.time() < deadline, "\n".join(log.read_text()[-3000:] for log in logs.values())
            assert all(p.poll() is None for p in procs.values()), "\n".join(
                log.read_text()[-3000:] for log in logs.values()
            )
            time.sleep(0.5)
    finally:
        gate.release()
        for proc in procs.values():
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    outputs = {name: log.read_text() for name, log in logs.items()}
    assert all(p.returncode == 0 for p in procs.values()), outputs
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
    from indusfactory.infra.locking import lock_uri
    from indusfactory.infra.storage import basename as storage_basename
    from indusfactory.learning.concept import concept_uri_for
    from indusfactory.sources.ingest import catalog_uri_for, ingest

    config = make_config(execution={"lock_stale_seconds": 120})
    catalog = ingest(config.source, catalog_uri_for(config))
    uri = lock_uri(config.factory_root, f"learn-concept-{storage_basename(concept_uri_for(config, catalog))}")
    storage.write_bytes_atomic(uri, _stale_lock("gpu-box-gpu3 pid 4242", age=3600))
    started = time.monotonic()
    record = learn_concept(config=config)
    assert not record.reused and time.monotonic() - started < 120
    assert not storage.exists(uri)


# -- 4. logs and secrets ---------------------------------------------------------------------------------


@task(name="leaky", retries=0, cache_key_fn=lambda context, parameters: f"leaky-{uuid.uuid4().hex}")
def leaky_task(config: FactoryConfig) -> None:
    token, password = os.environ["HF_TOKEN"], os.environ["FACTORY_DB_PASSWORD"]
    logging.getLogger("indusfactory.leak").warning(
        "library: token %s, url s3://AKIAEXAMPLE:%s@bucket/key", token, password
    )
    get_run_logger().info(f"task: session {os.environ['AWS_SESSION_TOKEN']}")
    raise PermissionError(f"access denied for https://factory:{password}@registry.example/v2 (token {token})")


@flow(name="leaky")
def leaky_flow(config: FactoryConfig) -> None:
    with factory_run(config) as run:
        run(leaky_task)(config)


def _all_pages(read, **kwargs) -> list:
    items, offset = [], 0
    while True:
        page = read(**kwargs, limit=200, offset=offset)
        items += page
        if len(page) < 200:
            return items
        offset += len(page)


def _what_prefect_holds(client, flow_run_ids: list) -> tuple[list, list[str]]:
    """The logs of these flow runs, and every text the API keeps about them (logs, artifacts, states)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    runs = FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids))
    logs = _all_pages(client.read_logs, log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_run_ids)))
    texts = [f"{log.name} {log.message}" for log in logs]
    texts += [f"{a.key} {a.description} {a.data}" for a in _all_pages(client.read_artifacts, flow_run_filter=runs)]
    for run in _all_pages(client.read_task_runs, flow_run_filter=runs) + client.read_flow_runs(flow_run_filter=runs):
        texts += [f"{run.name} {run.state.name} {run.state.message}"]
        texts += [
            f"{s.name} {s.message}"
            for s in (
                client.read_task_run_states(run.id) if hasattr(run, "task_key") else client.read_flow_run_states(run.id)
            )
        ]
    return logs, texts


def _files_under(root: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_library_logs_reach_the_run_and_no_secret_reaches_logs_artifacts_files_or_errors(
    prefect_api, make_config, monkeypatch, tmp_path
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTextSearch
    from prefect.logging.handlers import APILogWorker

    from flows.generate_dataset import generate_dataset
    from flows.ingest import ingest
    from indusfactory.infra.errors import BadInputError

    planted = {
        "HF_TOKEN": f"hf_{uuid.uuid4().hex}",
        "AWS_SESSION_TOKEN": f"FwoGZXIvYXdzE{uuid.uuid4().hex}",
        "FACTORY_DB_PASSWORD": f"pw{uuid.uuid4().hex}",
    }
    for name, value in planted.items():
        monkeypatch.setenv(name, value)
    url_secret = f"wJalrXUtnFEMI{uuid.uuid4().hex}"
    secrets = [*planted.values(), url_secret]

    # A real run of the whole chain with the secrets in its environment: trains, generates, publishes.
    config = make_config()
    states = [generate_dataset(config=config, return_state=True)]
    assert states[0].is_completed()

    # Credentials in a config URI are refused before anything is written, and not repeated.
    bad = make_config(
        factory_root=tmp_path / "refused", source={"images_dir": f"s3://AKIAEXAMPLE:{url_secret}@inspection/images"}
    )
    states.append(ingest(config=bad, return_state=True))
    with pytest.raises(BadInputError) as refused:
        states[-1].result()
    assert "source.images_dir" in str(refused.value) and "credentials" in str(refused.value)
    assert not (tmp_path / "refused").exists()

    # A task that logs secrets (library logger and run logger) and fails with them in its message.
    states.append(leaky_flow(config=config, return_state=True))
    with pytest.raises(PermissionError) as failed:
        states[-1].result()
    assert "access denied for https://***@registry.example/v2" in str(failed.value)

    errors = ["".join(traceback.format_exception(e.value)) for e in (refused, failed)]
    APILogWorker.drain_all(timeout=30)  # logs are sent in the background: all of them, before reading
    with get_client(sync_client=True) as client:
        logs, held = _what_prefect_holds(client, [s.state_details.flow_run_id for s in states])
        found = {
            secret: client.read_logs(log_filter=LogFilter(text=LogFilterTextSearch(query=f'"{secret}"')))
            for secret in secrets
        }
    files = _files_under(Path(config.factory_root))
    names = {p.name for p, _ in files}
    assert {"manifest.json", "README.md", "record.json", "catalog.json"} <= names
    assert any("prefect-results" in str(p) for p, _ in files)
    for secret in secrets:
        assert not found[secret], f"{secret[:6]}... in the Prefect logs"
        assert not [t for t in errors + held if secret in t], f"{secret[:6]}... leaked"
        assert not [p for p, data in files if secret.encode() in data], f"{secret[:6]}... written to disk"

    # The scrubbed lines are there (so the scan above looked at them), library loggers included.
    by_logger: dict[str, list[str]] = {}
    for log in logs:
        by_logger.setdefault(log.name, []).append(log.message)
    assert any("library: token ***, url s3://***@bucket/key" in m for m in by_logger.get("indusfactory.leak", []))
    assert any("task: session ***" in m for m in by_logger.get("prefect.task_runs", []))
    assert any("access denied for https://***@registry.example" in m for m in by_logger.get("prefect.task_runs", []))
    assert any("trained in" in m for m in by_logger.get("indusfactory.concept", [])), sorted(by_logger)


def test_library_loggers_are_routed_and_quiet_outside_runs(recwarn):
    from prefect.logging.handlers import APILogHandler

    import tasks._prefect  # noqa: F401 - routes the library loggers on import
    from tasks._prefect import LIBRARY_LOGGERS

    assert {"indusfactory", "diffusers", "transformers"} <= set(LIBRARY_LOGGERS)
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        assert any(isinstance(h, APILogHandler) for h in logger.handlers), name
        assert logger.level != logging.NOTSET, f"{name} has a level of its own (ours unless one was set)"
    assert logging.getLogger("indusfactory").getEffectiveLevel() == logging.INFO
    logging.getLogger("indusfactory.outside").warning("outside any run")
    assert not [w for w in recwarn if "without a flow run id" in str(w.message)]


def test_redaction_of_environment_values_and_url_credentials():
    from indusfactory.infra import redact

    env = {
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY",
        "HF_TOKEN": "hf_abcdefghijklmnop",
        "SERVICE_PASSWORD": "correct-horse",
        "TOKENIZERS_PARALLELISM": "false",
        "MY_API_TOKEN_TTL": "3600",
        "PATH": "/usr/bin",
    }
    text = (
        "key wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY token hf_abcdefghijklmnop pw correct-horse "
        "s3://AKIA:s3cret@bucket/x https://user:p%40ss@host:8443/y false 3600 /usr/bin http://host:80/a@b"
    )
    assert redact.scrub(text, env) == (
        "key *** token *** pw *** s3://***@bucket/x https://***@host:8443/y false 3600 /usr/bin http://host:80/a@b"
    )
    assert redact.uri_credentials({"a": {"b": "s3://k:s@b/x", "c": ["file:///x", "https://u:p@h"]}}) == [
        "a.b",
        "a.c[1]",
    ]
    inner = ValueError("inner correct-horse")
    outer = FileNotFoundError(2, "no file", "/data/correct-horse/x.png")
    outer.__cause__ = inner
    os.environ["INDUSFACTORY_TEST_PASSWORD"] = "correct-horse"
    try:
        redact.scrub_exception(outer)
    finally:
        del os.environ["INDUSFACTORY_TEST_PASSWORD"]
    assert "correct-horse" not in "".join(traceback.format_exception(outer))
    assert isinstance(outer, FileNotFoundError) and outer.filename == "/data/***/x.png"


# -- 5. docker images ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Dockerfile.gpu", "Dockerfile.cpu"])
def test_images_are_non_root_with_the_model_cache_in_a_volume(name):
    dockerfile = _dockerfile(name)
    env = _env_of(dockerfile)
    user = re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)
    assert user and user[-1] not in ("0", "root")
    volumes = re.findall(r'^VOLUME \["([^"]+)"\]', dockerfile, re.MULTILINE)
    assert any(env["HF_HOME"].startswith(v + "/") for v in volumes), "the model cache lives in a volume"
    workdir = re.findall(r"^WORKDIR (\S+)", dockerfile, re.MULTILINE)[-1]
    assert env["INDUSFACTORY_HOME"] == workdir, "deployments/prefect.yaml's pull step cds into INDUSFACTORY_HOME"
    for arg in ("TORCH_VERSION", "TORCH_INDEX", "PREFECT_VERSION"):
        assert re.search(rf"^ARG {arg}=\S+", dockerfile, re.MULTILINE), arg
    assert re.search(r"pip install \. ", dockerfile), "the package itself is installed"
    assert re.search(r'pip install --index-url "\$\{TORCH_INDEX\}" "torch==\$\{TORCH_VERSION\}"', dockerfile)
    prefect_pin = re.search(r"^prefect-version: (\S+)", (REPO / "deployments/prefect.yaml").read_text(), re.M)
    assert re.search(rf"^ARG PREFECT_VERSION={re.escape(prefect_pin.group(1))}$", dockerfile, re.MULTILINE)


def test_gpu_image_is_a_cuda_runtime_with_cuda_torch():
    dockerfile = _dockerfile("Dockerfile.gpu")
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)", dockerfile, re.MULTILINE).group(1)
    assert base.startswith("nvidia/cuda:") and "runtime" in base
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}", dockerfile, re.MULTILINE)
    cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)", base).groups()
    assert re.search(
        rf"^ARG TORCH_INDEX=https://download.pytorch.org/whl/cu{''.join(cuda)}$", dockerfile, re.MULTILINE
    ), "torch wheels for the CUDA version of the base image"


def test_dockerignore_keeps_the_context_small():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "factory", "tests"} <= ignored
    copied = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", _dockerfile("Dockerfile.gpu"), re.MULTILINE)
    for sources in copied:
        for source in sources.split():
            assert source not in ignored and (REPO / source).exists(), source


# -- 6. the operator's guide -------------------------------------------------------------------------------


def test_operations_guide_matches_the_repository():
    import yaml

    guide = (REPO / "docs" / "OPERATIONS.md").read_text()
    assert "docs/OPERATIONS.md" in (REPO / "README.md").read_text()
    for kind in ("process", "kubernetes", "docker"):
        assert f"--base-job-template deployments/pools/{kind}.json" in guide
    deployments = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["deployments"]
    import importlib

    def flow_name(entrypoint: str) -> str:
        path, function = entrypoint.split(":")
        return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), function).name

    names = {f"{flow_name(d['entrypoint'])}/{d['name']}" for d in deployments}
    mentioned = set(re.findall(r"prefect deployment run ([\w-]+/[\w-]+)", guide))
    assert mentioned and mentioned <= names, mentioned - names
    pools = {d["work_pool"]["name"] for d in deployments}
    assert all(f"--pool {pool}" in guide for pool in pools)
    for key in ("fan_out", "shard_deployment", "shards_per_run", "lock_stale_seconds", "prefect-results"):
        assert key in guide, key
    for command in re.findall(r"docker build -f (docker/\S+)", guide):
        assert (REPO / command).is_file()
