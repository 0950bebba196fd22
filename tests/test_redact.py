"""Library logs reach the run's logs; secrets are kept out of logs, artifacts, files and errors
(indusfactory/infra/redact.py and the log routing of tasks/_prefect.py)."""

from __future__ import annotations

import logging
import os
import re
import sys
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
