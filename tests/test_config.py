import pytest
import yaml

from indusfactory.config import FactoryConfig, load_config, parse_config
from indusfactory.infra.errors import ConfigError


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


@pytest.mark.parametrize(
    "text",
    [
        "a: " + "[" * 100_000 + "]" * 100_000,  # flow sequences 100,000 deep
        "factory_root: " + "{a: " * 20_000 + "1" + "}" * 20_000,  # flow mappings
        "\n".join("  " * i + f"k{i}:" for i in range(5_000)) + " 1",  # block mappings, 5,000 levels of indentation
    ],
    ids=["sequences", "mappings", "blocks"],
)
def test_yaml_nested_too_deep_is_a_config_error_naming_the_file(tmp_path, text):
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="nested too deeply") as info:
        load_config(path)
    assert str(path) in str(info.value) and info.value.__cause__ is None


def test_a_config_file_that_is_not_utf8_is_a_config_error_naming_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("factory_root: /data/usine-\xe9t\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8") as info:
        load_config(path)
    assert str(path) in str(info.value) and "byte 26" in str(info.value)


def test_the_cli_prints_a_bad_config_file_in_a_few_lines(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    for name, data in (("deep.yaml", ("a: " + "[" * 100_000).encode()), ("latin1.yaml", b"factory_root: caf\xe9\n")):
        path = tmp_path / name
        path.write_bytes(data)
        result = CliRunner().invoke(app, ["run", str(path)])
        assert result.exit_code == 2 and str(path) in result.output, result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 3, result.output


def test_prompt_templates_must_name_their_fields():
    with pytest.raises(ConfigError, match="classes"):
        parse_config({"condition": {"prompt_template": "an image of a {token}"}})


def test_every_field_of_the_run_form_has_a_description():
    """Prefect renders FactoryConfig's JSON schema as the run form: a field without a description is a bare name
    there (a subclass that overrides a default must restate the inherited description)."""
    schema = FactoryConfig.model_json_schema()
    models = {"FactoryConfig": schema, **schema.get("$defs", {})}
    bare = [
        f"{model}.{name}"
        for model, spec in models.items()
        for name, field in spec.get("properties", {}).items()
        if not field.get("description")
    ]
    assert bare == []
    assert len(schema["$defs"]) >= 10  # every section is checked, not only the top level


@pytest.mark.parametrize(
    ("key", "value", "counts"),
    [
        ("concept.checkpoint_every", 7, False),
        ("concept.validation_images", 0, False),
        ("condition.validation_probe_samples", 3, False),
        ("concept.learning_rate", 2e-3, True),
        ("condition.steps", 5, True),
    ],
)
def test_fingerprint_membership_is_declared_on_the_field(key, value, counts):
    """A setting marked ``NOT_IN_FINGERPRINT`` on its field leaves the trained model's fingerprint alone;
    every other setting of the stage changes it (and so retrains)."""
    from types import SimpleNamespace

    from indusfactory.infra.fingerprint import in_fingerprint
    from indusfactory.learning.concept import concept_fingerprint
    from indusfactory.learning.condition import condition_fingerprint

    section, name = key.split(".")
    catalog = SimpleNamespace(content_fingerprint="c" * 16)
    concept = SimpleNamespace(fingerprint="f" * 16)

    def fingerprints(config: FactoryConfig) -> tuple[str, str]:
        return concept_fingerprint(config, catalog), condition_fingerprint(config, catalog, concept)

    before = fingerprints(parse_config({}))
    after = fingerprints(parse_config({section: {name: value}}))
    changed = before[0] != after[0] if section == "concept" else before[1] != after[1]
    assert changed is counts
    assert in_fingerprint(type(getattr(parse_config({}), section)), name) is counts
