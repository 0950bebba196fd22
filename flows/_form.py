"""The run form of the flows an operator starts from the UI with a whole ``FactoryConfig``: ``generate-dataset``,
``ingest``, ``learn-concept``, ``learn-condition`` and ``evaluate-dataset`` take the same short parameters
first, then ``config_file`` and last the full ``config`` (advanced), composed by ``indusfactory.runform``.

``@short_form`` under ``@flow`` gives a stage function ``stage(config) -> record`` that signature (its
parameters, their types and their descriptions in the UI) and calls it with the composed config; the stage
function keeps its own name, module and summary. ``generate-shards`` is not one of them: its parent run
passes it exact records.
"""

import inspect
from collections.abc import Callable
from typing import TypeVar

from indusfactory.config import FactoryConfig
from indusfactory.runform import ProfileName, RunSources, compose_config
from tasks._prefect import run_logger

R = TypeVar("R")

PARAMETERS_DOC = """Args:
    dataset_name: Name of the dataset (folder under datasets/).
    images_per_driver: Images generated per driver (1-15).
    defect_free_images: Use at most this many defect-free images.
    sources: Where the annotated defective and the defect-free images are.
    base_model: Stable Diffusion 1.x folder or hub id ('embedded:tiny-sd': the demo model).
    profile: Named preset: demo (tiny model, CPU), smoke (a quick end-to-end check; not a useful dataset),
        cpu-128 (labels that follow the images on CPU: 128 px, ~12 min of training), sd15-gpu.
    factory_root: Local path or s3:// URI everything is written under.
    config_file: Path or URI of a YAML FactoryConfig (a site's settings).
    config: Advanced: the full configuration; only the fields set here override.

The first parameters are the short form; the same ones in every stage flow give the same config, so the same
catalog, models and dataset. Order: profile < config_file < config < short parameters (indusfactory/runform.py).
"""


def short_form(stage: Callable[[FactoryConfig], R]) -> Callable[..., R]:
    """The flow function of ``stage``: the short form's parameters, composed into the config ``stage`` runs
    with (the layers applied are the run's first log line)."""

    def run_form(
        dataset_name: str | None = None,
        images_per_driver: int | None = None,
        defect_free_images: int | None = None,
        sources: RunSources | None = None,
        base_model: str | None = None,
        profile: ProfileName | None = None,
        factory_root: str | None = None,
        config_file: str | None = None,
        config: FactoryConfig | None = None,
    ) -> R:
        composed, layers = compose_config(
            profile,
            config_file,
            config,
            dataset_name=dataset_name,
            images_per_driver=images_per_driver,
            defect_free_images=defect_free_images,
            sources=sources,
            base_model=base_model,
            factory_root=factory_root,
        )
        run_logger().info("configuration: %s", " < ".join(layers))
        return stage(composed)

    # Not functools.wraps: its __wrapped__ would make Prefect read the stage's own signature.
    run_form.__name__, run_form.__qualname__, run_form.__module__ = stage.__name__, stage.__qualname__, stage.__module__
    run_form.__doc__ = inspect.cleandoc(stage.__doc__ or "") + "\n\n" + PARAMETERS_DOC
    return run_form
