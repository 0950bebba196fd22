"""Prefect results and cache records live under the factory root (tasks/_prefect.py), locally and on S3."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POOLS = REPO / "deployments" / "pools"
PREFECT = str(Path(sys.executable).parent / "prefect")
PLACEHOLDER = re.compile(r"\{\{\s*([\w.$]+)\s*\}\}")


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
