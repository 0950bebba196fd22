"""Work-pool job templates (deployments/pools): Prefect's defaults extended, every placeholder declared,
accepted by a real server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import dockerfile_env, dockerfile_text

REPO = Path(__file__).resolve().parents[1]
POOLS = REPO / "deployments" / "pools"
PREFECT = str(Path(sys.executable).parent / "prefect")
PLACEHOLDER = re.compile(r"\{\{\s*([\w.$]+)\s*\}\}")


def _template(kind: str) -> dict:
    return json.loads((POOLS / f"{kind}.json").read_text())


def _placeholders(obj) -> set[str]:
    return set(PLACEHOLDER.findall(json.dumps(obj)))


def _defaults(template: dict) -> dict:
    return {name: spec["default"] for name, spec in template["variables"]["properties"].items() if "default" in spec}


def _prefect_default_template(kind: str) -> dict:
    """Prefect's own default base job template of a worker type (process: the installed worker; kubernetes,
    docker: the metadata of prefect-kubernetes and prefect-docker bundled with the Prefect server)."""
    if kind == "process":
        from prefect.workers.process import ProcessWorker

        return ProcessWorker.get_default_base_job_template()
    import prefect

    bundled = Path(prefect.__file__).parent / "server/api/collections_data/views/aggregate-worker-metadata.json"
    for collection in json.loads(bundled.read_text()).values():
        for worker in collection.values():
            if worker.get("type") == kind:
                return worker["default_base_job_configuration"]
    raise LookupError(kind)


@pytest.mark.parametrize("kind", ["process", "kubernetes", "docker"])
def test_pool_template_extends_prefects_default_and_declares_every_placeholder(kind):
    template = _template(kind)
    assert set(template) == {"job_configuration", "variables"}
    declared = set(template["variables"]["properties"])
    used = _placeholders(template["job_configuration"])
    assert used <= declared, f"undeclared variables in {kind}.json: {used - declared}"
    assert not declared - used, f"variables of {kind}.json that nothing uses: {declared - used}"
    default = _prefect_default_template(kind)
    assert set(default["job_configuration"]) <= set(template["job_configuration"]), "a default job field was dropped"
    assert set(default["variables"]["properties"]) <= declared, "a default variable was dropped"
    env = _defaults(template)["env"]
    assert env["HF_HOME"] and env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_process_template_renders_into_prefects_process_job_configuration(prefect_api):
    import asyncio

    from prefect.workers.process import ProcessJobConfiguration

    template = _template("process")
    configuration = asyncio.run(ProcessJobConfiguration.from_template_and_values(template, {}))
    assert configuration.env["HF_HOME"] == "/var/cache/indusfactory/huggingface"
    override = asyncio.run(ProcessJobConfiguration.from_template_and_values(template, {"env": {"HF_HOME": "/big"}}))
    assert override.env["HF_HOME"] == "/big" and "PYTORCH_CUDA_ALLOC_CONF" in override.env


def test_kubernetes_template_requests_a_gpu_and_mounts_the_model_cache():
    from prefect.utilities.templating import apply_values

    template = _template("kubernetes")
    rendered = apply_values(template["job_configuration"], _defaults(template))
    pod = rendered["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert "node_selector" in _placeholders(template["job_configuration"]["job_manifest"]) and pod["nodeSelector"] == {}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == "indusfactory-models"
    assert container["env"]["HF_HOME"].startswith(mounts["model-cache"] + "/")
    assert container["image"] == "indusfactory:gpu"
    assert container["envFrom"] == [{"secretRef": {"name": "indusfactory-credentials", "optional": True}}]
    assert pod["securityContext"]["runAsUser"] == int(
        re.search(r"useradd .*--uid (\d+)", dockerfile_text("Dockerfile.gpu")).group(1)
    )
    custom = apply_values(
        template["job_configuration"], {**_defaults(template), "gpu_count": 2, "node_selector": {"pool": "a100"}}
    )
    custom_pod = custom["job_manifest"]["spec"]["template"]["spec"]
    assert custom_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert custom_pod["nodeSelector"] == {"pool": "a100"}


def test_docker_template_requests_a_gpu_of_the_gpu_image_with_a_model_cache_volume():
    from prefect.utilities.templating import apply_values

    template = _template("docker")
    rendered = apply_values(template["job_configuration"], _defaults(template))
    request = rendered["container_create_kwargs"]["device_requests"][0]
    assert request["capabilities"] == [["gpu"]] and request["device_ids"] == ["0"]
    gpu_dockerfile = dockerfile_text("Dockerfile.gpu")
    tag = re.search(r"docker build -f docker/Dockerfile.gpu -t (\S+) \.", gpu_dockerfile).group(1)
    assert rendered["image"] == tag
    volume, mount = rendered["volumes"][0].split(":")[:2]
    assert volume == "indusfactory-models" and f'VOLUME ["{mount}"]' in gpu_dockerfile
    assert rendered["env"]["HF_HOME"] == dockerfile_env(gpu_dockerfile)["HF_HOME"]
    assert rendered["env"]["HF_HOME"].startswith(mount + "/")


def test_templates_are_accepted_by_a_real_server_and_a_broken_one_is_not(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "home")}
    suffix = uuid.uuid4().hex[:6]
    for kind in ("process", "kubernetes", "docker"):
        result = subprocess.run(
            [
                PREFECT,
                "work-pool",
                "create",
                f"gpu-{kind}-{suffix}",
                "--type",
                kind,
                "--base-job-template",
                str(POOLS / f"{kind}.json"),
            ],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    with get_client(sync_client=True) as client:
        for kind in ("process", "kubernetes", "docker"):
            pool = client.read_work_pool(f"gpu-{kind}-{suffix}")
            assert pool.type == kind and pool.base_job_template == _template(kind)

    broken = _template("process")
    broken["job_configuration"]["env"] = "{{ not_declared }}"
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    result = subprocess.run(
        [PREFECT, "work-pool", "create", f"broken-{suffix}", "--type", "process", "--base-job-template", str(path)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "not_declared" in result.stdout + result.stderr
