import pytest
import yaml

from indusfactory.config import FactoryConfig, load_config, parse_config
from indusfactory.errors import ConfigError


def test_defaults_run_the_embedded_demo():
    config = FactoryConfig()
    assert config.base_model.pretrained == "embedded:tiny-sd"
    assert config.factory_root == "./factory"
    assert config.execution.device == "auto"


def test_yaml_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"concept": {"steps": 7}, "export": {"dataset_name": "x"}}))
    config = load_config(path)
    assert config.concept.steps == 7 and config.export.dataset_name == "x"
    assert config.condition.steps == FactoryConfig().condition.steps


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"concept": {"stepz": 3}}, "concept.stepz"),
        ({"unknown_section": {}}, "unknown_section"),
        ({"concept": {"steps": -1}}, "concept.steps"),
        ({"concept": {"lora_rank": 0}}, "concept.lora_rank"),
        ({"generation": {"shard_size": 0}}, "generation.shard_size"),
        ({"base_model": {"resolution": 100}}, "divisible by 8"),
        ({"plan": {"images_per_driver": 16}}, "plan.images_per_driver"),
        ({"concept": {"steps": "many"}}, "concept.steps"),
        ({"export": {"version": "../../etc"}}, "export.version"),
        ({"export": {"dataset_name": "/abs/path"}}, "export.dataset_name"),
        ({"evaluation": {"real_fractions": [0.0, 1.5]}}, "evaluation.real_fractions"),
        ({"execution": {"fan_out": "everywhere"}}, "execution.fan_out"),
        ({"execution": {"shard_deployment": "no-slash"}}, "execution.shard_deployment"),
    ],
)
def test_bad_config_names_the_key(tmp_path, data, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert needle in str(info.value) and str(path) in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_prompt_templates_must_name_their_fields():
    with pytest.raises(ConfigError, match="classes"):
        parse_config({"condition": {"prompt_template": "an image of a {token}"}})
