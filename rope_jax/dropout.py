"""Inverted dropout (Srivastava et al. 2014) with keep masks from a counter-based hash.

Random bits are the cost of dropout on a CPU: a T5-small step drops about 10^8 elements.
``flax.linen.Dropout`` draws them with ``jax.random.bernoulli``, which materialises the
draw before comparing: with jax's ``rbg`` PRNG XLA's CPU backend expands
``rng_bit_generator`` into a loop that writes every random word to memory, and the
``threefry`` PRNG runs 20 cipher rounds for every two 32-bit words.

Here a mask element is a pure function of the layer's key and the element's position, in
32-bit integer arithmetic that XLA fuses into the code that uses the mask (the ``where``
of dropout, or the product that follows), so no random-bit buffer exists:

1. The key (from jax's PRNG as before: ``make_rng("dropout")`` per layer, ``fold_in`` per
   step, whatever ``jax_default_prng_impl`` is) gives two words ``k0, k1 =
   jax.random.bits(key, (2,), uint32)``.
2. The element's position gives two counters: ``lo``, its row-major index within the
   trailing axes (as many of them as keep the count below 2**32: all of them unless the
   tensor has 2**32 elements or more), and ``hi``, its row-major index over the remaining
   leading axes (0 when there are none).
3. ``pcg4d(lo, hi, k0, k1)`` (Jarzynski and Olano 2020, "Hash Functions for GPU
   Rendering", JCGT 9(3): a PCG-style LCG step on each lane, then two rounds in which each
   lane adds the product of two others, with a xor-shift between them) mixes the four
   words; the element is kept when the fourth output word is at least ``round(rate *
   2**32)``. The paper's quality/speed comparison puts pcg4d at the high-quality end for
   four inputs; ``tests/test_dropout.py`` checks the keep rate, neighbouring elements along
   every axis, and masks of neighbouring keys for independence.

The mask depends on global positions only, so it is the same however the tensor is sharded
across devices, and a rematerialised forward pass (``remat``) recomputes the same mask.

The drop probability is ``round(rate * 2**32) / 2**32`` (0.1 is exact to 10^-10), and kept
values are scaled by the inverse of that keep probability, so the expectation of the output
is exactly the input, as in inverted dropout. A float32 uniform (Flax, T5's Mesh TensorFlow
``tf.nn.dropout``, BERT) has a resolution of 2**-23 in the same role.

``benchmarks/dropout.py`` times the masks in one run, in turn, on one T5-small encoder
layer's ``[8, 6, 512, 512]`` attention weights, ``where(keep, w / 0.9, 0) @ v``: on 2 CPU
cores (medians of 9) forward 42 ms with this mask, 88 ms with 16-bit halves of
``jax.random.bits`` (``rbg``), 103 ms with those of ``threefry`` and 196 ms with
``jax.random.bernoulli``; value and gradient 135, 199, 214 and 318 ms.

The bits differ from ``jax.random.bernoulli``'s for the same key, so the masks of another
codebase are not reproduced bit for bit (they are not between jax PRNGs either).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_LEVELS = 1 << 32
# Each position counter is one uint32 word.
_COUNTER_LIMIT = 1 << 32
# pcg4d's constants: the 32-bit LCG multiplier and increment of Numerical Recipes, which
# Jarzynski and Olano use for the first step.
_LCG_MUL = 1664525
_LCG_ADD = 1013904223


def drop_threshold(rate: float) -> int:
    """Number of the 2**32 values of a 32-bit hash word that drop an element."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate!r}.")
    return min(round(rate * _LEVELS), _LEVELS - 1)


def keep_probability(rate: float) -> float:
    """The keep probability that :func:`dropout` realises for ``rate``."""
    return 1.0 - drop_threshold(rate) / _LEVELS


def pcg4d(x, y, z, w):
    """Jarzynski and Olano's (2020) ``pcg4d`` on uint32 arrays; returns the four words."""
    mul, add = jnp.uint32(_LCG_MUL), jnp.uint32(_LCG_ADD)
    x, y, z, w = (lane * mul + add for lane in (x, y, z, w))
    x, y, z, w = _pcg4d_round(x, y, z, w)
    x, y, z, w = (lane ^ (lane >> 16) for lane in (x, y, z, w))
    return _pcg4d_round(x, y, z, w)


def _pcg4d_round(x, y, z, w):
    x = x + y * w
    y = y + z * x
    z = z + x * y
    w = w + y * z
    return x, y, z, w


def _split_axis(shape: tuple[int, ...]) -> int:
    """First axis of the trailing block whose element count stays below 2**32."""
    split, count = len(shape), 1
    while split > 0 and count * shape[split - 1] < _COUNTER_LIMIT:
        split -= 1
        count *= shape[split]
    if math.prod(shape[:split]) >= _COUNTER_LIMIT or (split == len(shape) and shape):
        raise ValueError(
            f"dropout of shape {shape}: the keep mask counts positions in two 32-bit words "
            f"(trailing axes, leading axes) and this shape needs more; split the tensor or "
            f"drop it in parts."
        )
    return split


def _row_major_index(shape: tuple[int, ...], axes: range, index: tuple) -> jax.Array:
    """Row-major index over ``axes`` of ``shape`` for the elements of ``full[index]``: the
    leading ``len(index)`` axes are fixed at ``index``, the others count with iota."""
    fixed = len(index)
    block_shape = shape[fixed:]
    out = jnp.zeros(block_shape, jnp.uint32)
    for axis in axes:
        if axis < fixed:
            coordinate = jnp.asarray(index[axis]).astype(jnp.uint32)
        else:
            coordinate = lax.broadcasted_iota(jnp.uint32, block_shape, axis - fixed)
        out = out * jnp.uint32(shape[axis]) + coordinate
    return out


def key_words(rng: jax.Array) -> jax.Array:
    """The two uint32 words ``[k0, k1]`` that a key contributes to every mask it makes."""
    return jax.random.bits(rng, (2,), jnp.uint32)


def keep_mask_from_words(
    words: jax.Array, rate: float, shape: tuple[int, ...], index: tuple = ()
) -> jax.Array:
    """``keep_mask(rng, rate, shape)[index]`` from ``words = key_words(rng)``, computing
    only that block: ``index`` fixes the leading axes (Python or traced integers), so a
    loop over blocks of a tensor draws exactly the mask of the whole tensor."""
    shape = tuple(int(n) for n in shape)
    split = _split_axis(shape)
    lo = _row_major_index(shape, range(split, len(shape)), index)
    hi = _row_major_index(shape, range(split), index)
    word = pcg4d(lo, hi, words[0], words[1])[3]
    return word >= jnp.uint32(drop_threshold(rate))


def keep_mask(rng: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
    """Boolean keep mask: True with probability :func:`keep_probability` per element."""
    return keep_mask_from_words(key_words(rng), rate, shape)


def dropout(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """``x / keep_probability`` where kept, 0 elsewhere; ``x`` itself at rate 0."""
    threshold = drop_threshold(rate)
    if threshold == 0:
        return x
    keep = keep_mask(rng, rate, x.shape)
    scale = jnp.asarray(1.0 / keep_probability(rate), x.dtype)
    return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))


class Dropout(nn.Module):
    """``flax.linen.Dropout`` with :func:`dropout`'s hashed mask (same "dropout" rng stream)."""

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if deterministic or drop_threshold(self.rate) == 0:
            return x
        return dropout(x, self.rate, self.make_rng("dropout"))


__all__ = [
    "Dropout",
    "drop_threshold",
    "dropout",
    "keep_mask",
    "keep_mask_from_words",
    "keep_probability",
    "key_words",
    "pcg4d",
]
