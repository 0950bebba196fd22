"""Flow ``generate-shards``: the child run that a ``generate-dataset`` run dispatches to a GPU work pool.

One worker per GPU (``CUDA_VISIBLE_DEVICES``) runs it with a concurrency of one; its shards run one
at a time on that GPU (a worker that sees several GPUs runs one shard per GPU at once), and the
models stay loaded between the shards of a run.
"""

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from indusfactory.config import FactoryConfig
from indusfactory.schema import CatalogRecord, ModelRecord, PlanRecord, ShardRecord
from tasks._prefect import factory_run
from tasks.generate import generate_shards_locally
from tasks.preflight import preflight_task


@flow(name="generate-shards", task_runner=ThreadPoolTaskRunner(max_workers=1))
def generate_shards(
    config: FactoryConfig,
    catalog: CatalogRecord,
    plan: PlanRecord,
    concept: ModelRecord,
    condition: ModelRecord,
    dataset_uri: str,
    shards: list[int],
) -> list[ShardRecord]:
    with factory_run(config) as run:  # results under the factory root, library logs, secrets scrubbed
        run(preflight_task)(config, "generate-shards")  # what the config names, checked in seconds before any work
        return generate_shards_locally(run, config, catalog, plan, concept, condition, dataset_uri, shards)
