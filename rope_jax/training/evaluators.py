"""Evaluators the train loop calls (big_vision's ``evaluators`` pattern), built from config.

A config lists ``(name, every_steps, kwargs)`` triples; ``from_config`` turns each into an
object with ``name``, ``every_steps`` (None = the run's ``eval_every_steps``; 0 = only after
the last step, as for the loop's other periods) and
``run(state) -> {scalar: value}``, using a registry of builders the caller supplies (the
trainer knows no SuperGLUE: ``evaluation.finetune`` registers its own). The loop calls them
every ``every_steps`` steps and after the last step (``loop.run_steps``).

Two generic evaluators over fixed held-out batches of the model family's task:

* ``HeldOutLoss``: token-weighted (or example-weighted, for classification heads) cross
  entropy and accuracy, ``task.loss_sums`` summed over the batches and divided once;
* ``LossByPosition``: mean cross entropy of the target tokens in buckets of
  ``bucket_width`` positions (``task.token_losses``), the ablation's curve, as scalars
  ``loss_at_<start>-<end>``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from rope_jax import families


@dataclasses.dataclass
class Evaluator:
    """What the loop needs: a name, a period and ``run(state) -> scalars``."""

    name: str
    every_steps: int
    run: Callable[[Any], dict[str, float]]


def from_config(
    specs: Sequence[Sequence[Any]],
    builders: Mapping[str, Callable[..., Callable[[Any], dict[str, float]]]],
    *,
    default_every: int,
) -> list[Evaluator]:
    """``[(name, every_steps, kwargs), ...]`` -> evaluators; ``builders[name](**kwargs)``
    gives the ``run`` function; ``every_steps`` None is ``default_every``. An unknown name
    or a malformed entry is an error naming it."""
    out = []
    for spec in specs:
        if len(spec) != 3 or not isinstance(spec[2], Mapping):
            raise ValueError(
                f"evaluators entry {spec!r}: give (name, every_steps, kwargs), e.g. "
                "('held_out_loss', None, {}) (None = every eval_every_steps)"
            )
        name, every, kwargs = spec
        if name not in builders:
            raise ValueError(f"unknown evaluator {name!r}; known: {sorted(builders)}")
        if every is not None and (
            isinstance(every, bool) or not isinstance(every, int) or every < 0
        ):
            raise ValueError(
                f"evaluator {name!r}: every_steps must be None (= eval_every_steps) or an "
                f"int >= 0 (0 = only after the last step), got {every!r}"
            )
        every = default_every if every is None else every
        out.append(Evaluator(name, every, builders[name](**dict(kwargs))))
    return out


def _variables(state):
    return families.variables_of(state.params, state.random_features)


def held_out_loss(task, batches: Callable[[], Iterable[dict]]) -> Callable:
    """``run(state)`` -> ``{"loss", "accuracy", "weight"}`` over ``batches()``."""
    task = families.as_task(task)
    sums_fn = jax.jit(lambda variables, batch: task.loss_sums(variables, batch, deterministic=True))

    def run(state) -> dict[str, float]:
        totals: dict[str, float] = {}
        variables = _variables(state)
        for batch in batches():
            for name, value in jax.device_get(sums_fn(variables, batch)).items():
                totals[name] = totals.get(name, 0.0) + float(value)
        weight = max(totals.get("weight_sum", 0.0), 1.0)
        return {
            "loss": totals.get("cross_entropy_sum", float("nan")) / weight,
            "accuracy": totals.get("correct_sum", float("nan")) / weight,
            "weight": totals.get("weight_sum", 0.0),
        }

    return run


def bucket_means(loss_sums: np.ndarray, weights: np.ndarray, width: int) -> list[float | None]:
    """Mean loss over the targets in each bucket of ``width`` positions (the last may be
    shorter): summed loss / summed weight, None for a bucket without targets."""
    means = []
    for start in range(0, len(loss_sums), width):
        weight = float(np.sum(weights[start : start + width]))
        total = float(np.sum(loss_sums[start : start + width]))
        means.append(total / weight if weight > 0 else None)
    return means


def loss_by_position(
    task, batches: Callable[[], Iterable[dict]], *, bucket_width: int = 8
) -> Callable:
    """``run(state)`` -> ``{"loss_at_0-7": ..., ...}``: target-token cross entropy per
    bucket of positions (buckets without targets are left out)."""
    task = families.as_task(task)
    if bucket_width < 1:
        raise ValueError(f"loss_by_position: bucket_width must be >= 1, got {bucket_width}")
    token_losses = jax.jit(task.token_losses)

    def run(state) -> dict[str, float]:
        variables = _variables(state)
        loss_sums = weights = None
        for batch in batches():
            _, weights_BL = task.targets_and_weights(batch)
            weights_BL = np.asarray(weights_BL, np.float64)
            losses_BL = np.asarray(jax.device_get(token_losses(variables, batch)), np.float64)
            row_sums, row_weights = (losses_BL * weights_BL).sum(0), weights_BL.sum(0)
            loss_sums = row_sums if loss_sums is None else loss_sums + row_sums
            weights = row_weights if weights is None else weights + row_weights
        if loss_sums is None:
            return {}
        means = bucket_means(loss_sums, weights, bucket_width)
        out = {}
        for index, mean in enumerate(means):
            if mean is not None:
                start = index * bucket_width
                end = min(start + bucket_width, len(loss_sums)) - 1
                out[f"loss_at_{start}-{end}"] = mean
        return out

    return run
