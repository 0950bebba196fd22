"""Datasets as a catalogue: list, show, diff and gc over real published versions (tiny models), through
the library, the CLI and the Prefect table artifact a generate-dataset run leaves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()


def _publish(prepared) -> str:
    from indusfactory.generation.generate import generate_shard
    from indusfactory.publishing.publish import publish_dataset

    shards = [generate_shard(prepared.ctx, prepared.plan, prepared.dataset_uri, i) for i in range(prepared.plan.shards)]
    return publish_dataset(
        prepared.config,
        prepared.catalog,
        prepared.plan,
        prepared.concept,
        prepared.condition,
        prepared.dataset_uri,
        shards,
    ).version


def _three_versions(make_config, prepare_generation, root=None):
    """A (condition 1, 2 sampling steps), B (condition 1, 3 steps), C (condition 2): C published last; under
    ``root`` (the default factory root when None)."""
    small = {"max_defect_free_images": 1, "augmentations_per_image": 1, "images_per_driver": 2}
    # No validation images or adherence probe (not in any fingerprint; they were most of the time here).
    concept = {"validation_images": 0}
    condition = {"validation_images": 0, "validation_probe_samples": 0}
    a = prepare_generation(make_config(root, plan=small, concept=concept, condition=condition))
    b = prepare_generation(make_config(root, plan=small, concept=concept, condition=condition, generation={"steps": 3}))
    c = prepare_generation(make_config(root, plan=small, concept=concept, condition={**condition, "steps": 3}))
    assert a.condition.uri == b.condition.uri != c.condition.uri and a.concept.uri == c.concept.uri
    versions = [_publish(p) for p in (a, b, c)]
    assert len(set(versions)) == 3
    return (a, b, c), versions


@pytest.fixture
def three_versions(make_config, prepare_generation, tmp_path):
    return tmp_path / "factory", *_three_versions(make_config, prepare_generation)


def _gc_dry_run(root: Path, *extra: str) -> tuple[list[str], str]:
    result = runner.invoke(app, ["datasets", "gc", "--factory-root", str(root), *extra])
    assert result.exit_code == 0, result.output
    removes = sorted(line.split()[2] for line in result.output.splitlines() if line.startswith("remove "))
    token = result.output.rsplit("--delete ", 1)[1].split()[0]
    return removes, token


def _tree(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def test_list_show_diff_and_gc_remove_exactly_what_the_dry_run_listed(three_versions):
    from indusfactory.publishing.catalogue import find_version, plan_gc, versions

    root, (a, b, c), (va, vb, vc) = three_versions
    listed = versions(str(root))
    assert [(v.version, v.latest, v.published) for v in listed] == [
        (va, False, True),
        (vb, False, True),
        (vc, True, True),
    ]
    result = runner.invoke(app, ["datasets", "list", "--factory-root", str(root)])
    assert result.exit_code == 0, result.output
    assert f"* demo-cracks/{vc}" in result.output and f"  demo-cracks/{va}" in result.output
    assert f"condition={c.condition.fingerprint}" in result.output and "evaluation: not run" in result.output

    shown = json.loads(runner.invoke(app, ["datasets", "show", "demo-cracks", "--factory-root", str(root)]).output)
    assert shown["version"] == vc and shown["latest"] and shown["counts"]["samples"] == c.plan.samples
    assert shown["models"]["condition"]["present"] and shown["models"]["condition"]["card"].endswith("README.md")
    assert shown["lineage"]["catalog_fingerprint"] == c.catalog.content_fingerprint
    assert sum(shown["classes"].values()) == shown["counts"]["annotations"] and shown["evaluation"] == "not run"
    assert shown["contact_sheet"] and Path(shown["contact_sheet"]).is_file()

    result = runner.invoke(
        app, ["datasets", "diff", f"demo-cracks/{va}", f"demo-cracks/{vb}", "--factory-root", str(root)]
    )
    assert result.exit_code == 0, result.output
    assert "config: generation.steps: 2 -> 3" in result.output
    assert "lineage: generation_fingerprint:" in result.output and "concept_fingerprint" not in result.output
    assert "counts: samples" not in result.output  # same plan, same counts

    # Default grace: the condition model only A and B used was trained minutes ago, so it stays.
    removes, token = _gc_dry_run(root)
    assert removes == sorted([str(root / "datasets" / "demo-cracks" / va), str(root / "datasets" / "demo-cracks" / vb)])
    # Without grace it goes too; the concept (used by C's condition model) and everything of C stay.
    removes, token = _gc_dry_run(root, "--grace-hours", "0")
    assert removes == sorted([a.dataset_uri, b.dataset_uri, a.condition.uri])
    plan = plan_gc(str(root), grace_seconds=0)
    assert {i.uri for i in plan.keep} >= {c.dataset_uri, c.condition.uri, c.concept.uri}

    before = _tree(root)
    refused = runner.invoke(
        app, ["datasets", "gc", "--factory-root", str(root), "--grace-hours", "0", "--delete", "0" * 12]
    )
    assert refused.exit_code == 2 and "changed since the dry run" in refused.output and _tree(root) == before
    result = runner.invoke(
        app, ["datasets", "gc", "--factory-root", str(root), "--grace-hours", "0", "--delete", token]
    )
    assert result.exit_code == 0, result.output
    gone = {p for p in before - _tree(root)}
    assert {p for p in gone if not any(p.startswith(r + "/") for r in removes)} == set(removes), (
        "exactly the listed folders (and what is inside them) were removed"
    )
    for kept in (c.dataset_uri, c.condition.uri, c.concept.uri, str(root / "datasets" / "demo-cracks" / "latest")):
        assert Path(kept).exists(), kept
    assert find_version(str(root), "demo-cracks").version == vc
    assert _gc_dry_run(root, "--grace-hours", "0")[0] == [], "nothing left to collect"


def test_gc_keeps_newest_versions_unpublished_folders_and_what_a_kept_config_names(three_versions):
    from indusfactory.publishing.catalogue import plan_gc

    root, (a, b, c), (va, vb, vc) = three_versions
    partial = root / "datasets" / "demo-cracks" / "v-being-written" / "data"
    partial.mkdir(parents=True)
    plan = plan_gc(str(root), keep_versions=1, grace_seconds=0)
    assert {i.uri for i in plan.remove} == {a.dataset_uri}, "B is kept, so is condition 1 B was made with"
    reasons = {i.uri: i.reason for i in plan.keep}
    assert "newest" in reasons[b.dataset_uri] and "unpublished" in reasons[str(partial.parent)]
    assert "latest" == reasons[c.dataset_uri]
    # B keeps condition 1; without B kept, a config of C naming A's folder keeps A (and A's models).
    manifest_uri = Path(c.dataset_uri) / "manifest.json"
    manifest = json.loads(manifest_uri.read_text())
    manifest["config"]["generation"]["adherence_scorer"] = f"segformer:{a.dataset_uri}/evaluation/x/segmentor"
    manifest_uri.write_text(json.dumps(manifest))
    plan = plan_gc(str(root), grace_seconds=0)
    assert {i.uri for i in plan.remove} == {b.dataset_uri}


def test_each_publish_leaves_the_catalogue_as_a_table_artifact(prefect_api, three_versions):
    from prefect.client.orchestration import get_client

    from flows.generate_dataset import generate_dataset

    root, (a, b, c), (va, vb, vc) = three_versions
    record = generate_dataset(config=c.config.model_copy(update={"evaluation": c.config.evaluation}))
    assert record.version == vc and record.reused
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        tables = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["factory-datasets"])))
    table = max(tables, key=lambda a: a.created)
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [(r["version"], r["latest"], r["samples"]) for r in rows] == [
        (va, False, a.plan.samples),
        (vb, False, b.plan.samples),
        (vc, True, c.plan.samples),
    ]


def test_gc_on_s3_lists_then_removes_exactly_what_nothing_references(make_config, prepare_generation, s3_bucket):
    """The same rules with the factory root on S3 (a real endpoint on loopback): the dry run lists the right
    objects, `--delete` removes exactly their prefixes, and `latest`, what it references, an unpublished version
    and the models of kept versions stay."""
    import fsspec

    from indusfactory.publishing.catalogue import find_version, plan_gc

    root = f"{s3_bucket}/factory"
    (a, b, c), (va, vb, vc) = _three_versions(make_config, prepare_generation, root)
    assert a.dataset_uri == f"{root}/datasets/demo-cracks/{va}" and c.condition.uri.startswith(f"{root}/models/")
    fs = fsspec.filesystem("s3")
    partial = f"{root}/datasets/demo-cracks/v-being-written"
    fs.pipe(f"{partial}/data/train-00000-of-00001.parquet", b"half")

    def tree() -> set[str]:
        fs.invalidate_cache()
        return {"s3://" + p for p in fs.find(root)}

    removes, _ = _gc_dry_run(root)
    assert removes == sorted([a.dataset_uri, b.dataset_uri]), "the condition model of A and B is in its grace"
    plan = plan_gc(root, keep_versions=1, grace_seconds=0)
    assert {i.uri for i in plan.remove} == {a.dataset_uri}, "B is one of the newest, so its condition model stays"
    removes, token = _gc_dry_run(root, "--grace-hours", "0")
    assert removes == sorted([a.dataset_uri, b.dataset_uri, a.condition.uri])
    reasons = {i.uri: i.reason for i in plan_gc(root, grace_seconds=0).keep}
    assert reasons[c.dataset_uri] == "latest" and "unpublished" in reasons[partial]
    assert "lineage" in reasons[c.condition.uri] and "lineage" in reasons[c.concept.uri]
    # An s3:// path in the config of a kept version keeps what it names (and that version's models).
    manifest_uri = f"{c.dataset_uri}/manifest.json"
    original = fs.cat(manifest_uri)
    manifest = json.loads(original)
    manifest["config"]["generation"]["adherence_scorer"] = f"segformer:{a.dataset_uri}/evaluation/x/segmentor"
    fs.pipe(manifest_uri, json.dumps(manifest).encode())
    assert {i.uri for i in plan_gc(root, grace_seconds=0).remove} == {b.dataset_uri}
    fs.pipe(manifest_uri, original)

    before = tree()
    refused = runner.invoke(app, ["datasets", "gc", "--factory-root", root, "--grace-hours", "0", "--delete", "0" * 12])
    assert refused.exit_code == 2 and "changed since the dry run" in refused.output and tree() == before
    result = runner.invoke(app, ["datasets", "gc", "--factory-root", root, "--grace-hours", "0", "--delete", token])
    assert result.exit_code == 0, result.output
    assert sorted(line.split()[2] for line in result.output.splitlines() if line.startswith("removed ")) == removes
    after = tree()
    gone = before - after
    assert gone and all(any(p.startswith(r + "/") for r in removes) for p in gone), "only under the listed prefixes"
    assert not [p for p in after if any(p.startswith(r + "/") for r in removes)], "everything under them"
    for kept in (c.dataset_uri, c.condition.uri, c.concept.uri, partial):
        assert any(p.startswith(kept + "/") for p in after), kept
    assert f"{root}/datasets/demo-cracks/latest" in after and f"{c.dataset_uri}/manifest.json" in after
    assert find_version(root, "demo-cracks").version == vc
    assert _gc_dry_run(root, "--grace-hours", "0")[0] == [], "nothing left to collect"
