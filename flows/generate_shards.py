"""Flow ``generate-shards``: the child run that a ``generate-dataset`` run dispatches to a GPU work pool.

One worker per GPU runs it with a concurrency of one, so two shards never share a GPU; the
models stay loaded between the shards of a run.
"""

from prefect import flow, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from indusfactory.config import FactoryConfig
from indusfactory.schema import CatalogRecord, ModelRecord, PlanRecord, ShardRecord
from tasks._prefect import factory_run
from tasks.generate import generate_shard_task


@flow(name="generate-shards", task_runner=ThreadPoolTaskRunner(max_workers=1))
def generate_shards(config: FactoryConfig, catalog: CatalogRecord, plan: PlanRecord, concept: ModelRecord,
                    condition: ModelRecord, dataset_uri: str, shards: list[int]) -> list[ShardRecord]:
    with factory_run(config) as run:  # results under the factory root, library logs, secrets scrubbed
        futures = run(generate_shard_task).map(unmapped(config), unmapped(catalog), unmapped(plan),
                                               unmapped(concept), unmapped(condition), unmapped(dataset_uri), shards)
        return [future.result() for future in futures]
