"""Adherence scorers: which code ``generation.adherence_scorer`` may run.

Custom code runs only where the operator put it:

- names registered in this process with :func:`register_adherence_scorer` (built in: ``dark_iou``);
- names registered by installed packages as entry points of the group ``indusfactory.adherence_scorers``
  (``[project.entry-points."indusfactory.adherence_scorers"] my_scorer = "my_pkg.scoring:score"``);
- ``segformer:<folder>``, a segmentor an evaluation saved (weights only, from safetensors);
- ``package.module:function`` only when the deployment sets ``INDUSFACTORY_ALLOW_SCORER_IMPORTS=1`` in the
  worker's environment; a config (or a run form) alone can never make a worker import a module.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
from collections.abc import Callable

import numpy as np

from indusfactory.infra.errors import ConfigError

AdherenceScorer = Callable[[list[np.ndarray], list[np.ndarray]], list[float]]
"""Scores how well each generated image (uint8 HxWx3) shows the defect in its mask (bool HxW); higher is better."""

ENTRY_POINT_GROUP = "indusfactory.adherence_scorers"
ALLOW_IMPORTS_ENV = "INDUSFACTORY_ALLOW_SCORER_IMPORTS"
SEGFORMER_PREFIX = "segformer:"
KEY = "generation.adherence_scorer"

SCORERS: dict[str, AdherenceScorer] = {}
"""Scorers registered in this process by name."""


def register_adherence_scorer(name: str) -> Callable[[AdherenceScorer], AdherenceScorer]:
    """Decorator: make ``fn`` available as ``generation.adherence_scorer: <name>`` (e.g. a learned segmentor)."""

    def register(fn: AdherenceScorer) -> AdherenceScorer:
        SCORERS[name] = fn
        return fn

    return register


def _builtins_registered() -> None:
    import indusfactory.generation.generate  # noqa: F401 - registers the built-in scorers (dark_iou)


def entry_point_scorers() -> dict[str, importlib.metadata.EntryPoint]:
    """Scorers installed packages register as entry points of ``indusfactory.adherence_scorers``."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def known_names() -> list[str]:
    """Every name a config may use: registered in this process or through entry points."""
    _builtins_registered()
    return sorted(set(SCORERS) | set(entry_point_scorers()))


def imports_allowed() -> bool:
    """Whether the deployment allows ``package.module:function`` scorers (``INDUSFACTORY_ALLOW_SCORER_IMPORTS=1``)."""
    return os.environ.get(ALLOW_IMPORTS_ENV, "").strip().lower() in ("1", "true", "yes")


def is_import_path(name: str) -> bool:
    module, sep, attr = name.partition(":")
    return bool(sep and module and attr and not name.startswith(SEGFORMER_PREFIX))


def _how_to_register() -> str:
    return (
        "register it with indusfactory.generation.scorers.register_adherence_scorer, or as an entry point of "
        f"the group '{ENTRY_POINT_GROUP}' of an installed package"
    )


def _unknown(name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(
        f"{KEY} {name!r} is not a registered scorer{hint}; known: {', '.join(known) or 'none'}. "
        f"To use your own, {_how_to_register()}"
    )


def _refused_import(name: str) -> ConfigError:
    return ConfigError(
        f"{KEY} {name!r} is an import path, which this worker does not allow: {_how_to_register()}, "
        f"or set {ALLOW_IMPORTS_ENV}=1 in the deployment's environment (not the run's parameters)"
    )


MOVED_MODULES = {"indusfactory.generate": "indusfactory.generation.generate"}
"""Import paths configs wrote before the library became sub-packages, and where those modules live now."""


def _import(name: str) -> AdherenceScorer:
    module, _, attr = name.partition(":")
    module = MOVED_MODULES.get(module, module)
    try:
        scorer = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{KEY} {name!r} cannot be imported: {exc}") from exc
    if not callable(scorer):
        raise ConfigError(f"{KEY} {name!r} is not a function")
    return scorer


def _load_entry_point(name: str, entry: importlib.metadata.EntryPoint) -> AdherenceScorer:
    try:
        scorer = entry.load()
    except Exception as exc:  # noqa: BLE001 - a broken installed package: name it
        raise ConfigError(
            f"{KEY} {name!r}: its entry point {entry.value!r} cannot be loaded: {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(scorer):
        raise ConfigError(f"{KEY} {name!r}: its entry point {entry.value!r} is not a function")
    return scorer


def resolve(name: str) -> AdherenceScorer | None:
    """The scorer a config names without loading a model: registered, entry point or (allowed) import path.

    ``segformer:`` names return None (the caller loads the segmentor); an unknown or refused name is a
    ``ConfigError`` naming the key and how to register.
    """
    if name.startswith(SEGFORMER_PREFIX):
        return None
    _builtins_registered()
    if name in SCORERS:
        return SCORERS[name]
    entries = entry_point_scorers()
    if name in entries:
        return _load_entry_point(name, entries[name])
    if is_import_path(name):
        if not imports_allowed():
            raise _refused_import(name)
        return _import(name)
    raise _unknown(name, known_names())


def adherence_scorer(name: str | None) -> AdherenceScorer | None:
    """The scorer a config names (see the module); None for no scorer."""
    if name is None:
        return None
    if name.startswith(SEGFORMER_PREFIX):  # the real-data segmentor an evaluation saved (evaluation/<fp>/segmentor)
        from indusfactory.evaluation.evaluate import segmentor_adherence_scorer

        return segmentor_adherence_scorer(name[len(SEGFORMER_PREFIX) :])
    return resolve(name)
