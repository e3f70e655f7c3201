"""Nyström attention against exact softmax and a float64 numpy Nyström formula."""

import jax
import numpy as np
import pytest
from attention_reference import random_qkv, relative_error
from attention_reference import softmax_attention as reference_attention

from rope_jax.attention import iterative_pinv, padding_mask
from rope_jax.attention import nystrom_attention as eager_nystrom_attention

nystrom_attention = jax.jit(
    eager_nystrom_attention,
    static_argnames=("num_landmarks", "causal", "pinv_iterations", "conv_kernel_size", "rope"),
)


def numpy_softmax(logits):
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True)


def numpy_pinv_iteration(a, iterations):
    z = a.T / (np.abs(a).sum(0).max() * np.abs(a).sum(1).max())
    identity = np.eye(a.shape[0])
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * identity - az @ (15 * identity - az @ (7 * identity - az)))
    return z


def numpy_nystrom(q, k, v, valid, num_landmarks, iterations=None):
    """Float64 loops: segments of the valid tokens, valid token of rank r -> floor(r m / n)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    out = np.zeros(q.shape)
    for b in range(q.shape[0]):
        index = np.flatnonzero(valid[b])
        segments = (np.arange(len(index)) * num_landmarks) // len(index)
        used = [j for j in range(num_landmarks) if np.any(segments == j)]
        for h in range(q.shape[2]):
            qb, kb, vb = q[b, index, h], k[b, index, h], v[b, index, h]
            qb = qb / np.sqrt(q.shape[-1])
            q_tilde = np.stack([qb[segments == j].mean(0) for j in used])
            k_tilde = np.stack([kb[segments == j].mean(0) for j in used])
            kernel_1 = numpy_softmax(q[b, :, h] / np.sqrt(q.shape[-1]) @ k_tilde.T)
            kernel_2 = numpy_softmax(q_tilde @ k_tilde.T)
            kernel_3 = numpy_softmax(q_tilde @ kb.T)
            if iterations is None:
                pinv = np.linalg.pinv(kernel_2)
            else:
                pinv = numpy_pinv_iteration(kernel_2, iterations)
            out[b, :, h] = kernel_1 @ pinv @ kernel_3 @ vb
    return out


def test_landmarks_equal_to_length_reproduce_exact_attention():
    q, k, v = random_qkv(0, length=12)
    exact = reference_attention(q, k, v)
    with_exact_pinv = nystrom_attention(q, k, v, num_landmarks=12, pinv_iterations=None)
    np.testing.assert_allclose(with_exact_pinv, exact, rtol=1e-4, atol=1e-4)
    # The paper's 6 iterations are not enough to invert a 12 x 12 kernel exactly; 30 are.
    with_iterations = nystrom_attention(q, k, v, num_landmarks=12, pinv_iterations=30)
    np.testing.assert_allclose(with_iterations, exact, rtol=1e-4, atol=1e-4)


def test_iterative_pinv_converges_to_the_pseudo_inverse():
    logits = np.random.default_rng(1).normal(size=(1, 1, 8, 8))
    kernel = numpy_softmax(logits)
    np.testing.assert_allclose(
        iterative_pinv(kernel.astype(np.float32), 30)[0, 0],
        np.linalg.pinv(kernel[0, 0]),
        rtol=1e-3,
        atol=1e-3,
    )
    # The same iteration in float64 numpy: agreement after the paper's 6 steps.
    np.testing.assert_allclose(
        iterative_pinv(kernel.astype(np.float32), 6)[0, 0],
        numpy_pinv_iteration(kernel[0, 0], 6),
        rtol=1e-4,
        atol=1e-4,
    )


def test_error_falls_as_landmarks_grow():
    errors = []
    for num_landmarks in (2, 8, 32):
        per_seed = []
        for seed in range(3):
            q, k, v = random_qkv(10 + seed, length=32, std=0.7)
            out = nystrom_attention(q, k, v, num_landmarks=num_landmarks)
            per_seed.append(relative_error(out, reference_attention(q, k, v)))
        errors.append(np.mean(per_seed))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.1, errors


@pytest.mark.parametrize("length, num_landmarks", [(12, 4), (13, 4), (7, 3)])
def test_matches_float64_nystrom_formula_for_any_length(length, num_landmarks):
    q, k, v = random_qkv(20, length=length)
    valid = np.ones((2, length), bool)
    valid[1, length - 3 :] = False
    mask = padding_mask(valid)
    np.testing.assert_allclose(
        nystrom_attention(q, k, v, num_landmarks=num_landmarks, mask=mask, pinv_iterations=6),
        numpy_nystrom(q, k, v, valid, num_landmarks, iterations=6),
        rtol=1e-4,
        atol=1e-4,
    )


def test_divisible_length_uses_the_papers_consecutive_segments():
    q, k, v = random_qkv(21, length=12)
    out = nystrom_attention(q, k, v, num_landmarks=4, pinv_iterations=None)
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    scale = 8**-0.5
    q_tilde = q64.reshape(2, 4, 3, 2, 8).mean(2)  # segments of 3 consecutive positions
    k_tilde = k64.reshape(2, 4, 3, 2, 8).mean(2)
    kernel_1 = numpy_softmax(np.einsum("bthd,bmhd->bhtm", q64, k_tilde) * scale)
    kernel_2 = numpy_softmax(np.einsum("bmhd,bnhd->bhmn", q_tilde, k_tilde) * scale)
    kernel_3 = numpy_softmax(np.einsum("bmhd,bshd->bhms", q_tilde, k64) * scale)
    expected = np.einsum(
        "bhtm,bhmn,bhns,bshd->bthd", kernel_1, np.linalg.pinv(kernel_2), kernel_3, v64
    )
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_appending_padded_tokens_changes_nothing():
    q, k, v = random_qkv(30, length=10)
    base = nystrom_attention(q, k, v, num_landmarks=4)
    extra_q, extra_k, extra_v = random_qkv(31, length=6, std=10.0)
    valid = np.array([[1] * 10 + [0] * 6] * 2)
    padded = nystrom_attention(
        np.concatenate([q, extra_q], 1),
        np.concatenate([k, extra_k], 1),
        np.concatenate([v, extra_v], 1),
        num_landmarks=4,
        mask=padding_mask(valid),
    )
    np.testing.assert_allclose(padded[:, :10], base, rtol=1e-5, atol=1e-5)


def test_fewer_valid_tokens_than_landmarks_is_exact():
    """Each valid token becomes its own landmark; the unused landmarks drop out."""
    q, k, v = random_qkv(40, length=8)
    valid = np.array([[1] * 5 + [0] * 3, [1] * 8])
    out = nystrom_attention(
        q, k, v, num_landmarks=8, mask=padding_mask(valid), pinv_iterations=None
    )
    expected = reference_attention(q, k, v, mask=valid[:, None, None, :])
    np.testing.assert_allclose(out[0, :5], expected[0, :5], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out[1], expected[1], rtol=1e-4, atol=1e-4)


def test_convolution_skip_adds_a_depthwise_convolution_of_masked_values():
    q, k, v = random_qkv(50, length=9)
    weights = np.random.default_rng(51).normal(size=(3, 2)).astype(np.float32)
    valid = np.array([[1] * 9, [1] * 7 + [0] * 2])
    mask = padding_mask(valid)
    plain = nystrom_attention(
        q, k, v, num_landmarks=3, mask=mask, conv_kernel_size=3, conv_weights=0 * weights
    )
    with_conv = nystrom_attention(
        q, k, v, num_landmarks=3, mask=mask, conv_kernel_size=3, conv_weights=weights
    )
    masked_v = np.pad(v * valid[:, :, None, None], [(0, 0), (1, 1), (0, 0), (0, 0)])
    conv = sum(weights[j][None, None, :, None] * masked_v[:, j : j + 9] for j in range(3))
    np.testing.assert_allclose(np.asarray(with_conv) - plain, conv, rtol=1e-5, atol=1e-5)


def test_rejects_what_it_cannot_compute():
    q, k, v = random_qkv(60, length=4)
    with pytest.raises(ValueError, match="bidirectional only"):
        eager_nystrom_attention(q, k, v, num_landmarks=2, causal=True)
    with pytest.raises(ValueError, match="key-padding masks"):
        eager_nystrom_attention(q, k, v, num_landmarks=2, mask=np.ones((2, 1, 4, 4), bool))
    with pytest.raises(ValueError, match="needs conv_weights"):
        eager_nystrom_attention(q, k, v, num_landmarks=2, conv_kernel_size=3)


def test_at_least_as_many_landmarks_as_valid_keys_is_exact_softmax():
    """The reference switches to softmax attention when num_landmarks == seq_len; here a row
    with at most m valid keys is exact, with the paper's 6 iterations (which alone miss)."""
    q, k, v = random_qkv(41, length=8)
    for num_landmarks in (8, 11):  # every row, decided from the static length
        out = nystrom_attention(q, k, v, num_landmarks=num_landmarks)
        np.testing.assert_allclose(out, reference_attention(q, k, v), rtol=1e-5, atol=1e-5)
    # Per row: 5 valid keys <= 6 landmarks is exact (padded query rows too); 8 > 6 is not.
    valid = np.array([[1] * 5 + [0] * 3, [1] * 8])
    out = nystrom_attention(q, k, v, num_landmarks=6, mask=padding_mask(valid))
    exact = reference_attention(q, k, v, mask=valid[:, None, None, :])
    np.testing.assert_allclose(out[0], exact[0], rtol=1e-5, atol=1e-5)
    approximate = numpy_nystrom(q[1:], k[1:], v[1:], valid[1:], 6, iterations=6)[0]
    np.testing.assert_allclose(out[1], approximate, rtol=1e-4, atol=1e-4)
    assert relative_error(out[1], exact[1]) > 1e-3
    # Cross-attention (T != S): only the keys count.
    q_cross = random_qkv(42, length=3)[0]
    out = nystrom_attention(q_cross, k, v, num_landmarks=6, mask=padding_mask(valid))
    exact = reference_attention(q_cross, k, v, mask=valid[:, None, None, :])
    np.testing.assert_allclose(out[0], exact[0], rtol=1e-5, atol=1e-5)
