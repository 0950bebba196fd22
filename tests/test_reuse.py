"""Reusing finished work (tasks/reuse.py): the completion marker is the truth the Prefect cache key follows."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from indusfactory.infra import storage
from indusfactory.layout import FactoryLayout
from tasks.reuse import CompletedOutput

TASK = SimpleNamespace(task=SimpleNamespace(name="learn-concept"))


def test_the_cache_key_exists_only_while_the_output_is_complete_on_storage(tmp_path):
    folder = FactoryLayout.of(str(tmp_path)).model("concept", "abc")
    policy = CompletedOutput(marker=lambda parameters: parameters["folder"].marker)
    key = lambda: policy.compute_key(TASK, {"folder": folder}, {})  # noqa: E731

    assert key() is None, "nothing built yet: no key, the task runs"
    with storage.local_copy_for_write(folder.uri, markers=(folder.marker_name,)) as local:
        (Path(local) / "weights.safetensors").write_bytes(b"w" * 100)
        (Path(local) / folder.marker_name).write_text(json.dumps({"kind": "concept"}))
    complete = key()
    assert complete is not None and complete == key(), "a complete output has one stable key"

    storage.filesystem(folder.file("weights.safetensors"))[0].rm(folder.file("weights.safetensors"))
    assert key() is None, "a file its listing names is gone: not a hit, the stage rebuilds"

    other = FactoryLayout.of(str(tmp_path)).model("concept", "def")
    assert CompletedOutput(marker=lambda p: other.marker).compute_key(TASK, {}, {}) is None


def test_every_stage_task_caches_by_its_completion_marker():
    """The one reuse mechanism: each stage task's cache policy is CompletedOutput; publishing has none."""
    from tasks.evaluate import evaluate_dataset_task
    from tasks.generate import build_plan_task, generate_shard_task, publish_dataset_task
    from tasks.ingest import ingest_task
    from tasks.learn import learn_concept_task, learn_condition_task

    stages = [ingest_task, learn_concept_task, learn_condition_task, build_plan_task, generate_shard_task]
    assert all(isinstance(t.cache_policy, CompletedOutput) for t in [*stages, evaluate_dataset_task])
    assert not isinstance(publish_dataset_task.cache_policy, CompletedOutput)
