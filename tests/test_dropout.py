"""rope_jax.dropout: the 16-bit keep mask against a numpy reading of the same random bits."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rope_jax import dropout


def _reference_keep(key, rate, shape):
    """The documented rule, written with numpy: two uint16 draws per 32-bit word, low half
    first (little-endian), an element kept when its draw is at least round(rate * 2**16)."""
    size = int(np.prod(shape))
    words = np.asarray(jax.random.bits(key, ((size + 1) // 2,), jnp.uint32))
    halves = words.astype("<u4").view("<u2")[:size]
    return (halves >= round(rate * 65536)).reshape(shape)


@pytest.mark.parametrize("shape", [(4, 6, 8), (3, 5)])  # even and odd element counts
def test_keep_mask_is_the_documented_rule(shape):
    key = jax.random.key(7)
    got = np.asarray(dropout.keep_mask(key, 0.3, shape))
    np.testing.assert_array_equal(got, _reference_keep(key, 0.3, shape))
    assert got.any() and not got.all()


def test_keep_fraction_and_expectation():
    rate = 0.1
    keep_prob = dropout.keep_probability(rate)
    assert keep_prob == 1.0 - 6554 / 65536
    x = jnp.full((1 << 20,), 2.0, jnp.float32)
    out = np.asarray(dropout.dropout(x, rate, jax.random.key(1)))
    # Every value is dropped (0) or scaled by exactly 1 / keep_prob.
    np.testing.assert_allclose(np.unique(out), [0.0, 2.0 / keep_prob], rtol=1e-7)
    kept = (out > 0).mean()
    sigma = np.sqrt(keep_prob * (1 - keep_prob) / x.size)
    assert abs(kept - keep_prob) < 5 * sigma
    assert abs(out.mean() - 2.0) < 2.0 * 5 * sigma / keep_prob


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
    want_keep = _reference_keep(module_key, 0.5, x.shape)
    np.testing.assert_array_equal(np.asarray(got), np.where(want_keep, 2.0, 0.0))
