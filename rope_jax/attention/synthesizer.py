"""Random Synthesizer attention (Tay et al. 2021, "Synthesizer", section 3.2 "Random").

The attention weights do not depend on the tokens: ``softmax(R) V`` with ``R [H, T, S]`` a
learned (or fixed random) array that the calling module owns and passes in. q and k are
accepted for the common kernel signature but not used.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from rope_jax.attention import _inputs
from rope_jax.attention.masks import causal_mask, combine_masks
from rope_jax.attention.softmax import masked_softmax


def random_synthesizer_attention(
    q_BTHD,
    k_BSHD,
    v_BSHD,
    *,
    logits,
    mask=None,
    bias=None,
    causal=False,
    q_positions=None,
    kv_positions=None,
    rope=None,
):
    """``softmax(logits + bias) v`` with masking as in ``softmax_attention``.

    Args:
      logits: float, ``[H, T, S]`` or broadcastable to ``[B, H, T, S]`` (e.g. sliced to the
        current lengths from a ``[H, L_max, L_max]`` parameter).
      mask, bias, causal: as in ``softmax_attention``.
      q_positions, kv_positions, rope: ignored (the weights carry no token content to
        rotate); accepted so the kernel fits the common signature.

    Returns:
      ``[B, T, H, D]`` in q's dtype.
    """
    del q_positions, kv_positions, rope
    _inputs.check_qkv("random_synthesizer_attention", q_BTHD, k_BSHD, v_BSHD)
    q_len, kv_len = q_BTHD.shape[1], k_BSHD.shape[1]
    logits = jnp.asarray(logits).astype(jnp.float32)
    if logits.ndim == 3:
        logits = logits[None]
    if logits.ndim != 4 or logits.shape[-2:] != (q_len, kv_len):
        raise ValueError(
            f"random_synthesizer_attention: logits must be [H, {q_len}, {kv_len}] or "
            f"broadcastable to [B, H, {q_len}, {kv_len}], got shape {logits.shape}."
        )
    if bias is not None:
        logits = logits + jnp.asarray(bias).astype(jnp.float32)
    if causal:
        mask = combine_masks(mask, causal_mask(q_len, kv_len, offset=kv_len - q_len))
    weights_BHTS = masked_softmax(logits, mask)
    out_BTHD = jnp.einsum("BHTS,BSHD->BTHD", weights_BHTS.astype(v_BSHD.dtype), v_BSHD)
    return out_BTHD.astype(q_BTHD.dtype)


def logits_for_call(table_HPP, cfg, q_offset, q_len, kv_len):
    """The ``[H, T, S]`` block of a ``[H, max_length, max_length]`` logits table for queries
    at slots ``q_offset ..`` and keys ``0 .. S-1``; a clear error past ``max_length``."""
    if max(q_len, kv_len) > cfg.max_length:
        raise ValueError(
            f"random_synthesizer attention has logits for max_length={cfg.max_length} "
            f"positions, got lengths {q_len} x {kv_len}; raise max_length."
        )
    offset = jnp.asarray(q_offset, jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    return lax.dynamic_slice(table_HPP, (zero, offset, zero), (cfg.num_heads, q_len, kv_len))


def forward_flops(cfg, q_len, kv_len, causal):
    """Only the weights-times-values product: the logits are a parameter, not ``q k^T``."""
    del causal
    return 2.0 * q_len * kv_len * cfg.num_heads * cfg.head_dim
