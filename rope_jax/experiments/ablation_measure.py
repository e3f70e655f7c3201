"""What the ablation measures: loss at each position of held-out windows, by bucket and
range, and its mean and spread over seeds.

Every cell is evaluated on the same held-out windows at the training length ``L`` and at
``k x L`` for each ``k`` in ``eval_multipliers``: the mean loss over the targets (every next
token; the masked tokens, chosen once with ``mlm.eval_mask_seed`` on the longest windows,
whose prefixes are the shorter ones, so every cell and seed sees the same masks and
positions < L keep theirs at every length) at each position, per bucket of
``L / buckets_per_train_length`` positions (buckets line up across lengths) and per range of
``L`` positions.

Across seeds (``aggregate``): the mean, the sample standard deviation (``ddof=1``, the
unbiased variance; undefined for one seed and then ``None``), the minimum, the maximum and
``n``, the number of seeds with a value.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import numpy as np

from rope_jax import families
from rope_jax.data import windows as windows_lib
from rope_jax.training import evaluators


def eval_batches(
    objective: str, windows: np.ndarray, lengths: list[int], *, seed: int, tokenizer, mlm_rate
) -> dict[int, dict[str, np.ndarray]]:
    """Held-out batch per length: ``windows`` made into one batch (masked once with ``seed``
    for MLM) at the longest length, and its prefixes for the shorter ones, so every cell sees
    the same targets and a position keeps its mask at every length that includes it."""
    width = windows_lib.window_width(objective, max(lengths))
    longest = windows_lib.window_batch(
        windows[:, :width],
        objective,
        rng=np.random.default_rng(seed),
        tokenizer=tokenizer,
        mlm_rate=mlm_rate,
    )
    return {n: {key: value[:, :n] for key, value in longest.items()} for n in lengths}


@functools.cache
def _token_losses(task):
    """Jitted ``(variables, batch) -> loss [B, L]`` of the family's task
    (``families.ModelTask.token_losses``, the loss-by-position evaluator's measure). Tasks
    hash by their flax module's fields, so every seed and cell with the same model shares one
    compiled program per shape; the parameters are an argument, never baked in."""
    return jax.jit(task.token_losses)


def position_losses(
    model, variables, batch: dict[str, np.ndarray], batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cross entropy summed over the rows of ``batch`` at each position, weighted by its
    ``loss_weights``, and the weight at each position -> ``([length], [length])``. The
    model is called through its family's task (``families.as_task``), as the trainer
    calls it."""
    per_token = _token_losses(families.as_task(model))
    rows = len(batch["input_tokens"])
    loss_sums = np.zeros(batch["input_tokens"].shape[1])
    for start in range(0, rows, batch_size):
        # The last chunk is padded with copies of its last row (same shape, one compile).
        index = np.minimum(np.arange(start, start + batch_size), rows - 1)
        chunk = {key: value[index] for key, value in batch.items()}
        losses_BL = np.asarray(per_token(variables, chunk), np.float64)[: rows - start]
        loss_sums += (losses_BL * chunk["loss_weights"][: rows - start]).sum(axis=0)
    return loss_sums, batch["loss_weights"].sum(axis=0).astype(np.float64)


# Mean loss per bucket of positions: the loop's loss-by-position evaluator's measure.
bucket_losses = evaluators.bucket_means


def length_summary(
    loss_sums: np.ndarray, weights: np.ndarray, train_length: int, bucket_width: int
) -> dict[str, Any]:
    """The numbers reported for one evaluated length of one run (JSON-ready)."""
    length = len(loss_sums)
    (mean,) = bucket_losses(loss_sums, weights, length)
    beyond = bucket_losses(loss_sums[train_length:], weights[train_length:], length)
    return {
        "mean_loss": mean,
        "loss_beyond_train_length": beyond[0] if beyond else None,
        "num_targets": int(weights.sum()),
        "range_losses": bucket_losses(loss_sums, weights, train_length),
        "bucket_losses": bucket_losses(loss_sums, weights, bucket_width),
        "position_losses": bucket_losses(loss_sums, weights, 1),
    }


def aggregate(values: list[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation, min, max and n of the values that are not None."""
    present = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(present)
    if not n:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    array = np.asarray(present, np.float64)
    return {
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if n > 1 else None,
        "min": float(array.min()),
        "max": float(array.max()),
        "n": n,
    }


SCALARS = ("mean_loss", "loss_beyond_train_length")
CURVES = ("range_losses", "bucket_losses")


def aggregate_lengths(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """One evaluated length over seeds: ``per_seed`` are ``length_summary`` dicts (all for
    the same length and targets). Scalars become ``<name>`` (mean), ``<name>_std``,
    ``<name>_min``, ``<name>_max``; curves the same per element; ``position_losses`` the
    mean per position; ``num_seeds`` the n."""
    out: dict[str, Any] = {"num_seeds": len(per_seed), "num_targets": per_seed[0]["num_targets"]}
    for name in SCALARS:
        stats = aggregate([summary[name] for summary in per_seed])
        out[name] = stats["mean"]
        out.update({f"{name}_{key}": stats[key] for key in ("std", "min", "max")})
    for name in (*CURVES, "position_losses"):
        columns = zip(*(summary[name] for summary in per_seed), strict=True)
        stats = [aggregate(list(column)) for column in columns]
        out[name] = [s["mean"] for s in stats]
        if name in CURVES:
            for key in ("std", "min", "max", "n"):
                out[f"{name}_{key}"] = [s[key] for s in stats]
    return out
