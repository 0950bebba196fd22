"""Failure reaches a person: a Prefect automation that sends a notification when a run of an indusfactory
deployment fails, crashes or times out.

    python deployments/notify_failures.py --url https://hooks.slack.com/services/... --kind slack
    python deployments/notify_failures.py --url https://alerts.example.com/hook          # any JSON webhook

Run it after `prefect deploy --all --prefect-file deployments/prefect.yaml` (it watches the deployments of
that file found on the server; `--deployment flow/name` picks some), and again after adding a deployment.
It saves the notification block `indusfactory-failures` (the URL is kept as a secret for Slack and Teams)
and creates, or replaces, the automation `indusfactory: failed or crashed runs`. Check it with
`prefect automation inspect "indusfactory: failed or crashed runs"`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

AUTOMATION = "indusfactory: failed or crashed runs"
BLOCK = "indusfactory-failures"
EVENTS = {"prefect.flow-run.Failed", "prefect.flow-run.Crashed", "prefect.flow-run.TimedOut"}
SUBJECT = "indusfactory: {{ deployment.name }} run {{ flow_run.name }} {{ flow_run.state.name }}"
BODY = (
    "Flow run {{ flow_run.name }} of deployment {{ flow.name }}/{{ deployment.name }} ended "
    "{{ flow_run.state.name }}: {{ flow_run.state.message }}\n"
    "Run page: {{ flow_run|ui_url }}\n"
    "Rerunning is safe: finished stages and shards are reused (docs/OPERATIONS.md, the operator's day)."
)
PREFECT_YAML = Path(__file__).with_name("prefect.yaml")


def notification_block(url: str, kind: str):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock, MicrosoftTeamsWebhook, SlackWebhook

    if kind == "slack":
        return SlackWebhook(url=url)
    if kind == "teams":
        return MicrosoftTeamsWebhook(url=url)
    return CustomWebhookNotificationBlock(
        name=BLOCK, url=url, json_data={"text": "{{subject}}\n{{body}}", "title": "{{subject}}"}
    )


def watched_deployments(client, names: list[str] | None) -> dict[str, str]:
    """``{flow/deployment: id}`` of the named deployments, or of every deployment of ``prefect.yaml``'s
    entrypoints found on the server."""
    entrypoints = {d["entrypoint"] for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}
    found = {}
    for deployment in client.read_deployments():
        name = f"{client.read_flow(deployment.flow_id).name}/{deployment.name}"
        if (name in names) if names else deployment.entrypoint in entrypoints:
            found[name] = str(deployment.id)
    missing = sorted(set(names or []) - set(found))
    if missing or not found:
        raise SystemExit(
            f"no such deployment on the server: {', '.join(missing) or 'none of deployments/prefect.yaml'}"
            "; run `prefect deploy --all --prefect-file deployments/prefect.yaml` first"
        )
    return found


def create(url: str, kind: str = "webhook", names: list[str] | None = None):
    """Save the block, then create (or replace) the automation; returns it as read back from the server."""
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    block_id = notification_block(url, kind).save(BLOCK, overwrite=True)
    with get_client(sync_client=True) as client:
        deployments = watched_deployments(client, names)
        for existing in client.read_automations_by_name(AUTOMATION):
            client.delete_automation(existing.id)
    trigger = EventTrigger(
        expect=EVENTS,
        posture=Posture.Reactive,
        threshold=1,
        match_related={
            "prefect.resource.role": "deployment",
            "prefect.resource.id": [f"prefect.deployment.{i}" for i in deployments.values()],
        },
    )
    automation = Automation(
        name=AUTOMATION,
        description="Notify a person when a run of "
        + ", ".join(sorted(deployments))
        + " fails, crashes or times out (deployments/notify_failures.py).",
        trigger=trigger,
        actions=[SendNotification(block_document_id=block_id, subject=SUBJECT, body=BODY)],
    ).create()
    return Automation.read(id=automation.id), deployments


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="Webhook URL the notification is sent to.")
    parser.add_argument("--kind", choices=("webhook", "slack", "teams"), default="webhook")
    parser.add_argument(
        "--deployment",
        action="append",
        help="flow/deployment to watch (repeatable); "
        "default: every deployment of deployments/prefect.yaml on the server.",
    )
    args = parser.parse_args(argv)
    automation, deployments = create(args.url, args.kind, args.deployment)
    print(
        f"automation {automation.name!r} ({automation.id}) notifies block {BLOCK!r} when a run of "
        f"{', '.join(sorted(deployments))} ends {', '.join(sorted(e.rsplit('.', 1)[1] for e in EVENTS))}"
    )


if __name__ == "__main__":
    main()
