"""Shared fixtures: a random tiny SD pipeline, small sample data, tiny configs, a real Prefect API."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test that applies ``execution.torch_threads`` must not change the thread count of the tests after it."""
    import sys

    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch else None
    yield
    torch = sys.modules.get("torch")
    if torch is not None and before is not None and torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """A randomly initialised tiny SD 1.x pipeline in diffusers layout (written once per session)."""
    from indusfactory.demo.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0)


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    from indusfactory.demo.sample_data import write_sample_data

    return write_sample_data(tmp_path_factory.mktemp("data") / "sample", n_defective=12, n_defect_free=4, size=64).root


def tiny_config(sample: Path, factory_root: Path, model: Path | str, **overrides):
    """A FactoryConfig that runs the whole chain in seconds on the tiny model."""
    from indusfactory.config import parse_config

    data = {
        "factory_root": str(factory_root),
        "source": {
            "coco_annotations": str(sample / "defective" / "annotations.json"),
            "images_dir": str(sample / "defective" / "images"),
            "defect_free_dir": str(sample / "defect_free"),
        },
        "base_model": {"pretrained": str(model)},
        "concept": {"steps": 2, "batch_size": 2},
        "condition": {"steps": 2, "batch_size": 2},
        "plan": {"augmentations_per_image": 1, "images_per_driver": 3, "max_defect_free_images": 2},
        "generation": {"steps": 2, "shard_size": 4, "batch_size": 3},
        "evaluation": {"enabled": False, "steps": 6, "finetune_steps": 3, "batch_size": 4},
    }
    for section, values in overrides.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return parse_config(data)


@pytest.fixture
def make_config(sample_root, tiny_model_path, tmp_path):
    def make(factory_root: Path | str | None = None, **overrides):
        return tiny_config(sample_root, factory_root or tmp_path / "factory", tiny_model_path, **overrides)

    return make


@pytest.fixture
def catalog(make_config):
    """The catalog of the sample data, ingested under the test's factory root."""
    from indusfactory.sources.ingest import catalog_folder_for, ingest

    config = make_config()
    return ingest(config.source, catalog_folder_for(config))


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API (temporary SQLite-backed server) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible endpoint over HTTP on loopback (moto's server), as s3fs's own tests use."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh bucket on the loopback endpoint; returns its ``s3://`` URI."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True)
    name = "test-" + request.node.name.lower().replace("_", "-")[:40]
    fs.mkdir(name)
    s3fs.S3FileSystem.clear_instance_cache()
    return f"s3://{name}"


@pytest.fixture
def s3_iam(s3_endpoint, monkeypatch):
    """IAM users on the loopback endpoint, and a context that turns its authentication on (off again after)."""
    import json
    from contextlib import contextmanager
    from types import SimpleNamespace

    import boto3
    import requests
    import s3fs

    iam = boto3.client("iam", endpoint_url=s3_endpoint)

    def user_with(actions: list[str]) -> tuple[str, str]:
        name = f"preflight-{len(iam.list_users()['Users'])}"
        iam.create_user(UserName=name)
        policy = iam.create_policy(
            PolicyName=name,
            PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
            ),
        )
        iam.attach_user_policy(UserName=name, PolicyArn=policy["Policy"]["Arn"])
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    @contextmanager
    def enforced(key_id: str, secret: str):
        requests.post(f"{s3_endpoint}/moto-api/reset-auth", data=b"0", timeout=10)
        try:
            with monkeypatch.context() as env:
                env.setenv("AWS_ACCESS_KEY_ID", key_id)
                env.setenv("AWS_SECRET_ACCESS_KEY", secret)
                s3fs.S3FileSystem.clear_instance_cache()
                yield
        finally:
            requests.post(f"{s3_endpoint}/moto-api/reset-auth", data=b"inf", timeout=10)
            s3fs.S3FileSystem.clear_instance_cache()

    return SimpleNamespace(user_with=user_with, enforced=enforced)


@pytest.fixture
def prepare_generation():
    """A function: config -> everything generation needs (catalog, 2-step models, plan, dataset URI), made
    with the library functions the tasks call, under the config's factory root."""
    from types import SimpleNamespace

    def prepare(config) -> SimpleNamespace:
        from indusfactory.generation.generate import GenerationContext
        from indusfactory.generation.plan import build_plan, plan_folder_for
        from indusfactory.learning.concept import concept_folder_for, train_concept
        from indusfactory.learning.condition import condition_folder_for, train_condition
        from indusfactory.publishing.publish import dataset_uri_for
        from indusfactory.sources.ingest import catalog_folder_for, ingest

        catalog = ingest(config.source, catalog_folder_for(config))
        concept = train_concept(config, catalog, concept_folder_for(config, catalog))
        condition = train_condition(config, catalog, concept, condition_folder_for(config, catalog, concept))
        plan = build_plan(config, catalog, plan_folder_for(config, catalog))
        ctx = GenerationContext(
            config=config, catalog_uri=catalog.uri, categories=catalog.categories, concept=concept, condition=condition
        )
        return SimpleNamespace(
            config=config,
            catalog=catalog,
            concept=concept,
            condition=condition,
            plan=plan,
            ctx=ctx,
            dataset_uri=dataset_uri_for(config, plan, concept, condition),
        )

    return prepare


def dockerfile_text(name: str) -> str:
    return (Path(__file__).resolve().parents[1] / "docker" / name).read_text()


def dockerfile_env(dockerfile: str) -> dict[str, str]:
    """The ``ENV`` key=value pairs of a Dockerfile (continuation lines joined)."""
    text = dockerfile.replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(dict(pair.split("=", 1) for pair in line[4:].split() if "=" in pair))
    return env


def race_behind_a_lock(script: str, config, lock: str, tmp_path: Path, timeout: float = 420) -> tuple[dict, dict]:
    """Run ``script`` (given ``config`` as JSON) in two processes, ``run-a`` and ``run-b``, against the test's
    Prefect API while the test holds the storage lock ``lock``; release it once both log that they wait for it.
    Returns each run's output and exit status."""
    import subprocess
    import sys
    import time

    from prefect.settings import PREFECT_API_URL

    from indusfactory.infra.locking import StorageLock

    repo = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_HOME": str(tmp_path / "home"),
        "PYTHONPATH": str(repo),
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    for key in ("PREFECT_TEST_MODE", "PREFECT_UNIT_TEST_MODE", "PREFECT_PROFILES_PATH"):
        env.pop(key, None)
    logs = {name: tmp_path / f"{name}.log" for name in ("run-a", "run-b")}
    gate = StorageLock(lock, owner="test-holder", stale_after=600).acquire()  # both runs must meet the lock
    procs = {}
    try:
        for name, log in logs.items():
            with open(log, "w") as out:
                procs[name] = subprocess.Popen(
                    [sys.executable, "-c", script, config.model_dump_json()],
                    cwd=repo,
                    env={**env, "INDUSFACTORY_WORKER_NAME": name},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
        deadline = time.time() + timeout
        while not all("held by test-holder" in log.read_text() for log in logs.values()):
            texts = "\n".join(log.read_text()[-3000:] for log in logs.values())
            assert time.time() < deadline and all(p.poll() is None for p in procs.values()), texts
            time.sleep(0.5)
    finally:
        gate.release()
        for proc in procs.values():
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return {name: log.read_text() for name, log in logs.items()}, {name: p.returncode for name, p in procs.items()}
