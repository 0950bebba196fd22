"""Flow ``ingest``: the team's raw files become the catalog."""

from prefect import flow

from flows._form import short_form
from indusfactory.config import FactoryConfig
from indusfactory.schema import CatalogRecord
from tasks._prefect import factory_run
from tasks.ingest import ingest_task
from tasks.preflight import preflight_task


@flow(name="ingest")
@short_form
def ingest(config: FactoryConfig) -> CatalogRecord:
    """The team's raw files become the catalog."""
    with factory_run(config) as run:  # results under the factory root, library logs, secrets scrubbed
        run(preflight_task)(config, "ingest")  # what the config names, checked in seconds before any work
        return run(ingest_task)(config)
