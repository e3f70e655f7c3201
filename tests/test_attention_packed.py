"""Packed rows for the linear-family kernels (performer, linear, taylor): a packed row's
outputs and gradients equal each example run alone, causal and bidirectional, with RoPE in
both recipes; float64 references with an explicit segment mask; stabilisers that stay inside
their segment; cross-attention between two packed rows."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_reference import causal_tril, feature_scores, quadratic_form

from rope_jax.attention import (
    linear_attention,
    performer_attention,
    performer_projection,
    segment_mask,
    taylor_attention,
)
from rope_jax.attention import segments as segments_lib
from rope_jax.positions import RopeSpec

HEADS, HEAD_DIM, NUM_FEATURES, CHUNK = 2, 8, 16, 4
PROJECTION = performer_projection(jax.random.PRNGKey(0), NUM_FEATURES, HEAD_DIM)
KERNELS = {
    "performer": functools.partial(performer_attention, projection=PROJECTION),
    "performer_relu": functools.partial(performer_attention, projection=PROJECTION, kernel="relu"),
    "linear": linear_attention,
    "taylor": taylor_attention,
}
RECIPES = {"feature": RopeSpec(recipe="feature"), "input": RopeSpec(recipe="input")}
# Row 0: segments start mid-chunk (chunks of 4), one spans three chunks, one sits inside a
# chunk, then padding. Row 1: a boundary on a chunk boundary, no padding.
ROW_LENGTHS = ((5, 9, 3), (12, 8))
LENGTH = 20


def _examples(seed):
    """Per row, a list of (q, k, v) ``[1, n, H, D]`` examples of the lengths above."""
    rng = np.random.default_rng(seed)
    return [
        [
            tuple(rng.normal(size=(1, n, HEADS, HEAD_DIM)).astype(np.float32) for _ in range(3))
            for n in lengths
        ]
        for lengths in ROW_LENGTHS
    ]


def _pack(examples, seed):
    """The examples packed into ``[2, LENGTH]`` rows (padding filled with large noise)."""
    rng = np.random.default_rng(seed)
    q, k, v = (
        (5.0 * rng.normal(size=(len(examples), LENGTH, HEADS, HEAD_DIM))).astype(np.float32)
        for _ in range(3)
    )
    segment_ids = np.zeros((len(examples), LENGTH), np.int32)
    positions = np.zeros((len(examples), LENGTH), np.int32)
    slots = []
    for row, row_examples in enumerate(examples):
        start, row_slots = 0, []
        for index, (eq, ek, ev) in enumerate(row_examples):
            n = eq.shape[1]
            q[row, start : start + n], k[row, start : start + n], v[row, start : start + n] = (
                eq[0],
                ek[0],
                ev[0],
            )
            segment_ids[row, start : start + n] = index + 1
            positions[row, start : start + n] = np.arange(n)
            row_slots.append(slice(start, start + n))
            start += n
        slots.append(row_slots)
    return q, k, v, segment_ids, positions, slots


def quick_jit(fn):
    """``jax.jit`` with XLA's backend optimisations off: these programs are tiny and run once,
    so compiling them is nearly all of a test's time (about half of it with this)."""
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


def _value_and_grads(fn, q, k, v, probe, **kwargs):
    """``out`` and the gradients of ``sum(probe * out)`` with respect to q, k, v."""

    def probed(q, k, v):
        out = fn(q, k, v, **kwargs)
        return jnp.sum(out * probe), out

    grads, out = jax.grad(probed, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


def _unpacked(examples):
    """Each example in a row of its own, padded to ``LENGTH`` (what ``pack=False`` gives)."""
    flat = [example for row in examples for example in row]
    rows = [np.zeros((len(flat), LENGTH, HEADS, HEAD_DIM), np.float32) for _ in range(3)]
    valid = np.zeros((len(flat), LENGTH), bool)
    for index, example in enumerate(flat):
        n = example[0].shape[1]
        for row, x in zip(rows, example, strict=True):
            row[index, :n] = x[0]
        valid[index, :n] = True
    return rows, valid


CASES = [
    (kernel, causal, recipe)
    for kernel in ("performer", "linear", "taylor")
    for causal in (False, True)
    for recipe in ("feature", "input")
] + [("performer_relu", False, "input"), ("performer_relu", True, "feature")]


@pytest.mark.parametrize("kernel, causal, recipe", CASES)
def test_packed_row_equals_each_example_alone(kernel, causal, recipe):
    """Outputs and gradients (of a random probe of all outputs) at every example's slots
    equal that example alone in a padded row; gradients at padding are exactly 0. Any
    leak between segments, in either direction, would add to some example's gradient."""
    fn = functools.partial(KERNELS[kernel], causal=causal, rope=RECIPES[recipe], chunk_size=CHUNK)
    examples = _examples(0)
    q, k, v, segment_ids, positions, slots = _pack(examples, 1)
    (alone_q, alone_k, alone_v), alone_valid = _unpacked(examples)
    rng = np.random.default_rng(2)
    probe = rng.normal(size=q.shape).astype(np.float32)
    out, grads = quick_jit(
        lambda q, k, v: _value_and_grads(
            fn,
            q,
            k,
            v,
            probe,
            segment_ids=segment_ids,
            q_positions=positions,
            kv_positions=positions,
        )
    )(q, k, v)
    alone_probe = np.zeros(alone_q.shape, np.float32)
    flat_slots = [(row, slot) for row, row_slots in enumerate(slots) for slot in row_slots]
    for index, (row, slot) in enumerate(flat_slots):
        alone_probe[index, : slot.stop - slot.start] = probe[row, slot]
    alone_out, alone_grads = quick_jit(
        lambda q, k, v: _value_and_grads(fn, q, k, v, alone_probe, mask=alone_valid[:, None, None])
    )(alone_q, alone_k, alone_v)
    for index, (row, slot) in enumerate(flat_slots):
        n = slot.stop - slot.start
        np.testing.assert_allclose(out[row, slot], alone_out[index, :n], rtol=1e-4, atol=1e-5)
        for grad, alone_grad in zip(grads, alone_grads, strict=True):
            np.testing.assert_allclose(grad[row, slot], alone_grad[index, :n], rtol=1e-4, atol=1e-5)
    # Padding (segment 0) neither sees a key (zero output, as segment_mask gives softmax)
    # nor is seen (zero gradient).
    padding = segment_ids == 0
    np.testing.assert_array_equal(np.asarray(out)[padding], 0.0)
    for grad in grads:
        np.testing.assert_array_equal(np.asarray(grad)[padding], 0.0)


def _elu_plus_one(x):
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def _positive_features(x, projection):
    """FAVOR+ features in float64 without any stabiliser (exact arithmetic cancels them)."""
    x = np.asarray(x, np.float64) * x.shape[-1] ** -0.25
    projected = np.einsum("blhd,md->blhm", x, np.asarray(projection, np.float64))
    return np.exp(projected - 0.5 * np.sum(x * x, -1, keepdims=True))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", ["linear", "performer", "taylor"])
def test_packed_row_matches_float64_quadratic_form_with_segment_mask(kernel, causal):
    """Independent reference: the explicit ``[T, S]`` scores (elu + 1 features; unstabilised
    FAVOR+ features; Taylor's ``1 + s + s^2 / 2`` from ``s = q . k / sqrt(D)`` directly)
    times ``segment_mask`` (and the causal triangle), summed in float64."""
    _, _, _, segment_ids, _, _ = _pack(_examples(3), 4)
    rng = np.random.default_rng(5)
    q, k, v = (rng.normal(size=(2, LENGTH, HEADS, HEAD_DIM)).astype(np.float32) for _ in range(3))
    if kernel == "linear":
        scores = feature_scores(_elu_plus_one(q), _elu_plus_one(k))
    elif kernel == "performer":
        scores = feature_scores(
            _positive_features(q, PROJECTION), _positive_features(k, PROJECTION)
        )
    else:
        similarity = np.einsum("bthd,bshd->bhts", q, k).astype(np.float64) * HEAD_DIM**-0.5
        scores = 1.0 + similarity + similarity**2 / 2.0
    out = quick_jit(
        functools.partial(KERNELS[kernel], causal=causal, segment_ids=segment_ids, chunk_size=CHUNK)
    )(q, k, v)
    visible = np.asarray(segment_mask(segment_ids, segment_ids))
    if causal:
        visible = visible * causal_tril(LENGTH)
    np.testing.assert_allclose(out, quadratic_form(scores * visible, v), rtol=2e-5, atol=2e-5)


def _dominant_key(k, row, slot):
    """``k`` with the key at ``(row, slot)`` where the FAVOR+ key exponent ``w . x - |x|^2 / 2``
    (``x = k / d^(1/4)``) peaks: ``x = w`` for the longest projection row ``w``."""
    strongest = np.asarray(PROJECTION)[np.argmax(np.linalg.norm(PROJECTION, axis=-1))]
    k = k.copy()
    k[row, slot] = strongest * HEAD_DIM**0.25
    return k


@pytest.mark.parametrize("causal", [False, True])
def test_performer_stabiliser_stays_in_its_segment(causal):
    """A key that dominates every other (exponent ``|w|^2 / 2`` scaled up) in segment 1 must
    change no bit of segment 2's outputs: a row-wide maximum would divide segment 2's
    features by it (to zero, here). Causal: it changes no earlier output of its own segment
    either (the running maximum restarts per segment and never looks ahead)."""
    q, k, v, segment_ids, positions, slots = _pack(_examples(6), 7)
    k = 0.5 * k  # keys well below the dominant one, whose exponent is |w|^2 / 2
    fn = quick_jit(
        functools.partial(
            KERNELS["performer"],
            causal=causal,
            segment_ids=segment_ids,
            q_positions=positions,
            kv_positions=positions,
            chunk_size=CHUNK,
        )
    )
    first, second = slots[0][1], slots[0][2]  # rows 5..13 and 14..16 of row 0
    base = np.asarray(fn(q, k, v))
    changed = np.asarray(fn(q, _dominant_key(k, 0, first.start + 6), v))
    assert np.all(np.isfinite(changed))
    np.testing.assert_array_equal(changed[0, second], base[0, second])
    np.testing.assert_array_equal(changed[1], base[1])
    if causal:
        np.testing.assert_array_equal(
            changed[0, first.start : first.start + 6], base[0, first.start : first.start + 6]
        )
    assert np.max(np.abs(changed[0, first] - base[0, first])) > 1e-3


@pytest.mark.parametrize("kernel", ["performer", "linear", "taylor"])
def test_cross_attention_between_packed_rows(kernel):
    """Decoder rows (3 examples + padding) reading encoder rows (3 examples + padding) with
    other lengths: each query sees the keys with its segment id, outputs and gradients as
    each pair alone (queries and keys in rows of their own, keys padded and masked)."""
    rng = np.random.default_rng(8)
    q_lengths, kv_lengths, q_len, kv_len = (3, 4, 2), (6, 2, 7), 11, 18

    def row(lengths, total):
        x = (4.0 * rng.normal(size=(1, total, HEADS, HEAD_DIM))).astype(np.float32)
        ids = np.zeros((1, total), np.int32)
        ids[0, : sum(lengths)] = np.repeat(np.arange(1, len(lengths) + 1), lengths)
        x[0, : sum(lengths)] = rng.normal(size=(sum(lengths), HEADS, HEAD_DIM))
        return x, ids

    def unpack(x, lengths, width):
        rows = np.zeros((len(lengths), width, HEADS, HEAD_DIM), np.float32)
        for index, start in enumerate(np.cumsum((0,) + lengths[:-1])):
            rows[index, : lengths[index]] = x[0, start : start + lengths[index]]
        return rows

    (q, q_ids), (k, kv_ids), (v, _) = (
        row(q_lengths, q_len),
        row(kv_lengths, kv_len),
        row(kv_lengths, kv_len),
    )
    probe = rng.normal(size=q.shape).astype(np.float32) * (q_ids != 0)[..., None, None]
    fn = functools.partial(KERNELS[kernel], chunk_size=CHUNK)
    out, grads = quick_jit(
        lambda q, k, v: _value_and_grads(
            fn, q, k, v, probe, segment_ids=q_ids, kv_segment_ids=kv_ids
        )
    )(q, k, v)
    kv_valid = np.arange(max(kv_lengths))[None, :] < np.array(kv_lengths)[:, None]
    alone_out, alone_grads = quick_jit(
        lambda q, k, v: _value_and_grads(
            fn, q, k, v, unpack(probe, q_lengths, max(q_lengths)), mask=kv_valid[:, None, None]
        )
    )(
        unpack(q, q_lengths, max(q_lengths)),
        unpack(k, kv_lengths, max(kv_lengths)),
        unpack(v, kv_lengths, max(kv_lengths)),
    )
    q_valid = np.arange(max(q_lengths))[None, :] < np.array(q_lengths)[:, None]
    np.testing.assert_allclose(
        unpack(np.asarray(out), q_lengths, max(q_lengths))[q_valid],
        np.asarray(alone_out)[q_valid],
        rtol=1e-4,
        atol=1e-5,
    )
    np.testing.assert_array_equal(np.asarray(out)[q_ids == 0], 0.0)
    for grad, alone_grad, lengths, ids in zip(
        grads,
        alone_grads,
        (q_lengths, kv_lengths, kv_lengths),
        (q_ids, kv_ids, kv_ids),
        strict=True,
    ):
        width = max(lengths)
        valid = np.arange(width)[None, :] < np.array(lengths)[:, None]
        np.testing.assert_allclose(
            unpack(np.asarray(grad), lengths, width)[valid],
            np.asarray(alone_grad)[valid],
            rtol=1e-4,
            atol=1e-5,
        )
        np.testing.assert_array_equal(np.asarray(grad)[ids == 0], 0.0)


def test_segment_helpers():
    ids = jnp.array([[1, 1, 2, 2, 2, 1, 0, 0]])
    np.testing.assert_array_equal(segments_lib.run_ids(ids), [[1, 1, 2, 2, 2, 3, 4, 4]])
    values = jnp.array([[3.0, 1.0, 0.0, 5.0, 2.0, -1.0, 7.0, 4.0]])[..., None]
    runs = segments_lib.run_ids(ids)
    np.testing.assert_array_equal(
        quick_jit(segments_lib.running_max_in_runs)(values, runs)[..., 0],
        [[3.0, 3.0, 0.0, 5.0, 5.0, -1.0, 7.0, 7.0]],
    )
    np.testing.assert_array_equal(
        quick_jit(segments_lib.max_over_runs)(values, runs)[..., 0],
        [[3.0, 3.0, 5.0, 5.0, 5.0, -1.0, 7.0, 7.0]],
    )


def test_segment_arguments_are_checked():
    q = np.zeros((2, 6, HEADS, HEAD_DIM), np.float32)
    k = np.zeros((2, 4, HEADS, HEAD_DIM), np.float32)
    ids = np.ones((2, 6), np.int32)
    with pytest.raises(ValueError, match="kv_segment_ids"):
        linear_attention(q, k, k, segment_ids=ids)
    with pytest.raises(ValueError, match="no causal form"):
        linear_attention(q, q, q, causal=True, segment_ids=ids, kv_segment_ids=ids)
    with pytest.raises(ValueError, match="segment_ids must be"):
        taylor_attention(q, q, q, segment_ids=ids[:, :, None])
    with pytest.raises(ValueError, match="length 5"):
        KERNELS["performer"](q, q, q, segment_ids=ids[:, :5])
    with pytest.raises(ValueError, match="integers"):
        linear_attention(q, q, q, segment_ids=ids.astype(np.float32))
