"""Flow ``ingest``: the team's raw files become the catalog."""

from prefect import flow

from indusfactory.config import FactoryConfig
from indusfactory.schema import CatalogRecord
from tasks.ingest import ingest_task


@flow(name="ingest")
def ingest(config: FactoryConfig = FactoryConfig()) -> CatalogRecord:
    return ingest_task(config)
