"""One task object per model family (``ModelConfig.family``, the one family vocabulary).

``for_model(model)`` gives the task of a module from ``rope_jax.models``; ``as_task(x)``
accepts a task as well (the trainer's and decoding's entry points take either). A module
without a ``config`` (a hand-written test model) needs its task named:
``EncoderTask(module)``.
"""

from __future__ import annotations

from rope_jax.families.base import (
    RANDOM_FEATURES,
    SHARED,
    ModelTask,
    dummy_batch,
    variables_of,
)
from rope_jax.families.encoder import EncoderTask, classification_sums
from rope_jax.families.generative import DecoderTask, EncoderDecoderTask

TASKS: dict[str, type[ModelTask]] = {
    "encoder": EncoderTask,
    "encoder_decoder": EncoderDecoderTask,
    "decoder": DecoderTask,
}


def for_family(family: str, model) -> ModelTask:
    if family not in TASKS:
        raise ValueError(f"unknown model family {family!r}; choose one of {sorted(TASKS)}")
    return TASKS[family](model)


def for_model(model) -> ModelTask:
    """The task of a ``rope_jax.models`` module, from its ``config.family``."""
    config = getattr(model, "config", None)
    family = getattr(config, "family", None)
    if family is None:
        raise TypeError(
            f"{type(model).__name__} has no config.family; wrap it in its family's task, "
            "e.g. rope_jax.families.EncoderTask(module)"
        )
    return for_family(family, model)


def as_task(model_or_task) -> ModelTask:
    """A task unchanged, a module as ``for_model``."""
    if isinstance(model_or_task, ModelTask):
        return model_or_task
    return for_model(model_or_task)


__all__ = [
    "RANDOM_FEATURES",
    "SHARED",
    "TASKS",
    "DecoderTask",
    "EncoderDecoderTask",
    "EncoderTask",
    "ModelTask",
    "as_task",
    "classification_sums",
    "dummy_batch",
    "for_family",
    "for_model",
    "variables_of",
]
