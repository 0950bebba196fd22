"""The datasets of the factory root as a Prefect table artifact, made after each publish."""

from __future__ import annotations

from prefect.artifacts import create_table_artifact

from indusfactory.config import FactoryConfig
from indusfactory.publishing.catalogue import versions

CATALOGUE_KEY = "factory-datasets"


def catalogue_artifact(config: FactoryConfig) -> list[dict]:
    """A table of every dataset version under the factory root (``indusfactory datasets list``); returns its rows."""
    rows = [v.row() for v in versions(config.factory_root)]
    create_table_artifact(
        rows,
        key=CATALOGUE_KEY,
        description=f"datasets under {config.factory_root} (latest marked); `indusfactory datasets list|show|diff|gc`",
    )
    return rows
