"""The prompts of the concept and the condition, from the config alone (no model, no torch): the training
stages, the plan and the probe all read them here."""

from __future__ import annotations

from indusfactory.config import FactoryConfig


def concept_prompt(config: FactoryConfig) -> str:
    """The instance prompt of the concept, ``an image of a [V]``."""
    return config.concept.prompt_template.format(token=config.concept.token)


def condition_prompt(config: FactoryConfig, class_names: list[str]) -> str:
    """``an image of a [V] with a [class] crack``; several classes are joined with 'and'."""
    classes = " and ".join(dict.fromkeys(class_names))
    return config.condition.prompt_template.format(token=config.concept.token, classes=classes)
