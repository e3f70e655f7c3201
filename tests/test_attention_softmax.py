"""Exact softmax attention, masks, random synthesizer and the registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_reference import random_qkv, rope_rotate
from attention_reference import softmax_attention as reference_attention

from rope_jax.attention import (
    ATTENTION_FNS,
    causal_mask,
    combine_masks,
    get_attention_fn,
    padding_mask,
    random_synthesizer_attention,
    segment_mask,
)
from rope_jax.attention import softmax_attention as eager_softmax_attention
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
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in random_qkv(11, length=8, std=3.0))
    hyperparameters = {
        "performer": dict(projection=jax.random.normal(jax.random.PRNGKey(0), (16, 8))),
        "nystrom": dict(num_landmarks=4),
        "random_synthesizer": dict(logits=np.zeros((2, 8, 8), np.float32)),
    }
    mask = padding_mask(np.array([[1] * 8, [1] * 5 + [0] * 3]))
    for name in ATTENTION_FNS:
        fn = jax.jit(get_attention_fn(name, **hyperparameters.get(name, {})))
        out = fn(q, k, v, mask=mask)
        assert out.dtype == jnp.bfloat16, name
        assert out.shape == q.shape, name
        assert np.all(np.isfinite(np.asarray(out, np.float32))), name
