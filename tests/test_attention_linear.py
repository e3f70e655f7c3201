"""Linear (elu + 1) and Taylor attention against float64 numpy quadratic forms; RoPE recipes."""

import jax
import numpy as np
import pytest
from attention_reference import (
    causal_tril,
    feature_scores,
    quadratic_form,
    random_qkv,
    rope_rotate,
)

from rope_jax.attention import linear_attention as eager_linear_attention
from rope_jax.attention import padding_mask
from rope_jax.attention import taylor_attention as eager_taylor_attention
from rope_jax.positions import RopeSpec

STATIC = ("causal", "chunk_size", "rope", "scale")
linear_attention = jax.jit(eager_linear_attention, static_argnames=STATIC[:3])
taylor_attention = jax.jit(eager_taylor_attention, static_argnames=STATIC)


def elu_plus_one(x):
    x = np.asarray(x, np.float64)
    return np.where(x > 0, x + 1.0, np.exp(x))


VALID = np.array([[1] * 10, [0, 0] + [1] * 6 + [0, 0]])


@pytest.mark.parametrize("causal", [False, True])
def test_linear_matches_float64_quadratic_form(causal):
    q, k, v = random_qkv(0, length=10)
    scores = feature_scores(elu_plus_one(q), elu_plus_one(k)) * VALID[:, None, None, :]
    if causal:
        scores = scores * causal_tril(10)
    out = linear_attention(q, k, v, mask=padding_mask(VALID), causal=causal, chunk_size=4)
    # The first two queries of row 1 have no valid key before them: zeros.
    expected = quadratic_form(scores, v)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_taylor_matches_float64_quadratic_form(causal):
    q, k, v = random_qkv(1, length=10)
    s = np.einsum("bthd,bshd->bhts", q.astype(np.float64), k.astype(np.float64)) / np.sqrt(8)
    scores = (1.0 + s + s * s / 2.0) * VALID[:, None, None, :]
    if causal:
        scores = scores * causal_tril(10)
    out = taylor_attention(q, k, v, mask=padding_mask(VALID), causal=causal, chunk_size=4)
    expected = quadratic_form(scores, v)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    unscaled = taylor_attention(q, k, v, scale=1.0)
    s_unscaled = s * np.sqrt(8)
    np.testing.assert_allclose(
        unscaled,
        quadratic_form(1.0 + s_unscaled + s_unscaled**2 / 2.0, v),
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.parametrize("causal", [False, True])
def test_roformer_recipe_matches_eq_19_and_keeps_the_relative_property(causal):
    q, k, v = random_qkv(2, length=9)
    rope = RopeSpec(recipe="feature")
    positions = np.arange(9)
    out = linear_attention(q, k, v, rope=rope, causal=causal)
    phi_q, phi_k = elu_plus_one(q), elu_plus_one(k)
    mask = causal_tril(9) if causal else 1.0
    expected = quadratic_form(
        feature_scores(phi_q, phi_k) * mask,
        v,
        feature_scores(rope_rotate(phi_q, positions), rope_rotate(phi_k, positions)) * mask,
    )
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    # The numerator depends on positions only through n - m (the denominator not at all):
    # shifting every position by the same amount changes nothing ...
    shifted = linear_attention(
        q, k, v, rope=rope, causal=causal, q_positions=positions + 37, kv_positions=positions + 37
    )
    np.testing.assert_allclose(shifted, out, rtol=1e-4, atol=1e-5)
    # ... while shifting only the keys does.
    keys_shifted = linear_attention(
        q, k, v, rope=rope, causal=causal, q_positions=positions, kv_positions=positions + 3
    )
    assert np.max(np.abs(np.asarray(keys_shifted) - np.asarray(out))) > 1e-3


def test_input_recipe_rotates_before_the_feature_map():
    q, k, v = random_qkv(3, length=7)
    positions = np.arange(7)
    out = linear_attention(q, k, v, rope=RopeSpec(recipe="input"), causal=True)
    phi_q = elu_plus_one(rope_rotate(q, positions))
    phi_k = elu_plus_one(rope_rotate(k, positions))
    expected = quadratic_form(feature_scores(phi_q, phi_k) * causal_tril(7), v)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_taylor_feature_recipe_with_an_odd_feature_count():
    """1 + D + D^2 features is odd: the last feature stays unrotated; still relative."""
    q, k, v = random_qkv(4, length=6, head_dim=4)
    rope = RopeSpec(recipe="feature")
    positions = np.arange(6)
    out = taylor_attention(q, k, v, rope=rope)
    shifted = taylor_attention(
        q, k, v, rope=rope, q_positions=positions + 11, kv_positions=positions + 11
    )
    np.testing.assert_allclose(shifted, out, rtol=1e-4, atol=1e-5)


def test_rejects_full_masks_and_bias():
    q, k, v = random_qkv(5, length=4)
    with pytest.raises(ValueError, match="key-padding masks"):
        eager_linear_attention(q, k, v, mask=np.ones((2, 1, 4, 4), bool))
    with pytest.raises(ValueError, match="bias"):
        eager_taylor_attention(q, k, v, bias=np.zeros((1, 2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="equal q and k lengths"):
        eager_linear_attention(q, k[:, :3], v[:, :3], causal=True)
