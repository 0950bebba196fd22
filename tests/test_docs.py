"""The operator's guide (docs/OPERATIONS.md) matches the repository."""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POOLS = REPO / "deployments" / "pools"
PREFECT = str(Path(sys.executable).parent / "prefect")
PLACEHOLDER = re.compile(r"\{\{\s*([\w.$]+)\s*\}\}")


def test_operations_guide_matches_the_repository():
    import yaml

    guide = (REPO / "docs" / "OPERATIONS.md").read_text()
    assert "docs/OPERATIONS.md" in (REPO / "README.md").read_text()
    for kind in ("process", "kubernetes", "docker"):
        assert f"--base-job-template deployments/pools/{kind}.json" in guide
    deployments = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["deployments"]
    import importlib

    def flow_name(entrypoint: str) -> str:
        path, function = entrypoint.split(":")
        return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), function).name

    names = {f"{flow_name(d['entrypoint'])}/{d['name']}" for d in deployments}
    mentioned = set(re.findall(r"prefect deployment run ([\w-]+/[\w-]+)", guide))
    assert mentioned and mentioned <= names, mentioned - names
    pools = {d["work_pool"]["name"] for d in deployments}
    assert all(f"--pool {pool}" in guide for pool in pools)
    for key in ("fan_out", "shard_deployment", "shards_per_run", "lock_stale_seconds", "prefect-results"):
        assert key in guide, key
    for command in re.findall(r"docker build -f (docker/\S+)", guide):
        assert (REPO / command).is_file()
