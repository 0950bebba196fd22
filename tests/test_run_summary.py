"""The run summary answers "what did I get": a real flow run on the tiny model, its summary artifact read
back through the Prefect API, and the CLI's last lines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
STAGES = ("ingest", "learn-concept", "learn-condition", "build-plan", "generate-shard", "publish-dataset")


def _artifacts(key: str | None = None, kind: str | None = None, flow_run_id=None) -> list:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        found = client.read_artifacts()
    return sorted((a for a in found if (key is None or a.key == key) and (kind is None or a.type == kind)
                   and (flow_run_id is None or a.flow_run_id == flow_run_id)), key=lambda a: a.created)


def _logs(flow_run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def check_summary(markdown: str, dataset_uri: str, concept_uri: str, condition_uri: str, evaluation: str) -> None:
    """Every field of the summary is filled (shared with the deployment test)."""
    assert re.search(r"\*\*Labels: (follows labels|near chance) \(median label AUC [0-9.]+ vs chance [0-9.]+", markdown)
    assert f"**Evaluation: {evaluation}.**" in markdown
    assert re.search(r"\*\*Throughput: [0-9.]+ images/s\.\*\*", markdown)
    for stage in STAGES:
        assert re.search(rf"\| {stage} \| (ran|reused \(cached\)) \| [0-9.]+ s \|", markdown), stage
    assert re.search(r"\| total \| \| [0-9.]+ s \|", markdown)
    assert f"[model card]({concept_uri}/README.md)" in markdown and Path(concept_uri, "README.md").is_file()
    assert f"[model card]({condition_uri}/README.md)" in markdown and Path(condition_uri, "README.md").is_file()
    assert "![contact sheet](data:image/png;base64," in markdown and f"`{dataset_uri}/contact_sheet.png`" in markdown
    assert f"pd.read_parquet('{dataset_uri}/data/')" in markdown


def test_the_summary_says_what_the_run_made(prefect_api, make_config, capsys):
    from flows.generate_dataset import generate_dataset
    from indusfactory.catalogue import evaluation_headline, published_evaluation
    from indusfactory.cli import _print_dataset

    evaluation = {"enabled": True, "steps": 4, "finetune_steps": 2, "seeds": 1, "controls": [],
                  "real_fractions": [1.0], "batch_size": 4}
    config = make_config(export={"dataset_name": "summary-test"}, evaluation=evaluation,
                         execution={"torch_threads": 1})
    first = generate_dataset(config=config)
    headline = evaluation_headline(published_evaluation(first.uri))
    assert headline != "not run" and headline.split(":")[0] in ("synthetic helps", "no benefit", "inconclusive")
    summary = _artifacts("summary-test-summary", "markdown")[-1]
    models = {kind: next((Path(config.factory_root) / "models" / kind).iterdir()) for kind in ("concept", "condition")}
    check_summary(summary.data, first.uri, str(models["concept"]), str(models["condition"]), headline)
    assert "| generate-shard | ran |" in summary.data and "| learn-concept | ran |" in summary.data

    # The CLI's last lines say the same.
    _print_dataset(first)
    printed = capsys.readouterr().out
    assert f"evaluation:  {headline}" in printed and f"contact sheet: {first.uri}/contact_sheet.png" in printed
    assert f"condition card: {models['condition']}/README.md" in printed
