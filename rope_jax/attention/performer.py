"""Performer attention, FAVOR+ (Choromanski et al. 2021, "Rethinking Attention with Performers").

Softmax kernel, positive random features (their Lemma 1 / eq. (7)):
``phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)`` on ``x = q / d^(1/4)`` (likewise for k), so that
``E[phi(q) . phi(k)] = exp(q . k / sqrt(d))``. The rows of ``W [m, d]`` are blocks of ``d``
orthogonal directions rescaled to chi-distributed norms (their section 2.4).

Stabilisers (exact: they cancel in numerator / denominator, so no gradient flows through
them):
  * queries: each row is divided by its own ``max_m exp(w_m . x - |x|^2 / 2)``; the
    ``|x|^2 / 2`` and ``1 / sqrt(m)`` factors cancel in the ratio as well and are skipped.
  * keys, bidirectional: one maximum over all valid keys and features of each (batch, head).
  * keys, causal: the RUNNING maximum over keys ``<= s`` (``lax.cummax``), rescaled pairwise
    as in online softmax (see ``kernelized``). The reference implementation takes one maximum
    over the whole sequence, so earlier outputs depend on later keys (through rounding, and
    through the epsilon it adds to the features, which breaks the exact cancellation); here
    an output never depends on a later position, bit for bit and in the gradient.
Padded keys get zero features, so they leave numerator AND denominator (the reference
implementation only zeroes their values, which keeps them in the denominator).
The ReLU kernel follows the reference implementation (``make_fast_generalized_attention``
with ``kernel_fn=relu``, ``kernel_epsilon=0.001``, through ``generalized_kernel_feature_creator``
with its default ``normalize_data=False``): ``phi(x) = relu(W x) + 0.001`` on the unscaled
input, with no ``1 / sqrt(m)`` factor. The factor would not cancel: scaling the ReLU part but
not the 0.001 changes the kernel. The reference's default ``features_type="deterministic"``
(no projection, ``phi(x) = relu(x) + 0.001``) is not offered; ``W`` is always a projection.

Packed rows (``segment_ids``, beyond the reference, which has no segments): sums stay within
each example (see ``kernelized`` and ``segments``), and so do the key stabilisers: the causal
running maximum restarts at every segment start, the bidirectional maximum is taken per
segment. One example's keys therefore never rescale another's features (where a row-wide
maximum could underflow a segment with smaller keys to zero).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rope_jax.attention import _inputs, kernelized, segments

KERNELS = ("softmax", "relu")
RELU_FEATURE_EPSILON = 1e-3


def performer_projection(key, num_features, head_dim, *, orthogonal=True):
    """Random projection ``W [num_features, head_dim]`` (float32) for FAVOR+ features.

    orthogonal=True: stacked blocks of ``head_dim`` orthonormal rows (QR of a Gaussian matrix,
    sign-corrected so each block is Haar-distributed; the last block truncated), each row
    rescaled to the norm of an independent Gaussian vector, i.e. chi(d)-distributed, so each
    row is marginally Gaussian like the iid case. orthogonal=False: iid N(0, 1) entries.
    """
    if num_features < 1 or head_dim < 1:
        raise ValueError(
            f"performer_projection needs num_features >= 1 and head_dim >= 1, got "
            f"{num_features} and {head_dim}."
        )
    block_key, norm_key = jax.random.split(key)
    if not orthogonal:
        return jax.random.normal(block_key, (num_features, head_dim), jnp.float32)
    num_blocks = -(-num_features // head_dim)

    def orthonormal_rows(block_key):
        gaussian_DD = jax.random.normal(block_key, (head_dim, head_dim), jnp.float32)
        return orthonormal_columns(gaussian_DD).T

    blocks = jax.vmap(orthonormal_rows)(jax.random.split(block_key, num_blocks))
    directions_MD = blocks.reshape(num_blocks * head_dim, head_dim)[:num_features]
    norms_M = jnp.linalg.norm(
        jax.random.normal(norm_key, (num_features, head_dim), jnp.float32), axis=-1
    )
    return directions_MD * norms_M[:, None]


def orthonormal_columns(matrix_DD):
    """Q of the QR factorisation with R's diagonal positive (the Haar-distributed orthogonal
    matrix when ``matrix_DD`` is Gaussian; Mezzadri 2007), by classical Gram-Schmidt run twice
    per column ("twice is enough", Giraud et al. 2005), so ``Q^T Q = I`` to float32 rounding.

    Matmuls only, no LAPACK call: on CPU, several QR custom calls running at once in one
    program (one per Performer layer at init, or at a redraw inside the train step) can
    deadlock jaxlib 0.10 on a 2-core machine.
    """
    size = matrix_DD.shape[-1]

    def add_column(j, q_DD):
        column_D = matrix_DD[:, j]
        earlier_D = jnp.arange(size) < j
        for _ in range(2):
            column_D = column_D - q_DD @ jnp.where(earlier_D, q_DD.T @ column_D, 0.0)
        return q_DD.at[:, j].set(column_D / jnp.linalg.norm(column_D))

    return jax.lax.fori_loop(0, size, add_column, jnp.zeros_like(matrix_DD))


def _check_projection(projection_MD, head_dim):
    projection_MD = jnp.asarray(projection_MD)
    if projection_MD.ndim != 2 or projection_MD.shape[1] != head_dim:
        raise ValueError(
            f"performer: projection must be [num_features, head_dim={head_dim}] (from "
            f"performer_projection), got shape {projection_MD.shape}."
        )
    return projection_MD.astype(jnp.float32)


def _check_kernel(kernel):
    if kernel not in KERNELS:
        raise ValueError(f"performer: kernel must be one of {KERNELS}, got {kernel!r}.")


def _softmax_log_features(x_BLHD, projection_MD):
    """``w . x - |x|^2 / 2`` with ``x`` scaled by ``d^(-1/4)``, float32 ``[B, L, H, M]``."""
    x_BLHD = x_BLHD.astype(jnp.float32) * x_BLHD.shape[-1] ** -0.25
    projected_BLHM = jnp.einsum("BLHD,MD->BLHM", x_BLHD, projection_MD)
    return projected_BLHM - 0.5 * jnp.sum(x_BLHD * x_BLHD, axis=-1, keepdims=True)


def _softmax_query_features(q_BLHD, projection_MD):
    """Query features divided by their row maximum (the row factor cancels in the ratio)."""
    x_BLHD = q_BLHD.astype(jnp.float32) * q_BLHD.shape[-1] ** -0.25
    projected_BLHM = jnp.einsum("BLHD,MD->BLHM", x_BLHD, projection_MD)
    row_max_BLH1 = jax.lax.stop_gradient(jnp.max(projected_BLHM, axis=-1, keepdims=True))
    return jnp.exp(projected_BLHM - row_max_BLH1)


def _key_features_given_shift(log_features_BLHM, shift_BLH, key_valid_BL):
    exponent_BLHM = log_features_BLHM - shift_BLH[..., None]
    if key_valid_BL is not None:
        # Mask the exponent, not the result: exp of the masked branch must stay finite.
        exponent_BLHM = jnp.where(key_valid_BL[:, :, None, None], exponent_BLHM, -jnp.inf)
    return jnp.exp(exponent_BLHM)


def _key_row_max(log_features_BLHM, key_valid_BL):
    row_max_BLH = jnp.max(log_features_BLHM, axis=-1)
    if key_valid_BL is not None:
        row_max_BLH = jnp.where(key_valid_BL[:, :, None], row_max_BLH, kernelized.NO_KEY_SHIFT)
    return jax.lax.stop_gradient(row_max_BLH)


def _relu_features(x_BLHD, projection_MD, key_valid_BL=None):
    """``relu(W x) + 0.001`` (the reference's generalized features; see the module doc)."""
    projected_BLHM = jnp.einsum("BLHD,MD->BLHM", x_BLHD.astype(jnp.float32), projection_MD)
    features_BLHM = jax.nn.relu(projected_BLHM) + RELU_FEATURE_EPSILON
    if key_valid_BL is not None:
        features_BLHM = jnp.where(key_valid_BL[:, :, None, None], features_BLHM, 0.0)
    return features_BLHM


def performer_attention(
    q_BTHD,
    k_BSHD,
    v_BSHD,
    *,
    projection,
    mask=None,
    bias=None,
    causal=False,
    kernel="softmax",
    chunk_size=64,
    q_positions=None,
    kv_positions=None,
    rope=None,
    segment_ids=None,
    kv_segment_ids=None,
):
    """FAVOR+ attention ``D^-1 phi(Q) (phi(K)^T V)``; causal by chunked prefix sums.

    Args:
      q_BTHD, k_BSHD, v_BSHD: ``[B, L, H, D]``.
      projection: ``[M, D]`` random features from ``performer_projection`` (an argument, so
        a trainer can redraw it).
      mask: key-padding mask broadcastable to ``[B, 1, 1, S]``; padded keys get zero
        features. Other masks raise ValueError.
      bias: must be None (no score matrix to add it to).
      causal: causal attention (needs T == S), never forming an ``L x L`` matrix.
      kernel: ``"softmax"`` (positive random features) or ``"relu"``.
      chunk_size: block length of the chunked sums (causal, and packed rows).
      q_positions, kv_positions, rope: RoPE (``RopeSpec``). ``rope.recipe == "feature"``
        rotates the features (size M) in the numerator only (RoFormer eq. (19));
        ``"input"`` rotates q and k before the feature map. Positions default to 0..L-1.
      segment_ids: ``[B, L]`` ids of the examples packed in a row (0 = padding), for
        self-attention (T == S): a query sees only keys of its own segment (causal: the
        earlier ones), as with ``masks.segment_mask``; each run of equal ids is a segment.
      kv_segment_ids: ``[B, S]`` the keys' ids when they come from another packed row
        (cross-attention, not causal); query t then sees the keys with its id.

    Returns:
      ``[B, T, H, D]`` in q's dtype (features and sums in float32). Queries with no valid key
      return zeros.
    """
    name = "performer_attention"
    _inputs.check_qkv(name, q_BTHD, k_BSHD, v_BSHD)
    _inputs.reject_bias(name, bias)
    _check_kernel(kernel)
    batch, q_len, _, head_dim = q_BTHD.shape
    kv_len = k_BSHD.shape[1]
    projection_MD = _check_projection(projection, head_dim)
    if causal and q_len != kv_len:
        raise ValueError(f"{name}: causal=True needs equal q and k lengths, got {q_len}, {kv_len}.")
    key_valid_BS = _inputs.key_valid_from_mask(name, mask, batch, q_len, kv_len)
    if kv_segment_ids is not None:
        return segments.cross_attention_by_merge(
            name,
            functools.partial(
                performer_attention,
                projection=projection_MD,
                kernel=kernel,
                chunk_size=chunk_size,
                rope=rope,
            ),
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

    key_shift_BSH = None
    if kernel == "relu":
        query_features = _relu_features(q_BTHD, projection_MD)
        key_features = _relu_features(k_BSHD, projection_MD, key_valid_BS)
    else:
        query_features = _softmax_query_features(q_BTHD, projection_MD)
        log_features_BSHM = _softmax_log_features(k_BSHD, projection_MD)
        row_max_BSH = _key_row_max(log_features_BSHM, key_valid_BS)
        if causal and run_ids_BL is not None:
            key_shift_BSH = segments.running_max_in_runs(row_max_BSH, run_ids_BL)
            shift_BSH = key_shift_BSH
        elif causal:
            key_shift_BSH = jax.lax.cummax(row_max_BSH, axis=1)
            shift_BSH = key_shift_BSH
        elif run_ids_BL is not None:
            shift_BSH = segments.max_over_runs(row_max_BSH, run_ids_BL)
        else:
            global_max_B1H = jnp.max(row_max_BSH, axis=1, keepdims=True)
            shift_BSH = jnp.broadcast_to(global_max_B1H, row_max_BSH.shape)
        key_features = _key_features_given_shift(log_features_BSHM, shift_BSH, key_valid_BS)

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
            key_shift_BLH=key_shift_BSH,
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


def init_state(batch, heads, head_dim, value_dim, *, num_features=None, projection=None):
    """Empty running sums for causal incremental decoding (``kernelized.FeatureState``), in
    feature space: ``num_features``, or the rows of the ``projection`` to be used."""
    del head_dim  # the state lives in feature space
    if (num_features is None) == (projection is None):
        raise ValueError("performer.init_state: give num_features or projection (one of them).")
    if num_features is None:
        num_features = projection.shape[0]
    return kernelized.init_feature_state(batch, heads, num_features, value_dim)


def forward_flops(cfg, q_len, kv_len, causal):
    """Feature projections of q and k, ``phi(K)^T V`` and ``phi(Q) (phi(K)^T V)``."""
    del causal
    heads, head_dim = cfg.num_heads, cfg.head_dim
    return 2.0 * heads * cfg.num_features * head_dim * (2 * q_len + 2 * kv_len)


def step(
    state, q_t, k_t, v_t, *, projection, kernel="softmax", mask=None, position=None, rope=None
):
    """One decoding step of causal performer attention; equals ``causal=True`` position by
    position.

    Args:
      state: from ``init_state`` or the previous step.
      q_t, k_t, v_t: ``[B, 1, H, D]`` for the new position.
      projection, kernel: as in ``performer_attention``.
      mask: key validity of the new position, broadcastable to ``[B, 1, 1, 1]``.
      position: int ``[B]``, ``[B, 1]`` or scalar, the new position (needed with ``rope``).

    Returns:
      ``(state, out_t)`` with ``out_t [B, 1, H, D]`` in q_t's dtype.
    """
    name = "performer.step"
    _inputs.check_qkv(name, q_t, k_t, v_t)
    _check_kernel(kernel)
    if q_t.shape[1] != 1:
        raise ValueError(f"{name}: expects one position, q_t [B, 1, H, D], got {q_t.shape}.")
    batch, _, _, head_dim = q_t.shape
    projection_MD = _check_projection(projection, head_dim)
    key_valid_B1 = _inputs.key_valid_from_mask(name, mask, batch, 1, 1)
    positions_B1 = _inputs.step_positions(name, position, rope, batch)
    q_t, k_t = kernelized.rope_before_features(q_t, k_t, positions_B1, positions_B1, rope)

    new_shift_BH = None
    if kernel == "relu":
        query_features = _relu_features(q_t, projection_MD)
        key_features = _relu_features(k_t, projection_MD, key_valid_B1)
    else:
        query_features = _softmax_query_features(q_t, projection_MD)
        log_features_B1HM = _softmax_log_features(k_t, projection_MD)
        row_max_BH = _key_row_max(log_features_B1HM, key_valid_B1)[:, 0]
        new_shift_BH = jnp.maximum(state.shift, row_max_BH)
        key_features = _key_features_given_shift(
            log_features_B1HM, new_shift_BH[:, None, :], key_valid_B1
        )
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
        new_shift_BH,
    )
    return state, out_BHD[:, None].astype(q_t.dtype)
