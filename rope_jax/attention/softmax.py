"""Exact scaled dot-product attention (Vaswani et al. 2017, eq. (1)), with optional dropout
on the attention weights as in T5 and BERT."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rope_jax import dropout as dropout_lib
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
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
):
    """``softmax(scale * q k^T + bias) v`` with boolean masking and attention dropout.

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
      dropout_rate: probability of dropping each attention weight, a Python float in
        ``[0, 1)``. T5 (Raffel et al. 2020) and BERT (Devlin et al. 2019) drop attention
        probabilities after the softmax during training (both at 0.1, the rate of their
        other dropout layers).
      dropout_rng: PRNG key; dropout applies only when it is given and ``dropout_rate > 0``
        (otherwise the result is exactly that of plain attention, as for evaluation).
        The keep mask is ``rope_jax.dropout.keep_mask(dropout_rng, dropout_rate, [B, H, T,
        S])`` (a hash of the key and each weight's position; the rate is resolved to
        2**-32) and kept weights
        are scaled by the inverse keep probability (inverted dropout), in float32, before
        the weighted sum of values. Each batch row and head draws its
        own mask, as in BERT and the Hugging Face T5; Flax's ``dot_product_attention``
        defaults instead to one mask shared across batch and heads.

    Returns:
      ``[B, T, H, D]`` in q's dtype. Logits and softmax run in float32; a query whose keys
      are all masked gets a zero output (and zero gradients), never NaN, with or without
      dropout.
    """
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(
            f"softmax_attention: dropout_rate must be in [0, 1), got {dropout_rate!r}."
        )
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
    if dropout_rng is not None and dropout_lib.drop_threshold(dropout_rate) > 0:
        # Masked weights are exactly 0 and stay 0 whether kept or dropped.
        keep_BHTS = dropout_lib.keep_mask(dropout_rng, dropout_rate, weights_BHTS.shape)
        scale = 1.0 / dropout_lib.keep_probability(dropout_rate)
        out_BTHD = _dropped_weighted_sum(weights_BHTS, keep_BHTS, v_BSHD, scale)
    else:
        out_BTHD = _weighted_sum(weights_BHTS, v_BSHD)
    return out_BTHD.astype(q_BTHD.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dropped_weighted_sum(weights_BHTS, keep_BHTS, v_BSHD, scale):
    """``dropout(weights) @ v`` with the keep mask given: ``where(keep, w * scale, 0) v``.

    Its gradient keeps the boolean mask (1 byte per weight) and recomputes the dropped
    weights from the softmax weights, which the softmax's own gradient keeps anyway, instead
    of keeping the dropped float32 weights (4 bytes per weight) as plain autodiff of the
    two steps does: for T5-small's encoder, 8 x 48 MiB less live memory in the backward
    pass. Same values and gradients.
    """
    return _weighted_sum(_drop(weights_BHTS, keep_BHTS, scale), v_BSHD)


def _drop(weights_BHTS, keep_BHTS, scale):
    dropped = weights_BHTS * jnp.asarray(scale, weights_BHTS.dtype)
    return jnp.where(keep_BHTS, dropped, jnp.zeros((), weights_BHTS.dtype))


def _weighted_sum(weights_BHTS, v_BSHD):
    """``weights v`` as a heads-major batched product: the values are transposed to
    ``[B, H, S, D]`` (``S x D`` per head, a copy of ``v``, T/D times smaller than the
    weights) and the ``[B, H, T, D]`` result back. Written directly as
    ``BHTS,BSHD->BTHD`` the product ran 1.5x slower on CPU (T5-small's encoder shapes,
    ``[8, 6, 512, 512]`` weights: 25 vs 17 ms, a one-off script alternating both in one
    process); T5-small's whole encoder pass was 1.11x and 1.12x faster in two alternating
    runs of the two versions, the train step unchanged."""
    v_BHSD = jnp.einsum("BSHD->BHSD", v_BSHD)
    out_BHTD = jnp.einsum("BHTS,BHSD->BHTD", weights_BHTS.astype(v_BSHD.dtype), v_BHSD)
    return jnp.einsum("BHTD->BTHD", out_BHTD)


def _dropped_weighted_sum_fwd(weights_BHTS, keep_BHTS, v_BSHD, scale):
    out = _dropped_weighted_sum(weights_BHTS, keep_BHTS, v_BSHD, scale)
    return out, (weights_BHTS, keep_BHTS, v_BSHD)


def _dropped_weighted_sum_bwd(scale, residuals, dout_BTHD):
    weights_BHTS, keep_BHTS, v_BSHD = residuals
    dropped_BHTS = _drop(weights_BHTS, keep_BHTS, scale).astype(v_BSHD.dtype)
    dv_BSHD = jnp.einsum("BHTS,BTHD->BSHD", dropped_BHTS, dout_BTHD.astype(v_BSHD.dtype))
    ddropped_BHTS = jnp.einsum(
        "BTHD,BSHD->BHTS", dout_BTHD, v_BSHD, preferred_element_type=jnp.float32
    )
    dweights_BHTS = _drop(ddropped_BHTS, keep_BHTS, scale).astype(weights_BHTS.dtype)
    return dweights_BHTS, None, dv_BSHD.astype(v_BSHD.dtype)


_dropped_weighted_sum.defvjp(_dropped_weighted_sum_fwd, _dropped_weighted_sum_bwd)


def forward_flops(cfg, q_len, kv_len, causal):
    """``q k^T`` and ``weights v``: ``4 T S H D``; a causal kernel still forms all of
    ``T x S`` (masked), so it is counted in full."""
    del causal
    return 4.0 * q_len * kv_len * cfg.num_heads * cfg.head_dim


def softmax_attention_heads_major(q_BTHD, k_BHDS, v_BHSD, *, mask=None, bias=None, scale=None):
    """:func:`softmax_attention` (no dropout, no RoPE) with keys ``[B, H, D, S]`` and values
    ``[B, H, S, D]``.

    Those are the operand layouts XLA's batched dot wants (batch dimensions first, then the
    contracted and the free dimension of the right-hand operand); given ``[B, S, H, D]`` it
    transposes keys and values at every call. Decoding reads the same encoder keys/values at
    every step (``layers.MultiHeadAttention``'s "cross_cache"), so they are stored once in
    this layout: on CPU the per-step transposes of T5-small's eight layers moved about 100 MB
    per token, more than the weights of the decoder layers. Same arguments and result
    otherwise (``[B, T, H, D]`` in q's dtype, float32 logits and softmax, masked weights
    exactly 0).
    """
    if (
        q_BTHD.ndim != 4
        or k_BHDS.ndim != 4
        or v_BHSD.shape
        != (
            k_BHDS.shape[0],
            k_BHDS.shape[1],
            k_BHDS.shape[3],
            k_BHDS.shape[2],
        )
    ):
        raise ValueError(
            f"softmax_attention_heads_major: q must be [B, T, H, D], k [B, H, D, S] and v "
            f"[B, H, S, D], got shapes {q_BTHD.shape}, {k_BHDS.shape}, {v_BHSD.shape}."
        )
    batch, _, heads, head_dim = q_BTHD.shape
    if k_BHDS.shape[:3] != (batch, heads, head_dim):
        raise ValueError(
            f"softmax_attention_heads_major: k {k_BHDS.shape} must be [B, H, D, S] with q's "
            f"batch, heads and head_dim {q_BTHD.shape}."
        )
    if scale is None:
        scale = q_BTHD.shape[3] ** -0.5
    logits_BHTS = jnp.einsum("BTHD,BHDS->BHTS", q_BTHD, k_BHDS, preferred_element_type=jnp.float32)
    logits_BHTS = logits_BHTS * jnp.float32(scale)
    if bias is not None:
        logits_BHTS = logits_BHTS + jnp.asarray(bias).astype(jnp.float32)
    weights_BHTS = masked_softmax(logits_BHTS, mask)
    out_BHTD = jnp.einsum("BHTS,BHSD->BHTD", weights_BHTS.astype(v_BHSD.dtype), v_BHSD)
    return jnp.einsum("BHTD->BTHD", out_BHTD).astype(q_BTHD.dtype)
