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
from jax import lax

from rope_jax import config_fields, scanning

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


def decay_mask(params, no_decay_pattern: str = r"(bias|scale|norm)") -> object:
    """True for parameters that get weight decay: matrices (ndim >= 2) whose path matches
    nothing in ``no_decay_pattern`` (case-insensitive; the path is joined with '/'). A scanned
    stack's arrays are seen one layer at a time (``per_layer``).

    Norm scales and biases are vectors and are excluded by both rules; the pattern also keeps
    e.g. a ``layer_norm/...`` subtree out if someone gives it a matrix.
    """
    pattern = re.compile(no_decay_pattern, re.IGNORECASE) if no_decay_pattern else None

    def wants_decay(path, leaf):
        name = param_path_name(path)
        if getattr(leaf, "ndim", 0) < 2:
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

    def mask_fn(params):
        return decay_mask(params, config.no_decay_pattern)

    if config.name == "adamw":
        tx = optax.adamw(
            learning_rate=schedule,
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=mask_fn,
        )
    else:
        tx = adafactor(
            learning_rate=schedule,
            min_dim_size_to_factor=config.min_dim_size_to_factor,
            decay_rate=config.decay_rate,
            multiply_by_parameter_scale=config.multiply_by_parameter_scale,
            clipping_threshold=config.clipping_threshold or None,
            momentum=config.momentum or None,
            weight_decay_rate=config.weight_decay or None,
            weight_decay_mask=mask_fn,
            factored=config.factored,
        )
    return per_layer(tx), schedule


def per_layer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` with each layer of a scanned stack (``rope_jax.scanning``) updated on its own.

    The weight-decay mask tells matrices from vectors by their number of axes, which a
    stacked ``[L, ...]`` array has one more of; and Adafactor's statistics are per array:
    factored row/column moments over its two largest axes, the update clipped by its block
    RMS, the step scaled by its parameter RMS. A stacked array would mix its layers in all
    three (and could factor over the layers axis), so the stacked leaves go through
    ``jax.vmap(tx)`` over that axis (T5X's Adafactor treats a ``layers`` axis as a batch
    dimension likewise) and the scanned model trains as its unscanned twin does. Params
    without stacked layers get ``tx`` unchanged (the same state as before).
    """
    stacked_tx = optax.GradientTransformation(jax.vmap(tx.init), jax.vmap(tx.update))

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "layers" if scanning.is_stacked_path(path) else "rest", params
        )

    def split(params):
        return any(
            scanning.is_stacked_path(path)
            for path, _ in jax.tree_util.tree_leaves_with_path(params)
        )

    both = optax.multi_transform({"layers": stacked_tx, "rest": tx}, labels)

    def init_fn(params):
        return both.init(params) if split(params) else tx.init(params)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("per_layer needs params (Adafactor scales by them).")
        return (both if split(params) else tx).update(updates, state, params)

    return optax.GradientTransformation(init_fn, update_fn)


def _mean_over_axis(x, axis: int):
    """``jnp.mean(x, axis)`` as a product with a ones vector (float32 accumulation).

    jaxlib 0.10's CPU backend runs a reduce over a leading axis of a large array as a slow
    unvectorised loop (Adafactor's column statistics of the ``[512, 32128]`` output layer
    took longer than its gradient); a matrix-vector product runs at memory speed everywhere.
    """
    ones = jnp.ones((x.shape[axis],), x.dtype)
    total = lax.dot_general(
        x, ones, (((axis,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    return (total / x.shape[axis]).astype(x.dtype)


def _root_mean_square(x):
    """``sqrt(mean(x**2))`` of a whole array, as a dot product (see ``_mean_over_axis``)."""
    flat = x.reshape(-1)
    return jnp.sqrt(jnp.dot(flat, flat, preferred_element_type=jnp.float32) / max(flat.size, 1))


def scale_by_factored_rms(
    *, decay_rate: float, min_dim_size_to_factor: int, factored: bool, epsilon: float = 1e-30
) -> optax.GradientTransformation:
    """``optax.scale_by_factored_rms`` (Shazeer & Stern 2018) with its means as products.

    Same state (``optax.FactoredState``, from optax's own ``init``), same decay schedule
    ``1 - (t + 1)^-decay_rate`` and the same arithmetic; the row and column means of the
    squared gradient are ``_mean_over_axis`` products instead of reduces, and ``v ** -0.5``
    is ``lax.rsqrt(v)`` (XLA's CPU backend lowers a float power to exp/log: 142 against 38 ms
    for the full-size statistics of T5-small's 72 unfactored ``[512, 6, 64]`` attention
    kernels; the two agree to 1 ulp).
    """
    reference = optax.scale_by_factored_rms(
        factored=factored,
        decay_rate=decay_rate,
        min_dim_size_to_factor=min_dim_size_to_factor,
        epsilon=epsilon,
    )

    def factored_dims(shape):
        if not factored or len(shape) < 2:
            return None
        order = sorted(range(len(shape)), key=lambda axis: shape[axis])
        if shape[order[-2]] < min_dim_size_to_factor:
            return None
        return order[-2], order[-1]

    def update_fn(grads, state, params):
        if params is None:
            raise ValueError("scale_by_factored_rms needs params.")
        step = jnp.asarray(state.count + 1, jnp.float32)
        decay = 1.0 - step ** (-decay_rate)

        def update_leaf(grad, v_row, v_col, v, param):
            dtype = param.dtype
            grad_sqr = jnp.square(grad) + epsilon
            dims = factored_dims(param.shape)
            if dims is None:
                new_v = (decay * v + (1.0 - decay) * grad_sqr).astype(dtype)
                return grad * lax.rsqrt(new_v), v_row, v_col, new_v
            d1, d0 = dims
            new_v_row = (decay * v_row + (1.0 - decay) * _mean_over_axis(grad_sqr, d0)).astype(
                dtype
            )
            new_v_col = (decay * v_col + (1.0 - decay) * _mean_over_axis(grad_sqr, d1)).astype(
                dtype
            )
            reduced_d1 = d1 - 1 if d1 > d0 else d1
            row_col_mean = jnp.mean(new_v_row, axis=reduced_d1, keepdims=True)
            row_factor = lax.rsqrt(new_v_row / row_col_mean)
            col_factor = lax.rsqrt(new_v_col)
            update = grad * jnp.expand_dims(row_factor, d0) * jnp.expand_dims(col_factor, d1)
            return update, new_v_row, new_v_col, v

        leaves, treedef = jax.tree.flatten(grads)
        rows = treedef.flatten_up_to(state.v_row)
        cols = treedef.flatten_up_to(state.v_col)
        vs = treedef.flatten_up_to(state.v)
        ps = treedef.flatten_up_to(params)
        results = [update_leaf(*args) for args in zip(leaves, rows, cols, vs, ps, strict=True)]
        updates, new_rows, new_cols, new_vs = (
            treedef.unflatten([r[i] for r in results]) for i in range(4)
        )
        new_state = optax.FactoredState(
            count=optax.safe_increment(state.count), v_row=new_rows, v_col=new_cols, v=new_vs
        )
        return updates, new_state

    return optax.GradientTransformation(reference.init, update_fn)


def clip_by_block_rms(threshold: float) -> optax.GradientTransformation:
    """``optax.clip_by_block_rms`` with the RMS as a dot product."""

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(
            lambda u: u / jnp.maximum(1.0, _root_mean_square(u) / threshold), updates
        ), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def scale_by_param_block_rms(min_scale: float = 1e-3) -> optax.GradientTransformation:
    """``optax.scale_by_param_block_rms`` with the RMS as a dot product."""

    def update_fn(updates, state, params):
        if params is None:
            raise ValueError("scale_by_param_block_rms needs params.")
        return jax.tree.map(
            lambda u, p: u * jnp.maximum(_root_mean_square(p), min_scale), updates, params
        ), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def adafactor(
    learning_rate,
    *,
    min_dim_size_to_factor: int = 128,
    decay_rate: float = 0.8,
    multiply_by_parameter_scale: bool = True,
    clipping_threshold: float | None = 1.0,
    momentum: float | None = None,
    weight_decay_rate: float | None = None,
    weight_decay_mask=None,
    factored: bool = True,
) -> optax.GradientTransformation:
    """``optax.adafactor`` rebuilt from the same steps, with products for its statistics.

    The chain and every state are those of ``optax.adafactor`` (checkpoints of either load
    in the other, and the updates agree to float rounding: tests compare them); the row and
    column means and the block RMS values are matrix-vector / dot products
    (``_mean_over_axis``), which jaxlib 0.10's CPU backend runs far faster than reduces.
    """
    chain = [
        scale_by_factored_rms(
            decay_rate=decay_rate, min_dim_size_to_factor=min_dim_size_to_factor, factored=factored
        )
    ]
    if clipping_threshold is not None:
        chain.append(clip_by_block_rms(clipping_threshold))
    chain.append(optax.scale_by_learning_rate(learning_rate, flip_sign=False))
    if multiply_by_parameter_scale:
        chain.append(scale_by_param_block_rms())
    if momentum is not None:
        chain.append(optax.ema(momentum, debias=False, accumulator_dtype=jnp.float32))
    if weight_decay_rate is not None:
        chain.append(optax.add_decayed_weights(weight_decay_rate, mask=weight_decay_mask))
    chain.append(optax.scale(-1))
    return optax.chain(*chain)


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
