"""Flow ``learn-condition``: ingest, concept, then the conditioning network on topological drivers."""

from prefect import flow

from indusfactory.config import FactoryConfig
from indusfactory.schema import ModelRecord
from tasks.ingest import ingest_task
from tasks.learn import learn_concept_task, learn_condition_task


@flow(name="learn-condition")
def learn_condition(config: FactoryConfig = FactoryConfig()) -> ModelRecord:
    catalog = ingest_task(config)
    concept = learn_concept_task(config, catalog)
    return learn_condition_task(config, catalog, concept)
