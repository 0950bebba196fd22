"""Flow ``learn-concept``: ingest, then DreamBooth LoRA of the defective concept."""

from prefect import flow

from flows._form import short_form
from indusfactory.config import FactoryConfig
from indusfactory.schema import ModelRecord
from tasks._prefect import factory_run
from tasks.ingest import ingest_task
from tasks.learn import learn_concept_task
from tasks.preflight import preflight_task


@flow(name="learn-concept")
@short_form
def learn_concept(config: FactoryConfig) -> ModelRecord:
    """Ingest, then DreamBooth LoRA of the defective concept."""
    with factory_run(config) as run:  # results under the factory root, library logs, secrets scrubbed
        run(preflight_task)(config, "learn-concept")  # what the config names, checked in seconds before any work
        catalog = run(ingest_task)(config)
        return run(learn_concept_task)(config, catalog)
