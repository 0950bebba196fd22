"""The factory learns what it is shown: a small version of benchmarks/bench_controllability.py.

Trains the default recipe (shortened) from the shipped base model on procedural grey surfaces the
base model never saw, then checks what was learned on defect-free images and masks no stage saw:
defects where the masks say (far above the chance pairing), and grey images from grey sources. A
conditioning network that learned nothing must fail the same check.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from indusfactory.config import parse_config
from indusfactory.generation import adherence
from indusfactory.infra.imaging import fit_square

pytestmark = pytest.mark.slow
RESOLUTION = 64
BUDGET = {"concept": {"steps": 150}, "condition": {"steps": 800, "validation_images": 0}}
"""A shortened default recipe: enough to learn the condition on 2 CPU cores in a few minutes."""


def _config(data, root, **sections) -> "FactoryConfig":  # noqa: F821
    raw = {
        "factory_root": str(root),
        "source": {
            "coco_annotations": str(data.coco_annotations),
            "images_dir": str(data.images_dir),
            "defect_free_dir": str(data.defect_free_dir),
            "split_field": "split",
        },
        "concept": {"validation_images": 0},
        "generation": {"steps": 12},
        "evaluation": {"enabled": False},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return parse_config(raw)


@pytest.fixture(scope="module")
def surfaces(tmp_path_factory):
    from indusfactory.demo.surfaces import write_surface_dataset

    # A seed the benchmark does not use: these exact images were never looked at while tuning.
    return write_surface_dataset(
        tmp_path_factory.mktemp("surfaces"),
        n_defective=32,
        n_defect_free=8,
        n_heldout=8,
        size=128,
        tint="grey",
        seed=11,
    )


@pytest.fixture(scope="module")
def learned(surfaces, tmp_path_factory):
    """Ingest, concept and condition of the shortened default recipe (trained once for the module)."""
    from indusfactory.learning.concept import concept_folder_for, train_concept
    from indusfactory.learning.condition import condition_folder_for, train_condition
    from indusfactory.sources.ingest import catalog_folder_for, ingest

    config = _config(surfaces, tmp_path_factory.mktemp("factory"), **BUDGET)
    catalog = ingest(config.source, catalog_folder_for(config))
    concept = train_concept(config, catalog, concept_folder_for(config, catalog))
    condition = train_condition(config, catalog, concept, condition_folder_for(config, catalog, concept))
    return config, catalog, concept, condition


def _held_out(surfaces, categories):
    """Defect-free images no stage read, with test-split masks no stage saw."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    from indusfactory.schema import category_index

    coco = json.loads(surfaces.coco_annotations.read_text())
    test_ids = {i["id"] for i in coco["images"] if i["split"] == "test"}
    names = {c["id"]: c["name"] for c in coco["categories"]}
    to_class = category_index(categories)
    masks = [
        (
            to_class[a["category_id"]],
            names[a["category_id"]],
            fit_square(
                mask_utils.decode(
                    {"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}
                ).astype(bool),
                RESOLUTION,
            ),
        )
        for a in coco["annotations"]
        if a["image_id"] in test_ids
    ]
    images = [
        fit_square(np.asarray(Image.open(p).convert("RGB")), RESOLUTION)
        for p in sorted(surfaces.heldout_defect_free_dir.glob("*.png"))
    ]
    return images, masks


def _probe(config, catalog, concept_uri, condition_uri, surfaces):
    from indusfactory.learning.condition import condition_prompt
    from indusfactory.learning.controllability import probe_cases, sample_probe
    from indusfactory.learning.models import load_generation_pipeline

    images, masks = _held_out(surfaces, catalog.categories)
    pipe = load_generation_pipeline(config.base_model, concept_uri, condition_uri, config.generation.scheduler)
    return sample_probe(pipe, config, probe_cases(images, masks, 24, seed=3), lambda n: condition_prompt(config, n))


def test_defects_land_where_held_out_masks_say_far_above_chance(learned, surfaces):
    config, catalog, concept, condition = learned
    result = _probe(config, catalog, concept.uri, condition.uri, surfaces)
    summary = result.summary
    assert summary.follows_labels, summary.headline()  # median AUC at least 0.1 above the chance pairing
    assert summary.fraction_darker >= 0.75, summary.headline()
    # the stage measured the same on its own (validation masks) and wrote it into the record and the card
    assert condition.adherence["verdict"] == adherence.FOLLOWS_LABELS, (condition.adherence, summary.headline())
    card = (__import__("pathlib").Path(condition.uri) / "README.md").read_text()
    assert "held-out adherence" in card and "follows labels" in card


def test_a_conditioning_network_that_learned_nothing_is_near_chance(learned, surfaces, tmp_path):
    from indusfactory.learning.condition import condition_folder_for, train_condition

    config, catalog, concept, _ = learned
    untrained = config.model_copy(
        update={"factory_root": str(tmp_path), "condition": config.condition.model_copy(update={"steps": 1})}
    )
    record = train_condition(untrained, catalog, concept, condition_folder_for(untrained, catalog, concept))
    assert record.adherence["verdict"] == adherence.NEAR_CHANCE
    summary = _probe(untrained, catalog, concept.uri, record.uri, surfaces).summary
    assert not summary.follows_labels, summary.headline()


def test_the_concept_measures_its_look_against_its_sources(learned):
    _, _, concept, _ = learned
    assert concept.look["sources"]["colourfulness"] == 0  # the grey surfaces
    assert concept.look["generated"]["colourfulness"] >= 0 and len(concept.look["generated"]["mean_rgb"]) == 3
    card = (__import__("pathlib").Path(concept.uri) / "README.md").read_text()
    assert "colourfulness" in card


def test_grey_sources_give_grey_samples_with_their_labels_where_they_were(learned, surfaces):
    config, catalog, concept, condition = learned
    matched = _probe(config, catalog, concept.uri, condition.uri, surfaces)
    own_colour = config.model_copy(update={"generation": config.generation.model_copy(update={"colour_match": "none"})})
    own = _probe(own_colour, catalog, concept.uri, condition.uri, surfaces)
    assert np.median([adherence.colourfulness(i) for i in matched.images]) <= 2
    assert np.median([adherence.colourfulness(i) for i in own.images]) > 2  # what the models draw themselves
    assert abs(matched.summary.median_auc - own.summary.median_auc) < 0.02, (matched.summary, own.summary)


@pytest.mark.xfail(
    strict=True,
    reason="known open goal of issue 13: the concept model itself still draws colour noise into grey "
    "textures (the shipped VAE adds colourfulness 5 after a round trip); generation's colour_match, not "
    "the model, makes the samples grey",
)
def test_the_concept_model_itself_draws_grey_from_grey_sources(learned):
    _, _, concept, _ = learned
    assert concept.look["generated"]["colourfulness"] <= 6, concept.look
