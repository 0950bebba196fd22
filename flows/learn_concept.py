"""Flow ``learn-concept``: ingest, then DreamBooth LoRA of the defective concept."""

from prefect import flow

from indusfactory.config import FactoryConfig
from indusfactory.schema import ModelRecord
from tasks.ingest import ingest_task
from tasks.learn import learn_concept_task


@flow(name="learn-concept")
def learn_concept(config: FactoryConfig = FactoryConfig()) -> ModelRecord:
    catalog = ingest_task(config)
    return learn_concept_task(config, catalog)
