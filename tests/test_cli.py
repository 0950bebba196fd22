import yaml
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def test_sample_data_and_tiny_model_commands(tmp_path):
    result = runner.invoke(app, ["sample-data", str(tmp_path / "data"), "--n-defective", "3", "--n-defect-free", "2"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "data" / "defect_free").glob("*.png"))) == 2
    result = runner.invoke(app, ["tiny-model", str(tmp_path / "model")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_sample_data_rejects_bad_size(tmp_path):
    result = runner.invoke(app, ["sample-data", str(tmp_path / "d"), "--size", "30"])
    assert result.exit_code == 2 and "size" in result.output


def test_run_with_unknown_key_names_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"generation": {"stepz": 3}}))
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2 and "generation.stepz" in result.output


def _config_file(tmp_path, sample_root, tiny_model_path, images_dir, **extra):
    """A YAML config on the sample data and the tiny model, its images from ``images_dir``."""
    path = tmp_path / "c.yaml"
    source = {
        "coco_annotations": str(sample_root / "defective" / "annotations.json"),
        "images_dir": str(images_dir),
        "defect_free_dir": str(sample_root / "defect_free"),
    }
    base = {"factory_root": str(tmp_path / "factory"), "base_model": {"pretrained": str(tiny_model_path)}}
    path.write_text(yaml.safe_dump({**base, "source": source, **extra}))
    return path


def test_run_with_missing_source_folder_names_it(prefect_api, tmp_path, sample_root, tiny_model_path):
    path = _config_file(tmp_path, sample_root, tiny_model_path, tmp_path / "no-such-images")
    result = runner.invoke(app, ["run", str(path), "--stage", "ingest"])
    assert result.exit_code == 2, result.output
    assert "source.images_dir" in result.output and "no-such-images" in result.output


def test_run_takes_a_profile_under_its_file(prefect_api, tmp_path, sample_root, tiny_model_path, monkeypatch):
    """``indusfactory run FILE --profile cpu-128``: the profile's resolution unless the file sets one; an unknown
    profile is a usage error naming the known ones."""
    images = sample_root / "defective" / "images"
    path = _config_file(tmp_path, sample_root, tiny_model_path, images, generation={"steps": 4})
    result = runner.invoke(app, ["run", str(path), "--profile", "nope"])
    assert result.exit_code == 2 and "unknown profile 'nope'" in result.output and "cpu-128" in result.output

    import flows.cli as cli

    seen = []
    original = cli._run_flow
    monkeypatch.setattr(cli, "_run_flow", lambda config, stage: seen.append(config) or original(config, stage))
    result = runner.invoke(app, ["run", str(path), "--stage", "ingest", "--profile", "cpu-128"])
    assert result.exit_code == 0, result.output
    assert seen[0].base_model.resolution == 128 and seen[0].generation.steps == 4  # the file's keys win
    assert seen[0].base_model.pretrained == str(tiny_model_path)
