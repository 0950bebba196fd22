"""Flow ``evaluate-dataset``: score a published dataset with the paper's downstream protocol.

The chain's stages are cached, so they only find the dataset that generate-dataset published
for this config; the evaluation itself is cached inside the dataset version.
"""

from prefect import flow

from flows._form import short_form
from indusfactory.config import FactoryConfig
from indusfactory.evaluation.evaluate import published_dataset
from indusfactory.publishing.publish import dataset_uri_for
from indusfactory.schema import EvaluationRecord
from tasks._prefect import factory_run
from tasks.evaluate import evaluate_dataset_task
from tasks.generate import build_plan_task
from tasks.ingest import ingest_task
from tasks.learn import learn_concept_task, learn_condition_task
from tasks.preflight import preflight_task


@flow(name="evaluate-dataset")
@short_form
def evaluate_dataset(config: FactoryConfig) -> EvaluationRecord:
    """Score the dataset version generate-dataset published for this config: downstream segmentation,
    adherence and fidelity."""
    with factory_run(config) as run:  # results under the factory root, library logs, secrets scrubbed
        run(preflight_task)(config, "evaluate-dataset")  # what the config names, checked in seconds before any work
        catalog = run(ingest_task)(config)
        concept = run(learn_concept_task)(config, catalog)
        condition = run(learn_condition_task)(config, catalog, concept)
        plan = run(build_plan_task)(config, catalog)
        dataset = published_dataset(dataset_uri_for(config, plan, concept, condition))
        return run(evaluate_dataset_task)(config, catalog, dataset)
