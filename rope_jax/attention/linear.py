"""Linear attention with fixed (non-random) feature maps.

* ``linear_attention``: ``phi(x) = elu(x) + 1`` (Katharopoulos et al. 2020, "Transformers are
  RNNs", eq. (7)), applied to q and k as they are.
* ``taylor_attention``: similarity ``1 + s + s^2 / 2`` with ``s = q . k / sqrt(d)``, the
  second-order Taylor expansion of ``exp(s)``. An even-order Taylor polynomial of exp is
  positive everywhere (here ``((1 + s)^2 + 1) / 2``), so it is a valid attention weight and
  factorises exactly as ``phi(q) . phi(k)`` with
  ``phi(x) = [1, x, vec(x x^T) / sqrt(2)]`` on ``x = q / d^(1/4)`` (``1 + D + D^2``
  features; the symmetric half would do with fewer, the full outer product keeps it plain).

Both are bidirectional or causal (chunked prefix sums, see ``kernelized``), take packed
rows (``segment_ids``, see ``segments``) and have a recurrent form (``init_state`` /
``step`` and ``taylor_init_state`` / ``taylor_step``).
RoPE recipes as for every linear-family kernel: ``"feature"`` rotates the features in the
numerator only (RoFormer eq. (19)), ``"input"`` rotates q and k before the feature map.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rope_jax.attention import _inputs, kernelized, segments


def elu_features(x_BLHD):
    """``elu(x) + 1`` in float32 (positive)."""
    return jax.nn.elu(x_BLHD.astype(jnp.float32)) + 1.0


def taylor_features(x_BLHD, scale=None):
    """``[1, x, vec(x x^T) / sqrt(2)]`` on ``x = x * sqrt(scale)``, float32 ``[B, L, H, M]``.

    ``phi(q) . phi(k) = 1 + s + s^2 / 2`` with ``s = scale * q . k`` (default scale
    ``1 / sqrt(D)``), ``M = 1 + D + D^2``.
    """
    head_dim = x_BLHD.shape[-1]
    if scale is None:
        scale = head_dim**-0.5
    x_BLHD = x_BLHD.astype(jnp.float32) * jnp.sqrt(jnp.float32(scale))
    outer_BLHDD = jnp.einsum("BLHD,BLHE->BLHDE", x_BLHD, x_BLHD) * (0.5**0.5)
    ones_BLH1 = jnp.ones(x_BLHD.shape[:-1] + (1,), jnp.float32)
    return jnp.concatenate(
        [ones_BLH1, x_BLHD, outer_BLHDD.reshape(x_BLHD.shape[:-1] + (head_dim * head_dim,))],
        axis=-1,
    )


def _feature_attention(
    name,
    feature_map,
    q_BTHD,
    k_BSHD,
    v_BSHD,
    mask,
    bias,
    causal,
    chunk_size,
    q_positions,
    kv_positions,
    rope,
    segment_ids,
    kv_segment_ids,
):
    _inputs.check_qkv(name, q_BTHD, k_BSHD, v_BSHD)
    _inputs.reject_bias(name, bias)
    batch, q_len = q_BTHD.shape[:2]
    kv_len = k_BSHD.shape[1]
    if causal and q_len != kv_len:
        raise ValueError(f"{name}: causal=True needs equal q and k lengths, got {q_len}, {kv_len}.")
    key_valid_BS = _inputs.key_valid_from_mask(name, mask, batch, q_len, kv_len)
    if kv_segment_ids is not None:

        def self_attention(q, k, v, *, mask, segment_ids, q_positions, kv_positions):
            return _feature_attention(
                name,
                feature_map,
                q,
                k,
                v,
                mask,
                None,
                False,
                chunk_size,
                q_positions,
                kv_positions,
                rope,
                segment_ids,
                None,
            )

        return segments.cross_attention_by_merge(
            name,
            self_attention,
            q_BTHD,
            k_BSHD,
            v_BSHD,
            key_valid_BS=key_valid_BS,
            segment_ids=segment_ids,
            kv_segment_ids=kv_segment_ids,
            causal=causal,
            q_positions=q_positions,
            kv_positions=kv_positions,
        )
    run_ids_BL, query_valid_BL, key_valid_BS = segments.self_attention_runs(
        name, segment_ids, key_valid_BS, batch, q_len, kv_len
    )
    q_BTHD, k_BSHD = kernelized.rope_before_features(
        q_BTHD, k_BSHD, q_positions, kv_positions, rope
    )
    query_features = feature_map(q_BTHD)
    key_features = feature_map(k_BSHD)
    if key_valid_BS is not None:
        key_features = jnp.where(key_valid_BS[:, :, None, None], key_features, 0.0)
    numerator_q, numerator_k = kernelized.numerator_features(
        query_features, key_features, q_positions, kv_positions, rope
    )
    if causal:
        out_BTHD = kernelized.causal(
            numerator_q,
            numerator_k,
            query_features,
            key_features,
            v_BSHD,
            chunk_size=chunk_size,
            run_ids_BL=run_ids_BL,
        )
    else:
        out_BTHD = kernelized.bidirectional(
            numerator_q,
            numerator_k,
            query_features,
            key_features,
            v_BSHD,
            run_ids_BL=run_ids_BL,
            chunk_size=chunk_size,
            query_valid_BL=query_valid_BL,
        )
    return out_BTHD.astype(q_BTHD.dtype)


def _feature_step(name, feature_map, state, q_t, k_t, v_t, mask, position, rope):
    _inputs.check_qkv(name, q_t, k_t, v_t)
    if q_t.shape[1] != 1:
        raise ValueError(f"{name}: expects one position, q_t [B, 1, H, D], got {q_t.shape}.")
    batch = q_t.shape[0]
    key_valid_B1 = _inputs.key_valid_from_mask(name, mask, batch, 1, 1)
    positions_B1 = _inputs.step_positions(name, position, rope, batch)
    q_t, k_t = kernelized.rope_before_features(q_t, k_t, positions_B1, positions_B1, rope)
    query_features = feature_map(q_t)
    key_features = feature_map(k_t)
    if key_valid_B1 is not None:
        key_features = jnp.where(key_valid_B1[:, :, None, None], key_features, 0.0)
    numerator_q, numerator_k = kernelized.numerator_features(
        query_features, key_features, positions_B1, positions_B1, rope
    )
    state, out_BHD = kernelized.step(
        state,
        numerator_q[:, 0],
        numerator_k[:, 0],
        query_features[:, 0],
        key_features[:, 0],
        v_t[:, 0],
    )
    return state, out_BHD[:, None].astype(q_t.dtype)


def linear_attention(
    q_BTHD,
    k_BSHD,
    v_BSHD,
    *,
    mask=None,
    bias=None,
    causal=False,
    chunk_size=64,
    q_positions=None,
    kv_positions=None,
    rope=None,
    segment_ids=None,
    kv_segment_ids=None,
):
    """``phi(Q) (phi(K)^T V) / phi(Q) sum_s phi(k_s)`` with ``phi = elu + 1``.

    ``mask``: key padding only (``[B, 1, 1, S]``); ``causal``: chunked prefix sums (T == S);
    ``rope``: ``RopeSpec`` (recipe "feature" or "input"), positions default to 0..L-1.
    ``segment_ids`` ``[B, L]`` (0 = padding): packed-row self-attention, a query sees only
    its own segment (causal: its earlier part); ``kv_segment_ids`` ``[B, S]``: the keys' ids
    for cross-attention between two packed rows (not causal). See ``segments``.
    Returns ``[B, T, H, D]`` in q's dtype; queries with no valid key return zeros.
    """
    return _feature_attention(
        "linear_attention",
        elu_features,
        q_BTHD,
        k_BSHD,
        v_BSHD,
        mask,
        bias,
        causal,
        chunk_size,
        q_positions,
        kv_positions,
        rope,
        segment_ids,
        kv_segment_ids,
    )


def init_state(batch, heads, head_dim, value_dim):
    """Empty running sums for causal ``linear_attention`` decoding."""
    return kernelized.init_feature_state(batch, heads, head_dim, value_dim)


def step(state, q_t, k_t, v_t, *, mask=None, position=None, rope=None):
    """One decoding step of causal ``linear_attention``: ``(state, out_t [B, 1, H, D])``.

    ``mask`` (validity of the new key) broadcasts to ``[B, 1, 1, 1]``; ``position`` (scalar,
    ``[B]`` or ``[B, 1]``) is required with ``rope``.
    """
    return _feature_step("linear.step", elu_features, state, q_t, k_t, v_t, mask, position, rope)


def taylor_attention(
    q_BTHD,
    k_BSHD,
    v_BSHD,
    *,
    mask=None,
    bias=None,
    causal=False,
    scale=None,
    chunk_size=64,
    q_positions=None,
    kv_positions=None,
    rope=None,
    segment_ids=None,
    kv_segment_ids=None,
):
    """Attention with weights ``1 + s + s^2 / 2``, ``s = scale * q . k`` (scale 1/sqrt(D)).

    Computed exactly in linear time through ``taylor_features``. Arguments as in
    ``linear_attention``.
    """
    return _feature_attention(
        "taylor_attention",
        lambda x: taylor_features(x, scale),
        q_BTHD,
        k_BSHD,
        v_BSHD,
        mask,
        bias,
        causal,
        chunk_size,
        q_positions,
        kv_positions,
        rope,
        segment_ids,
        kv_segment_ids,
    )


def taylor_init_state(batch, heads, head_dim, value_dim):
    """Empty running sums for causal ``taylor_attention`` decoding (``1 + D + D^2`` features)."""
    return kernelized.init_feature_state(batch, heads, 1 + head_dim + head_dim**2, value_dim)


def taylor_step(state, q_t, k_t, v_t, *, mask=None, position=None, rope=None, scale=None):
    """One decoding step of causal ``taylor_attention``: ``(state, out_t [B, 1, H, D])``."""
    return _feature_step(
        "linear.taylor_step",
        lambda x: taylor_features(x, scale),
        state,
        q_t,
        k_t,
        v_t,
        mask,
        position,
        rope,
    )


def linear_forward_flops(cfg, q_len, kv_len, causal):
    """``phi(K)^T V`` and ``phi(Q) (phi(K)^T V)`` with ``M = D`` features."""
    del causal
    return 2.0 * cfg.num_heads * cfg.head_dim * cfg.head_dim * (q_len + kv_len)


def taylor_forward_flops(cfg, q_len, kv_len, causal):
    """The outer products of the features, then the sums with ``M = 1 + D + D^2``."""
    del causal
    heads, head_dim = cfg.num_heads, cfg.head_dim
    outer_products = 2.0 * heads * head_dim**2 * (q_len + kv_len)
    return outer_products + 2.0 * heads * (1 + head_dim + head_dim**2) * head_dim * (q_len + kv_len)
