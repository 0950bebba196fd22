"""Training stages on the tiny model: exact resume from checkpoints, outputs, bad input."""

import pytest
import torch
from safetensors.torch import load_file

from indusfactory.concept import LORA_WEIGHTS, concept_fingerprint, train_concept
from indusfactory.condition import train_condition
from indusfactory.errors import BadInputError
from indusfactory.ingest import catalog_uri_for, ingest
from indusfactory.training import CHECKPOINT_FILE, checkpoint_uri_for


class Crash(Exception):
    """Stands for a worker dying mid-training."""


def _crash_at(step_to_crash: int):
    def progress(step, total, loss):
        if step == step_to_crash:
            raise Crash(f"killed at step {step}")

    return progress


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_concept_resumes_from_its_checkpoint_to_the_same_weights(make_config, catalog, tmp_path):
    config = make_config(concept={"steps": 6, "checkpoint_every": 2})
    train_concept(config, catalog, str(tmp_path / "full"))
    with pytest.raises(Crash):
        train_concept(config, catalog, str(tmp_path / "resumed"), progress=_crash_at(5))
    assert (tmp_path / "resumed.checkpoint" / CHECKPOINT_FILE).is_file()
    assert not (tmp_path / "resumed").exists(), "a crashed run must not leave a model folder"
    seen = []
    record = train_concept(config, catalog, str(tmp_path / "resumed"), progress=lambda s, t, l: seen.append(s))
    assert seen == [5, 6], "the rerun continues after the last checkpoint (step 4)"
    _assert_same_tensors(load_file(tmp_path / "full" / LORA_WEIGHTS), load_file(tmp_path / "resumed" / LORA_WEIGHTS))
    assert not (tmp_path / "resumed.checkpoint").exists() and record.steps == 6


def test_condition_resumes_from_its_checkpoint_to_the_same_weights(make_config, catalog, tmp_path):
    config = make_config(condition={"steps": 4, "checkpoint_every": 2})
    concept = train_concept(config, catalog, str(tmp_path / "concept"))
    train_condition(config, catalog, concept, str(tmp_path / "full"))
    with pytest.raises(Crash):
        train_condition(config, catalog, concept, str(tmp_path / "resumed"), progress=_crash_at(3))
    train_condition(config, catalog, concept, str(tmp_path / "resumed"))
    weights = "diffusion_pytorch_model.safetensors"
    _assert_same_tensors(load_file(tmp_path / "full" / weights), load_file(tmp_path / "resumed" / weights))
    assert not (tmp_path / "resumed.checkpoint").exists()


def test_checkpoint_frequency_does_not_change_the_model_identity(make_config, catalog):
    a = make_config(concept={"checkpoint_every": 2})
    b = make_config(concept={"checkpoint_every": 50})
    assert concept_fingerprint(a, catalog) == concept_fingerprint(b, catalog)
    c = make_config(concept={"learning_rate": 5e-4})
    assert concept_fingerprint(c, catalog) != concept_fingerprint(a, catalog)
    assert checkpoint_uri_for("/x/models/concept/abc/") == "/x/models/concept/abc.checkpoint"


def test_empty_training_split_is_refused_before_training(make_config, catalog, tmp_path):
    config = make_config(source={"split_fractions": (0.0, 0.5, 0.5)})
    empty = ingest(config.source, catalog_uri_for(config))
    with pytest.raises(BadInputError, match="no defective image in its train split"):
        train_concept(config, empty, str(tmp_path / "concept"))
    assert not (tmp_path / "concept").exists()
