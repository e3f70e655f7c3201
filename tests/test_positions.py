"""Position encodings against independent float64 numpy references and published values."""

import jax.numpy as jnp
import numpy as np
import pytest

from rope_jax import positions as pe


def _rope_reference_f64(x_BLHD, positions_BL, base, layout, scale):
    """RoFormer eq. (13)-(15) written as an explicit block-diagonal rotation matrix."""
    x = np.asarray(x_BLHD, np.float64)
    batch, length, heads, dim = x.shape
    pos = np.broadcast_to(np.asarray(positions_BL, np.float64), (batch, length))
    out = np.empty_like(x)
    for b in range(batch):
        for l in range(length):
            rotation = np.zeros((dim, dim))
            for i in range(dim // 2):
                angle = pos[b, l] * scale * base ** (-2.0 * i / dim)
                a, c = (2 * i, 2 * i + 1) if layout == "interleaved" else (i, i + dim // 2)
                rotation[a, a] = np.cos(angle)
                rotation[a, c] = -np.sin(angle)
                rotation[c, a] = np.sin(angle)
                rotation[c, c] = np.cos(angle)
            out[b, l] = x[b, l] @ rotation.T
    return out


@pytest.mark.parametrize("layout", ["interleaved", "half"])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_rope_matches_float64_rotation_matrix(layout, scale):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4], [7, 100, 3, 0, 2047]])
    got = pe.apply_rope(jnp.asarray(x), positions, base=10000.0, layout=layout, scale=scale)
    want = _rope_reference_f64(x, positions, 10000.0, layout, scale)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("layout", ["interleaved", "half"])
def test_rope_scores_depend_only_on_offset(layout):
    rng = np.random.default_rng(1)
    dim = 16
    q = rng.normal(size=(1, 1, 1, dim)).astype(np.float32)
    k = rng.normal(size=(1, 1, 1, dim)).astype(np.float32)

    def score(m, n):
        rq = pe.apply_rope(jnp.asarray(q), np.array([[m]]), layout=layout)
        rk = pe.apply_rope(jnp.asarray(k), np.array([[n]]), layout=layout)
        return float(jnp.sum(rq * rk))

    for offset in (-7, 0, 3, 50):
        scores = [score(m, m + offset) for m in (0, 5, 17, 300)]
        np.testing.assert_allclose(scores, scores[0], atol=2e-4)
    # And the score does change with the offset (the test can fail).
    assert abs(score(0, 1) - score(0, 5)) > 1e-3


def test_rope_bfloat16_keeps_dtype_and_broadcasts_positions():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 4, 2, 8)).astype(np.float32)
    got = pe.apply_rope(jnp.asarray(x, jnp.bfloat16), np.arange(4)[None, :])
    assert got.dtype == jnp.bfloat16
    want = _rope_reference_f64(x, np.arange(4)[None, :], 10000.0, "interleaved", 1.0)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=5e-2, rtol=2e-2)


def test_rope_rejects_bad_arguments():
    x = jnp.zeros((1, 3, 1, 7))
    with pytest.raises(ValueError, match="even head dimension"):
        pe.apply_rope(x, np.arange(3)[None])
    with pytest.raises(ValueError, match="layout"):
        pe.apply_rope(jnp.zeros((1, 3, 1, 8)), np.arange(3)[None], layout="split")
    with pytest.raises(ValueError, match="positions must have shape"):
        pe.apply_rope(jnp.zeros((2, 3, 1, 8)), np.zeros((3, 3), np.int32))
    with pytest.raises(ValueError, match="recipe"):
        pe.RopeSpec(recipe="numerator")
    with pytest.raises(ValueError, match="scale"):
        pe.RopeSpec(scale=0.0)
    spec = pe.RopeSpec(layout="half", scale=0.5)
    y = jnp.ones((1, 3, 1, 8))
    np.testing.assert_array_equal(
        spec.apply(y, np.arange(3)[None]),
        pe.apply_rope(y, np.arange(3)[None], layout="half", scale=0.5),
    )
