"""The documented keep-mask rule of rope_jax.dropout, written with numpy (uint32 wraps)."""

import jax
import jax.numpy as jnp
import numpy as np


def pcg4d(x, y, z, w):
    """Jarzynski and Olano (2020), "Hash Functions for GPU Rendering", JCGT 9(3), pcg4d."""
    v = [
        np.asarray(lane, np.uint32) * np.uint32(1664525) + np.uint32(1013904223)
        for lane in (x, y, z, w)
    ]
    for round_ in range(2):
        v[0] = v[0] + v[1] * v[3]
        v[1] = v[1] + v[2] * v[0]
        v[2] = v[2] + v[0] * v[1]
        v[3] = v[3] + v[1] * v[2]
        if round_ == 0:
            v = [lane ^ (lane >> np.uint32(16)) for lane in v]
    return v


def keep_mask(key, rate, shape):
    """Kept where pcg4d(index, 0, k0, k1)[3] >= round(rate * 2**32), for tensors below
    2**32 elements (the whole row-major index is the low counter)."""
    size = int(np.prod(shape))
    assert size < 2**32
    k0, k1 = np.asarray(jax.random.bits(key, (2,), jnp.uint32))
    index = np.arange(size, dtype=np.uint64).astype(np.uint32)
    zeros = np.zeros(size, np.uint32)
    with np.errstate(over="ignore"):
        word = pcg4d(index, zeros, np.full(size, k0, np.uint32), np.full(size, k1, np.uint32))[3]
    return (word >= round(rate * 2**32)).reshape(shape)
