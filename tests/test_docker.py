"""The Docker images (docker/): they cannot be built here (no engine), so they are linted with hadolint and
their Dockerfiles checked: non-root, the model cache in a volume, CUDA torch on the GPU image."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import dockerfile_env, dockerfile_text

REPO = Path(__file__).resolve().parents[1]
POOLS = REPO / "deployments" / "pools"
PREFECT = str(Path(sys.executable).parent / "prefect")
PLACEHOLDER = re.compile(r"\{\{\s*([\w.$]+)\s*\}\}")


ROOT = Path(__file__).resolve().parents[1]


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint is not installed: it is a dev dependency (pip install -e '.[dev]')")
    return found


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfile_passes_hadolint(dockerfile):
    result = subprocess.run([_hadolint(), str(ROOT / "docker" / dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_lint_catches_a_baddockerfile_text(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\n")
    assert subprocess.run([_hadolint(), str(bad)], capture_output=True).returncode != 0


@pytest.mark.parametrize("name", ["Dockerfile.gpu", "Dockerfile.cpu"])
def test_images_are_non_root_with_the_model_cache_in_a_volume(name):
    dockerfile = dockerfile_text(name)
    env = dockerfile_env(dockerfile)
    user = re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)
    assert user and user[-1] not in ("0", "root")
    volumes = re.findall(r'^VOLUME \["([^"]+)"\]', dockerfile, re.MULTILINE)
    assert any(env["HF_HOME"].startswith(v + "/") for v in volumes), "the model cache lives in a volume"
    workdir = re.findall(r"^WORKDIR (\S+)", dockerfile, re.MULTILINE)[-1]
    assert env["INDUSFACTORY_HOME"] == workdir, "deployments/prefect.yaml's pull step cds into INDUSFACTORY_HOME"
    for arg in ("TORCH_VERSION", "TORCH_INDEX", "PREFECT_VERSION"):
        assert re.search(rf"^ARG {arg}=\S+", dockerfile, re.MULTILINE), arg
    assert re.search(r"pip install \. ", dockerfile), "the package itself is installed"
    assert re.search(r'pip install --index-url "\$\{TORCH_INDEX\}" "torch==\$\{TORCH_VERSION\}"', dockerfile)
    prefect_pin = re.search(r"^prefect-version: (\S+)", (REPO / "deployments/prefect.yaml").read_text(), re.M)
    assert re.search(rf"^ARG PREFECT_VERSION={re.escape(prefect_pin.group(1))}$", dockerfile, re.MULTILINE)


def test_gpu_image_is_a_cuda_runtime_with_cuda_torch():
    dockerfile = dockerfile_text("Dockerfile.gpu")
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)", dockerfile, re.MULTILINE).group(1)
    assert base.startswith("nvidia/cuda:") and "runtime" in base
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}", dockerfile, re.MULTILINE)
    cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)", base).groups()
    assert re.search(
        rf"^ARG TORCH_INDEX=https://download.pytorch.org/whl/cu{''.join(cuda)}$", dockerfile, re.MULTILINE
    ), "torch wheels for the CUDA version of the base image"


def test_dockerignore_keeps_the_context_small():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "factory", "tests"} <= ignored
    copied = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile_text("Dockerfile.gpu"), re.MULTILINE)
    for sources in copied:
        for source in sources.split():
            assert source not in ignored and (REPO / source).exists(), source
