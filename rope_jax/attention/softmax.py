"""Exact scaled dot-product attention (Vaswani et al. 2017, eq. (1))."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rope_jax.attention import _inputs
from rope_jax.attention.masks import causal_mask, combine_masks


@jax.custom_jvp
def _softmax_last_axis(logits):
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    # The shift cancels in the ratio; an all -inf row gets shift 0, so exp gives exact
    # zeros and the row comes out as zeros instead of 0 / 0.
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    unnormalized = jnp.exp(logits - row_max)
    total = jnp.sum(unnormalized, axis=-1, keepdims=True)
    # max(), not where(): a where on the row sums stops XLA's CPU fusion (~1.7x slower).
    return unnormalized / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)


@_softmax_last_axis.defjvp
def _softmax_last_axis_jvp(primals, tangents):
    # d softmax = w * (t - <w, t>): keeps only the weights for the backward pass (as
    # jax.nn.softmax does), and entries with weight 0 (masked) get exactly 0.
    (logits,), (logits_dot,) = primals, tangents
    weights = _softmax_last_axis(logits)
    weighted_mean = jnp.sum(weights * logits_dot, axis=-1, keepdims=True)
    return weights, weights * (logits_dot - weighted_mean)


def masked_softmax(logits, mask=None):
    """Float32 softmax over the last axis where masked entries get weight exactly 0.

    A row with no allowed entry (or only ``-inf`` logits) returns all zeros; neither the
    values nor the gradients contain NaN. ``mask`` broadcasts against ``logits``.
    """
    logits = logits.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    return _softmax_last_axis(logits)


def softmax_attention(
    q_BTHD,
    k_BSHD,
    v_BSHD,
    *,
    mask=None,
    bias=None,
    causal=False,
    scale=None,
    q_positions=None,
    kv_positions=None,
    rope=None,
):
    """``softmax(scale * q k^T + bias) v`` with boolean masking.

    Args:
      q_BTHD, k_BSHD, v_BSHD: queries, keys, values ``[B, L, H, D]``.
      mask: bool, broadcastable to ``[B, H, T, S]``, True = may attend.
      bias: additive float, broadcastable to ``[B, H, T, S]`` (T5 relative bias, ALiBi).
      causal: also apply ``causal_mask(T, S, offset=S - T)`` (the queries are the last T
        positions, which covers incremental decoding against a cache).
      scale: logit scale; ``1 / sqrt(D)`` when None. T5 models pass ``scale=1.0``.
      q_positions, kv_positions: int ``[B|1, T]`` / ``[B|1, S]``, used only with ``rope``;
        default ``0..L-1``.
      rope: ``RopeSpec`` or None; when given, q and k are rotated before the dot product.

    Returns:
      ``[B, T, H, D]`` in q's dtype. Logits and softmax run in float32; a query whose keys
      are all masked gets a zero output (and zero gradients), never NaN.
    """
    _inputs.check_qkv("softmax_attention", q_BTHD, k_BSHD, v_BSHD)
    if rope is not None:
        q_BTHD = _inputs.rotate(q_BTHD, q_positions, rope)
        k_BSHD = _inputs.rotate(k_BSHD, kv_positions, rope)
    q_len, kv_len, head_dim = q_BTHD.shape[1], k_BSHD.shape[1], q_BTHD.shape[3]
    if scale is None:
        scale = head_dim**-0.5
    if causal:
        mask = combine_masks(mask, causal_mask(q_len, kv_len, offset=kv_len - q_len))

    logits_BHTS = jnp.einsum("BTHD,BSHD->BHTS", q_BTHD, k_BSHD, preferred_element_type=jnp.float32)
    logits_BHTS = logits_BHTS * jnp.float32(scale)
    if bias is not None:
        logits_BHTS = logits_BHTS + jnp.asarray(bias).astype(jnp.float32)
    weights_BHTS = masked_softmax(logits_BHTS, mask)
    out_BTHD = jnp.einsum("BHTS,BSHD->BTHD", weights_BHTS.astype(v_BSHD.dtype), v_BSHD)
    return out_BTHD.astype(q_BTHD.dtype)
