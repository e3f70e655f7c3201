"""Position encodings against independent float64 numpy references and published values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rope_jax import positions as pe
from rope_jax.model_config import ModelConfig
from rope_jax.position_encodings import POSITION_ENCODINGS


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
    x = jnp.asarray(rng.normal(size=(2, 4, 2, 8)), jnp.bfloat16)
    # Positions bfloat16 cannot hold (1001 -> 1000, 4097 -> 4096): float32 angles are needed.
    positions = np.array([[0, 1, 1001, 4097]])
    got = pe.apply_rope(x, positions)
    assert got.dtype == jnp.bfloat16
    want = _rope_reference_f64(np.asarray(x, np.float32), positions, 10000.0, "interleaved", 1.0)
    # Only the final rounding to bfloat16 remains (~2^-9 relative).
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2, rtol=1e-2)


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


def test_rope_layouts_are_related_by_a_fixed_permutation():
    dim = 8
    # Interleaved pair (2i, 2i+1) plays the role of half-split pair (i, i + dim/2):
    # half-layout slot i holds interleaved dim 2i, slot i + dim/2 holds dim 2i + 1.
    permutation = np.empty(dim, np.int64)
    for i in range(dim // 2):
        permutation[i] = 2 * i
        permutation[i + dim // 2] = 2 * i + 1
    np.testing.assert_array_equal(permutation, [0, 2, 4, 6, 1, 3, 5, 7])
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 6, 2, dim)).astype(np.float32))
    positions = np.array([[0, 1, 2, 3, 4, 5], [9, 8, 30, 1, 0, 64]])
    interleaved = pe.apply_rope(x, positions, layout="interleaved")
    half = pe.apply_rope(x[..., permutation], positions, layout="half")
    np.testing.assert_allclose(
        np.asarray(half), np.asarray(interleaved)[..., permutation], atol=1e-6
    )
    # Without the permutation the layouts differ (so the check above can fail).
    assert not np.allclose(np.asarray(pe.apply_rope(x, positions, layout="half")), interleaved)


def test_rope_position_zero_is_identity_and_jit_works():
    x = jnp.asarray(np.random.default_rng(4).normal(size=(1, 3, 2, 4)).astype(np.float32))
    np.testing.assert_array_equal(pe.apply_rope(x, np.zeros((1, 3), np.int32)), x)
    jitted = jax.jit(pe.apply_rope, static_argnames=("base", "layout", "scale"))
    np.testing.assert_allclose(
        jitted(x, jnp.arange(3)[None], layout="half"),
        pe.apply_rope(x, np.arange(3)[None], layout="half"),
        atol=1e-6,
    )


def test_rope_scale_multiplies_positions():
    x = jnp.asarray(np.random.default_rng(5).normal(size=(1, 4, 1, 8)).astype(np.float32))
    np.testing.assert_allclose(
        pe.apply_rope(x, np.array([[0, 4, 8, 12]]), scale=0.25),
        pe.apply_rope(x, np.array([[0, 1, 2, 3]])),
        atol=1e-6,
    )


def test_rope_ntk_base_formula_and_frequency_property():
    head_dim, factor = 64, 4.0
    new_base = pe.rope_ntk_base(10000.0, head_dim, factor)
    assert new_base == pytest.approx(10000.0 * 4.0 ** (64 / 62), rel=1e-12)
    # The lowest frequency theta_{d/2-1} is divided by exactly `factor`; theta_0 stays 1.
    old = 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)
    new = new_base ** (-np.arange(0, head_dim, 2) / head_dim)
    assert new[0] == 1.0
    assert new[-1] == pytest.approx(old[-1] / factor, rel=1e-12)
    assert pe.rope_ntk_base(10000.0, head_dim, 1.0) == 10000.0
    with pytest.raises(ValueError, match="factor"):
        pe.rope_ntk_base(10000.0, head_dim, 0.5)
    with pytest.raises(ValueError, match="head_dim"):
        pe.rope_ntk_base(10000.0, 7, 2.0)


def test_sinusoidal_positions_match_the_transformer_paper():
    length, dim = 50, 16
    table = pe.sinusoidal_positions(length, dim)
    assert table.shape == (length, dim) and table.dtype == jnp.float32
    want = np.zeros((length, dim))
    for pos in range(length):
        for i in range(dim // 2):
            want[pos, 2 * i] = np.sin(pos / 10000.0 ** (2 * i / dim))
            want[pos, 2 * i + 1] = np.cos(pos / 10000.0 ** (2 * i / dim))
    np.testing.assert_allclose(np.asarray(table), want, atol=2e-5)
    with pytest.raises(ValueError, match="even dim"):
        pe.sinusoidal_positions(4, 5)


# relative_position = memory (key) position - query position.
# Bidirectional, 32 buckets, max_distance 128: 16 buckets per sign, max_exact = 8,
# large n -> 8 + floor(ln(n / 8) / ln(16) * 8); keys after the query add 16.
T5_BIDIRECTIONAL_BY_HAND = [
    (0, 0),
    (-1, 1),
    (-7, 7),
    (-8, 8),  # ln(1) = 0 -> 8 + 0
    (-12, 9),  # ln(1.5) / ln(16) * 8 = 1.17 -> 9
    (-16, 10),  # ln(2) / ln(16) * 8 = 2.0 -> 10
    (-127, 15),  # ln(15.875) / ln(16) * 8 = 7.98 -> 15
    (-128, 15),  # 8 + 8 = 16, clipped to 15
    (-1000, 15),  # beyond max_distance: clipped
    (1, 17),  # 16 + 1
    (16, 26),  # 16 + 10
    (1000, 31),  # 16 + 15
]
# Causal, 32 buckets, max_distance 128: n = max(query - key, 0), max_exact = 16,
# large n -> 16 + floor(ln(n / 16) / ln(8) * 16).
T5_CAUSAL_BY_HAND = [
    (5, 0),  # key after the query: clipped to distance 0
    (0, 0),
    (-15, 15),
    (-16, 16),
    (-32, 21),  # ln(2) / ln(8) * 16 = 5.33 -> 21
    (-64, 26),  # ln(4) / ln(8) * 16 = 10.67 -> 26
    (-127, 31),  # ln(7.9375) / ln(8) * 16 = 15.94 -> 31
    (-128, 31),  # 16 + 16 = 32, clipped to 31
    (-500, 31),
]


def _t5_bucket_reference(relative_position, bidirectional, num_buckets, max_distance):
    """The T5 paper's bucketing for one Python int, in float64."""
    n = -relative_position
    offset = 0
    if bidirectional:
        num_buckets //= 2
        offset = num_buckets if n < 0 else 0
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return offset + n
    scaled = math.log(n / max_exact) / math.log(max_distance / max_exact)
    return offset + min(max_exact + int(scaled * (num_buckets - max_exact)), num_buckets - 1)


@pytest.mark.parametrize(
    "bidirectional, pairs", [(True, T5_BIDIRECTIONAL_BY_HAND), (False, T5_CAUSAL_BY_HAND)]
)
def test_t5_buckets_match_hand_computed_values(bidirectional, pairs):
    relative, want = np.array(pairs).T
    got = pe.t5_relative_position_bucket(relative, bidirectional=bidirectional)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), want)
    assert [_t5_bucket_reference(int(r), bidirectional, 32, 128) for r in relative] == list(want)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 20), (64, 256)])
def test_t5_buckets_match_float64_reference(bidirectional, num_buckets, max_distance):
    relative = np.arange(-300, 301)
    got = pe.t5_relative_position_bucket(
        relative, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    want = [
        _t5_bucket_reference(int(r), bidirectional, num_buckets, max_distance) for r in relative
    ]
    np.testing.assert_array_equal(np.asarray(got), want)


def test_t5_buckets_match_transformers():
    torch = pytest.importorskip("torch")
    modeling_t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    relative = np.arange(-300, 301)
    for bidirectional in (True, False):
        for num_buckets, max_distance in ((32, 128), (8, 20)):
            want = modeling_t5.T5Attention._relative_position_bucket(
                torch.from_numpy(relative),
                bidirectional=bidirectional,
                num_buckets=num_buckets,
                max_distance=max_distance,
            ).numpy()
            got = pe.t5_relative_position_bucket(
                relative,
                bidirectional=bidirectional,
                num_buckets=num_buckets,
                max_distance=max_distance,
            )
            np.testing.assert_array_equal(np.asarray(got), want)


def test_t5_relative_bias_indexes_the_table_by_bucket():
    num_buckets, heads = 32, 3
    table = np.random.default_rng(6).normal(size=(num_buckets, heads)).astype(np.float32)
    q_positions = np.array([[0, 1, 2], [5, 6, 7]])
    kv_positions = np.array([[0, 1, 2, 3, 200]])  # batch 1 broadcasts against batch 2
    for bidirectional in (True, False):
        bias = pe.t5_relative_bias(
            jnp.asarray(table), q_positions, kv_positions, bidirectional=bidirectional
        )
        assert bias.shape == (2, heads, 3, 5) and bias.dtype == jnp.float32
        bias = np.asarray(bias)
        for b in range(2):
            for t in range(3):
                for s in range(5):
                    relative = int(kv_positions[0, s] - q_positions[b, t])
                    bucket = _t5_bucket_reference(relative, bidirectional, 32, 128)
                    np.testing.assert_array_equal(bias[b, :, t, s], table[bucket])
    with pytest.raises(ValueError, match="num_buckets"):
        pe.t5_relative_bias(jnp.zeros((16, 2)), q_positions, kv_positions, bidirectional=True)


def test_alibi_slopes_match_the_paper():
    np.testing.assert_array_equal(pe.alibi_slopes(8), [1 / 2**k for k in range(1, 9)])
    # 16 heads: the geometric sequence 2^-0.5, 2^-1, ..., 2^-8 (paper, section 3).
    np.testing.assert_allclose(pe.alibi_slopes(16), [2 ** (-k / 2) for k in range(1, 17)])
    # 6 heads: the 4-head slopes 1/4, 1/16, 1/64, 1/256, then every other 8-head slope
    # (1/2, 1/8, 1/32, ...) up to 6 heads in all.
    np.testing.assert_array_equal(
        pe.alibi_slopes(6), [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8]
    )
    np.testing.assert_array_equal(pe.alibi_slopes(1), [1 / 256])


@pytest.mark.parametrize("causal", [True, False])
def test_alibi_bias_against_loops(causal):
    heads = 4
    q_positions = np.array([[0, 1, 2, 3]])
    kv_positions = np.array([[0, 1, 2, 3], [2, 0, 1, 3]])
    bias = pe.alibi_bias(heads, q_positions, kv_positions, causal=causal)
    assert bias.shape == (2, heads, 4, 4) and bias.dtype == jnp.float32
    bias = np.asarray(bias)
    slopes = [1 / 4, 1 / 16, 1 / 64, 1 / 256]
    for b in range(2):
        for h in range(heads):
            for t in range(4):
                for s in range(4):
                    i, j = q_positions[0, t], kv_positions[b, s]
                    if causal:
                        want = -slopes[h] * (i - j) if j <= i else 0.0
                    else:
                        want = -slopes[h] * abs(i - j)
                    assert float(bias[b, h, t, s]) == pytest.approx(want, abs=1e-7)


def test_hierarchical_extension_keeps_the_table_and_follows_the_formula():
    n, dim, alpha = 4, 3, 0.4
    table = np.random.default_rng(7).normal(size=(n, dim)).astype(np.float32)
    extended = pe.extend_positions_hierarchical(jnp.asarray(table), 14, alpha=alpha)
    assert extended.shape == (14, dim) and extended.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(extended[:n]), table)

    p = table.astype(np.float64)  # p[i - 1] is the post's 1-based p_i

    def u(i):
        return (p[i - 1] - alpha * p[0]) / (1 - alpha)

    # 1-based position (i - 1) * n + j -> 0-based row (i - 1) * n + j - 1.
    for i, j in ((2, 1), (2, 3), (3, 4), (4, 2)):
        row = (i - 1) * n + j - 1
        np.testing.assert_allclose(extended[row], alpha * u(i) + (1 - alpha) * u(j), atol=1e-5)
    # In exact arithmetic block i = 1 reproduces the table (why the first n rows are kept).
    np.testing.assert_allclose(alpha * u(1) + (1 - alpha) * u(3), p[2], atol=1e-12)
    # Distinct positions get distinct vectors.
    full = np.asarray(pe.extend_positions_hierarchical(jnp.asarray(table), n * n))
    assert len({tuple(row) for row in full.round(6)}) == n * n


def test_hierarchical_extension_edges():
    table = jnp.asarray(np.arange(12, dtype=np.float32).reshape(4, 3))
    np.testing.assert_array_equal(pe.extend_positions_hierarchical(table, 3), table[:3])
    bf16 = pe.extend_positions_hierarchical(table.astype(jnp.bfloat16), 10)
    assert bf16.dtype == jnp.bfloat16 and bf16.shape == (10, 3)
    with pytest.raises(ValueError, match="at most 16"):
        pe.extend_positions_hierarchical(table, 17)
    with pytest.raises(ValueError, match="alpha"):
        pe.extend_positions_hierarchical(table, 10, alpha=0.5)
    with pytest.raises(ValueError, match="new_length >= 0"):
        pe.extend_positions_hierarchical(table, -1)


def test_check_length_names_the_encoding_and_limit():
    pe.check_length(512, 512, "learned absolute position embedding")
    with pytest.raises(ValueError, match="learned absolute position embedding holds 512"):
        pe.check_length(513, 512, "learned absolute position embedding")


@pytest.mark.parametrize("name", [n for n, s in POSITION_ENCODINGS.items() if s.kind == "bias"])
def test_shift_invariant_flag_is_true_of_the_bias(name):
    """A bias declared shift-invariant is computed once for all rows from the row index
    (models.TransformerStack); that is right only if shifting every position leaves it
    unchanged, per row, for queries and keys at different offsets."""
    spec = POSITION_ENCODINGS[name]
    cfg = ModelConfig(num_heads=3, position=name, relpos_num_buckets=8, relpos_max_distance=20)
    rng = np.random.default_rng(0)
    table = None
    if spec.bias_table is not None:
        table = jnp.asarray(rng.normal(size=spec.bias_table(cfg)), jnp.float32)
    q = jnp.asarray([[0, 1, 2, 3, 4, 5], [3, 4, 5, 0, 1, 2]], jnp.int32)
    kv = jnp.asarray([[0, 1, 2, 3, 4, 5, 6, 7], [9, 8, 2, 30, 0, 1, 2, 3]], jnp.int32)
    for causal in (False, True):
        base = spec.bias(cfg, table, q, kv, causal)
        shifted = spec.bias(cfg, table, q + 17, kv + 17, causal)
        assert spec.shift_invariant == bool(np.array_equal(base, shifted)), (name, causal)
