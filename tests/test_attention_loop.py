"""Exact attention's loop over heads (``softmax_attention(loop_over_heads=True)``) against
float64 references, the batched form, and the rule that picks it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_reference import random_qkv
from attention_reference import softmax_attention as reference_attention
from dropout_reference import keep_mask as reference_keep_mask

from rope_jax import families
from rope_jax.attention import causal_mask, combine_masks, padding_mask, segment_mask, softmax
from rope_jax.attention import softmax_attention as eager_softmax_attention
from rope_jax.model_config import ModelConfig
from rope_jax.models import build_model

softmax_attention = jax.jit(
    eager_softmax_attention, static_argnames=("causal", "scale", "loop_over_heads")
)
BATCH, HEADS, Q_LEN, KV_LEN = 2, 3, 5, 7


def _masks():
    padding = padding_mask(np.array([[1] * KV_LEN, [1] * 4 + [0] * 3]))
    segments = segment_mask(np.array([[1, 1, 2, 2, 0]]), np.array([[1, 1, 1, 2, 2, 2, 0]]))
    return {
        "none": None,
        "padding [B,1,1,S]": padding,
        "segments [1,1,T,S]": segments,
        "per-row [B,H,T,S] with causal": combine_masks(
            np.random.default_rng(3).random((BATCH, HEADS, Q_LEN, KV_LEN)) > 0.3,
            causal_mask(Q_LEN, KV_LEN, offset=KV_LEN - Q_LEN),
        ),
    }


def _biases():
    rng = np.random.default_rng(4)
    shapes = {
        "none": None,
        "[1,H,T,S]": (1, HEADS, Q_LEN, KV_LEN),
        "[B,H,T,S]": (BATCH, HEADS, Q_LEN, KV_LEN),
        "[B,1,T,S]": (BATCH, 1, Q_LEN, KV_LEN),
        "[H,T,S] (3-D)": (HEADS, Q_LEN, KV_LEN),
        "[1,1,1,S]": (1, 1, 1, KV_LEN),
        "[B,H,T,1]": (BATCH, HEADS, Q_LEN, 1),
    }
    return {
        name: None if shape is None else rng.normal(size=shape).astype(np.float32)
        for name, shape in shapes.items()
    }


def _qkv(seed):
    q, _, _ = random_qkv(seed, batch=BATCH, length=Q_LEN, heads=HEADS)
    _, k, v = random_qkv(seed + 1, batch=BATCH, length=KV_LEN, heads=HEADS)
    return q, k, v


@pytest.mark.parametrize("mask_name", list(_masks()))
@pytest.mark.parametrize("bias_name", list(_biases()))
def test_loop_matches_float64_reference(mask_name, bias_name):
    q, k, v = _qkv(0)
    mask, bias = _masks()[mask_name], _biases()[bias_name]
    out = softmax_attention(q, k, v, mask=mask, bias=bias, loop_over_heads=True)
    expected = reference_attention(
        q, k, v, mask=None if mask is None else np.asarray(mask), bias=bias
    )
    assert out.shape == q.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_loop_with_dropout_draws_the_batched_forms_mask():
    q, k, v = _qkv(1)
    mask = np.asarray(_masks()["padding [B,1,1,S]"])
    bias = _biases()["[B,H,T,S]"]
    rate, key = 0.4, jax.random.key(9)

    def attend(loop):
        return jax.jit(
            lambda q, k, v: eager_softmax_attention(
                q,
                k,
                v,
                mask=mask,
                bias=bias,
                dropout_rate=rate,
                dropout_rng=key,
                loop_over_heads=loop,
            )
        )(q, k, v)

    looped = attend(True)
    np.testing.assert_allclose(looped, attend(False), rtol=1e-6, atol=1e-6)
    # And the documented mask, with numpy: weights * keep / p, then v.
    keep = reference_keep_mask(key, rate, (BATCH, HEADS, Q_LEN, KV_LEN))
    keep_prob = 1.0 - round(rate * 2**32) / 2**32
    q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bthd,bshd->bhts", q64, k64) / np.sqrt(q.shape[-1]) + bias
    logits = np.where(mask, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum("bhts,bshd->bthd", weights * keep / keep_prob, v64)
    np.testing.assert_allclose(looped, expected, rtol=1e-5, atol=1e-6)
    assert (
        np.abs(np.asarray(looped) - reference_attention(q, k, v, mask=mask, bias=bias)).max() > 0.1
    )


def test_loop_gradients_match_plain_autodiff():
    """Reverse mode through the loop (the batched form's derivative) against autodiff of
    the written-out formula, for q, k, v and a per-row bias; forward mode agrees too."""
    q, k, v = _qkv(2)
    mask = jnp.asarray(_masks()["per-row [B,H,T,S] with causal"])
    bias = jnp.asarray(_biases()["[B,1,T,S]"])
    cotangent = jnp.asarray(np.random.default_rng(5).normal(size=q.shape), jnp.float32)

    def plain(q, k, v, bias):
        logits = jnp.einsum("bthd,bshd->bhts", q, k) * q.shape[-1] ** -0.5 + bias
        weights = jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1)
        weights = weights * jnp.any(mask, -1, keepdims=True)
        return jnp.einsum("bhts,bshd->bthd", weights, v)

    def looped(q, k, v, bias):
        return eager_softmax_attention(q, k, v, mask=mask, bias=bias, loop_over_heads=True)

    args = (q, k, v, bias)
    got = jax.jit(jax.grad(lambda *a: jnp.sum(looped(*a) * cotangent), argnums=(0, 1, 2, 3)))(*args)
    want = jax.grad(lambda *a: jnp.sum(plain(*a) * cotangent), argnums=(0, 1, 2, 3))(*args)
    for name, g, w in zip(["q", "k", "v", "bias"], got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=name)
    tangents = tuple(jnp.ones_like(x) * 0.1 for x in args)
    _, got_tangent = jax.jvp(looped, args, tangents)
    _, want_tangent = jax.jvp(plain, args, tangents)
    np.testing.assert_allclose(got_tangent, want_tangent, rtol=1e-4, atol=1e-5)


def test_loop_gives_zeros_for_fully_masked_queries():
    q, k, v = _qkv(3)
    mask = np.ones((BATCH, 1, Q_LEN, KV_LEN), bool)
    mask[0, :, 2, :] = False
    mask[1] = False
    out = softmax_attention(q, k, v, mask=mask, loop_over_heads=True)
    np.testing.assert_array_equal(out[0, 2], 0.0)
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_allclose(out, reference_attention(q, k, v, mask=mask), atol=1e-6)


def test_loop_keeps_bfloat16():
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in _qkv(4))
    out = softmax_attention(q, k, v, mask=causal_mask(Q_LEN, KV_LEN), loop_over_heads=True)
    assert out.dtype == jnp.bfloat16
    expected = reference_attention(
        *(np.asarray(x.astype(jnp.float32)) for x in (q, k, v)),
        mask=np.asarray(causal_mask(Q_LEN, KV_LEN)),
    )
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=0.02, atol=0.03)


def test_loop_keeps_one_score_block_in_memory():
    """XLA's temporary memory of the forward pass: the batched form holds the [B, H, T, S]
    scores (16 MiB here), the loop about two of one head's T x S blocks (1 MiB each)."""
    q, k, v = (jnp.asarray(x) for x in random_qkv(5, batch=4, length=512, heads=4))
    scores_bytes = 4 * 4 * 512 * 512 * 4

    def temp_bytes(loop):
        fn = jax.jit(lambda q, k, v: eager_softmax_attention(q, k, v, loop_over_heads=loop))
        return fn.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(False) >= scores_bytes
    assert temp_bytes(True) <= scores_bytes // 4


def test_default_loops_on_a_one_device_cpu_for_large_score_blocks(monkeypatch):
    by_default = softmax._loop_over_heads_by_default
    # This suite simulates 8 devices: the batched form, whose batch axis may be sharded.
    assert jax.device_count() == 8
    assert not by_default((8, 512, 6, 64), 512)
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    assert by_default((8, 512, 6, 64), 512)  # T5-small's encoder
    assert by_default((1, 2048, 8, 64), 2048)
    assert not by_default((8, 114, 6, 64), 512)  # its cross-attention, 58k scores a head
    assert not by_default((8, 114, 6, 64), 114)
    assert not by_default((1, 512, 1, 64), 512)  # one block: nothing to loop over
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not by_default((8, 512, 6, 64), 512)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")

    # The default reaches the kernel: a loop in the traced program, and the same result.
    q, k, v = random_qkv(6, batch=2, length=256, heads=2)

    def program(loop):
        return jax.make_jaxpr(
            lambda q, k, v: eager_softmax_attention(q, k, v, loop_over_heads=loop)
        )(q, k, v)

    assert "_looped_attention" in str(program(None))
    assert "_looped_attention" not in str(program(False))
    np.testing.assert_allclose(
        softmax_attention(q, k, v), reference_attention(q, k, v), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    "family, position", [("encoder_decoder", "t5_bias"), ("encoder", "rope"), ("decoder", "alibi")]
)
def test_models_give_the_same_logits_with_the_loop(monkeypatch, family, position):
    """Every softmax attention of a model looped (as on a one-device CPU) against batched:
    the masks and biases the layers build (packed segments, per-row positions, causal,
    cross-attention) reach the loop intact."""
    cfg = ModelConfig(
        family=family,
        position=position,
        vocab_size=40,
        d_model=32,
        num_heads=2,
        head_dim=16,
        d_ff=48,
        num_layers=2,
        dropout_rate=0.0,
    )
    task = families.for_model(build_model(cfg))
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 40, (3, 8)).astype(np.int32)
    segments = np.array([[1] * 8, [1] * 5 + [2] * 3, [1] * 6 + [0] * 2], np.int32)
    positions = np.array([list(range(8)), list(range(5)) + list(range(3)), list(range(8))])
    if family == "encoder_decoder":
        batch = {
            "encoder_input_tokens": tokens,
            "encoder_segment_ids": segments,
            "encoder_positions": positions,
            "decoder_input_tokens": tokens[:, ::-1].copy(),
            "decoder_target_tokens": tokens,
            "decoder_segment_ids": segments,
            "decoder_positions": positions,
            "decoder_loss_weights": (segments > 0).astype(np.int32),
        }
    else:
        batch = {
            "input_tokens": tokens,
            "target_tokens": tokens,
            "loss_weights": (segments > 0).astype(np.int32),
            "segment_ids": segments,
            "positions": positions,
        }
    batch = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}
    variables = jax.jit(task.init)(task.init_rngs(jax.random.key(0)), batch)

    def logits(loop):
        monkeypatch.setattr(softmax, "_loop_over_heads_by_default", lambda *_: loop)
        program = jax.jit(task.logits)
        return np.asarray(program(variables, batch)), str(program.lower(variables, batch).as_text())

    looped, looped_text = logits(True)
    batched, batched_text = logits(False)
    assert "while" in looped_text and "while" not in batched_text
    np.testing.assert_allclose(looped, batched, rtol=1e-5, atol=1e-5)


def test_an_array_scale_takes_the_batched_form(monkeypatch):
    """A traced scale (a learned temperature, say) cannot be a constant of the loop's
    derivative rule: the default takes the batched form even where it would loop, and
    forcing the loop says why."""
    monkeypatch.setattr(softmax, "_loop_over_heads_by_default", lambda *_: True)
    q, k, v = _qkv(7)

    def attend(scale, loop=None):
        return eager_softmax_attention(q, k, v, scale=scale, loop_over_heads=loop)

    out = jax.jit(attend)(jnp.float32(0.5))
    np.testing.assert_allclose(out, reference_attention(q, k, v, scale=0.5), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs a Python number as scale"):
        jax.jit(lambda scale: attend(scale, loop=True))(jnp.float32(0.5))
