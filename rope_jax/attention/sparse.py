"""Sparse top-k softmax attention (Zhao et al. 2019, "Explicit Sparse Transformer").

Each query keeps its ``top_k`` largest logits and the softmax runs over those alone: every
other logit becomes ``-inf`` before the softmax, so the weights are exactly zero there (the
"sparse attention" of the seed posts: attention concentrated on the most relevant keys).

Ties. The cut is a threshold, as in the paper's code (``torch.topk`` gives the k-th largest
value ``v_k`` and logits ``< v_k`` are masked): every logit equal to the k-th largest value
is kept, so a query whose k-th and (k+1)-th logits tie keeps more than ``top_k`` keys.
Masked keys (padding, causal, other segments) are removed before the ranking, so the
``top_k`` are chosen among the keys a query may see; a query with at most ``top_k`` such
keys keeps all of them (plain softmax attention).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rope_jax import dropout as dropout_lib
from rope_jax.attention import _inputs
from rope_jax.attention.masks import causal_mask, combine_masks
from rope_jax.attention.softmax import masked_softmax


def sparse_topk_attention(
    q_BTHD,
    k_BSHD,
    v_BSHD,
    *,
    top_k,
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
    """``softmax(top_k(scale * q k^T + bias)) v``; arguments as in ``softmax_attention``.

    Args:
      top_k: logits kept per query (>= 1); ties with the k-th largest are kept too.
      mask, bias, causal, scale, q_positions, kv_positions, rope, dropout_rate,
        dropout_rng: as in ``softmax.softmax_attention`` (the bias counts in the ranking).

    Returns:
      ``[B, T, H, D]`` in q's dtype; float32 logits and softmax; a query with no visible
      key returns zeros.
    """
    name = "sparse_topk_attention"
    _inputs.check_qkv(name, q_BTHD, k_BSHD, v_BSHD)
    if top_k < 1:
        raise ValueError(f"{name}: top_k must be >= 1, got {top_k}.")
    if rope is not None:
        q_BTHD = _inputs.rotate(q_BTHD, q_positions, rope)
        k_BSHD = _inputs.rotate(k_BSHD, kv_positions, rope)
    q_len, kv_len, head_dim = q_BTHD.shape[1], k_BSHD.shape[1], q_BTHD.shape[3]
    scale = head_dim**-0.5 if scale is None else scale
    if causal:
        mask = combine_masks(mask, causal_mask(q_len, kv_len, offset=kv_len - q_len))

    logits_BHTS = jnp.einsum("BTHD,BSHD->BHTS", q_BTHD, k_BSHD, preferred_element_type=jnp.float32)
    logits_BHTS = logits_BHTS * jnp.float32(scale)
    if bias is not None:
        logits_BHTS = logits_BHTS + jnp.asarray(bias).astype(jnp.float32)
    if mask is not None:
        logits_BHTS = jnp.where(mask, logits_BHTS, -jnp.inf)
    # The k-th largest visible logit per query (-inf when fewer than k are visible, which
    # then keeps every visible one); a threshold, so ties with it are kept.
    kth_BHT1 = jax.lax.top_k(logits_BHTS, min(top_k, kv_len))[0][..., -1:]
    keep_BHTS = logits_BHTS >= jax.lax.stop_gradient(kth_BHT1)
    weights_BHTS = masked_softmax(logits_BHTS, keep_BHTS)
    if dropout_rng is not None and dropout_rate > 0.0:
        weights_BHTS = dropout_lib.dropout(weights_BHTS, dropout_rate, dropout_rng)
    out_BTHD = jnp.einsum("BHTS,BSHD->BTHD", weights_BHTS.astype(v_BSHD.dtype), v_BSHD)
    return out_BTHD.astype(q_BTHD.dtype)


def forward_flops(cfg, q_len, kv_len, causal):
    """As softmax attention: ``q k^T`` and ``weights v`` over all ``T x S`` pairs (the
    ranking is a selection, not a matmul)."""
    del causal
    return 4.0 * q_len * kv_len * cfg.num_heads * cfg.head_dim
