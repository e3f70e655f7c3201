"""Float64 numpy references for the attention tests (independent of rope_jax)."""

import numpy as np


def random_qkv(seed, batch=2, length=12, heads=2, head_dim=8, kv_length=None, std=1.0):
    rng = np.random.default_rng(seed)
    kv_length = length if kv_length is None else kv_length
    q = rng.normal(size=(batch, length, heads, head_dim)) * std
    k = rng.normal(size=(batch, kv_length, heads, head_dim)) * std
    v = rng.normal(size=(batch, kv_length, heads, head_dim))
    return q.astype(np.float32), k.astype(np.float32), v.astype(np.float32)


def softmax_attention(q, k, v, mask=None, bias=None, scale=None):
    """Exact attention; rows with no allowed key give zeros. mask/bias broadcast to BHTS."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = np.einsum("bthd,bshd->bhts", q, k) * scale
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    allowed = np.ones(logits.shape, bool) if mask is None else np.broadcast_to(mask, logits.shape)
    logits = np.where(allowed, logits, -np.inf)
    row_max = logits.max(-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.exp(logits - row_max)
    total = weights.sum(-1, keepdims=True)
    weights = weights / np.where(total > 0, total, 1.0)
    return np.einsum("bhts,bshd->bthd", weights, v)


def quadratic_form(scores_bhts, v, numerator_scores_bhts=None):
    """sum_s num_ts v_s / sum_s scores_ts from explicit (already masked) score matrices;
    a query with no key (zero denominator) gets zeros."""
    numerator = scores_bhts if numerator_scores_bhts is None else numerator_scores_bhts
    out = np.einsum("bhts,bshd->bthd", numerator, np.asarray(v, np.float64))
    denominator = scores_bhts.sum(-1).transpose(0, 2, 1)[..., None]
    return np.where(denominator != 0, out / np.where(denominator != 0, denominator, 1.0), 0.0)


def feature_scores(features_q, features_k):
    return np.einsum("bthm,bshm->bhts", features_q, features_k)


def causal_tril(length):
    return np.tril(np.ones((length, length)))


def rope_rotate(x, positions, base=10000.0):
    """Interleaved RoPE (RoFormer eq. (34)) in float64 on [B, L, H, D]; positions [L]."""
    x = np.asarray(x, np.float64)
    dim = x.shape[-1]
    theta = base ** (-np.arange(0, dim, 2) / dim)
    angles = np.asarray(positions, np.float64)[:, None] * theta[None, :]
    cos, sin = np.cos(angles)[None, :, None, :], np.sin(angles)[None, :, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def relative_error(approx, exact):
    approx, exact = np.asarray(approx, np.float64), np.asarray(exact, np.float64)
    return float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))
