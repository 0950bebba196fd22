"""The short run form of generate-dataset and of every flow an operator starts from the UI (ingest, learn-concept,
learn-condition, evaluate-dataset): the parameters an operator changes first, profiles, a YAML file and the
advanced config composed in one documented order, and a deployment run with only the short form."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from indusfactory.config import FactoryConfig
from indusfactory.infra.errors import ConfigError
from indusfactory.runform import PROFILES, ProfileName, compose_config

SHORT = [
    "dataset_name",
    "images_per_driver",
    "defect_free_images",
    "sources",
    "base_model",
    "profile",
    "factory_root",
    "config_file",
]


UI_FLOWS = {"generate-dataset", "ingest", "learn-concept", "learn-condition", "evaluate-dataset"}
"""The flows an operator starts from the UI with a whole FactoryConfig; generate-shards is dispatched by code."""


def _flows() -> dict:
    """Every Prefect flow defined in flows/*.py, by name."""
    import importlib
    from pathlib import Path

    from prefect import Flow

    found = {}
    for path in sorted((Path(__file__).resolve().parents[1] / "flows").glob("*.py")):
        module = importlib.import_module(f"flows.{path.stem}")
        found.update({f.name: f for f in vars(module).values() if isinstance(f, Flow)})
    return found


@pytest.mark.parametrize("name", sorted(UI_FLOWS))
def test_the_run_form_lists_the_short_parameters_first_and_the_full_config_last(name):
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(_flows()[name])
    ordered = sorted(schema.properties, key=lambda name: schema.properties[name]["position"])
    assert ordered == [*SHORT, "config"], f"{name} does not take the short form first"
    assert schema.required == [] or not schema.required, "every parameter is optional"
    assert schema.properties["profile"]["anyOf"][0]["enum"] == list(PROFILES) == list(typing.get_args(ProfileName))
    assert all(schema.properties[name].get("description") for name in ordered), "each parameter is explained"


def test_every_flow_that_takes_a_factory_config_takes_the_short_form_through_the_same_code():
    """A new flow, or one that kept (or copied) the long form, fails here; generate-shards takes exact records."""
    from flows._form import short_form

    flows = _flows()
    assert set(flows) == UI_FLOWS | {"generate-shards"}, "a new flow: does an operator start it from the UI?"
    shared = short_form(lambda config: config).__code__
    for name in sorted(UI_FLOWS):
        assert flows[name].fn.__code__ is shared, f"{name} does not compose its config with flows/_form.py"
    assert list(flows["generate-shards"].parameters.properties) == [
        "config",
        "catalog",
        "plan",
        "concept",
        "condition",
        "dataset_uri",
        "shards",
    ]
    deployed = yaml.safe_load((Path(__file__).resolve().parents[1] / "deployments" / "prefect.yaml").read_text())
    for deployment in deployed["deployments"]:
        if "generate_shards" not in deployment["entrypoint"]:
            assert set(deployment.get("parameters") or {}) <= {*SHORT, "config"}, deployment


def test_a_stage_flow_runs_from_the_short_form_alone(prefect_api, sample_root, tmp_path, caplog):
    """ingest with a profile, sources and a factory root only: the config is composed as for generate-dataset
    (the run's log names the layers) and the catalog lands under that factory root."""
    from flows.ingest import ingest
    from indusfactory.sources.ingest import catalog_uri_for

    sources = {
        "coco_annotations": str(sample_root / "defective" / "annotations.json"),
        "images_dir": str(sample_root / "defective" / "images"),
        "defect_free_dir": str(sample_root / "defect_free"),
    }
    short = {"profile": "smoke", "factory_root": str(tmp_path / "factory"), "sources": sources}
    state = ingest(**short, return_state=True)
    record = state.result()
    expected, layers = compose_config(short["profile"], None, None, factory_root=short["factory_root"], sources=sources)
    assert record.uri == catalog_uri_for(expected) and record.uri.startswith(str(tmp_path / "factory"))
    configured = [r.getMessage() for r in caplog.records if r.getMessage().startswith("configuration: ")]
    assert configured == [f"configuration: {' < '.join(layers)}"]
    assert layers == [
        "defaults",
        "profile smoke",
        "short parameters factory_root, source.coco_annotations, source.defect_free_dir, source.images_dir",
    ]


def test_composition_order_is_profile_then_file_then_config_then_short_parameters(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text(
        yaml.safe_dump(
            {"factory_root": "/srv/factory", "plan": {"images_per_driver": 7, "seed": 3}, "generation": {"steps": 9}}
        )
    )
    advanced = FactoryConfig.model_validate({"plan": {"images_per_driver": 5}, "export": {"dataset_name": "adv"}})
    config, layers = compose_config("smoke", str(site), advanced, dataset_name="short", base_model="/m")
    assert layers[:4] == ["defaults", "profile smoke", f"file {site}", "advanced config"]
    assert config.concept.steps == PROFILES["smoke"]["concept"]["steps"]  # profile (nothing later sets it)
    assert config.generation.steps == 9 and config.plan.seed == 3  # the file beats the profile
    assert config.factory_root == "/srv/factory"
    assert config.plan.images_per_driver == 5  # the advanced config beats the file, only where it sets a field
    assert config.export.dataset_name == "short" and config.base_model.pretrained == "/m"  # short form wins
    assert config.plan.augmentations_per_image == PROFILES["smoke"]["plan"]["augmentations_per_image"]

    full = FactoryConfig()
    assert compose_config(config=full)[0] is full, "a caller passing only a full config gets it unchanged"
    assert compose_config()[0] == FactoryConfig()
    assert compose_config("demo")[0] == FactoryConfig(), "demo is the defaults"
    cpu_128 = compose_config("cpu-128")[0]
    assert cpu_128.base_model.resolution == 128 and cpu_128.evaluation.steps == 400
    same_otherwise = cpu_128.model_copy(
        update={"base_model": FactoryConfig().base_model, "evaluation": FactoryConfig().evaluation}
    )
    assert same_otherwise == FactoryConfig(), "cpu-128 is the demo recipe at 128 px (and its evaluation budgets)"
    with pytest.raises(ConfigError, match="images_per_driver"):
        compose_config("smoke", images_per_driver=99)
    with pytest.raises(ConfigError, match="does not exist"):
        compose_config(config_file=str(tmp_path / "missing.yaml"))


def test_a_config_file_on_s3(s3_bucket):
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).pipe_file(
        f"{s3_bucket}/nightly.yaml".removeprefix("s3://"), yaml.safe_dump({"generation": {"steps": 11}}).encode()
    )
    config, layers = compose_config("sd15-gpu", f"{s3_bucket}/nightly.yaml")
    assert config.generation.steps == 11 and config.base_model.resolution == 512
    assert layers[-1] == f"file {s3_bucket}/nightly.yaml"


def test_the_nightly_deployment_uses_the_short_form():
    from test_workpool import REPO

    nightly = next(
        d
        for d in yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["deployments"]
        if d["name"] == "nightly"
    )
    params = dict(nightly["parameters"])
    assert params["profile"] == "sd15-gpu" and params["dataset_name"] and params["sources"]
    config, _ = compose_config(params.pop("profile"), None, params.pop("config"), **params)
    assert config.execution.fan_out == "work_pool" and config.base_model.resolution == 512
    assert config.source.images_dir.startswith("s3://") and not config.source.make_sample_data


@pytest.fixture(scope="module")
def short_form_run(tmp_path_factory, sample_root, tiny_model_path):
    """A real Prefect server (with its UI), the generate-dataset/local deployment, a process worker, and one run
    of it with only the short form (profile smoke on the tiny model), watched to its end."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from test_workpool import PREFECT, _cli, _logs_tail, running_prefect_server

    tmp = tmp_path_factory.mktemp("short-form")
    with running_prefect_server(tmp, ui=True) as (env, procs, logs):
        _cli(env, "work-pool", "create", "local-process", "--type", "process")
        _cli(
            env,
            "--no-prompt",
            "deploy",
            "--prefect-file",
            "deployments/prefect.yaml",
            "--name",
            "generate-dataset/local",
        )
        procs.start("worker", [PREFECT, "worker", "start", "--pool", "local-process", "--name", "operator"], env)
        factory = tmp / "factory"
        params = {
            "dataset_name": "short-form",
            "images_per_driver": 2,
            "defect_free_images": 1,
            "profile": "smoke",
            "base_model": str(tiny_model_path),
            "factory_root": str(factory),
            "sources": {
                "coco_annotations": str(sample_root / "defective" / "annotations.json"),
                "images_dir": str(sample_root / "defective" / "images"),
                "defect_free_dir": str(sample_root / "defect_free"),
            },
        }
        try:
            out = _cli(
                env,
                "deployment",
                "run",
                "generate-dataset/local",
                "--params",
                json.dumps(params),
                "--watch",
                "--watch-timeout",
                "540",
                timeout=600,
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{_logs_tail(logs)}") from None
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
            (run,) = client.read_flow_runs()
            artifacts = client.read_artifacts()
        yield SimpleNamespace(
            env=env,
            out=out,
            logs=logs,
            factory=factory,
            run=run,
            tmp=tmp,
            artifacts=[a for a in artifacts if a.flow_run_id == run.id],
            ui=env["PREFECT_API_URL"].removesuffix("/api"),
            tail=lambda: _logs_tail(logs),
        )


@pytest.mark.slow
def test_a_deployment_run_with_only_the_short_form_completes(short_form_run):
    run = short_form_run
    assert "Completed" in run.out and run.run.state.is_completed(), run.out + run.tail()
    assert set(run.run.parameters) == {
        "dataset_name",
        "images_per_driver",
        "defect_free_images",
        "profile",
        "base_model",
        "factory_root",
        "sources",
    }, "only the short form was given"
    manifest = json.loads(next((run.factory / "datasets" / "short-form").glob("v-*/manifest.json")).read_text())
    config = manifest["config"]
    assert config["plan"]["images_per_driver"] == 2 and config["plan"]["max_defect_free_images"] == 1
    assert config["concept"]["steps"] == PROFILES["smoke"]["concept"]["steps"]
    assert manifest["counts"]["samples"] == manifest["counts"]["planned"] > 0


@pytest.mark.slow
def test_the_deployment_runs_summary_has_every_field(short_form_run):
    from test_run_summary import check_summary

    run = short_form_run
    summary = next(a for a in run.artifacts if a.key == "short-form-summary")
    dataset = next((run.factory / "datasets" / "short-form").glob("v-*"))
    concept, condition = (next((run.factory / "models" / kind).iterdir()) for kind in ("concept", "condition"))
    check_summary(summary.data, str(dataset), str(concept), str(condition), "not run")  # smoke: no evaluation
