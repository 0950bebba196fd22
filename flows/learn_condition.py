"""Flow ``learn-condition``: ingest, concept, then the conditioning network on topological drivers."""

from prefect import flow

from flows._form import short_form
from indusfactory.config import FactoryConfig
from indusfactory.schema import ModelRecord
from tasks._prefect import factory_run
from tasks.ingest import ingest_task
from tasks.learn import learn_concept_task, learn_condition_task
from tasks.preflight import preflight_task


@flow(name="learn-condition")
@short_form
def learn_condition(config: FactoryConfig) -> ModelRecord:
    """Ingest, concept, then the conditioning network on topological drivers."""
    with factory_run(config) as run:  # results under the factory root, library logs, secrets scrubbed
        run(preflight_task)(config, "learn-condition")  # what the config names, checked in seconds before any work
        catalog = run(ingest_task)(config)
        concept = run(learn_concept_task)(config, catalog)
        return run(learn_condition_task)(config, catalog, concept)
