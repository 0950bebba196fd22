"""The run summary answers "what did I get", and the run estimates its time before spending: real flow runs on
the tiny model, artifacts and logs read back through the Prefect API."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from indusfactory.generation.throughput import Estimate, estimate, record

pytestmark = pytest.mark.slow
STAGES = ("ingest", "learn-concept", "learn-condition", "build-plan", "generate-shard", "publish-dataset")


def _artifacts(key: str | None = None, kind: str | None = None, flow_runs: set | None = None) -> list:
    """Artifacts of ``key`` and ``kind``, oldest first (filtered by the server: the session's API holds many)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        ArtifactFilterType,
        FlowRunFilter,
        FlowRunFilterId,
    )

    artifact_filter = ArtifactFilter(
        key=ArtifactFilterKey(any_=[key]) if key else None, type=ArtifactFilterType(any_=[kind]) if kind else None
    )
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=artifact_filter,
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(flow_runs))) if flow_runs else None,
        )
    return sorted(found, key=lambda a: a.created)


def _logs(flow_run_id, query: str, wait: float = 60.0) -> str:
    """The run's log lines holding ``query`` (waiting for them: logs reach the API in the background)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTextSearch

    deadline = time.time() + wait
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(
                log_filter=LogFilter(
                    flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]), text=LogFilterTextSearch(query=f'"{query}"')
                )
            )
        if logs or time.time() > deadline:
            return "\n".join(log.message for log in logs)
        time.sleep(1)


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


def test_the_summary_says_what_the_run_made_and_the_next_run_is_estimated(prefect_api, make_config, capsys):
    from flows.cli import _print_dataset
    from flows.generate_dataset import generate_dataset
    from indusfactory.publishing.catalogue import evaluation_headline, published_evaluation

    evaluation = {
        "enabled": True,
        "steps": 4,
        "finetune_steps": 2,
        "seeds": 1,
        "real_fractions": [1.0],
        "batch_size": 4,
    }
    config = make_config(export={"dataset_name": "summary-test"}, evaluation=evaluation, execution={"torch_threads": 1})
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

    # The first run kept its throughput; the second (another version on the same device) is estimated from it.
    kept = list((Path(config.factory_root) / "throughput").rglob("*.json"))
    assert len(kept) == 1
    second = generate_dataset(
        config=make_config(
            export={"dataset_name": "summary-test"},
            generation={"steps": 3, "shard_size": 4, "batch_size": 3},
            execution={"torch_threads": 1},
        )
    )
    assert second.version != first.version
    runs = {a.flow_run_id for a in _artifacts("summary-test-summary", "markdown")}
    assert len(runs) == 2
    progress = _artifacts(kind="progress", flow_runs=runs)
    last = max(progress, key=lambda a: a.created)
    assert re.search(r"expected [0-9.]+ images/s \(1 earlier runs on cpu x1\)", last.description or ""), (
        last.description
    )
    assert re.search(
        r"estimate: 6 images at [0-9.]+ images/s on cpu x1: about [0-9]+ (s|min)", _logs(last.flow_run_id, "estimate:")
    )
    assert "no earlier run on cpu x1" in _logs(summary.flow_run_id, "no earlier run")
    assert len(list((Path(config.factory_root) / "throughput").rglob("*.json"))) == 2


def test_estimates_scale_with_sampling_steps_and_the_eta_follows_the_rate(make_config, tmp_path):
    from tasks.report import eta_text

    config = make_config(generation={"steps": 10})
    assert estimate(config, "cpu x1", 100) is None
    for rate in (1.0, 2.0, 3.0):  # three runs at 10 steps: median 2 images/s
        record(config, "cpu x1", str(tmp_path / "factory" / "datasets" / "d" / f"v-{rate}"), int(50 * rate), 50.0)
    record(config, "cuda:GPU x1", str(tmp_path / "d" / "v-gpu"), 1000, 10.0)  # another device kind: not used
    found = estimate(config, "cpu x1", 100)
    assert found == Estimate(device="cpu x1", images=100, images_per_s=2.0, runs=3) and found.seconds == 50
    assert "100 images at 2.00 images/s on cpu x1: about 50 s (median of 3 earlier runs)" == found.text()
    slower = estimate(make_config(generation={"steps": 20}), "cpu x1", 100)
    assert slower.images_per_s == 1.0, "twice the sampling steps, half the rate"
    cut = estimate(make_config(generation={"steps": 10, "guidance_cutoff": 0.5}), "cpu x1", 100)
    assert cut.images_per_s == 2.0 * 20 / 15, "guidance in half the steps: 15 model passes per image instead of 20"
    unguided = estimate(make_config(generation={"steps": 10, "guidance_scale": 1.0}), "cpu x1", 100)
    assert unguided.images_per_s == 4.0, "no guidance: one pass per step"
    assert estimate(make_config(base_model={"resolution": 128}), "cpu x1", 100) is None, "another resolution"

    text = eta_text(remaining=10, generated=0, elapsed=0.0, expected=found)
    assert "expected 2.00 images/s (3 earlier runs on cpu x1)" in text and "(5 s left)" in text
    assert re.search(r"ETA \d\d:\d\d:\d\d UTC", text)
    assert "(2 s left)" in eta_text(remaining=10, generated=10, elapsed=2.0, expected=found), "measured rate wins"
    assert eta_text(remaining=0, generated=10, elapsed=2.0, expected=None) == ""
