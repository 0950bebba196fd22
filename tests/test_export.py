"""Atomic writes under the factory root: temporary files on local disks, single PUTs on object stores."""

from __future__ import annotations

import pytest

from indusfactory.infra import storage


def test_local_writes_go_through_a_temporary_and_stale_ones_are_removed(tmp_path, monkeypatch):
    moved = []
    real_rename = __import__("os").rename

    def spy(source, target, *args, **kwargs):
        moved.append((str(source), str(target)))
        return real_rename(source, target, *args, **kwargs)

    monkeypatch.setattr("os.rename", spy)
    target = tmp_path / "data" / "a.bin"
    storage.write_bytes_atomic(str(target), b"one")
    storage.write_many_atomic({str(tmp_path / "images" / f"{i}.png"): bytes([i]) for i in range(3)})
    assert target.read_bytes() == b"one" and (tmp_path / "images" / "2.png").read_bytes() == b"\x02"
    assert len(moved) == 4 and all("/.tmp-" in source for source, _ in moved)

    # What a crash leaves: a temporary file. Only the ones under the given folder are removed.
    stale = tmp_path / "data" / ".tmp-0123-a.bin"
    stale.write_bytes(b"half")
    elsewhere = tmp_path / "other" / ".tmp-4567-b.bin"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"half")
    assert storage.remove_temporaries(str(tmp_path / "data")) == [str(stale)]
    assert not stale.exists() and elsewhere.exists() and target.exists()
    assert storage.remove_temporaries(str(tmp_path / "missing")) == []


@pytest.mark.slow
def test_object_store_writes_are_single_puts(s3_bucket, monkeypatch):
    import fsspec
    import s3fs

    def no_move(*args, **kwargs):
        raise AssertionError("an object store write must not copy a temporary object")

    monkeypatch.setattr(s3fs.S3FileSystem, "mv", no_move)
    monkeypatch.setattr(s3fs.S3FileSystem, "_mv_file", no_move, raising=False)
    storage.write_bytes_atomic(f"{s3_bucket}/ds/manifest.json", b"{}")
    files = {f"{s3_bucket}/ds/images/{i}.png": bytes([i]) * 10 for i in range(20)}
    storage.write_many_atomic(files)
    fs = fsspec.filesystem("s3")
    found = sorted(fs.find(f"{s3_bucket}/ds"))
    assert len(found) == 21 and not [p for p in found if "/.tmp-" in p]
    assert all(fs.cat_file(uri) == data for uri, data in files.items())


def test_an_exclusive_write_never_replaces_a_file(tmp_path):
    target = str(tmp_path / "data" / "train-00000-of-00001.parquet")
    assert storage.write_bytes_exclusive(target, b"first")
    assert not storage.write_bytes_exclusive(target, b"second")
    assert (tmp_path / "data" / "train-00000-of-00001.parquet").read_bytes() == b"first"


@pytest.mark.slow
def test_racing_exclusive_writes_on_s3_leave_exactly_one_winner(s3_bucket):
    """Two runs writing one shard at once (S3: conditional PUT): one wins, the other keeps its hands off."""
    from concurrent.futures import ThreadPoolExecutor

    import fsspec

    uri = f"{s3_bucket}/ds/data/train-00000-of-00001.parquet"
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda i: storage.write_bytes_exclusive(uri, f"run {i}".encode()), range(8)))
    assert won.count(True) == 1
    assert fsspec.filesystem("s3").cat_file(uri) == f"run {won.index(True)}".encode()


def _manifest(folder, created: str) -> None:
    import json

    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"created": created}))


def test_latest_is_repaired_unless_it_names_a_version_published_later(tmp_path):
    from indusfactory.publishing.publish import point_latest

    root = tmp_path / "datasets" / "demo"
    _manifest(root / "v1", "2026-01-01T00:00:00+00:00")
    _manifest(root / "v2", "2026-02-01T00:00:00+00:00")
    latest = root / "latest"
    assert point_latest(str(root / "v1"), "v1", "2026-01-01T00:00:00+00:00")  # a crash left no pointer
    assert latest.read_text() == "v1\n"
    assert not point_latest(str(root / "v1"), "v1", "2026-01-01T00:00:00+00:00")  # already there: not rewritten
    assert point_latest(str(root / "v2"), "v2", "2026-02-01T00:00:00+00:00")  # behind a newer manifest
    assert latest.read_text() == "v2\n"
    assert not point_latest(str(root / "v1"), "v1", "2026-01-01T00:00:00+00:00")  # v2 was published later
    assert latest.read_text() == "v2\n"
    for damaged in ("v-gone\n", "../../escape\n", ""):
        latest.write_text(damaged)
        assert point_latest(str(root / "v1"), "v1", "2026-01-01T00:00:00+00:00")
        assert latest.read_text() == "v1\n"


@pytest.mark.slow
def test_a_pinned_version_is_one_closed_set_of_one_plan(prefect_api, make_config, prepare_generation):
    """Killed after one shard, then rerun with a smaller plan under the same pinned version; then the first
    config, and a changed one, rerun against the published version: refused each time, never mixed."""
    import json
    import shutil
    from pathlib import Path

    import datasets
    import pandas as pd

    from flows.generate_dataset import generate_dataset
    from indusfactory.generation.generate import generate_shard
    from indusfactory.infra.errors import VersionConflictError
    from indusfactory.publishing.publish import check_dataset_version

    def pinned(**overrides):
        return make_config(export={"version": "pinned"}, **{"generation": {"shard_size": 2}, **overrides})

    def check(setup):
        check_dataset_version(
            setup.config, setup.catalog, setup.plan, setup.concept, setup.condition, setup.dataset_uri
        )

    first = prepare_generation(pinned())
    root = Path(first.dataset_uri)
    assert first.plan.shards == 3 and root.name == "pinned"
    generate_shard(first.ctx, first.plan, first.dataset_uri, 0)  # ... and the run was killed here

    smaller = prepare_generation(pinned(plan={"max_defect_free_images": 1}))
    assert smaller.dataset_uri == first.dataset_uri and smaller.plan.samples < first.plan.samples
    for attempt in (lambda: check(smaller), lambda: generate_shard(smaller.ctx, smaller.plan, str(root), 0)):
        with pytest.raises(VersionConflictError) as info:
            attempt()
        assert str(root / "data") in str(info.value) and "train-00000-of-00003.parquet" in str(info.value)
        assert "delete that folder" in str(info.value) and "export.version" in str(info.value)
    assert [p.name for p in (root / "data").glob("*.parquet")] == ["train-00000-of-00003.parquet"]

    # As the error says: delete the unpublished folder; the smaller plan is then published alone.
    shutil.rmtree(root)
    record = generate_dataset(config=smaller.config)
    manifest = json.loads((root / "manifest.json").read_text())
    planned = smaller.plan.samples
    assert record.samples == manifest["counts"]["samples"] == planned
    assert len(pd.read_parquet(root / "data")) == planned
    assert datasets.load_dataset(str(root), split="train").num_rows == planned
    card = (root / "README.md").read_text()
    assert [line.strip("- ") for line in card.splitlines() if line.startswith("    - data/")] == [
        s["path"] for s in manifest["shards"]
    ]

    # The first config (a larger plan) and a changed generation config, against the published version.
    published = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    changed = prepare_generation(pinned(plan={"max_defect_free_images": 1}, generation={"shard_size": 2, "steps": 3}))
    for attempt in (
        lambda: check(first),
        lambda: generate_shard(first.ctx, first.plan, str(root), 2),
        lambda: generate_dataset(config=first.config),
        lambda: check(changed),
        lambda: generate_dataset(config=changed.config),
    ):
        with pytest.raises(VersionConflictError, match="published"):
            attempt()
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == published, "nothing written into it"
    assert generate_dataset(config=smaller.config).reused
