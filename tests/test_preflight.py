"""Preflight: a config's names, base model, storage and devices are checked in seconds, before ingest.

Each test builds the bad input and asserts the problem names the key, the place and what to check.
"""

from __future__ import annotations

import ast
import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from indusfactory import preflight
from indusfactory.infra.errors import ConfigError, PreflightError

FLOWS = ("evaluate_dataset", "generate_dataset", "generate_shards", "ingest", "learn_concept", "learn_condition")


def _text(problems) -> str:
    return "\n".join(str(p) for p in problems)


def test_a_good_config_passes_every_check(make_config):
    started = time.perf_counter()
    assert preflight.check(make_config()) == []
    assert time.perf_counter() - started < 30  # seconds, on a loaded 2-core CI machine (imports included)


def test_a_misspelt_scorer_and_a_bad_crack_style_are_named(make_config):
    config = make_config(generation={"adherence_scorer": "dark_iuo"}, plan={"procedural_styles": {"crack": "zigzag"}})
    text = _text(preflight.check(config, only=["names"]))
    assert "generation.adherence_scorer" in text and "'dark_iuo'" in text and "did you mean 'dark_iou'" in text
    assert "plan.procedural_styles.crack" in text and "'zigzag'" in text and "hairline" in text
    missing = make_config(generation={"adherence_scorer": "segformer:/no/such/segmentor"})
    assert "/no/such/segmentor has no config.json" in _text(preflight.check(missing, only=["names"]))


def test_import_path_scorers_need_the_deployments_permission(make_config, monkeypatch):
    from indusfactory.generation.scorers import adherence_scorer

    monkeypatch.delenv("INDUSFACTORY_ALLOW_SCORER_IMPORTS", raising=False)
    config = make_config(generation={"adherence_scorer": "indusfactory.generate:dark_iou"})
    text = _text(preflight.check(config, only=["names"]))
    assert "generation.adherence_scorer" in text and "INDUSFACTORY_ALLOW_SCORER_IMPORTS=1" in text
    assert "entry point" in text and "register_adherence_scorer" in text
    with pytest.raises(ConfigError, match="does not allow"):
        adherence_scorer("indusfactory.generate:dark_iou")
    monkeypatch.setenv("INDUSFACTORY_ALLOW_SCORER_IMPORTS", "1")
    assert preflight.check(config, only=["names"]) == []
    assert adherence_scorer("indusfactory.generate:dark_iou") is adherence_scorer("dark_iou")
    bad = make_config(generation={"adherence_scorer": "no_such_module_xyz:score"})
    assert "cannot be imported" in _text(preflight.check(bad, only=["names"]))


def test_scorers_registered_by_an_installed_package_entry_point(make_config, tmp_path, monkeypatch):
    from indusfactory.generation.scorers import adherence_scorer, known_names

    site = tmp_path / "site"
    (site / "acme_scorers").mkdir(parents=True)
    (site / "acme_scorers" / "__init__.py").write_text("def score(images, masks):\n    return [0.5] * len(images)\n")
    info = site / "acme_scorers-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-scorers\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[indusfactory.adherence_scorers]\nacme_blob = acme_scorers:score\nacme_broken = acme_scorers:nothing_here\n"
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("INDUSFACTORY_ALLOW_SCORER_IMPORTS", raising=False)

    assert {"acme_blob", "acme_broken", "dark_iou"} <= set(known_names())
    assert adherence_scorer("acme_blob")([1, 2], [1, 2]) == [0.5, 0.5]  # no import permission needed
    assert preflight.check(make_config(generation={"adherence_scorer": "acme_blob"}), only=["names"]) == []
    broken = make_config(generation={"adherence_scorer": "acme_broken"})
    assert "entry point 'acme_scorers:nothing_here' cannot be loaded" in _text(preflight.check(broken, only=["names"]))
    sys.modules.pop("acme_scorers", None)


def _copy_model(tiny_model_path: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model_path, tmp_path / "model"))


def test_bad_base_model_folders_are_named(make_config, tiny_model_path, tmp_path):
    def problems(folder: Path, **base) -> str:
        return _text(preflight.check(make_config(base_model={"pretrained": str(folder), **base}), only=["base_model"]))

    model = _copy_model(tiny_model_path, tmp_path)
    assert problems(model) == ""
    assert "does not exist" in problems(tmp_path / "nowhere")

    shutil.rmtree(model / "vae")
    assert f"component folder {model / 'vae'} is missing" in problems(model)

    model = _copy_model(tiny_model_path, tmp_path / "2")
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert f"{weights} is truncated" in problems(model)
    weights.write_bytes(b"\x00" * 4)
    assert f"{weights} is truncated" in problems(model)
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    assert f"{weights} is not a safetensors file" in problems(model)

    model = _copy_model(tiny_model_path, tmp_path / "3")
    index = json.loads((model / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    index["text_encoder"] = ["transformers", "CLIPTextModelWithProjection"]
    (model / "model_index.json").write_text(json.dumps(index))
    text = problems(model)
    assert "'StableDiffusionXLPipeline', not a Stable Diffusion 1.x pipeline" in text
    assert "CLIPTextModelWithProjection" in text and "base_model.pretrained" in text

    model = _copy_model(tiny_model_path, tmp_path / "4")
    (model / "text_encoder" / "model.safetensors").rename(model / "text_encoder" / "pytorch_model.bin")
    assert "holds no .safetensors weights" in problems(model)
    assert problems(model, allow_pickle_weights=True) == ""


def test_missing_evaluation_model_folders_are_named(make_config, tmp_path):
    config = make_config(
        evaluation={
            "enabled": True,
            "segmentor_pretrained": str(tmp_path / "no-segformer"),
            "feature_extractor": f"clip:{tmp_path / 'no-clip'}",
        }
    )
    text = _text(preflight.check(config, only=["base_model"]))
    assert "evaluation.segmentor_pretrained" in text and "no-segformer does not exist" in text
    assert "evaluation.feature_extractor" in text and "no-clip does not exist" in text
    assert preflight.check(config, "learn-concept", only=["base_model"]) == []  # training does not evaluate
    hub = make_config(evaluation={"enabled": True, "segmentor_pretrained": "nvidia/mit-b0"})
    assert preflight.check(hub, only=["base_model"]) == []  # a hub id is left to loading


def test_missing_or_unreadable_sources_and_an_unwritable_factory_root_are_named(make_config, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = make_config(
        factory_root=str(blocker / "factory"),
        source={"images_dir": str(tmp_path / "no-such-images"), "coco_annotations": str(tmp_path / "none.json")},
    )
    text = _text(preflight.check(config, only=["storage"]))
    assert "source.images_dir" in text and "no-such-images does not exist" in text
    assert "source.coco_annotations" in text and "none.json does not exist" in text
    assert "factory_root" in text and f"{blocker / 'factory'} is not writable" in text

    as_file = make_config(source={"defect_free_dir": str(blocker)})
    assert "is a file, expected a folder" in _text(preflight.check(as_file, only=["storage"]))


def test_too_little_free_space_is_named(make_config, tmp_path):
    config = make_config(execution={"preflight_min_free_mb": 1e12})
    text = _text(preflight.check(config, only=["storage"]))
    assert "factory_root" in text and "MiB free" in text and "preflight_min_free_mb" in text
    assert not [p for p in (tmp_path / "factory").iterdir() if p.name.startswith(".preflight-")]


def test_cuda_asked_for_but_absent_is_named(make_config):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    text = _text(preflight.check(make_config(execution={"device": "cuda"}), only=["devices"]))
    assert "execution.device" in text and "no CUDA device is available" in text
    text = _text(preflight.check(make_config(execution={"devices": ["cpu", "cuda:1"]}), only=["devices"]))
    assert "execution.devices" in text


def test_every_flow_runs_preflight_first():
    for name in FLOWS:
        tree = ast.parse((Path(__file__).parents[1] / "flows" / f"{name}.py").read_text())
        calls = [
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Call) and getattr(n.func.func, "id", None) == "run"
        ]
        first = min(calls, key=lambda n: (n.lineno, n.col_offset))
        assert first.func.args[0].id == "preflight_task", f"flows/{name}.py: preflight is not the first task"
        assert ast.literal_eval(first.args[1]) == name.replace("_", "-")


def test_a_flow_with_bad_names_fails_in_preflight_before_ingest(prefect_api, make_config, tmp_path):
    from flows.generate_dataset import generate_dataset

    config = make_config(generation={"adherence_scorer": "dark_iuo"}, plan={"procedural_styles": {"crack": "zigzag"}})
    started = time.perf_counter()
    with pytest.raises(PreflightError) as failed:
        generate_dataset(config=config)
    assert time.perf_counter() - started < 60
    message = str(failed.value)
    assert "2 problem(s)" in message and "dark_iuo" in message and "plan.procedural_styles.crack" in message
    assert not (tmp_path / "factory" / "catalog").exists(), "ingest must not have started"


# -- S3 ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_s3_places_are_checked_against_the_endpoint(make_config, s3_bucket, s3_endpoint, sample_root, monkeypatch):
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.put(str(sample_root) + "/", f"{s3_bucket}/sources/", recursive=True)
    sources = {
        "coco_annotations": f"{s3_bucket}/sources/defective/annotations.json",
        "images_dir": f"{s3_bucket}/sources/defective/images",
        "defect_free_dir": f"{s3_bucket}/sources/defect_free",
    }
    good = make_config(factory_root=f"{s3_bucket}/factory", source=sources)
    assert preflight.check(good, only=["storage"]) == []
    assert not [p for p in fs.find(s3_bucket) if ".preflight-" in p], "the test object is removed"

    missing = make_config(
        factory_root="s3://no-such-bucket-here/factory",
        source={**sources, "images_dir": f"{s3_bucket}/sources/nothing-here"},
    )
    text = _text(preflight.check(missing, only=["storage"]))
    assert "factory_root" in text and "'no-such-bucket-here'" in text and "NoSuchBucket" in text
    assert s3_endpoint in text
    assert "source.images_dir" in text and "nothing under" in text

    # The endpoint does not answer: one problem naming it, in seconds.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    started = time.perf_counter()
    text = _text(preflight.check(good, only=["storage"]))
    assert "http://127.0.0.1:9 cannot be reached" in text and len(preflight.check(good, only=["storage"])) == 1
    assert time.perf_counter() - started < 60


@pytest.mark.slow
def test_s3_credentials_and_write_permission_are_checked(make_config, s3_bucket, s3_iam):
    key_id, secret = s3_iam.user_with(["s3:ListBucket", "s3:GetObject"])
    config = make_config(factory_root=f"{s3_bucket}/factory")
    with s3_iam.enforced(key_id="AKIAWRONGWRONGWRONG0", secret="wrong-secret-value"):
        text = _text(preflight.check(config, only=["storage"]))
    assert "factory_root" in text and "InvalidAccessKeyId" in text and "AWS_ACCESS_KEY_ID" in text
    assert "wrong-secret-value" not in text
    with s3_iam.enforced(key_id=key_id, secret=secret):
        text = _text(preflight.check(config, only=["storage"]))
    assert "cannot write to" in text and "s3:PutObject" in text and "AccessDenied" in text
