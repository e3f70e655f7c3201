"""Adafactor (Shazeer & Stern 2018) as ``optax.adafactor``'s chain, with products for its
statistics and a form for a scanned stack's stacked ``[L, ...]`` parameters.

The chain, its states and its arithmetic are those of ``optax.adafactor`` (checkpoints of
either load in the other; tests compare the updates). Two departures, both for speed:

* The row and column means of the squared gradient and the block RMS values are
  matrix-vector / dot products (:func:`mean_over_axis`): jaxlib 0.10's CPU backend runs a
  reduce over a leading axis of a large array as a slow unvectorised loop (the column
  statistics of T5's ``[512, 32128]`` output layer took longer than its gradient), and
  ``v ** -0.5`` is ``lax.rsqrt(v)`` (XLA's CPU backend lowers a float power to exp/log:
  142 against 38 ms for T5-small's 72 unfactored ``[512, 6, 64]`` attention kernels).
* ``stacked=True`` builds the same optimizer for leaves that hold a scanned stack's layers
  on a leading axis (``rope_jax.scanning``), every statistic per layer: the update of
  ``jax.vmap(adafactor(...).update)`` over that axis, from the same state as
  ``jax.vmap(adafactor(...).init)`` (per-layer step counts of shape ``[L]``), but computed
  on the stacked arrays directly. Under ``vmap`` the per-layer means became batched
  matrix-vector products whose vector operand XLA's CPU backend transposes first (a copy of
  every stacked squared gradient) and the block RMS values multiply-then-reduce fusions; the
  stacked form contracts a ``[L, n]`` ones operand with the array (the layout XLA's batched
  dot takes as it is): 2.4 against 23 ms for one ``[8, 512, 1024]`` MLP kernel's two means
  on this 2-core CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax


def per_layer_view(values_L, ndim: int):
    """Per-layer scalars ``[L]`` shaped to broadcast against an ``ndim``-axis stacked array."""
    return jnp.reshape(values_L, (-1,) + (1,) * (ndim - 1))


def mean_over_axis(x, axis: int, *, stacked: bool = False):
    """``jnp.mean(x, axis)`` as a product with a ones vector (float32 accumulation); with
    ``stacked`` (``axis >= 1``), the same per index of ``x``'s leading axis, as a batched
    product with a ``[L, n]`` ones operand on the left (module docstring)."""
    n = x.shape[axis]
    if stacked:
        if axis < 1:
            raise ValueError(f"a stacked mean is over a layer's own axes (>= 1), got {axis}.")
        ones = jnp.ones((x.shape[0], n), x.dtype)
        dimensions = (((1,), (axis,)), ((0,), (0,)))
        total = lax.dot_general(ones, x, dimensions, preferred_element_type=jnp.float32)
    else:
        ones = jnp.ones((n,), x.dtype)
        dimensions = (((axis,), (0,)), ((), ()))
        total = lax.dot_general(x, ones, dimensions, preferred_element_type=jnp.float32)
    return (total / n).astype(x.dtype)


def root_mean_square(x, *, stacked: bool = False):
    """``sqrt(mean(x**2))`` of a whole array as a dot product; with ``stacked``, one value per
    layer (``[L]``) as a batched one."""
    if not stacked:
        flat = x.reshape(-1)
        squares = jnp.dot(flat, flat, preferred_element_type=jnp.float32)
        return jnp.sqrt(squares / max(flat.size, 1))
    flat_LN = x.reshape(x.shape[0], -1)
    dimensions = (((1,), (1,)), ((0,), (0,)))
    squares_L = lax.dot_general(flat_LN, flat_LN, dimensions, preferred_element_type=jnp.float32)
    return jnp.sqrt(squares_L / max(flat_LN.shape[1], 1))


def scale_by_factored_rms(
    *,
    decay_rate: float,
    min_dim_size_to_factor: int,
    factored: bool,
    epsilon: float = 1e-30,
    stacked: bool = False,
) -> optax.GradientTransformation:
    """``optax.scale_by_factored_rms`` with its means as products (module docstring).

    Same state (``optax.FactoredState``, from optax's own ``init``; ``stacked``: that state
    under ``jax.vmap``), the same decay schedule ``1 - (t + 1)^-decay_rate`` and the same
    arithmetic. A stacked leaf is factored as one of its layers would be: over the two
    largest of its own axes, never the layers axis.
    """
    reference = optax.scale_by_factored_rms(
        factored=factored,
        decay_rate=decay_rate,
        min_dim_size_to_factor=min_dim_size_to_factor,
        epsilon=epsilon,
    )
    lead = 1 if stacked else 0

    def factored_dims(shape):
        layer_shape = shape[lead:]
        if not factored or len(layer_shape) < 2:
            return None
        order = sorted(range(len(layer_shape)), key=lambda axis: layer_shape[axis])
        if layer_shape[order[-2]] < min_dim_size_to_factor:
            return None
        return order[-2] + lead, order[-1] + lead

    def update_fn(grads, state, params):
        if params is None:
            raise ValueError("scale_by_factored_rms needs params.")
        step = jnp.asarray(state.count + 1, jnp.float32)
        decay = 1.0 - step ** (-decay_rate)  # [L] when stacked

        def shaped(ndim):
            return per_layer_view(decay, ndim) if stacked else decay

        def update_leaf(grad, v_row, v_col, v, param):
            dtype = param.dtype
            grad_sqr = jnp.square(grad) + epsilon
            dims = factored_dims(param.shape)
            if dims is None:
                d = shaped(grad.ndim)
                new_v = (d * v + (1.0 - d) * grad_sqr).astype(dtype)
                return grad * lax.rsqrt(new_v), v_row, v_col, new_v
            d1, d0 = dims
            d = shaped(grad.ndim - 1)
            row_mean = mean_over_axis(grad_sqr, d0, stacked=stacked)
            col_mean = mean_over_axis(grad_sqr, d1, stacked=stacked)
            new_v_row = (d * v_row + (1.0 - d) * row_mean).astype(dtype)
            new_v_col = (d * v_col + (1.0 - d) * col_mean).astype(dtype)
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


def clip_by_block_rms(threshold: float, *, stacked: bool = False) -> optax.GradientTransformation:
    """``optax.clip_by_block_rms`` with the RMS as a dot product (per layer if ``stacked``)."""

    def clip(u):
        factor = jnp.maximum(1.0, root_mean_square(u, stacked=stacked) / threshold)
        return u / (per_layer_view(factor, u.ndim) if stacked else factor)

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def scale_by_param_block_rms(
    min_scale: float = 1e-3, *, stacked: bool = False
) -> optax.GradientTransformation:
    """``optax.scale_by_param_block_rms`` with the RMS as a dot product (per layer if
    ``stacked``)."""

    def scale(u, p):
        factor = jnp.maximum(root_mean_square(p, stacked=stacked), min_scale)
        return u * (per_layer_view(factor, u.ndim) if stacked else factor)

    def update_fn(updates, state, params):
        if params is None:
            raise ValueError("scale_by_param_block_rms needs params.")
        return jax.tree.map(scale, updates, params), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def scale_by_stacked_schedule(schedule: Callable) -> optax.GradientTransformation:
    """``optax.scale_by_schedule`` for stacked leaves: its per-layer counts ``[L]`` (the state
    of ``jax.vmap(optax.scale_by_schedule(schedule).init)``) give one step size per layer."""
    reference = optax.scale_by_schedule(schedule)

    def update_fn(updates, state, params=None):
        del params
        step_size_L = schedule(state.count)
        updates = jax.tree.map(
            lambda u: per_layer_view(jnp.asarray(step_size_L, u.dtype), u.ndim) * u, updates
        )
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(reference.init, update_fn)


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
    stacked: bool = False,
) -> optax.GradientTransformation:
    """``optax.adafactor`` rebuilt from the same steps (module docstring).

    ``stacked``: every leaf holds layers on its leading axis and is updated per layer (the
    update of ``jax.vmap`` of the unstacked optimizer, on its state); ``weight_decay_mask``
    must then be computed on the stacked leaves (``optim.decay_mask(..., stacked=True)``).
    """
    chain = [
        scale_by_factored_rms(
            decay_rate=decay_rate,
            min_dim_size_to_factor=min_dim_size_to_factor,
            factored=factored,
            stacked=stacked,
        )
    ]
    if clipping_threshold is not None:
        chain.append(clip_by_block_rms(clipping_threshold, stacked=stacked))
    if stacked and callable(learning_rate):
        chain.append(scale_by_stacked_schedule(learning_rate))
    else:
        chain.append(optax.scale_by_learning_rate(learning_rate, flip_sign=False))
    if multiply_by_parameter_scale:
        chain.append(scale_by_param_block_rms(stacked=stacked))
    if momentum is not None:
        # Elementwise, its count unused (no debiasing): the same on stacked leaves.
        chain.append(optax.ema(momentum, debias=False, accumulator_dtype=jnp.float32))
    if weight_decay_rate is not None:
        chain.append(optax.add_decayed_weights(weight_decay_rate, mask=weight_decay_mask))
    chain.append(optax.scale(-1))
    return optax.chain(*chain)
