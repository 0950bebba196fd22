"""Failure reaches a person: deployments/notify_failures.py creates the automation and its notification block
on a real Prefect API; read back, it watches the factory's deployments for failed, crashed and timed-out runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("notify_failures", REPO / "deployments" / "notify_failures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_failure_automation_is_created_and_read_back(prefect_api, capsys):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client
    from prefect.events.actions import SendNotification

    notify = _script()
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("generate-dataset")
        nightly = client.create_deployment(flow_id, "nightly", entrypoint="flows/generate_dataset.py:generate_dataset")
        elsewhere = client.create_deployment(flow_id, "elsewhere", entrypoint="other.py:flow")  # not the factory's

    for _ in range(2):  # run twice: still one automation
        notify.main(["--url", "http://127.0.0.1:9/hook"])
    out = capsys.readouterr().out
    assert "notifies block 'indusfactory-failures' when a run of" in out and "generate-dataset/nightly" in out

    with get_client(sync_client=True) as client:
        automations = client.read_automations_by_name(notify.AUTOMATION)
    assert len(automations) == 1
    automation = automations[0]
    assert automation.enabled
    trigger = automation.trigger
    assert trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed", "prefect.flow-run.TimedOut"}
    assert trigger.posture == "Reactive" and trigger.threshold == 1
    related = trigger.match_related if isinstance(trigger.match_related, list) else [trigger.match_related]
    ids = [value for spec in related if "prefect.resource.id" in spec for value in spec["prefect.resource.id"]]
    assert f"prefect.deployment.{nightly}" in ids and f"prefect.deployment.{elsewhere}" not in ids
    (action,) = automation.actions
    assert isinstance(action, SendNotification) and "{{ flow_run|ui_url }}" in action.body
    block = CustomWebhookNotificationBlock.load(notify.BLOCK)
    assert block.url == "http://127.0.0.1:9/hook" and "{{subject}}" in block.json_data["text"]
    with get_client(sync_client=True) as client:
        assert client.read_block_document(action.block_document_id).name == notify.BLOCK


def test_a_named_deployment_that_does_not_exist_is_refused(prefect_api):
    import pytest

    notify = _script()
    with pytest.raises(SystemExit, match="no such deployment on the server: generate-dataset/missing"):
        notify.main(["--url", "http://127.0.0.1:9/hook", "--deployment", "generate-dataset/missing"])
