"""Failure reaches a person: deployments/notify_failures.py creates the automation and its notification block
on a real Prefect API; read back, it watches the factory's deployments for failed, crashed and timed-out runs;
and on a real `prefect server start` it fires: a failed run of a watched deployment is posted to the webhook."""

from __future__ import annotations

import importlib.util
import time
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


class _Recorder:
    """A webhook on loopback that records the JSON body of every POST it receives."""

    def __init__(self):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.posts: list[dict] = []
        self.received = threading.Event()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                recorder.posts.append(json.loads(body or b"{}"))
                recorder.received.set()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_a_failed_run_of_a_watched_deployment_posts_to_the_webhook(tmp_path, monkeypatch):
    """The automation fires: on a real `prefect server start` (its triggers and actions services on, as in
    production), a flow run of the watched deployment that ends Failed makes the server POST the notification,
    naming the run, to the webhook; a failed run of a deployment it does not watch posts nothing."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Failed, Pending, Running
    from test_workpool import _logs_tail, running_prefect_server

    notify = _script()
    # the services that evaluate automations and run their actions (on by default; the server inherits this)
    monkeypatch.setenv("PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED", "true")
    with running_prefect_server(tmp_path) as (env, _, logs), _Recorder() as hook:
        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
            with get_client(sync_client=True) as client:
                flow_id = client.create_flow_from_name("generate-dataset")
                nightly = client.create_deployment(
                    flow_id, "nightly", entrypoint="flows/generate_dataset.py:generate_dataset"
                )
                local = client.create_deployment(
                    flow_id, "local", entrypoint="flows/generate_dataset.py:generate_dataset"
                )
            notify.main(["--url", hook.url, "--deployment", "generate-dataset/nightly"])

            with get_client(sync_client=True) as client:
                # each run goes the way a worker takes it: Scheduled -> Pending -> Running -> Failed
                unwatched = client.create_flow_run_from_deployment(local)
                run = client.create_flow_run_from_deployment(nightly)
                for flow_run, message in ((unwatched, "not watched"), (run, "shard group 0 failed")):
                    for state in (Pending(), Running(), Failed(message=message)):
                        result = client.set_flow_run_state(flow_run.id, state)
                        assert result.status.value == "ACCEPT", (state, result.details)
            assert hook.received.wait(60), "no notification within 60 s\n" + _logs_tail(logs)
            time.sleep(2)  # a second (wrong) POST for the unwatched run would arrive by now

    (post,) = hook.posts
    assert post["title"] == f"indusfactory: nightly run {run.name} Failed"
    text = post["text"]
    assert f"Flow run {run.name} of deployment generate-dataset/nightly ended Failed: shard group 0 failed" in text
    assert f"/runs/flow-run/{run.id}" in text and "Rerunning is safe" in text
    assert unwatched.name not in text
