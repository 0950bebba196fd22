"""Flow ``generate-dataset``: the whole chain, from raw files to a published dataset version.

ingest -> learn-concept -> learn-condition -> build-plan -> generate-shard x N -> publish-dataset
-> evaluate-dataset (``evaluation.enabled``)

Shards run in this flow (``execution.fan_out: local``) or as runs of the ``generate-shards``
deployment on a GPU work pool (``execution.fan_out: work_pool``); a run that stops, is cancelled or
crashes cancels its unfinished child runs (``tasks/dispatch.py``). Checking the version folder, generating
and publishing run under the version's storage lock: two runs of one config never write it at once.
"""

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows._form import short_form
from indusfactory.config import FactoryConfig
from indusfactory.publishing.catalogue import NOT_RUN, evaluation_headline, published_evaluation
from indusfactory.publishing.publish import check_dataset_version, dataset_folder_for
from indusfactory.schema import DatasetRecord
from tasks._prefect import factory_run
from tasks.catalogue import catalogue_artifact
from tasks.dispatch import cancel_child_runs, dispatch_shard_runs
from tasks.estimate import announce_estimate, record_throughput
from tasks.evaluate import evaluate_dataset_task
from tasks.generate import build_plan_task, generate_shards_locally, publish_dataset_task, version_lock
from tasks.ingest import ingest_task
from tasks.learn import learn_concept_task, learn_condition_task
from tasks.preflight import preflight_task
from tasks.report import StageClock, summarise_run


@flow(
    name="generate-dataset",
    task_runner=ThreadPoolTaskRunner(max_workers=1),
    on_cancellation=[cancel_child_runs],  # a run cancelled or crashed leaves no generate-shards child running
    on_crashed=[cancel_child_runs],
)
@short_form
def generate_dataset(config: FactoryConfig) -> DatasetRecord:
    """Make a dataset version: the whole chain, from the raw files to a published dataset."""
    clock = StageClock()  # time per stage, for the summary
    with factory_run(config) as run:  # results under the factory root, library logs, secrets scrubbed
        run = clock.wrap(run)
        run(preflight_task)(config, "generate-dataset")  # what the config names, checked in seconds before any work
        catalog = run(ingest_task)(config)
        concept = run(learn_concept_task)(config, catalog)
        condition = run(learn_condition_task)(config, catalog, concept)
        plan = run(build_plan_task)(config, catalog)
        version = dataset_folder_for(config, plan, concept, condition)  # datasets/<name>/<version>
        dataset_uri = version.uri
        announce_estimate(config, plan, dataset_uri)  # expected time and images/s, from earlier runs on this device
        with version_lock(config, version):  # one writer per version; a second run waits, then reuses
            check_dataset_version(config, catalog, plan, concept, condition, dataset_uri)
            with clock.timer("generation"):
                if config.execution.fan_out == "work_pool":
                    shards = dispatch_shard_runs(config, catalog, plan, concept, condition, dataset_uri)
                else:
                    shards = generate_shards_locally(
                        run, config, catalog, plan, concept, condition, dataset_uri, range(plan.shards)
                    )
            dataset = run(publish_dataset_task)(config, catalog, plan, concept, condition, dataset_uri, shards)
        record_throughput(config, dataset, shards, clock.seconds["generation"])  # for the next run's estimate
        catalogue_artifact(config)  # the factory root's datasets, this version included
        evaluation = "failed (see the evaluate-dataset task)" if config.evaluation.enabled else NOT_RUN
        try:
            if config.evaluation.enabled:
                run(evaluate_dataset_task)(config, catalog, dataset)
                evaluation = evaluation_headline(published_evaluation(dataset.uri))
        finally:  # the summary also when the evaluation fails
            summarise_run(catalog, concept, condition, plan, shards, dataset, clock, evaluation)
        return dataset
