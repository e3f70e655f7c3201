"""The two kernels added as one file + one registry entry each: sparse top-k softmax
attention and sliding-window attention, against float64 numpy references (masks, padding,
packed segments, decoding steps == the causal kernel), and the proof that adding them
touched nothing else."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_reference import random_qkv
from attention_reference import softmax_attention as reference_attention
from test_flops import hlo_dot_flops

from rope_jax.attention import KERNELS, padding_mask, segment_mask, softmax_attention
from rope_jax.attention.local import init_state, sliding_window_attention, step
from rope_jax.attention.sparse import sparse_topk_attention
from rope_jax.model_config import ModelConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ float64 references


def reference_topk(q, k, v, top_k, mask=None, bias=None):
    """Explicit Sparse Transformer in float64: logits below the k-th largest visible logit
    of their row become -inf (ties with it stay), then softmax."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bthd,bshd->bhts", q, k) * q.shape[-1] ** -0.5
    if bias is not None:
        logits = logits + bias
    visible = np.ones(logits.shape, bool) if mask is None else np.broadcast_to(mask, logits.shape)
    logits = np.where(visible, logits, -np.inf)
    ranked = -np.sort(-logits, axis=-1)
    kth = ranked[..., min(top_k, logits.shape[-1]) - 1 : min(top_k, logits.shape[-1])]
    keep = visible & (logits >= kth)
    return reference_attention(q, k, v, mask=keep, bias=bias)


def band(length, window, causal):
    t, s = np.arange(length)[:, None], np.arange(length)[None, :]
    near = (t - s >= 0) & (t - s < window) if causal else np.abs(t - s) < window
    return near[None, None]


# ------------------------------------------------------------------ sparse top-k


@pytest.mark.parametrize("top_k", [1, 3, 7])
def test_topk_matches_float64_reference_with_padding_causal_and_bias(top_k):
    q, k, v = random_qkv(0, length=7)
    valid = np.array([[1] * 7, [1] * 4 + [0] * 3])
    bias = np.random.default_rng(1).normal(size=(1, 2, 7, 7))
    mask = padding_mask(valid) & np.tril(np.ones((7, 7), bool))[None, None]
    out = jax.jit(sparse_topk_attention, static_argnames=("top_k", "causal"))(
        q, k, v, top_k=top_k, mask=padding_mask(valid), bias=bias, causal=True
    )
    expected = reference_topk(q, k, v, top_k, mask=np.asarray(mask), bias=bias)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_topk_keeps_ties_with_the_kth_logit():
    """Equal keys give equal logits: top_k=1 then keeps all of them (uniform weights)."""
    q, _, v = random_qkv(2, length=5)
    k = np.broadcast_to(np.ones((1, 1, 2, 8), np.float32), (2, 5, 2, 8))
    out = sparse_topk_attention(q, k, v, top_k=1)
    np.testing.assert_allclose(out, np.broadcast_to(v.mean(1, keepdims=True), v.shape), atol=1e-6)


def test_topk_at_least_the_length_is_softmax_and_keeps_gradients_finite():
    q, k, v = random_qkv(3, length=6)
    valid = np.array([[1] * 6, [0] * 6])  # a fully padded row
    mask = padding_mask(valid)
    np.testing.assert_allclose(
        sparse_topk_attention(q, k, v, top_k=6, mask=mask),
        softmax_attention(q, k, v, mask=mask),
        rtol=1e-6,
        atol=1e-6,
    )
    grads = jax.grad(lambda q: jnp.sum(sparse_topk_attention(q, k, v, top_k=2, mask=mask)))(q)
    assert np.all(np.isfinite(grads)) and np.all(grads[1] == 0)


# ------------------------------------------------------------------ sliding window


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [1, 3, 5, 11, 20])
def test_window_matches_float64_band_reference_with_padding(window, causal):
    q, k, v = random_qkv(4, length=11)
    valid = np.array([[1] * 11, [1] * 8 + [0] * 3])
    out = sliding_window_attention(q, k, v, window=window, causal=causal, mask=padding_mask(valid))
    expected = reference_attention(
        q, k, v, mask=band(11, window, causal) & np.asarray(padding_mask(valid))
    )
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_window_keeps_packed_segments_apart(causal):
    q, k, v = random_qkv(5, length=10)
    segment_ids = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, 0], [1] * 6 + [2] * 4])
    out = sliding_window_attention(q, k, v, window=3, causal=causal, segment_ids=segment_ids)
    mask = band(10, 3, causal) & np.asarray(segment_mask(segment_ids, segment_ids))
    np.testing.assert_allclose(out, reference_attention(q, k, v, mask=mask), rtol=1e-5, atol=1e-5)


def test_window_decoding_steps_equal_the_causal_kernel_and_keep_only_the_window():
    q, k, v = random_qkv(6, length=9)
    valid = np.array([[1] * 9, [1] * 6 + [0] * 3])
    full = sliding_window_attention(q, k, v, window=4, causal=True, mask=padding_mask(valid))
    state = init_state(2, 2, 8, 8, window=4)
    assert state.keys.shape == (2, 4, 2, 8)  # the buffer holds the window, not the length
    outs = []
    for t in range(9):
        key_valid = jnp.asarray(valid[:, t : t + 1, None, None] > 0)
        state, out_t = jax.jit(step)(
            state, q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], mask=key_valid
        )
        outs.append(out_t)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ FLOPs, and nothing else


@pytest.mark.parametrize("name,causal", [("sparse_topk", True), ("sliding_window", True),
                                         ("sliding_window", False)])  # fmt: skip
def test_flop_counts_match_the_compiled_dots(name, causal):
    cfg = ModelConfig(num_heads=2, head_dim=8, window_size=3, sparse_top_k=2)
    spec = KERNELS[name]
    q, k, v = random_qkv(7, length=10)
    fn = spec.bind(cfg)
    hlo = hlo_dot_flops(lambda q, k, v: fn(q, k, v, causal=causal), q, k, v)
    assert spec.flops(cfg, 10, 10, causal) * 2 == hlo  # batch 2


def test_each_new_kernel_is_one_file_and_one_registry_entry():
    """No module but the kernel's own file and the registry names the two kernels or their
    modules: the attention layer, config checks, FLOP counts, ablation grid and docs table
    take them from their registry entries."""
    pattern = re.compile(
        r"sparse_topk|sliding_window|window_size|sparse_top_k|\blocal\.|\bsparse\."
    )
    code = [*ROOT.glob("rope_jax/**/*.py"), *ROOT.glob("configs/*.py")]
    naming = {str(p.relative_to(ROOT)) for p in code if pattern.search(p.read_text())}
    assert naming == {
        "rope_jax/attention/local.py",
        "rope_jax/attention/sparse.py",
        "rope_jax/attention/registry.py",
    }
