"""The layout contracts: flows named as the docs say, deployable entrypoints, a Prefect-free library."""

import ast
import importlib
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_library_never_imports_prefect():
    offenders = [
        str(p)
        for p in (ROOT / "indusfactory").rglob("*.py")
        if re.search(r"^\s*(from|import) prefect", p.read_text(), re.MULTILINE)
    ]
    assert offenders == []


ORCHESTRATION = ("prefect", "tasks", "flows")


def _orchestration_imports(path: Path) -> list[str]:
    """Every import of Prefect, ``tasks`` or ``flows`` in a module: at the top, inside functions (lazy),
    or by name through ``__import__`` / ``importlib.import_module`` (an f-string counts by its prefix)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif (
            isinstance(node, ast.Call)
            and node.args
            and (
                (isinstance(node.func, ast.Name) and node.func.id in ("__import__", "import_module"))
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            arg = node.args[0]
            if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                arg = arg.values[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                names = [arg.value]
        found += [f"{path}:{node.lineno}: {name}" for name in names if name.split(".")[0] in ORCHESTRATION]
    return found


def test_library_never_imports_prefect_tasks_or_flows_not_even_lazily():
    offenders = [hit for p in sorted((ROOT / "indusfactory").rglob("*.py")) for hit in _orchestration_imports(p)]
    assert offenders == []


def test_the_import_check_sees_lazy_and_by_name_imports(tmp_path):
    module = tmp_path / "probe.py"
    module.write_text(
        "def run(stage):\n    from prefect import flow\n    import tasks.ingest\n"
        "    return __import__(f'flows.{stage}', fromlist=['*'])\n"
    )
    assert [hit.rsplit(": ", 1)[1] for hit in _orchestration_imports(module)] == ["prefect", "tasks.ingest", "flows."]


def test_deployment_entrypoints_resolve_to_named_flows():
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    names = set()
    for deployment in spec["deployments"]:
        path, attr = deployment["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, attr)
        names.add(f"{flow.name}/{deployment['name']}")
        assert deployment["enforce_parameter_schema"] is True
    assert {
        "generate-dataset/local",
        "generate-dataset/nightly",
        "ingest/local",
        "learn-concept/local",
        "learn-condition/local",
    } <= names


def test_flow_parameters_are_the_factory_config_form():
    from flows.generate_dataset import generate_dataset

    schema = generate_dataset.parameters.model_dump()
    assert list(schema["properties"])[-1] == "config"  # the short run form first, the full config last
    definitions = schema.get("definitions") or schema.get("$defs")
    assert {"FactoryConfig", "ConceptConfig", "GenerationConfig"} <= set(definitions)
