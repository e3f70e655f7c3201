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
    return _softmax_last_axis(_masked_logits(logits, mask))


def _masked_logits(logits, mask):
    logits = logits.astype(jnp.float32)
    return logits if mask is None else jnp.where(mask, logits, -jnp.inf)


@jax.custom_jvp
def _softmax_weighted_sum(logits_BHTS, v_BSHD):
    """``softmax(logits) v`` (float32 logits with ``-inf`` where masked), ``[B, T, H, D]``.

    Its derivative is that of the two steps, rearranged so that the reverse pass needs no
    sum over keys. The softmax's term ``w * <w, t>`` (:func:`_softmax_last_axis_jvp`)
    reaches the output as ``<w, t> * out``, since ``(w * c) v = c (w v)`` for a per-query
    ``c``; transposed, it becomes ``<dout, out>`` per query, a sum over the head dimension
    D instead of over the S keys of the ``[B, H, T, S]`` product ``w * (dout v^T)``. This
    is the ``D_i = rowsum(dO_i * O_i)`` of FlashAttention's backward pass (Dao et al.
    2022, Algorithm 4; Dao 2023, eq. before Algorithm 2), used here without the tiling:
    the pass over the scores becomes one elementwise step after the ``dout v^T`` product.
    """
    return _weighted_sum(_softmax_last_axis(logits_BHTS), v_BSHD)


@_softmax_weighted_sum.defjvp
def _softmax_weighted_sum_jvp(primals, tangents):
    (logits_BHTS, v_BSHD), (logits_dot, v_dot) = primals, tangents
    weights_BHTS = _softmax_last_axis(logits_BHTS)
    out_BTHD = _weighted_sum(weights_BHTS, v_BSHD)
    weighted_mean_BHT = jnp.sum(weights_BHTS * logits_dot, axis=-1)
    # Transposed, this per-query scaling of ``out`` is _query_dot_output(dout, out).
    shift_BTHD = jnp.einsum("BHT,BTHD->BTHD", weighted_mean_BHT, out_BTHD.astype(jnp.float32))
    out_dot = (
        _weighted_sum(weights_BHTS * logits_dot, v_BSHD)
        - shift_BTHD.astype(v_BSHD.dtype)
        + _weighted_sum(weights_BHTS, v_dot)
    )
    return out_BTHD, out_dot


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
    loop_over_heads: bool | None = None,
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
      loop_over_heads: evaluate one ``T x S`` score block at a time, in a loop over batch
        rows and heads (:func:`_looped_attention`); its derivatives, forward and reverse
        mode, are the batched form's. None chooses the loop on a one-device CPU for score
        blocks large enough to gain (:func:`_loop_over_heads_by_default`). Same result
        either way (same dropout mask), to float32 rounding.

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

    drops = dropout_rng is not None and dropout_lib.drop_threshold(dropout_rate) > 0
    qkv = (q_BTHD, k_BSHD, v_BSHD)
    mask_BHTS = None if mask is None else _as_4d(jnp.asarray(mask, bool), "mask")
    bias_BHTS = None if bias is None else _as_4d(jnp.asarray(bias), "bias")
    words = dropout_lib.key_words(dropout_rng) if drops else None
    rate = float(dropout_rate) if drops else 0.0
    # The loop takes the scale as a constant of its derivative rule: a Python number.
    constant_scale = isinstance(scale, (int, float))
    if loop_over_heads is None:
        loop_over_heads = constant_scale and _loop_over_heads_by_default(q_BTHD.shape, kv_len)
    if loop_over_heads and not constant_scale:
        raise ValueError(
            f"softmax_attention: loop_over_heads=True needs a Python number as scale, got "
            f"{type(scale).__name__}; pass float(scale) or leave loop_over_heads=None."
        )
    if loop_over_heads:
        return _looped_attention(*qkv, mask_BHTS, bias_BHTS, words, float(scale), rate)
    return _batched_attention(*qkv, mask_BHTS, bias_BHTS, words, scale, rate)


def _batched_attention(q_BTHD, k_BSHD, v_BSHD, mask_BHTS, bias_BHTS, words, scale, rate):
    """The ``[B, H, T, S]`` form of :func:`softmax_attention`; ``mask_BHTS``/``bias_BHTS``
    are 4-D or None, ``words`` the dropout key's ``dropout.key_words`` (None and ``rate``
    0.0 without dropout)."""
    logits_BHTS = jnp.einsum("BTHD,BSHD->BHTS", q_BTHD, k_BSHD, preferred_element_type=jnp.float32)
    logits_BHTS = logits_BHTS * jnp.float32(scale)
    if bias_BHTS is not None:
        logits_BHTS = logits_BHTS + bias_BHTS.astype(jnp.float32)
    logits_BHTS = _masked_logits(logits_BHTS, mask_BHTS)
    if rate:
        # Masked weights are exactly 0 and stay 0 whether kept or dropped.
        keep_BHTS = dropout_lib.keep_mask_from_words(words, rate, logits_BHTS.shape)
        inverse_keep = 1.0 / dropout_lib.keep_probability(rate)
        out_BTHD = _softmax_dropped_weighted_sum(logits_BHTS, keep_BHTS, v_BSHD, inverse_keep)
    else:
        out_BTHD = _softmax_weighted_sum(logits_BHTS, v_BSHD)
    return out_BTHD.astype(q_BTHD.dtype)


def _query_dot_output(dout_BTHD, out_BTHD):
    """``<dout, out>`` per query and head, float32 ``[B, H, T, 1]``: the softmax
    derivative's sum over keys, ``<w, dweights>``, taken over the head dimension instead
    (:func:`_softmax_weighted_sum`)."""
    return jnp.einsum(
        "BTHD,BTHD->BHT",
        dout_BTHD.astype(jnp.float32),
        out_BTHD.astype(jnp.float32),
    )[..., None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _softmax_dropped_weighted_sum(logits_BHTS, keep_BHTS, v_BSHD, scale):
    """``dropout(softmax(logits)) v`` with the keep mask given: ``where(keep, w * scale, 0) v``.

    Its gradient keeps the boolean mask (1 byte per weight) and recomputes the dropped
    weights from the softmax weights, which the softmax's own gradient keeps anyway, instead
    of keeping the dropped float32 weights (4 bytes per weight) as plain autodiff of the
    steps does: for T5-small's encoder, 8 x 48 MiB less live memory in the backward pass.
    The softmax's sum over keys is ``<dout, out>`` per query, as in
    :func:`_softmax_weighted_sum` (it holds with dropout too: ``out`` is the sum of the
    dropped weights times the values). Same values and gradients as autodiff of the steps.
    """
    weights_BHTS = _softmax_last_axis(logits_BHTS)
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


def _softmax_dropped_weighted_sum_fwd(logits_BHTS, keep_BHTS, v_BSHD, scale):
    weights_BHTS = _softmax_last_axis(logits_BHTS)
    out_BTHD = _weighted_sum(_drop(weights_BHTS, keep_BHTS, scale), v_BSHD)
    return out_BTHD, (weights_BHTS, keep_BHTS, v_BSHD, out_BTHD)


def _softmax_dropped_weighted_sum_bwd(scale, residuals, dout_BTHD):
    weights_BHTS, keep_BHTS, v_BSHD, out_BTHD = residuals
    dropped_BHTS = _drop(weights_BHTS, keep_BHTS, scale).astype(v_BSHD.dtype)
    dv_BSHD = jnp.einsum("BHTS,BTHD->BSHD", dropped_BHTS, dout_BTHD.astype(v_BSHD.dtype))
    ddropped_BHTS = jnp.einsum(
        "BTHD,BSHD->BHTS", dout_BTHD, v_BSHD, preferred_element_type=jnp.float32
    )
    dweights_BHTS = _drop(ddropped_BHTS, keep_BHTS, scale)
    dlogits_BHTS = weights_BHTS * (dweights_BHTS - _query_dot_output(dout_BTHD, out_BTHD))
    return dlogits_BHTS, None, dv_BSHD.astype(v_BSHD.dtype)


_softmax_dropped_weighted_sum.defvjp(
    _softmax_dropped_weighted_sum_fwd, _softmax_dropped_weighted_sum_bwd
)


# The loop over heads pays from about this many score entries per head on (256 x 256);
# T5-small's cross-attention (114 x 512) ran as fast either way, its decoder
# self-attention (114 x 114) faster batched.
_LOOP_MIN_SCORES = 64 * 1024


def _loop_over_heads_by_default(q_shape, kv_len: int) -> bool:
    """Whether ``softmax_attention`` loops over heads when ``loop_over_heads`` is None.

    On XLA's CPU backend the batched form writes the ``[B, H, T, S]`` scores to memory and
    reads them back in each of its passes (scale, bias and mask; softmax; ``weights v``);
    one head's ``T x S`` block stays in the core's cache through all of them.
    ``benchmarks/attention_loop.py``, forward pass, 2 cores: T5-small's encoder
    self-attention (``[8, 6, 512, 512]`` scores) 40.2 against 54.9 ms (1.37x), one row of 8
    heads at length 2048 93 against 147 ms (1.58x), with 20 against 60 and 45 against 256
    MiB of temporary memory; its cross-attention (114 x 512) 15.1 ms either way. The
    gain is for evaluation and decoding only: differentiated, the weights are kept for the
    backward pass anyway, and a loop whose backward pass recomputed them instead (as
    FlashAttention does) made T5-small's train step slower (5.83 against 5.63 s, 7
    alternating steps), so the derivative is the batched form's. A loop that wrote the
    weights out for that derivative (so the primal's passes stayed in cache) was no faster
    either: 6.89 against 6.86 s, 12 alternating steps, dropout 0. On
    GPUs and TPUs the loop would serialise work the batched form spreads over the chip,
    and with several devices it would slice through a sharded batch, so it is chosen only
    on a one-device CPU, for blocks of at least ``_LOOP_MIN_SCORES`` entries.
    """
    batch, q_len, heads, _ = q_shape
    return (
        jax.default_backend() == "cpu"
        and jax.device_count() == 1
        and batch * heads > 1
        and q_len * kv_len >= _LOOP_MIN_SCORES
    )


def _as_4d(x, name):
    if x.ndim > 4:
        raise ValueError(
            f"softmax_attention: {name} must broadcast to [B, H, T, S], got shape {x.shape}."
        )
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def _block(x_BHTS, b, h):
    """``x[b, h]`` of a ``[B|1, H|1, T|1, S|1]`` array (index 0 on a broadcast axis)."""
    b = b if x_BHTS.shape[0] > 1 else 0
    h = h if x_BHTS.shape[1] > 1 else 0
    return jax.lax.dynamic_slice(x_BHTS, (b, h, 0, 0), (1, 1) + x_BHTS.shape[2:])[0, 0]


def _heads_major(x_BLHD):
    """``[B, L, H, D] -> [B * H, L, D]``: each head's rows contiguous, one per loop step."""
    batch, length, heads, head_dim = x_BLHD.shape
    return jnp.einsum("BLHD->BHLD", x_BLHD).reshape(batch * heads, length, head_dim)


@functools.partial(jax.custom_jvp, nondiff_argnums=(6, 7))
def _looped_attention(q_BTHD, k_BSHD, v_BSHD, mask_BHTS, bias_BHTS, words, scale, rate):
    """:func:`_batched_attention` one ``(batch row, head)`` at a time, in a ``lax.scan``.

    q, k and v are laid out heads-major first (``[B * H, L, D]``, a copy T/D times smaller
    than the scores), so that each step reads contiguous ``[T, D]``/``[S, D]`` blocks; that
    ran 1-2 % faster than slicing each head out of ``[B, L, H, D]`` in the loop, and than a
    loop over batch rows with all heads batched, in alternating runs of T5-small's encoder
    pass. Each step takes its block of the mask and bias; with dropout it draws
    ``keep_mask(key, rate, [B, H, T, S])[b, h]`` through ``dropout.keep_mask_from_words``,
    so the result is the batched form's, mask included. Differentiated, it is the batched
    form (see :func:`_loop_over_heads_by_default`).
    """
    batch, q_len, heads, _ = q_BTHD.shape
    scores_shape = (batch, heads, q_len, k_BSHD.shape[1])
    inverse_keep = jnp.float32(1.0 / dropout_lib.keep_probability(rate))

    def head(i, qkv):
        q_TD, k_SD, v_SD = qkv
        b, h = i // heads, i % heads
        logits_TS = jnp.einsum("TD,SD->TS", q_TD, k_SD, preferred_element_type=jnp.float32)
        logits_TS = logits_TS * jnp.float32(scale)
        if bias_BHTS is not None:
            logits_TS = logits_TS + _block(bias_BHTS, b, h).astype(jnp.float32)
        mask_TS = None if mask_BHTS is None else _block(mask_BHTS, b, h)
        weights_TS = masked_softmax(logits_TS, mask_TS)
        if rate:
            keep_TS = dropout_lib.keep_mask_from_words(words, rate, scores_shape, (b, h))
            weights_TS = jnp.where(keep_TS, weights_TS * inverse_keep, 0.0)
        return i + 1, jnp.einsum("TS,SD->TD", weights_TS.astype(v_SD.dtype), v_SD)

    qkv = (_heads_major(q_BTHD), _heads_major(k_BSHD), _heads_major(v_BSHD))
    _, out_NTD = jax.lax.scan(head, jnp.int32(0), qkv)
    out_BHTD = out_NTD.reshape(batch, heads, q_len, out_NTD.shape[-1])
    return jnp.einsum("BHTD->BTHD", out_BHTD).astype(q_BTHD.dtype)


@_looped_attention.defjvp
def _looped_attention_jvp(scale, rate, primals, tangents):
    # The batched form's derivative (forward mode, and reverse mode through it).
    q_BTHD, k_BSHD, v_BSHD, mask_BHTS, bias_BHTS, words = primals
    dq_BTHD, dk_BSHD, dv_BSHD, _, dbias_BHTS, _ = tangents

    def batched(q_BTHD, k_BSHD, v_BSHD, bias_BHTS):
        return _batched_attention(q_BTHD, k_BSHD, v_BSHD, mask_BHTS, bias_BHTS, words, scale, rate)

    return jax.jvp(
        batched, (q_BTHD, k_BSHD, v_BSHD, bias_BHTS), (dq_BTHD, dk_BSHD, dv_BSHD, dbias_BHTS)
    )


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
