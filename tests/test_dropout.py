"""rope_jax.dropout: the hashed keep mask against a numpy pcg4d, and its statistics."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dropout_reference import keep_mask as reference_keep
from dropout_reference import pcg4d as reference_pcg4d

from rope_jax import dropout


@pytest.mark.parametrize("shape", [(4, 6, 8), (3, 5), (7,), ()])
def test_keep_mask_is_the_documented_rule(shape):
    key = jax.random.key(7)
    got = np.asarray(dropout.keep_mask(key, 0.3, shape))
    np.testing.assert_array_equal(got, reference_keep(key, 0.3, shape))
    if got.size > 10:
        assert got.any() and not got.all()


def test_pcg4d_matches_numpy_on_every_lane():
    words = np.random.default_rng(0).integers(0, 2**32, size=(4, 1000), dtype=np.uint64)
    words = words.astype(np.uint32)
    got = dropout.pcg4d(*(jnp.asarray(w) for w in words))
    with np.errstate(over="ignore"):
        want = reference_pcg4d(*words)
    for lane_got, lane_want in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(lane_got), lane_want)


def test_large_tensors_count_leading_axes_in_the_second_word(monkeypatch):
    """Above the counter limit (lowered here to 64) the trailing axes that fit form the low
    counter and the leading axes the high one; every position keeps its own pair."""
    monkeypatch.setattr(dropout, "_COUNTER_LIMIT", 64)
    shape, key = (3, 5, 4, 6), jax.random.key(2)
    got = np.asarray(dropout.keep_mask(key, 0.5, shape))
    k0, k1 = np.asarray(jax.random.bits(key, (2,), jnp.uint32))
    lo = np.broadcast_to(np.arange(24, dtype=np.uint32).reshape(1, 1, 4, 6), shape)
    hi = np.broadcast_to(np.arange(15, dtype=np.uint32).reshape(3, 5, 1, 1), shape)
    full = np.full(shape, k0, np.uint32), np.full(shape, k1, np.uint32)
    with np.errstate(over="ignore"):
        word = reference_pcg4d(lo, hi, *full)[3]
    np.testing.assert_array_equal(got, word >= 2**31)
    with pytest.raises(ValueError, match=r"dropout of shape \(100,\).*split the tensor"):
        dropout.keep_mask(key, 0.5, (100,))
    with pytest.raises(ValueError, match=r"dropout of shape \(100, 2\)"):
        dropout.keep_mask(key, 0.5, (100, 2))


@pytest.mark.parametrize(
    "shape, limit",
    [((3, 5, 4, 6), None), ((3, 5, 4, 6), 200), ((3, 5, 4, 6), 64), ((2, 2, 2, 6), 10)],
)
def test_a_block_of_the_mask_is_that_block_of_the_whole_mask(monkeypatch, shape, limit):
    """``keep_mask_from_words(..., index)`` (as a loop over blocks uses it, with traced
    indices) equals the same block of the whole tensor's mask, whichever axes the two
    counters cover: all four (no limit), the last three (200: the index is split between
    ``hi`` and ``lo``), the last two (64) or only the last (10)."""
    if limit is not None:
        monkeypatch.setattr(dropout, "_COUNTER_LIMIT", limit)
    key = jax.random.key(4)
    whole = np.asarray(dropout.keep_mask(key, 0.4, shape))
    words = dropout.key_words(key)
    block = jax.jit(lambda i, j: dropout.keep_mask_from_words(words, 0.4, shape, (i, j)))
    for i, j in [(0, 0), (1, 1), (shape[0] - 1, shape[1] - 1)]:
        np.testing.assert_array_equal(np.asarray(block(i, j)), whole[i, j])
    np.testing.assert_array_equal(
        np.asarray(dropout.keep_mask_from_words(words, 0.4, shape, (1,))), whole[1]
    )


def test_keep_fraction_and_expectation():
    rate = 0.1
    keep_prob = dropout.keep_probability(rate)
    assert keep_prob == 1.0 - round(0.1 * 2**32) / 2**32
    assert abs(keep_prob - 0.9) < 1e-9
    x = jnp.full((1 << 20,), 2.0, jnp.float32)
    out = np.asarray(dropout.dropout(x, rate, jax.random.key(1)))
    # Every value is dropped (0) or scaled by exactly 1 / keep_prob.
    np.testing.assert_allclose(np.unique(out), [0.0, 2.0 / keep_prob], rtol=1e-7)
    kept = (out > 0).mean()
    sigma = np.sqrt(keep_prob * (1 - keep_prob) / x.size)
    assert abs(kept - keep_prob) < 5 * sigma
    assert abs(out.mean() - 2.0) < 2.0 * 5 * sigma / keep_prob


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_neighbouring_elements_are_independent(rate):
    """P(both kept) of neighbours along each axis, and of neighbours two and seven apart in
    memory order, equals p**2 within 5 sigma; the 16 patterns of four consecutive elements
    pass a chi-square test at rate 0.5."""
    p = 1.0 - rate
    mask = np.asarray(dropout.keep_mask(jax.random.key(11), rate, (4, 6, 128, 256)))
    for axis in range(mask.ndim):
        a = np.take(mask, np.arange(mask.shape[axis] - 1), axis=axis)
        b = np.take(mask, np.arange(1, mask.shape[axis]), axis=axis)
        both = (a & b).mean()
        sigma = np.sqrt(p**2 * (1 - p**2) / a.size)
        assert abs(both - p**2) < 5 * sigma, (axis, both, p**2)
    flat = mask.reshape(-1)
    for lag in (2, 7, 256):
        both = (flat[:-lag] & flat[lag:]).mean()
        assert abs(both - p**2) < 5 * np.sqrt(p**2 * (1 - p**2) / (flat.size - lag)), lag
    if rate == 0.5:
        quads = flat[: flat.size // 4 * 4].reshape(-1, 4).astype(int) @ np.array([8, 4, 2, 1])
        counts = np.bincount(quads, minlength=16)
        expected = quads.size / 16
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < 37.7  # 15 degrees of freedom, p = 0.001


def test_masks_of_neighbouring_keys_are_independent():
    """Keys one step or one layer apart (fold_in, split) give masks that agree on
    p**2 + (1-p)**2 of the elements, as independent draws do."""
    rate, shape = 0.3, (8, 64, 64)
    p = 1.0 - rate
    base = jax.random.key(5)
    steps = [jax.random.fold_in(base, step) for step in range(3)]
    keys = steps + list(jax.random.split(jax.random.fold_in(base, 100), 3))
    masks = [np.asarray(dropout.keep_mask(key, rate, shape)) for key in keys]
    want = p**2 + (1 - p) ** 2
    sigma = np.sqrt(want * (1 - want) / masks[0].size)
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            agree = (masks[i] == masks[j]).mean()
            assert abs(agree - want) < 5 * sigma, (i, j, agree)


def test_rate_zero_is_identity_and_bad_rates_are_rejected():
    x = jnp.arange(6.0)
    np.testing.assert_array_equal(dropout.dropout(x, 0.0, jax.random.key(0)), x)
    for rate in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\)"):
            dropout.dropout(x, rate, jax.random.key(0))


def test_module_uses_the_dropout_stream_in_training_only():
    layer = dropout.Dropout(0.5)
    x = jnp.ones((64,))
    np.testing.assert_array_equal(layer.apply({}, x, deterministic=True), x)
    key = jax.random.key(3)
    got = layer.apply({}, x, deterministic=False, rngs={"dropout": key})
    # Flax derives the module's key from the "dropout" stream; the same rule applies to it.

    class Probe(nn.Module):
        @nn.compact
        def __call__(self):
            return self.make_rng("dropout")

    module_key = Probe().apply({}, rngs={"dropout": key})
    want_keep = reference_keep(module_key, 0.5, x.shape)
    np.testing.assert_array_equal(np.asarray(got), np.where(want_keep, 2.0, 0.0))


@pytest.mark.parametrize("spec", [("data", None, None), (None, None, "data")])
def test_mask_does_not_depend_on_how_the_tensor_is_sharded(spec):
    """Each element's bits come from its global position, so a mask made sharded over 8
    devices (batch axis or last axis) equals the one made on one device."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    shape, key = (8, 6, 16), jax.random.key(4)
    sharded = jax.jit(
        lambda k: dropout.keep_mask(k, 0.3, shape),
        out_shardings=NamedSharding(mesh, PartitionSpec(*spec)),
    )(key)
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(sharded), reference_keep(key, 0.3, shape))
