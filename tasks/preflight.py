"""Prefect task around ``indusfactory.preflight``: the first task of every flow."""

from __future__ import annotations

from prefect import task

from indusfactory import preflight
from indusfactory.config import FactoryConfig
from indusfactory.infra.errors import PreflightError
from tasks._prefect import run_logger


@task(name="preflight", retries=0)
def preflight_task(config: FactoryConfig, stage: str) -> None:
    """Check everything ``config`` names that ``stage`` uses; one ``PreflightError`` lists every problem."""
    problems = preflight.check(config, stage)
    if problems:
        raise PreflightError([str(p) for p in problems])
    run_logger().info("preflight of %s: every check passed", stage)
