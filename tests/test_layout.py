"""The layout contracts: flows named as the docs say, deployable entrypoints, a Prefect-free library."""

import importlib
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_library_never_imports_prefect():
    offenders = [str(p) for p in (ROOT / "indusfactory").rglob("*.py")
                 if re.search(r"^\s*(from|import) prefect", p.read_text(), re.MULTILINE)]
    assert offenders == []


def test_deployment_entrypoints_resolve_to_named_flows():
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    names = set()
    for deployment in spec["deployments"]:
        path, attr = deployment["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, attr)
        names.add(f"{flow.name}/{deployment['name']}")
        assert deployment["enforce_parameter_schema"] is True
    assert {"generate-dataset/local", "generate-dataset/nightly", "ingest/local", "learn-concept/local",
            "learn-condition/local"} <= names


def test_flow_parameters_are_the_factory_config_form():
    from flows.generate_dataset import generate_dataset

    schema = generate_dataset.parameters.model_dump()
    assert list(schema["properties"]) == ["config"]
    definitions = schema.get("definitions") or schema.get("$defs")
    assert {"FactoryConfig", "ConceptConfig", "GenerationConfig"} <= set(definitions)
