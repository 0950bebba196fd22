"""Generation scores every sample against its label and the chance pairing; a dataset whose labels do not
follow its images says so in its manifest, card and record, and can be refused before it is published."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from indusfactory.generation import adherence


def _generate_all(setup):
    from indusfactory.generation.generate import generate_shard
    from indusfactory.publishing.publish import publish_dataset

    shards = [generate_shard(setup.ctx, setup.plan, setup.dataset_uri, i) for i in range(setup.plan.shards)]
    dataset = publish_dataset(
        setup.config, setup.catalog, setup.plan, setup.concept, setup.condition, setup.dataset_uri, shards
    )
    return shards, dataset


@pytest.fixture
def sampler_following_masks(monkeypatch):
    """A stand-in sampler that paints each sample's masks dark on a noisy surface (what a condition that
    learned would do), so the QC plumbing can be checked without training one."""
    from indusfactory.generation import generate

    def sample(ctx, pipe, embeds, rows, inputs, shape=None):
        out = []
        for row, sample in zip(rows, inputs):
            rng = np.random.default_rng(row["seed"])
            image = rng.uniform(120, 200, size=(*sample.driver.shape[:2], 1)).repeat(3, axis=2)
            for _, mask in sample.instances:
                image[mask] *= 0.4
            out.append(image.round().astype(np.uint8))
        return np.stack(out)

    monkeypatch.setattr(generate, "sample_batch", sample)


def test_a_model_that_learned_nothing_is_marked_near_chance_everywhere(make_config, prepare_generation):
    setup = prepare_generation(make_config())  # a random tiny model, 2 training steps: noise images
    shards, dataset = _generate_all(setup)
    root = Path(setup.dataset_uri)
    df = pd.read_parquet(root / "data")
    assert df["qc_label_auc"].between(0, 1).all()
    assert df["qc_chance_auc"].notna().sum() == len(df) - sum(s.rows == 1 for s in shards)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["adherence"]["verdict"] == adherence.NEAR_CHANCE == dataset.adherence["verdict"]
    assert manifest["adherence"]["samples"] == len(df)
    assert "Warning" in (root / "README.md").read_text() and "near chance" in (root / "README.md").read_text()
    assert setup.condition.adherence["verdict"] == adherence.NEAR_CHANCE  # the condition's own held-out probe


def test_samples_that_follow_their_masks_are_marked_so(make_config, prepare_generation, sampler_following_masks):
    setup = prepare_generation(make_config())
    shards, dataset = _generate_all(setup)
    df = pd.read_parquet(Path(setup.dataset_uri) / "data")
    assert (df["qc_label_auc"] > 0.9).all()
    assert df["qc_chance_auc"].median() < 0.7
    assert dataset.adherence["verdict"] == adherence.FOLLOWS_LABELS
    merged = adherence.summarise_totals([s.adherence for s in shards])
    assert merged.median_auc == pytest.approx(df["qc_label_auc"].median(), abs=0.04)


def test_publishing_a_near_chance_dataset_can_be_refused_keeping_its_shards(make_config, prepare_generation):
    from indusfactory.infra.errors import NearChanceError

    setup = prepare_generation(make_config(generation={"refuse_near_chance": True}))
    with pytest.raises(NearChanceError, match="do not follow their labels"):
        _generate_all(setup)
    root = Path(setup.dataset_uri)
    assert not (root / "manifest.json").exists()
    assert len(list((root / "data").glob("*.parquet"))) == setup.plan.shards  # nothing already made is lost


def test_min_label_auc_fails_samples_below_it(make_config, prepare_generation, sampler_following_masks):
    setup = prepare_generation(make_config(generation={"min_label_auc": 0.95}))
    _generate_all(setup)
    df = pd.read_parquet(Path(setup.dataset_uri) / "data")
    assert (df["qc_passed"] == (df["qc_label_auc"] >= 0.95)).all()


def test_the_chance_pairing_does_not_depend_on_batching(make_config, prepare_generation, sampler_following_masks):
    from indusfactory.generation.generate import generate_rows
    from indusfactory.generation.plan import read_plan

    rows = read_plan(prepare_generation(make_config()).plan, 0)
    small = prepare_generation(make_config(generation={"batch_size": 1}))
    large = prepare_generation(make_config(generation={"batch_size": 4}))
    a = [r["qc_chance_auc"] for r in generate_rows(small.ctx, rows)]
    b = [r["qc_chance_auc"] for r in generate_rows(large.ctx, rows)]
    assert a == b and all(v is not None for v in a)
