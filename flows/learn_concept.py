"""Flow ``learn-concept``: ingest, then DreamBooth LoRA of the defective concept."""

from prefect import flow

from indusfactory.config import FactoryConfig
from indusfactory.schema import ModelRecord
from tasks._prefect import factory_run
from tasks.ingest import ingest_task
from tasks.learn import learn_concept_task
from tasks.preflight import preflight_task


@flow(name="learn-concept")
def learn_concept(config: FactoryConfig = FactoryConfig()) -> ModelRecord:
    with factory_run(config) as run:  # results under the factory root, library logs, secrets scrubbed
        run(preflight_task)(config, "learn-concept")  # what the config names, checked in seconds before any work
        catalog = run(ingest_task)(config)
        return run(learn_concept_task)(config, catalog)
