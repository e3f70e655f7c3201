"""Optimizers, learning-rate schedules and the weight-decay mask, built from ``config.optimizer``.

Schedules (``optimizer.schedule``) share a linear warmup from 0 to ``learning_rate`` over
``warmup_steps`` and then:

- ``constant``: ``learning_rate``.
- ``cosine``: ``end + (peak - end) * (1 + cos(pi * p)) / 2`` with ``p`` the fraction of the
  decay phase done (``warmup_steps`` to ``decay_steps``), ``end = peak * end_factor``
  (Loshchilov & Hutter, SGDR, without restarts).
- ``linear``: straight line from ``peak`` to ``end`` over the decay phase.
- ``rsqrt``: ``peak * sqrt(timescale / max(step, timescale))`` (Vaswani et al. 2017; T5 uses
  ``peak=0.01``, ``timescale=10_000``, no warmup, i.e. ``1 / sqrt(max(step, 10_000))``).

Gradient clipping by global norm and gradient accumulation are not optax transforms here:
the train step clips explicitly (so it can report the norm) and splits the batch into
microbatches itself (see ``trainer.py``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from rope_jax import config_fields, scanning
from rope_jax.training import adafactor as adafactor_lib

SCHEDULES = ("constant", "cosine", "linear", "rsqrt")
OPTIMIZERS = ("adamw", "adafactor")


def learning_rate_schedule(
    *,
    learning_rate: float,
    schedule: str,
    warmup_steps: int,
    decay_steps: int,
    end_factor: float = 0.0,
    rsqrt_timescale: int | None = None,
) -> Callable[[jax.Array], jax.Array]:
    """Returns ``step -> learning rate`` (float32) for the schedule described in the module doc."""
    if schedule not in SCHEDULES:
        raise ValueError(f"optimizer.schedule={schedule!r}; choose one of {SCHEDULES}.")
    if warmup_steps < 0:
        raise ValueError(f"optimizer.warmup_steps must be >= 0, got {warmup_steps}.")
    peak = float(learning_rate)
    end = peak * float(end_factor)
    timescale = float(max(warmup_steps, 1) if rsqrt_timescale is None else rsqrt_timescale)

    def schedule_fn(step):
        step = jnp.asarray(step, jnp.float32)
        if warmup_steps > 0:
            warmup = peak * jnp.minimum(step / warmup_steps, 1.0)
        else:
            warmup = jnp.float32(peak)
        done = jnp.clip((step - warmup_steps) / max(decay_steps - warmup_steps, 1), 0.0, 1.0)
        if schedule == "constant":
            decayed = jnp.float32(peak)
        elif schedule == "cosine":
            decayed = end + (peak - end) * 0.5 * (1.0 + jnp.cos(math.pi * done))
        elif schedule == "linear":
            decayed = peak + (end - peak) * done
        else:  # rsqrt
            decayed = peak * jnp.sqrt(timescale / jnp.maximum(step, timescale))
        return jnp.where(step < warmup_steps, warmup, decayed).astype(jnp.float32)

    return schedule_fn


def decay_mask(
    params, no_decay_pattern: str = r"(bias|scale|norm)", *, stacked: bool = False
) -> object:
    """True for parameters that get weight decay: matrices (ndim >= 2) whose path matches
    nothing in ``no_decay_pattern`` (case-insensitive; the path is joined with '/').
    ``stacked``: every leaf holds a scanned stack's layers on a leading axis, which does not
    count (a stacked vector is a vector); the unstacked ``per_layer`` form sees one layer at
    a time instead.

    Norm scales and biases are vectors and are excluded by both rules; the pattern also keeps
    e.g. a ``layer_norm/...`` subtree out if someone gives it a matrix.
    """
    pattern = re.compile(no_decay_pattern, re.IGNORECASE) if no_decay_pattern else None
    layer_axes = 1 if stacked else 0

    def wants_decay(path, leaf):
        name = param_path_name(path)
        if getattr(leaf, "ndim", 0) - layer_axes < 2:
            return False
        return not (pattern and pattern.search(name))

    return jax.tree_util.tree_map_with_path(wants_decay, params)


def param_path_name(path) -> str:
    """'encoder/layers_0/attention/query/kernel' for a pytree key path."""
    parts = []
    for entry in path:
        key = getattr(entry, "key", None)
        if key is None:
            key = getattr(entry, "name", None)
        if key is None:
            key = getattr(entry, "idx", entry)
        parts.append(str(key))
    return "/".join(parts)


def make_optimizer(
    config: OptimizerConfig | ml_collections.ConfigDict, num_train_steps: int
) -> tuple[optax.GradientTransformation, Callable[[jax.Array], jax.Array]]:
    """(optax transformation, schedule) from ``config`` (the typed ``optimizer`` section,
    ``config_boundary.optimizer_section``; a ConfigDict of the same keys also works).

    AdamW (Loshchilov & Hutter) with decoupled weight decay masked by ``decay_mask``;
    Adafactor (Shazeer & Stern 2018) with T5's settings by default (factored second moments,
    decay rate 0.8, update clipping 1.0, relative step size via parameter scale, no momentum).
    """
    if config.name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name={config.name!r}; choose one of {OPTIMIZERS}.")
    decay_steps = num_train_steps if config.decay_steps is None else config.decay_steps
    schedule = learning_rate_schedule(
        learning_rate=config.learning_rate,
        schedule=config.schedule,
        warmup_steps=config.warmup_steps,
        decay_steps=decay_steps,
        end_factor=config.end_factor,
        rsqrt_timescale=config.rsqrt_timescale,
    )

    def mask_fn(params, stacked=False):
        return decay_mask(params, config.no_decay_pattern, stacked=stacked)

    if config.name == "adamw":
        tx = optax.adamw(
            learning_rate=schedule,
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=mask_fn,
        )
        return per_layer(tx), schedule

    def build_adafactor(stacked):
        return adafactor_lib.adafactor(
            learning_rate=schedule,
            min_dim_size_to_factor=config.min_dim_size_to_factor,
            decay_rate=config.decay_rate,
            multiply_by_parameter_scale=config.multiply_by_parameter_scale,
            clipping_threshold=config.clipping_threshold or None,
            momentum=config.momentum or None,
            weight_decay_rate=config.weight_decay or None,
            weight_decay_mask=lambda params: mask_fn(params, stacked),
            factored=config.factored,
            stacked=stacked,
        )

    return per_layer(build_adafactor(False), stacked=build_adafactor(True)), schedule


def per_layer(
    tx: optax.GradientTransformation, *, stacked: optax.GradientTransformation | None = None
) -> optax.GradientTransformation:
    """``tx`` with each layer of a scanned stack (``rope_jax.scanning``) updated on its own.

    The weight-decay mask tells matrices from vectors by their number of axes, which a
    stacked ``[L, ...]`` array has one more of; and Adafactor's statistics are per array:
    factored row/column moments over its two largest axes, the update clipped by its block
    RMS, the step scaled by its parameter RMS. A stacked array would mix its layers in all
    three (and could factor over the layers axis), so the stacked leaves are updated as
    ``jax.vmap(tx)`` over that axis would (T5X's Adafactor treats a ``layers`` axis as a
    batch dimension likewise) and the scanned model trains as its unscanned twin does. Their
    state is always ``jax.vmap(tx.init)``'s, the per-layer states stacked; ``stacked``, when
    given, is ``tx`` written for stacked leaves (``adafactor.adafactor(stacked=True)``): the
    same update from that state, without ``vmap``'s batched reductions. Params without
    stacked layers get ``tx`` unchanged (the same state as before).
    """
    stacked_update = jax.vmap(tx.update) if stacked is None else stacked.update
    stacked_tx = optax.GradientTransformation(jax.vmap(tx.init), stacked_update)

    def stack_label(size, sizes):
        # Stacks of different depths (a 6-layer encoder, a 2-layer decoder) are vmapped
        # apart; the one-depth case keeps the label "layers" (checkpoints of it load).
        return "layers" if len(sizes) == 1 else f"layers@{size}"

    def labeled(params):
        """The multi_transform for ``params``, or None without stacked leaves."""
        stacked_paths = [
            leaf.shape[0]
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)
            if scanning.is_stacked_path(path)
        ]
        if not stacked_paths:
            return None
        sizes = sorted(set(stacked_paths))
        labels = jax.tree_util.tree_map_with_path(
            lambda path, leaf: (
                stack_label(leaf.shape[0], sizes) if scanning.is_stacked_path(path) else "rest"
            ),
            params,
        )
        transforms = {stack_label(size, sizes): stacked_tx for size in sizes}
        return optax.multi_transform({**transforms, "rest": tx}, labels)

    def init_fn(params):
        both = labeled(params)
        return tx.init(params) if both is None else both.init(params)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("per_layer needs params (Adafactor scales by them).")
        both = labeled(params)
        return (tx if both is None else both).update(updates, state, params)

    return optax.GradientTransformation(init_fn, update_fn)


def clip_by_global_norm(grads, max_norm: float):
    """(clipped grads, norm before clipping); ``max_norm <= 0`` turns clipping off.

    Same rule as ``optax.clip_by_global_norm``: scale by ``max_norm / norm`` when the global
    L2 norm exceeds ``max_norm``. The norm is computed in float32.
    """
    norm = optax.tree.norm(jax.tree.map(lambda g: g.astype(jnp.float32), grads))
    if max_norm <= 0:
        return grads, norm
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
    return jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads), norm


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Every key the optimizer reads (``config.optimizer``); ``None`` = derived."""

    name: str = "adamw"
    learning_rate: float = 1e-3
    schedule: str = "cosine"
    warmup_steps: int = 100
    # None = decay until num_train_steps.
    decay_steps: int | None = None
    end_factor: float = 0.1
    # rsqrt only; None = use warmup_steps (at least 1).
    rsqrt_timescale: int | None = None
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    no_decay_pattern: str = r"(bias|scale|norm)"
    grad_clip_norm: float = 1.0
    # Microbatches per step; the global batch is split inside the jitted step.
    grad_accum_steps: int = 1
    # Adafactor only.
    min_dim_size_to_factor: int = 128
    decay_rate: float = 0.8
    clipping_threshold: float = 1.0
    multiply_by_parameter_scale: bool = True
    momentum: float = 0.0
    factored: bool = True


def default_optimizer_config() -> ml_collections.ConfigDict:
    """``OptimizerConfig``'s fields and defaults as a ConfigDict, so overrides of unknown
    keys fail at start; unset (None) fields keep their type (an ml_collections placeholder)."""
    return config_fields.as_config_dict(OptimizerConfig)
