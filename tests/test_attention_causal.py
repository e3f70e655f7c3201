"""Every causal kernel: no gradient from later positions; recurrent steps equal the full
causal output."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_reference import random_qkv

from rope_jax.attention import (
    linear_attention,
    linear_init_state,
    linear_step,
    padding_mask,
    performer_attention,
    performer_init_state,
    performer_projection,
    performer_step,
    softmax_attention,
    taylor_attention,
    taylor_init_state,
    taylor_step,
)
from rope_jax.positions import RopeSpec

LENGTH, HEAD_DIM, NUM_FEATURES = 7, 4, 8
PROJECTION = performer_projection(jax.random.PRNGKey(0), NUM_FEATURES, HEAD_DIM)

CAUSAL_KERNELS = {
    "softmax": functools.partial(softmax_attention, causal=True),
    "performer": functools.partial(
        performer_attention, projection=PROJECTION, causal=True, chunk_size=3
    ),
    "performer_relu": functools.partial(
        performer_attention, projection=PROJECTION, causal=True, kernel="relu", chunk_size=3
    ),
    "performer_rope_feature": functools.partial(
        performer_attention, projection=PROJECTION, causal=True, rope=RopeSpec(), chunk_size=3
    ),
    "linear": functools.partial(linear_attention, causal=True, chunk_size=3),
    "taylor": functools.partial(taylor_attention, causal=True, chunk_size=3),
}


@pytest.mark.parametrize("name", sorted(CAUSAL_KERNELS))
def test_no_gradient_flows_from_later_positions(name):
    """For every cut t0: d(sum_{t < t0} r_t . out_t) / d(q, k, v at s >= t0) is exactly 0."""
    q, k, v = random_qkv(0, batch=1, length=LENGTH, heads=1, head_dim=HEAD_DIM)
    mask = padding_mask(np.array([[1, 1, 0, 1, 1, 1, 1]]))
    probe = np.random.default_rng(1).normal(size=(1, LENGTH, 1, HEAD_DIM)).astype(np.float32)

    def probed_output(q, k, v, weights_BT11):
        return jnp.sum(CAUSAL_KERNELS[name](q, k, v, mask=mask) * weights_BT11)

    grad_fn = jax.jit(jax.grad(probed_output, argnums=(0, 1, 2)))
    for cut in range(1, LENGTH):
        before_cut = (np.arange(LENGTH) < cut)[None, :, None, None]
        grads = grad_fn(q, k, v, probe * before_cut)
        for grad in grads:
            grad = np.asarray(grad)
            assert np.all(np.isfinite(grad))
            np.testing.assert_array_equal(grad[:, cut:], 0.0)
        assert np.abs(np.asarray(grads[2][:, :cut])).sum() > 0  # earlier values do matter


def _run_steps(step_fn, state, q, k, v, valid):
    step_fn = jax.jit(step_fn)
    outs = []
    for t in range(q.shape[1]):
        state, out = step_fn(
            state, q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], valid[:, t], t
        )
        outs.append(out)
    return jnp.concatenate(outs, axis=1)


STEP_CASES = {
    "performer": (
        lambda: performer_init_state(2, 2, HEAD_DIM, HEAD_DIM, num_features=NUM_FEATURES),
        lambda s, q, k, v, m, t: performer_step(
            s, q, k, v, projection=PROJECTION, mask=m[:, None, None, None], position=t
        ),
        dict(projection=PROJECTION),
        performer_attention,
    ),
    "performer_relu_rope_input": (
        lambda: performer_init_state(2, 2, HEAD_DIM, HEAD_DIM, num_features=NUM_FEATURES),
        lambda s, q, k, v, m, t: performer_step(
            s,
            q,
            k,
            v,
            projection=PROJECTION,
            kernel="relu",
            mask=m[:, None, None, None],
            position=t,
            rope=RopeSpec(recipe="input"),
        ),
        dict(projection=PROJECTION, kernel="relu", rope=RopeSpec(recipe="input")),
        performer_attention,
    ),
    "performer_rope_feature": (
        lambda: performer_init_state(2, 2, HEAD_DIM, HEAD_DIM, num_features=NUM_FEATURES),
        lambda s, q, k, v, m, t: performer_step(
            s,
            q,
            k,
            v,
            projection=PROJECTION,
            mask=m[:, None, None, None],
            position=t,
            rope=RopeSpec(),
        ),
        dict(projection=PROJECTION, rope=RopeSpec()),
        performer_attention,
    ),
    "linear_rope_feature": (
        lambda: linear_init_state(2, 2, HEAD_DIM, HEAD_DIM),
        lambda s, q, k, v, m, t: linear_step(
            s, q, k, v, mask=m[:, None, None, None], position=t, rope=RopeSpec()
        ),
        dict(rope=RopeSpec()),
        linear_attention,
    ),
    "taylor": (
        lambda: taylor_init_state(2, 2, HEAD_DIM, HEAD_DIM),
        lambda s, q, k, v, m, t: taylor_step(s, q, k, v, mask=m[:, None, None, None]),
        {},
        taylor_attention,
    ),
}


@pytest.mark.parametrize("name", sorted(STEP_CASES))
def test_recurrent_steps_reproduce_the_causal_output(name):
    init, step_fn, kwargs, full_fn = STEP_CASES[name]
    q, k, v = random_qkv(1, length=LENGTH, head_dim=HEAD_DIM, std=1.5)
    valid = np.array([[1] * LENGTH, [0, 1, 1, 0, 1, 1, 1]], bool)
    full_fn = jax.jit(functools.partial(full_fn, causal=True, chunk_size=3, **kwargs))
    full = full_fn(q, k, v, mask=padding_mask(valid))
    stepped = _run_steps(step_fn, init(), q, k, v, valid)
    np.testing.assert_allclose(stepped, full, rtol=1e-5, atol=1e-5)
