"""Exact softmax attention, masks, random synthesizer and the registry."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_reference import random_qkv, rope_rotate
from attention_reference import softmax_attention as reference_attention
from dropout_reference import keep_mask as reference_keep_mask

from rope_jax.attention import (
    KERNELS,
    causal_mask,
    combine_masks,
    get_attention_fn,
    padding_mask,
    random_synthesizer_attention,
    segment_mask,
    softmax_attention_heads_major,
)
from rope_jax.attention import softmax_attention as eager_softmax_attention
from rope_jax.model_config import ModelConfig
from rope_jax.positions import RopeSpec

softmax_attention = jax.jit(eager_softmax_attention, static_argnames=("causal", "scale", "rope"))


def test_masks_against_hand_values():
    np.testing.assert_array_equal(
        padding_mask(np.array([[5, 7, 0]])), np.array([[[[True, True, False]]]])
    )
    np.testing.assert_array_equal(
        causal_mask(2, 3, offset=1)[0, 0], np.array([[1, 1, 0], [1, 1, 1]], bool)
    )
    np.testing.assert_array_equal(causal_mask(2, 2)[0, 0], np.array([[1, 0], [1, 1]], bool))
    segments = segment_mask(np.array([[1, 1, 2, 0]]), np.array([[1, 1, 2, 0]]))[0, 0]
    expected = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(segments, expected)
    combined = combine_masks(None, padding_mask(np.array([[1, 1, 0]])), causal_mask(3, 3))
    assert combined.shape == (1, 1, 3, 3)
    np.testing.assert_array_equal(combined[0, 0], np.array([[1, 0, 0], [1, 1, 0], [1, 1, 0]], bool))
    assert combine_masks(None, None) is None


@pytest.mark.parametrize("use_padding", [False, True])
@pytest.mark.parametrize("use_causal", [False, True])
@pytest.mark.parametrize("use_bias", [False, True])
def test_matches_float64_reference(use_padding, use_causal, use_bias):
    q, k, v = random_qkv(0, length=7)
    rng = np.random.default_rng(1)
    mask = padding_mask(np.array([[1] * 7, [1] * 4 + [0] * 3])) if use_padding else None
    if use_causal:
        mask = combine_masks(mask, causal_mask(7, 7))
    bias = rng.normal(size=(1, 2, 7, 7)).astype(np.float32) if use_bias else None
    out = softmax_attention(q, k, v, mask=mask, bias=bias)
    mask_array = None if mask is None else np.asarray(mask)
    expected = reference_attention(q, k, v, mask=mask_array, bias=bias)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_bias", [False, True])
def test_heads_major_keys_values_match_float64_reference(use_bias):
    # Keys [B, H, D, S] and values [B, H, S, D] (decoding's stored cross-attention layout):
    # the same attention as [B, S, H, D], padding mask and a bias included.
    q, k, v = random_qkv(3, length=3, kv_length=6)
    mask = padding_mask(np.array([[1] * 6, [1] * 4 + [0] * 2]))
    bias = np.random.default_rng(4).normal(size=(1, 2, 3, 6)).astype(np.float32)
    bias = bias if use_bias else None
    out = jax.jit(softmax_attention_heads_major)(
        q, np.einsum("bshd->bhds", k), np.einsum("bshd->bhsd", v), mask=mask, bias=bias
    )
    expected = reference_attention(q, k, v, mask=np.asarray(mask), bias=bias)
    assert out.shape == q.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"k \[B, H, D, S\] and v \[B, H, S, D\]"):
        softmax_attention_heads_major(q, k, v)


def test_causal_keyword_aligns_last_query_with_last_key():
    q, k, v = random_qkv(2, length=3, kv_length=5)
    out = softmax_attention(q, k, v, causal=True)
    expected = reference_attention(q, k, v, mask=np.asarray(causal_mask(3, 5, offset=2)))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_scale_one_is_unscaled_dot_product():
    q, k, v = random_qkv(3, length=5)
    np.testing.assert_allclose(
        softmax_attention(q, k, v, scale=1.0),
        reference_attention(q, k, v, scale=1.0),
        rtol=1e-5,
        atol=1e-6,
    )


def test_matches_jax_dot_product_attention():
    q, k, v = random_qkv(4, length=6)
    mask = combine_masks(padding_mask(np.array([[1] * 6, [1] * 5 + [0]])), causal_mask(6, 6))
    np.testing.assert_allclose(
        softmax_attention(q, k, v, mask=mask),
        jax.nn.dot_product_attention(q, k, v, mask=mask),
        rtol=1e-5,
        atol=1e-6,
    )
    # The hand-written softmax derivative against jax.nn's.
    cotangent = np.random.default_rng(5).normal(size=q.shape).astype(np.float32)

    def gradients(fn):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v, mask=mask) * cotangent)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for ours, theirs in zip(
        gradients(eager_softmax_attention), gradients(jax.nn.dot_product_attention), strict=True
    ):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_fully_masked_rows_give_zero_output_and_finite_gradients():
    q, k, v = random_qkv(5, length=4)
    mask = np.ones((2, 1, 4, 4), bool)
    mask[0, :, 2, :] = False  # one query sees nothing
    mask[1] = False  # a whole sequence sees nothing
    bias = np.zeros((1, 2, 4, 4), np.float32)
    bias[..., 3] = -np.inf  # -inf biases are masks too

    def loss(q, k, v):
        return jnp.sum(softmax_attention(q, k, v, mask=mask, bias=bias) ** 2)

    out = softmax_attention(q, k, v, mask=mask, bias=bias)
    np.testing.assert_array_equal(out[0, 2], 0.0)
    np.testing.assert_array_equal(out[1], 0.0)
    expected = reference_attention(q, k, v, mask=mask & (bias > -np.inf))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for grad in grads:
        assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grads[0][1], 0.0)  # no gradient into fully masked queries


def test_bfloat16_inputs_keep_dtype_and_softmax_runs_in_float32():
    # q and k share a large component: logits lie in about [80, 100], a few units apart.
    # Rounded to bfloat16 (spacing 0.5 there) the weights would be off by up to ~25%.
    rng = np.random.default_rng(6)
    common = rng.normal(size=8)
    common *= 16.0 / np.linalg.norm(common)
    q = (common + 0.5 * rng.normal(size=(2, 8, 2, 8))).astype(np.float32)
    k = (common + 0.5 * rng.normal(size=(2, 8, 2, 8))).astype(np.float32)
    v = rng.normal(size=(2, 8, 2, 8)).astype(np.float32)
    q16, k16, v16 = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    out = softmax_attention(q16, k16, v16, mask=causal_mask(8, 8))
    assert out.dtype == jnp.bfloat16
    expected = reference_attention(
        *(np.asarray(x.astype(jnp.float32)) for x in (q16, k16, v16)),
        mask=np.asarray(causal_mask(8, 8)),
    )
    # Only the bf16 rounding of the weights and of the output remain (~2^-8 relative);
    # bfloat16 logits would give errors of ~0.3 here.
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=0.02, atol=0.03)


def test_rope_rotates_q_and_k_before_the_product():
    q, k, v = random_qkv(7, length=5)
    q_positions, kv_positions = np.arange(3, 8), np.arange(5)
    out = softmax_attention(
        q, k, v, rope=RopeSpec(), q_positions=q_positions[None], kv_positions=kv_positions[None]
    )
    expected = reference_attention(rope_rotate(q, q_positions), rope_rotate(k, kv_positions), v)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def _padded_causal_mask_and_bias(length):
    mask = combine_masks(
        padding_mask(np.array([[1] * length, [1] * (length - 2) + [0] * 2])),
        causal_mask(length, length),
    )
    bias = np.random.default_rng(12).normal(size=(1, 2, length, length)).astype(np.float32)
    return np.asarray(mask), bias


def _reference_weights(q, k, mask, bias):
    """Float64 softmax weights [B, H, T, S], rows with no allowed key all zero."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    logits = np.einsum("bthd,bshd->bhts", q, k) * q.shape[-1] ** -0.5 + bias
    logits = np.where(np.broadcast_to(mask, logits.shape), logits, -np.inf)
    row_max = logits.max(-1, keepdims=True)
    weights = np.exp(logits - np.where(np.isfinite(row_max), row_max, 0.0))
    total = weights.sum(-1, keepdims=True)
    return weights / np.where(total > 0, total, 1.0)


def test_dropout_matches_float64_reference_with_documented_keep_mask():
    q, k, v = random_qkv(13, length=6)
    mask, bias = _padded_causal_mask_and_bias(6)
    rate, key = 0.4, jax.random.key(3)
    out = eager_softmax_attention(q, k, v, mask=mask, bias=bias, dropout_rate=rate, dropout_rng=key)
    # The documented rule (rope_jax.dropout), computed here with numpy.
    keep = reference_keep_mask(key, rate, (2, 2, 6, 6))
    keep_prob = 1.0 - round(rate * 2**32) / 2**32
    weights = _reference_weights(q, k, mask, bias)
    assert keep[weights > 0].any() and not keep[weights > 0].all()
    v64 = np.asarray(v, np.float64)
    expected = np.einsum("bhts,bshd->bthd", weights * keep / keep_prob, v64)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    # The comparison tells apart a missing rescale and a different keep mask.
    unscaled = np.einsum("bhts,bshd->bthd", weights * keep, v64)
    other_mask = np.einsum("bhts,bshd->bthd", weights * ~keep / rate, v64)
    for wrong in (unscaled, other_mask):
        assert np.abs(np.asarray(out) - wrong).max() > 0.1


def test_dropout_gradients_match_plain_autodiff_with_documented_keep_mask():
    """The dropped-weights product has its own gradient (the mask is kept, the dropped
    weights are recomputed); it must equal plain autodiff of the written-out formula."""
    q, k, v = random_qkv(14, length=6)
    mask, bias = _padded_causal_mask_and_bias(6)
    rate, key = 0.4, jax.random.key(5)
    keep = jnp.asarray(reference_keep_mask(key, rate, (2, 2, 6, 6)))
    keep_prob = 1.0 - round(rate * 2**32) / 2**32
    cotangent = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)

    def plain(q, k, v, bias):
        logits = jnp.einsum("bthd,bshd->bhts", q, k) * q.shape[-1] ** -0.5 + bias
        logits = jnp.where(mask, logits, -1e30)
        weights = jax.nn.softmax(logits, axis=-1) * jnp.any(mask, -1, keepdims=True)
        dropped = jnp.where(keep, weights / keep_prob, 0.0)
        return jnp.sum(jnp.einsum("bhts,bshd->bthd", dropped, v) * cotangent)

    def kernel(q, k, v, bias):
        out = eager_softmax_attention(
            q, k, v, mask=mask, bias=bias, dropout_rate=rate, dropout_rng=key
        )
        return jnp.sum(out * cotangent)

    args = (q, k, v, jnp.asarray(bias))
    got = jax.jit(jax.grad(kernel, argnums=(0, 1, 2, 3)))(*args)
    want = jax.jit(jax.grad(plain, argnums=(0, 1, 2, 3)))(*args)
    for name, g, w in zip("qkv", got[:3], want[:3], strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(got[3], want[3], rtol=1e-4, atol=1e-5, err_msg="bias")


def _reference_gradients(q, k, v, mask, bias, cotangent, keep=None, keep_prob=1.0):
    """Float64 reverse pass of ``dropout(softmax(q k^T / sqrt(D) + bias)) v`` written out
    step by step, with the softmax derivative's sum over keys as the textbook has it:
    dlogits = w * (dw - sum_s w dw). Returns (dq, dk, dv, dbias summed to bias's shape)."""
    q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, cotangent))
    scale = q.shape[-1] ** -0.5
    weights = _reference_weights(q, k, mask, bias)
    drop = 1.0 if keep is None else np.where(keep, 1.0 / keep_prob, 0.0)
    dv = np.einsum("bhts,bthd->bshd", weights * drop, g)
    dweights = np.einsum("bthd,bshd->bhts", g, v) * drop
    dlogits = weights * (dweights - np.sum(weights * dweights, -1, keepdims=True))
    dq = np.einsum("bhts,bshd->bthd", dlogits, k) * scale
    dk = np.einsum("bhts,bthd->bshd", dlogits, q) * scale
    return dq, dk, dv, dlogits.sum(0, keepdims=True)


@pytest.mark.parametrize("loop_over_heads", [False, True])
@pytest.mark.parametrize("rate", [0.0, 0.4])
def test_gradients_match_float64_reverse_pass(loop_over_heads, rate):
    """The kernel's backward pass takes the softmax's sum over keys as <dout, out> per query
    (FlashAttention's D term); it must equal the textbook reverse pass, with padding, a
    causal mask, a query with no key, a per-head bias and dropout."""
    q, k, v = random_qkv(21, length=6)
    mask, bias = _padded_causal_mask_and_bias(6)
    mask = mask.copy()
    mask[1, :, 3, :] = False  # a query that sees no key
    key = jax.random.key(8)
    cotangent = np.random.default_rng(3).normal(size=q.shape).astype(np.float32)

    def loss(q, k, v, bias):
        out = eager_softmax_attention(
            q,
            k,
            v,
            mask=mask,
            bias=bias,
            dropout_rate=rate,
            dropout_rng=key if rate else None,
            loop_over_heads=loop_over_heads,
        )
        return jnp.sum(out * cotangent)

    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, jnp.asarray(bias))
    keep = np.asarray(reference_keep_mask(key, rate, (2, 2, 6, 6))) if rate else None
    keep_prob = 1.0 - round(rate * 2**32) / 2**32
    want = _reference_gradients(q, k, v, mask, bias, cotangent, keep, keep_prob)
    for name, g, w in zip(("q", "k", "v", "bias"), got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(got[0][1, 3], 0.0)


@pytest.mark.parametrize("loop_over_heads", [False, True])
def test_forward_mode_derivative_matches_float64_formula(loop_over_heads):
    q, k, v = random_qkv(22, length=5)
    tq, tk, tv = random_qkv(23, length=5)
    mask, bias = _padded_causal_mask_and_bias(5)
    tbias = np.random.default_rng(4).normal(size=bias.shape).astype(np.float32)

    def attend(q, k, v, bias):
        return eager_softmax_attention(
            q, k, v, mask=mask, bias=bias, loop_over_heads=loop_over_heads
        )

    _, got = jax.jit(lambda p, t: jax.jvp(attend, p, t))((q, k, v, bias), (tq, tk, tv, tbias))
    q64, k64, tq64, tk64 = (np.asarray(x, np.float64) for x in (q, k, tq, tk))
    weights = _reference_weights(q, k, mask, bias)
    dlogits = (
        np.einsum("bthd,bshd->bhts", tq64, k64) + np.einsum("bthd,bshd->bhts", q64, tk64)
    ) * q.shape[-1] ** -0.5 + tbias
    dlogits = np.where(np.broadcast_to(mask, dlogits.shape), dlogits, 0.0)
    dweights = weights * (dlogits - np.sum(weights * dlogits, -1, keepdims=True))
    want = np.einsum("bhts,bshd->bthd", dweights, np.asarray(v, np.float64)) + np.einsum(
        "bhts,bshd->bthd", weights, np.asarray(tv, np.float64)
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in its equations' parameters."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


@pytest.mark.parametrize("rate", [0.0, 0.4])
def test_backward_pass_does_not_sum_over_keys(rate):
    """Differentiated, the only sum over the key axis of the [B, H, T, S] scores is the
    forward softmax's normaliser: the backward pass sums <dout, out> over the head dimension
    instead (a sum over keys there is a second full pass over the scores)."""
    q, k, v = random_qkv(24, length=6, kv_length=9)
    mask = np.ones((2, 1, 6, 9), bool)

    def loss(q, k, v):
        out = eager_softmax_attention(
            q, k, v, mask=mask, dropout_rate=rate, dropout_rng=jax.random.key(1) if rate else None
        )
        return jnp.sum(out**2)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr
    key_sums = [
        eqn
        for eqn in _equations(jaxpr)
        if eqn.primitive.name == "reduce_sum"
        and eqn.invars[0].aval.shape == (2, 2, 6, 9)
        and 3 in eqn.params["axes"]
    ]
    assert len(key_sums) == 1


def test_dropout_mean_over_keys_approaches_plain_attention():
    # Inverted dropout keeps the expectation: E[keep / (1 - rate)] = 1.
    q, k, v = random_qkv(14, batch=1, length=4)
    rate, num_keys = 0.5, 4000
    keys = jax.random.split(jax.random.key(4), num_keys)
    samples = jax.jit(
        jax.vmap(lambda key: eager_softmax_attention(q, k, v, dropout_rate=rate, dropout_rng=key))
    )(keys)
    plain = reference_attention(q, k, v)
    # One sample is far from the mean (standard deviation ~0.5 per entry) ...
    assert np.abs(np.asarray(samples[0]) - plain).max() > 0.2
    # ... the mean of 4000 is within ~6 standard errors (~0.008 each).
    np.testing.assert_allclose(np.asarray(samples).mean(0), plain, atol=0.05)


def test_dropout_rate_zero_or_no_key_is_bit_identical_to_plain():
    # Eager: under jit each variant would compile a program of its own.
    q, k, v = random_qkv(15, length=5)
    mask, bias = _padded_causal_mask_and_bias(5)
    plain = eager_softmax_attention(q, k, v, mask=mask, bias=bias)
    key = jax.random.key(5)
    no_rate = eager_softmax_attention(
        q, k, v, mask=mask, bias=bias, dropout_rate=0.0, dropout_rng=key
    )
    no_key = eager_softmax_attention(q, k, v, mask=mask, bias=bias, dropout_rate=0.3)
    np.testing.assert_array_equal(no_rate, plain)
    np.testing.assert_array_equal(no_key, plain)
    q16, k16, v16 = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    np.testing.assert_array_equal(
        eager_softmax_attention(q16, k16, v16, mask=mask, dropout_rate=0.0, dropout_rng=key),
        eager_softmax_attention(q16, k16, v16, mask=mask),
    )


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_dropout_rate_outside_unit_interval_is_rejected(rate):
    q, k, v = random_qkv(16, length=3)
    with pytest.raises(ValueError, match=r"dropout_rate must be in \[0, 1\)"):
        eager_softmax_attention(q, k, v, dropout_rate=rate, dropout_rng=jax.random.key(0))


def test_fully_masked_rows_stay_zero_with_dropout():
    q, k, v = random_qkv(17, length=4)
    mask = np.ones((2, 1, 4, 4), bool)
    mask[0, :, 1, :] = False
    mask[1] = False
    key = jax.random.key(6)

    def loss(q, k, v):
        out = eager_softmax_attention(q, k, v, mask=mask, dropout_rate=0.5, dropout_rng=key)
        return jnp.sum(out**2), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    np.testing.assert_array_equal(out[0, 1], 0.0)
    np.testing.assert_array_equal(out[1], 0.0)
    assert np.all(np.isfinite(out))
    for grad in grads:
        assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grads[0][1], 0.0)


def test_random_synthesizer_matches_numpy():
    q, k, v = random_qkv(8, length=5)
    logits = np.random.default_rng(9).normal(size=(2, 5, 5)).astype(np.float32)
    out = random_synthesizer_attention(q, k, v, logits=logits, causal=True)
    weights = np.where(np.tril(np.ones((5, 5), bool)), logits.astype(np.float64), -np.inf)
    weights = np.exp(weights - weights.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum("hts,bshd->bthd", weights, v.astype(np.float64))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_registry_binds_hyperparameters_and_rejects_unknowns():
    q, k, v = random_qkv(10, length=4)
    fn = get_attention_fn("softmax", scale=1.0)
    np.testing.assert_allclose(
        jax.jit(fn)(q, k, v), reference_attention(q, k, v, scale=1.0), rtol=1e-5, atol=1e-6
    )
    assert get_attention_fn("linear") is not None
    with pytest.raises(ValueError, match="known kernels.*nystrom.*performer"):
        get_attention_fn("flash")
    with pytest.raises(ValueError, match="does not take \\['num_landmarks'\\]"):
        get_attention_fn("performer", num_landmarks=4)


def test_every_registered_kernel_keeps_bfloat16_and_stays_finite():
    """Every registry entry, called as the attention layer calls it: hyperparameters from a
    config (``KernelSpec.bind``), variables made by the spec's own initialisers."""
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in random_qkv(11, length=8, std=3.0))
    cfg = ModelConfig(
        num_heads=2, head_dim=8, max_length=8, num_features=16, num_landmarks=4,
        window_size=3, sparse_top_k=2,
    )  # fmt: skip
    mask = padding_mask(np.array([[1] * 8, [1] * 5 + [0] * 3]))
    for name, spec in KERNELS.items():
        variables = {}
        for variable in spec.variables:
            if variable.used(cfg, False):
                value = variable.init(cfg)(jax.random.PRNGKey(0), variable.shape(cfg), jnp.float32)
                read = variable.read or (lambda value, *_: value)
                variables[variable.argument] = read(value, cfg, 0, 8, 8)
        fn = jax.jit(functools.partial(spec.bind(cfg), **variables))
        out = fn(q, k, v, mask=mask)
        assert out.dtype == jnp.bfloat16, name
        assert out.shape == q.shape, name
        assert np.all(np.isfinite(np.asarray(out, np.float32))), name
