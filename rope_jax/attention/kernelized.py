"""Shared machinery of feature-map ("linearised") attention: ``phi(q) (phi(k)^T v)``.

Kernels (performer, linear, taylor) turn q and k into non-negative features and call these
functions. Each takes numerator and denominator features separately, because RoFormer's
recipe for RoPE in linear attention (Su et al. 2021, eq. (19)) rotates the features in the
numerator only:

    out_t = sum_s <R_t phi(q_t), R_s phi(k_s)> v_s / sum_s <phi(q_t), phi(k_s)>.

Causal attention runs over chunks of ``chunk_size`` positions: a masked ``C x C`` product
inside a chunk, a running ``[M, D]`` state across chunks (``lax.scan``), so memory and time
grow linearly with length and no ``L x L`` matrix is formed.

Stabilised features (FAVOR+) arrive multiplied by ``exp(-shift_s)`` with a per-key
``shift_s`` that never decreases along the sequence and depends only on keys ``<= s``. The
pair ``(t, s)`` is then re-weighted by ``exp(shift_s - shift_t) <= 1``, i.e. every key
feature that query ``t`` sees is scaled by the same ``exp(-shift_t)``, which cancels in
the ratio. This is the running-maximum rescaling of online softmax, applied to random
features: nothing about later positions enters any earlier output.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rope_jax.attention import _inputs

# Shift of a prefix with no valid key yet: finite, so exp(a - b) of two such shifts is 1.
NO_KEY_SHIFT = -1e30


class FeatureState(NamedTuple):
    """Running sums of causal feature-map attention (incremental decoding).

    kv: ``[B, H, M, D]`` sum of ``phi_num(k_s) v_s^T``; ksum: ``[B, H, M]`` sum of
    ``phi_den(k_s)``; shift: ``[B, H]`` the stabiliser both sums are relative to.
    """

    kv: jax.Array
    ksum: jax.Array
    shift: jax.Array


def init_feature_state(batch, heads, num_features, value_dim):
    return FeatureState(
        kv=jnp.zeros((batch, heads, num_features, value_dim), jnp.float32),
        ksum=jnp.zeros((batch, heads, num_features), jnp.float32),
        shift=jnp.full((batch, heads), NO_KEY_SHIFT, jnp.float32),
    )


def rotate_features(features_BLHM, positions, rope):
    """RoPE on the feature axis; with an odd feature count the last feature stays as is."""
    num_features = features_BLHM.shape[-1]
    if num_features % 2 == 0:
        return _inputs.rotate(features_BLHM, positions, rope)
    rotated = _inputs.rotate(features_BLHM[..., :-1], positions, rope)
    return jnp.concatenate([rotated, features_BLHM[..., -1:]], axis=-1)


def bidirectional(num_q_BTHM, num_k_BSHM, den_q_BTHM, den_k_BSHM, v_BSHD):
    """Non-causal ``D^-1 phi(Q) (phi(K)^T V)``, float32 ``[B, T, H, D]``."""
    v_BSHD = v_BSHD.astype(jnp.float32)
    kv_BHMD = jnp.einsum("BSHM,BSHD->BHMD", num_k_BSHM, v_BSHD)
    numerator_BTHD = jnp.einsum("BTHM,BHMD->BTHD", num_q_BTHM, kv_BHMD)
    ksum_BHM = jnp.einsum("BSHM->BHM", den_k_BSHM)
    denominator_BTH = jnp.einsum("BTHM,BHM->BTH", den_q_BTHM, ksum_BHM)
    return _inputs.safe_divide(numerator_BTHD, denominator_BTH)


def _chunked(x_BL, num_chunks, chunk_size):
    """``[B, L, ...] -> [N, B, C, ...]`` (L already padded to N * C)."""
    batch = x_BL.shape[0]
    x_BNC = x_BL.reshape((batch, num_chunks, chunk_size) + x_BL.shape[2:])
    return jnp.moveaxis(x_BNC, 1, 0)


def causal(
    num_q_BLHM, num_k_BLHM, den_q_BLHM, den_k_BLHM, v_BLHD, key_shift_BLH=None, chunk_size=64
):
    """Causal feature-map attention by chunked prefix sums, float32 ``[B, L, H, D]``.

    ``key_shift_BLH`` (optional) is the non-decreasing stabiliser the key features were
    divided by (``exp(-shift)``); without it the features are used as they are.
    """
    batch, length, heads, _ = num_q_BLHM.shape
    chunk_size = max(1, min(chunk_size, length))
    num_chunks = -(-length // chunk_size)
    padded = num_chunks * chunk_size - length
    v_BLHD = v_BLHD.astype(jnp.float32)
    if key_shift_BLH is None:
        key_shift_BLH = jnp.zeros((batch, length, heads), jnp.float32)
    if padded:
        # Padding sits after every real position, so it can influence no real output.
        pad = lambda x: jnp.pad(x, [(0, 0), (0, padded)] + [(0, 0)] * (x.ndim - 2))
        num_q_BLHM, num_k_BLHM, den_q_BLHM, den_k_BLHM, v_BLHD = map(
            pad, (num_q_BLHM, num_k_BLHM, den_q_BLHM, den_k_BLHM, v_BLHD)
        )
        key_shift_BLH = jnp.pad(key_shift_BLH, [(0, 0), (0, padded), (0, 0)], mode="edge")

    chunks = tuple(
        _chunked(x, num_chunks, chunk_size)
        for x in (num_q_BLHM, num_k_BLHM, den_q_BLHM, den_k_BLHM, v_BLHD, key_shift_BLH)
    )
    lower_11TS = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))[None, None]

    def one_chunk(state, chunk):
        num_q, num_k, den_q, den_k, v, shift_BCH = chunk
        # Pair weights exp(shift_s - shift_t) <= 1 for s <= t; exactly 0 above the diagonal.
        shift_BHC = shift_BCH.transpose(0, 2, 1)
        exponent_BHTS = shift_BHC[:, :, None, :] - shift_BHC[:, :, :, None]
        pair_BHTS = jnp.exp(jnp.where(lower_11TS, exponent_BHTS, -jnp.inf))
        scores_BHTS = jnp.einsum("BTHM,BSHM->BHTS", num_q, num_k) * pair_BHTS
        numerator_BTHD = jnp.einsum("BHTS,BSHD->BTHD", scores_BHTS, v)
        den_scores_BHTS = jnp.einsum("BTHM,BSHM->BHTS", den_q, den_k) * pair_BHTS
        denominator_BTH = jnp.einsum("BHTS->BTH", den_scores_BHTS)

        carried_BTH = jnp.exp(state.shift[:, None, :] - shift_BCH)
        numerator_BTHD += jnp.einsum("BTHM,BHMD->BTHD", num_q, state.kv) * carried_BTH[..., None]
        denominator_BTH += jnp.einsum("BTHM,BHM->BTH", den_q, state.ksum) * carried_BTH
        out_BTHD = _inputs.safe_divide(numerator_BTHD, denominator_BTH)

        end_shift_BH = shift_BCH[:, -1, :]
        to_end_BCH = jnp.exp(shift_BCH - end_shift_BH[:, None, :])
        decay_BH = jnp.exp(state.shift - end_shift_BH)
        kv = state.kv * decay_BH[:, :, None, None] + jnp.einsum(
            "BSHM,BSH,BSHD->BHMD", num_k, to_end_BCH, v
        )
        ksum = state.ksum * decay_BH[:, :, None] + jnp.einsum("BSHM,BSH->BHM", den_k, to_end_BCH)
        return FeatureState(kv, ksum, end_shift_BH), out_BTHD

    first_shift_BH = key_shift_BLH[:, 0, :]
    state = init_feature_state(batch, heads, num_k_BLHM.shape[-1], v_BLHD.shape[-1])
    state = state._replace(shift=first_shift_BH)
    _, out_NBCHD = jax.lax.scan(one_chunk, state, chunks)
    out_BLHD = jnp.moveaxis(out_NBCHD, 0, 1).reshape((batch, -1, heads, v_BLHD.shape[-1]))
    return out_BLHD[:, :length]


def step(state, num_q_BHM, num_k_BHM, den_q_BHM, den_k_BHM, v_BHD, new_shift_BH=None):
    """One causal position: adds key ``t`` to the running sums and reads them with query ``t``.

    Key features arrive divided by ``exp(new_shift)``; the old sums are rescaled to it.
    Returns ``(state, out_BHD)`` with a float32 output.
    """
    if new_shift_BH is None:
        new_shift_BH = state.shift
    decay_BH = jnp.exp(state.shift - new_shift_BH)
    kv_BHMD = state.kv * decay_BH[:, :, None, None] + jnp.einsum(
        "BHM,BHD->BHMD", num_k_BHM, v_BHD.astype(jnp.float32)
    )
    ksum_BHM = state.ksum * decay_BH[:, :, None] + den_k_BHM
    numerator_BHD = jnp.einsum("BHM,BHMD->BHD", num_q_BHM, kv_BHMD)
    denominator_BH = jnp.einsum("BHM,BHM->BH", den_q_BHM, ksum_BHM)
    out_BHD = _inputs.safe_divide(numerator_BHD, denominator_BH)
    return FeatureState(kv_BHMD, ksum_BHM, new_shift_BH), out_BHD
