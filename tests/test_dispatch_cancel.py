"""A work-pool parent that stops cancels its unfinished ``generate-shards`` children (issue 16), on a real
Prefect API: a ``generate-shards`` deployment without any worker, so the children the dispatcher creates
stay Scheduled; one of them is marked Completed and one Running, then the parent stops (a stop request,
Prefect's TerminationSignal, an error while it waits, a crash). The running child ends Cancelling (its
worker would stop it), the scheduled ones Cancelled, the Completed one stays Completed."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import tiny_config
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.exceptions import TerminationSignal
from prefect.states import Completed, Running

from flows.generate_dataset import generate_dataset
from indusfactory.infra import stopping
from indusfactory.schema import CatalogRecord, ModelRecord, PlanRecord
from tasks import dispatch


@pytest.fixture(autouse=True)
def _no_stop_left(monkeypatch):
    monkeypatch.setattr(dispatch, "POLL_SECONDS", 0.2, raising=False)  # polls fast
    stopping.reset()
    yield
    stopping.reset()


@pytest.fixture
def shard_deployment(prefect_api) -> tuple[str, uuid.UUID]:
    """A ``generate-shards`` deployment that no worker serves: its runs stay Scheduled. ('flow/name', id)."""
    name = f"no-worker-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("generate-shards")
        deployment_id = client.create_deployment(flow_id, name, entrypoint="flows/generate_shards.py:generate_shards")
    return f"generate-shards/{name}", deployment_id


def _dispatch_arguments(tmp_path: Path, deployment: str, shards: int) -> dict:
    config = tiny_config(
        tmp_path / "sample",
        tmp_path / "factory",
        "embedded:tiny-sd",
        execution={"fan_out": "work_pool", "shard_deployment": deployment, "shards_per_run": 1},
    )
    model = {"uri": str(tmp_path / "model"), "fingerprint": "f", "base_model": "embedded:tiny-sd", "steps": 2}
    return {
        "config": config,
        "catalog": CatalogRecord(
            uri=str(tmp_path / "catalog"),
            **{"fingerprint": "f", "content_fingerprint": "f", "categories": []},
            **dict.fromkeys(("found", "ingested", "quarantined", "duplicates", "defective", "defect_free"), 0),
        ),
        "plan": PlanRecord(uri=str(tmp_path / "plan"), fingerprint="f", samples=4 * shards, shards=shards),
        "concept": ModelRecord(kind="concept", seconds=1.0, **model),
        "condition": ModelRecord(kind="condition", method="controlnet", seconds=1.0, **model),
        "dataset_uri": str(tmp_path / "dataset"),
    }


def _children(deployment_id: uuid.UUID, count: int, timeout: float = 60.0) -> list:
    """The deployment's runs once there are ``count`` of them, oldest first."""
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            )
            if len(runs) >= count or time.monotonic() > deadline:
                return sorted(runs, key=lambda run: run.created)
            time.sleep(0.1)


def _states(deployment_id: uuid.UUID) -> dict[uuid.UUID, StateType]:
    return {run.id: run.state.type for run in _children(deployment_id, 0)}


def _finish_one_and_start_one(runs: list) -> None:
    """What workers would leave: the first child Completed, the second Running; the others stay Scheduled."""
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(runs[0].id, Completed(), force=True)
        client.set_flow_run_state(runs[1].id, Running(), force=True)


def _assert_cancelled(runs: list, states: dict) -> None:
    assert states[runs[0].id] == StateType.COMPLETED, "a Completed child is never touched"
    assert states[runs[1].id] == StateType.CANCELLING, "a running child is Cancelling: its worker stops it"
    assert [states[run.id] for run in runs[2:]] == [StateType.CANCELLED] * 2, "scheduled children are Cancelled"


STOPS = {
    "stop request": stopping.StopRequested,  # SIGINT / SIGTERM in the flow's process: the stop flag
    "SIGTERM from a worker": TerminationSignal,  # what Prefect raises in the parent a worker stops (a cancel)
    "error while waiting": RuntimeError,
}


@pytest.mark.parametrize("stop", list(STOPS))
def test_a_stopped_work_pool_parent_cancels_its_unfinished_children_and_keeps_a_completed_one(
    shard_deployment, tmp_path, monkeypatch, caplog, stop
):
    deployment, deployment_id = shard_deployment
    arguments = _dispatch_arguments(tmp_path, deployment, shards=4)
    outcome: list[BaseException] = []

    @flow(name="dispatch-parent")  # no hooks: the dispatcher itself cancels what it started
    def parent() -> None:
        dispatch.dispatch_shard_runs(**arguments)

    def run_parent() -> None:  # in a thread, so that a parent that never stops fails the test instead of hanging it
        try:
            parent()
        except BaseException as exc:  # noqa: BLE001 - the outcome to check
            outcome.append(exc)

    thread = threading.Thread(target=run_parent, daemon=True)
    thread.start()
    runs = _children(deployment_id, 4)
    assert len(runs) == 4, "one child run per shard, all Scheduled (no worker)"
    _finish_one_and_start_one(runs)
    time.sleep(3 * dispatch.POLL_SECONDS)  # time for the parent to see it Completed; it waits on for the others
    assert thread.is_alive()
    if stop == "stop request":
        stopping.request_stop(signal.SIGTERM)  # what the signal handlers do first, in any thread's next check
    else:  # raised where the parent waits: by Prefect's SIGTERM handler, or by a call to an API gone away
        failure = TerminationSignal(signal.SIGTERM) if stop == "SIGTERM from a worker" else RuntimeError("API gone")
        monkeypatch.setattr(dispatch, "_read_runs", _failing_once(dispatch._read_runs, failure))
    thread.join(timeout=60)
    assert not thread.is_alive(), "the parent still waits for its children after the stop"

    assert len(outcome) == 1 and isinstance(outcome[0], STOPS[stop]), outcome
    _assert_cancelled(runs, _states(deployment_id))
    assert "cancelled 3 of 4 child generate-shards runs" in caplog.text


def _failing_once(read, failure: BaseException):
    """``_read_runs`` that fails in the wait, then works again for the clean-up (the API back a moment later)."""
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise failure
        return read(*args, **kwargs)

    return flaky


def test_a_crashed_generate_dataset_run_cancels_its_unfinished_child_runs_through_its_hooks(shard_deployment, caplog):
    """The flow hooks, for what the dispatcher's own clean-up did not reach (a cancel whose hooks the worker
    runs after the process was stopped, a crash): the children are found through the API as subflows."""
    deployment, deployment_id = shard_deployment
    assert generate_dataset.on_cancellation_hooks == [dispatch.cancel_child_runs]
    assert generate_dataset.on_crashed_hooks == [dispatch.cancel_child_runs]

    children: list = []

    @flow(name="crashing-parent", on_crashed=generate_dataset.on_crashed_hooks)
    def parent() -> None:
        children.extend(run_deployment(deployment, parameters={}, timeout=0) for _ in range(4))  # its subflows
        _finish_one_and_start_one(children)
        raise stopping.StopRequested(signal.SIGTERM, "a test")  # a crash (a KeyboardInterrupt), no dispatcher

    unrelated = run_deployment(deployment, parameters={}, timeout=0, as_subflow=False)  # no child of it: left alone
    with pytest.raises(stopping.StopRequested):
        parent()

    states = _states(deployment_id)
    _assert_cancelled(children, states)
    assert states[unrelated.id] == StateType.SCHEDULED
    assert "cancelled 3 unfinished child runs of" in caplog.text
