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


def _factory_file_names() -> dict[str, str]:
    """The file names ``indusfactory.layout`` owns (``record.json``, ...): ``{value: constant name}``."""
    from indusfactory import layout

    return {value: name for name, value in vars(layout).items() if name.isupper() and "." in str(value)}


def test_only_the_layout_names_the_files_and_folders_of_the_factory_root():
    """A path under the factory root is built from ``indusfactory.layout`` alone: no other module of the
    library, the tasks or the flows spells one of its file names (``record.json``, ``manifest.json``, ...);
    only the storage floor's default markers, checked against the layout below."""
    names = _factory_file_names()
    assert {"record.json", "manifest.json", "catalog.json", "plan.json", "checkpoint.pt"} <= names.keys()
    allowed = {("indusfactory/infra/storage.py", "record.json"), ("indusfactory/infra/storage.py", "class_images.json")}
    offenders = []
    for folder in ("indusfactory", "tasks", "flows"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel == "indusfactory/layout.py" or "assets" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and node.value in names and (rel, node.value) not in allowed:
                    offenders.append(f"{rel}:{node.lineno}: {node.value!r} (layout.{names[node.value]})")
    assert offenders == []


def test_storage_default_markers_are_the_layouts():
    """The storage floor cannot import the layout; its default completion markers are the layout's."""
    from indusfactory import layout
    from indusfactory.infra import storage

    assert set(storage.COMPLETION_MARKERS) == {layout.MODEL_RECORD, layout.CLASS_IMAGES_RECORD}


def test_a_stage_folder_carries_the_fingerprint_it_is_named_by(tmp_path):
    from indusfactory.layout import FactoryLayout

    root = FactoryLayout.of(str(tmp_path / "factory"))
    folders = [root.catalog("c1"), root.model("concept", "m1"), root.plan("p1"), root.dataset("demo", "v-1")]
    assert [Path(f.uri).name for f in folders] == [f.fingerprint for f in folders]
    assert [Path(f.marker).name for f in folders] == ["catalog.json", "record.json", "plan.json", "manifest.json"]
    version = root.dataset("demo", "v-1")
    assert (
        version.files.latest == root.latest("demo")
        and version.files.sibling("v-2").uri == root.dataset("demo", "v-2").uri
    )
    assert Path(version.files.evaluation_folder("e1").uri) == Path(version.uri) / "evaluation" / "e1"


def test_a_stage_written_to_a_uri_of_its_own_records_the_fingerprint_of_its_inputs(make_config, catalog, tmp_path):
    """Nothing reads a fingerprint out of a path: a plan written anywhere records the plan's fingerprint."""
    from indusfactory.generation.plan import build_plan, plan_fingerprint, plan_folder_for

    config = make_config(plan={"max_defect_free_images": 2, "augmentations_per_image": 1})
    anywhere = build_plan(config, catalog, str(tmp_path / "somewhere-else"))
    assert anywhere.fingerprint == plan_fingerprint(config, catalog) == plan_folder_for(config, catalog).fingerprint
    assert Path(anywhere.uri).name == "somewhere-else"
