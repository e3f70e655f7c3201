"""Nyström attention (Xiong et al. 2021, "Nyströmformer", eq. (12)-(15)).

``softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T) V`` with ``m`` landmarks ``Q~, K~``
that are means of consecutive segments of the queries / keys, and the pseudo-inverse by the
paper's iteration (their eq. (14)):

    Z_0 = A^T / (||A||_1 ||A||_inf),
    Z_{j+1} = 1/4 Z_j (13 I - A Z_j (15 I - A Z_j (7 I - A Z_j))).

Segments. The reference implementation pads the sequence to a multiple of ``m`` and lets
the padding into the means. Here the segments are formed over the VALID tokens only: the
valid token of rank ``r`` among ``n`` valid tokens belongs to segment ``floor(r m / n)``.
With no padding and ``m`` dividing the length this is exactly the paper's segmentation; for
other lengths the segments differ in size by at most one token; padding never enters a mean,
and appending padded positions changes nothing. A segment with no valid token (``n < m``)
yields an unused landmark: its rows and columns of the three kernels are zero, and the
iteration then inverts the remaining block (block-diagonal structure is preserved).

Exact path. The reference switches to exact softmax attention when ``num_landmarks ==
seq_len`` (its padded, static length), where the iterative pseudo-inverse would only
approximate (1.5-3 % off after 6 iterations). Here the switch is per row: a row whose valid
keys number at most ``m`` makes every valid key its own landmark (ranks ``r < r'`` fall in
segments ``floor(r m / n) < floor(r' m / n)`` when ``m >= n``), so ``softmax(Q K~^T) V~``
with ``V~`` the landmark means of V IS exact softmax attention, in ``O(T m)``, and such rows
take it; with ``m >= S`` every row does and the Nyström terms are not computed at all. This
covers the reference's condition (its rows have at most ``seq_len`` valid tokens) and also
the padded rows it would still approximate.

The optional skip connection is the paper's depthwise convolution over the sequence on V,
one filter per head (their code: ``Conv2d(heads, heads, (k, 1), groups=heads)`` applied to
the key-masked values); its weights are an argument, ``conv_weights [K, H]``.
"""

from __future__ import annotations

import jax.numpy as jnp

from rope_jax.attention import _inputs
from rope_jax.attention.softmax import masked_softmax


def segment_means_weights(valid_BL, num_landmarks):
    """Averaging weights ``[B, L, M]`` and landmark validity ``[B, M]`` (see module doc)."""
    valid_BL = valid_BL.astype(jnp.int32)
    rank_BL = jnp.cumsum(valid_BL, axis=1) - valid_BL
    count_B1 = jnp.maximum(jnp.sum(valid_BL, axis=1, keepdims=True), 1)
    segment_BL = (rank_BL * num_landmarks) // count_B1
    landmark_11M = jnp.arange(num_landmarks)[None, None, :]
    member_BLM = (segment_BL[:, :, None] == landmark_11M) & (valid_BL[:, :, None] > 0)
    sizes_BM = jnp.sum(member_BLM, axis=1)
    weights_BLM = member_BLM / jnp.maximum(sizes_BM, 1)[:, None, :].astype(jnp.float32)
    return weights_BLM.astype(jnp.float32), sizes_BM > 0


def iterative_pinv(a_BHMK, num_iterations):
    """Moore-Penrose pseudo-inverse by the Nyströmformer iteration (eq. (14)), float32.

    ``Z_0 = A^T / (||A||_1 ||A||_inf)`` per matrix (the reference implementation takes the
    two norms over the whole batch; per matrix is the paper's formula).
    """
    a_BHMK = a_BHMK.astype(jnp.float32)
    max_column_sum = jnp.max(jnp.sum(jnp.abs(a_BHMK), axis=-2), axis=-1)
    max_row_sum = jnp.max(jnp.sum(jnp.abs(a_BHMK), axis=-1), axis=-1)
    norm_product_BH = max_column_sum * max_row_sum
    z_BHKM = (
        jnp.swapaxes(a_BHMK, -1, -2)
        / jnp.where(norm_product_BH > 0, norm_product_BH, 1.0)[:, :, None, None]
    )
    identity_11MM = jnp.eye(a_BHMK.shape[-1], dtype=jnp.float32)[None, None]
    for _ in range(num_iterations):
        az = a_BHMK @ z_BHKM
        z_BHKM = (
            0.25
            * z_BHKM
            @ (13 * identity_11MM - az @ (15 * identity_11MM - az @ (7 * identity_11MM - az)))
        )
    return z_BHKM


def depthwise_conv_skip(v_BLHD, conv_weights_KH, key_valid_BL=None):
    """``out[t] = sum_j w[j, h] v[t + j - K // 2]`` over the sequence, zero-padded, float32."""
    kernel_size, heads = conv_weights_KH.shape
    if kernel_size % 2 == 0 or heads != v_BLHD.shape[2]:
        raise ValueError(
            f"nystrom: conv_weights must be [K, heads={v_BLHD.shape[2]}] with odd K, got "
            f"{conv_weights_KH.shape}."
        )
    v_BLHD = v_BLHD.astype(jnp.float32)
    if key_valid_BL is not None:
        v_BLHD = jnp.where(key_valid_BL[:, :, None, None], v_BLHD, 0.0)
    length = v_BLHD.shape[1]
    half = kernel_size // 2
    padded = jnp.pad(v_BLHD, [(0, 0), (half, half), (0, 0), (0, 0)])
    weights_KH = conv_weights_KH.astype(jnp.float32)
    out_BLHD = jnp.zeros_like(v_BLHD)
    for offset in range(kernel_size):
        out_BLHD += padded[:, offset : offset + length] * weights_KH[offset][None, None, :, None]
    return out_BLHD


def nystrom_attention(
    q_BTHD,
    k_BSHD,
    v_BSHD,
    *,
    num_landmarks,
    mask=None,
    bias=None,
    causal=False,
    pinv_iterations=6,
    conv_kernel_size=None,
    conv_weights=None,
    scale=None,
    q_positions=None,
    kv_positions=None,
    rope=None,
):
    """Nyström approximation of softmax attention in ``O(L m)`` time and memory.

    Args:
      q_BTHD, k_BSHD, v_BSHD: ``[B, L, H, D]``.
      num_landmarks: ``m``. Rows with at most ``m`` valid keys get exact softmax attention
        (see "Exact path" in the module doc).
      mask: key-padding mask broadcastable to ``[B, 1, 1, S]``; when ``T == S`` it also
        marks the padded queries, which stay out of the query landmarks.
      bias: must be None; causal: must be False (Nyström attention is bidirectional).
      pinv_iterations: iterations of the paper's pseudo-inverse (6 in the paper); None
        uses an exact SVD-based ``jnp.linalg.pinv`` instead.
      conv_kernel_size, conv_weights: depthwise convolution skip on V (self-attention
        only); ``conv_weights [K, H]`` are the filter taps; ``conv_kernel_size``, if given,
        must equal K.
      scale: logit scale, ``1 / sqrt(D)`` when None.
      q_positions, kv_positions, rope: RoPE applied to q and k before everything else.

    Returns:
      ``[B, T, H, D]`` in q's dtype (computed in float32).
    """
    name = "nystrom_attention"
    _inputs.check_qkv(name, q_BTHD, k_BSHD, v_BSHD)
    _inputs.reject_bias(name, bias)
    if causal:
        raise ValueError(f"{name} is bidirectional only; causal=True is not supported.")
    if num_landmarks < 1:
        raise ValueError(f"{name}: num_landmarks must be >= 1, got {num_landmarks}.")
    batch, q_len, _, head_dim = q_BTHD.shape
    out_dtype = q_BTHD.dtype
    kv_len = k_BSHD.shape[1]
    if conv_kernel_size is not None and conv_weights is None:
        raise ValueError(
            f"{name}: conv_kernel_size={conv_kernel_size} needs conv_weights [K, H]; kernels "
            "own no parameters, the calling module does."
        )
    if conv_weights is not None:
        conv_weights = jnp.asarray(conv_weights)
        if conv_kernel_size is not None and conv_weights.shape[0] != conv_kernel_size:
            raise ValueError(
                f"{name}: conv_weights {conv_weights.shape} do not match "
                f"conv_kernel_size={conv_kernel_size}."
            )
        if q_len != kv_len:
            raise ValueError(f"{name}: the convolution skip needs self-attention (T == S).")
    key_valid_BS = _inputs.key_valid_from_mask(name, mask, batch, q_len, kv_len)
    if rope is not None:
        q_BTHD = _inputs.rotate(q_BTHD, q_positions, rope)
        k_BSHD = _inputs.rotate(k_BSHD, kv_positions, rope)
    if scale is None:
        scale = head_dim**-0.5

    all_valid_BS = jnp.ones((batch, kv_len), bool)
    key_valid_or_all_BS = all_valid_BS if key_valid_BS is None else key_valid_BS
    k_weights_BSM, k_landmark_valid_BM = segment_means_weights(key_valid_or_all_BS, num_landmarks)

    q_BTHD = q_BTHD.astype(jnp.float32) * jnp.float32(scale)
    k_BSHD = k_BSHD.astype(jnp.float32)
    v_BSHD = v_BSHD.astype(jnp.float32)
    k_landmarks_BMHD = jnp.einsum("BSM,BSHD->BMHD", k_weights_BSM, k_BSHD)

    # K below indexes key landmarks where both landmark axes appear.
    key_landmark_mask = k_landmark_valid_BM[:, None, None, :]
    kernel_1_BHTM = masked_softmax(
        jnp.einsum("BTHD,BMHD->BHTM", q_BTHD, k_landmarks_BMHD), key_landmark_mask
    )
    # Rows with at most m valid keys: each key is its own landmark, and this is exact.
    v_landmarks_BMHD = jnp.einsum("BSM,BSHD->BMHD", k_weights_BSM, v_BSHD)
    exact_BTHD = jnp.einsum("BHTM,BMHD->BTHD", kernel_1_BHTM, v_landmarks_BMHD)
    if num_landmarks >= kv_len:  # every row (static): the Nyström terms are never needed
        out_BTHD = exact_BTHD
    else:
        query_valid_BT = key_valid_or_all_BS if q_len == kv_len else jnp.ones((batch, q_len), bool)
        q_weights_BTM, q_landmark_valid_BM = segment_means_weights(query_valid_BT, num_landmarks)
        q_landmarks_BMHD = jnp.einsum("BTM,BTHD->BMHD", q_weights_BTM, q_BTHD)
        query_landmark_rows = q_landmark_valid_BM[:, None, :, None]
        kernel_2_BHMK = masked_softmax(
            jnp.einsum("BMHD,BKHD->BHMK", q_landmarks_BMHD, k_landmarks_BMHD), key_landmark_mask
        )
        kernel_2_BHMK = jnp.where(query_landmark_rows, kernel_2_BHMK, 0.0)
        key_mask = None if key_valid_BS is None else key_valid_BS[:, None, None, :]
        kernel_3_BHMS = masked_softmax(
            jnp.einsum("BMHD,BSHD->BHMS", q_landmarks_BMHD, k_BSHD), key_mask
        )
        kernel_3_BHMS = jnp.where(query_landmark_rows, kernel_3_BHMS, 0.0)

        if pinv_iterations is None:
            pinv_BHKM = jnp.linalg.pinv(kernel_2_BHMK)
        else:
            pinv_BHKM = iterative_pinv(kernel_2_BHMK, pinv_iterations)
        landmark_values_BHMD = jnp.einsum("BHMS,BSHD->BHMD", kernel_3_BHMS, v_BSHD)
        landmark_values_BHKD = pinv_BHKM @ landmark_values_BHMD
        nystrom_BTHD = jnp.einsum("BHTK,BHKD->BTHD", kernel_1_BHTM, landmark_values_BHKD)
        num_valid_keys_B = jnp.sum(key_valid_or_all_BS, axis=1)
        exact_rows_B111 = (num_valid_keys_B <= num_landmarks)[:, None, None, None]
        out_BTHD = jnp.where(exact_rows_B111, exact_BTHD, nystrom_BTHD)
    if conv_weights is not None:
        out_BTHD += depthwise_conv_skip(v_BSHD, conv_weights, key_valid_BS)
    return out_BTHD.astype(out_dtype)


def forward_flops(cfg, q_len, kv_len, causal):
    """``softmax(Q K~^T)``, ``softmax(Q~ K^T)``, its product with V, the two products that
    assemble the output, and 6 Newton-Schulz iterations of 4 ``m x m`` matmuls."""
    del causal
    m = min(cfg.num_landmarks, q_len, kv_len)
    per_head = (
        2.0 * q_len * m * cfg.head_dim
        + 4.0 * m * kv_len * cfg.head_dim
        + 2.0 * q_len * m * m
        + 2.0 * q_len * m * cfg.head_dim
        + 6 * 4 * 2.0 * m**3
    )
    return cfg.num_heads * per_head


def landmarks_message(cfg, length):
    """Why ``num_landmarks`` does not suit sequences of ``length`` ("" when it does)."""
    if cfg.num_landmarks <= length:
        return ""
    return (
        f"num_landmarks={cfg.num_landmarks} exceeds the length {length}, so some Nystrom "
        f"landmarks would average no token; choose num_landmarks <= {length} (a divisor of "
        f"it gives equal segments)"
    )
