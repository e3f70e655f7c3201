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

Packed rows (``run_ids``, see ``segments``): a query sees only keys of its own run.
Causal: the prefix sums restart at every run start, including one in the middle of a chunk
(the in-chunk product is masked to the same run, and the carried state is tagged with the run
it belongs to: a query reads it only if it is that run's). The shift then restarts too (a
running maximum per run), so nothing of one example scales another. Bidirectional: see
``bidirectional``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rope_jax.attention import _inputs, segments

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


def rope_before_features(q_BTHD, k_BSHD, q_positions, kv_positions, rope):
    """q and k rotated when ``rope.recipe == "input"`` (RoPE before the feature map)."""
    if rope is None or rope.recipe != "input":
        return q_BTHD, k_BSHD
    return _inputs.rotate(q_BTHD, q_positions, rope), _inputs.rotate(k_BSHD, kv_positions, rope)


def numerator_features(query_features, key_features, q_positions, kv_positions, rope):
    """The features of the numerator: rotated when ``rope.recipe == "feature"`` (RoFormer
    eq. (19); the denominator keeps the unrotated ones), else the features themselves."""
    if rope is None or rope.recipe != "feature":
        return query_features, key_features
    return (
        rotate_features(query_features, q_positions, rope),
        rotate_features(key_features, kv_positions, rope),
    )


def bidirectional(
    num_q_BTHM,
    num_k_BSHM,
    den_q_BTHM,
    den_k_BSHM,
    v_BSHD,
    run_ids_BL=None,
    chunk_size=64,
    query_valid_BL=None,
):
    """Non-causal ``D^-1 phi(Q) (phi(K)^T V)``, float32 ``[B, T, H, D]``.

    With ``run_ids_BL`` (self-attention of a packed row, T == S) each query sums over the
    keys of its own run only (``segmented_bidirectional``); padding must form runs of its
    own whose keys arrive with zero features, so its queries return zeros. With
    ``query_valid_BL`` (False on padding) rows holding at most one run of valid queries
    (rows that are padded, not packed) take the plain sums instead, which give the same
    result at about half the cost (``lax.cond`` picks the form at run time).
    """
    if run_ids_BL is not None:
        segmented = functools.partial(segmented_bidirectional, chunk_size=chunk_size)
        operands = (num_q_BTHM, num_k_BSHM, den_q_BTHM, den_k_BSHM, v_BSHD, run_ids_BL)
        if query_valid_BL is None:
            return segmented(*operands)
        runs_per_row_B = jnp.sum(segments.run_starts(run_ids_BL) & query_valid_BL, axis=1)

        def plain(num_q, num_k, den_q, den_k, v, run_ids):
            del run_ids
            out_BTHD = bidirectional(num_q, num_k, den_q, den_k, v)
            return jnp.where(query_valid_BL[:, :, None, None], out_BTHD, 0.0)

        return jax.lax.cond(jnp.all(runs_per_row_B <= 1), plain, segmented, *operands)
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


def _pad_length(x_BL, padded, mode="constant"):
    return jnp.pad(x_BL, [(0, 0), (0, padded)] + [(0, 0)] * (x_BL.ndim - 2), mode=mode)


def _masked_exp(exponent, keep):
    """``exp(exponent)`` where ``keep``, exactly 0 elsewhere (masked before exp, so a large
    exponent of a pair that does not count can never overflow)."""
    return jnp.exp(jnp.where(keep, exponent, -jnp.inf))


def causal(
    num_q_BLHM,
    num_k_BLHM,
    den_q_BLHM,
    den_k_BLHM,
    v_BLHD,
    key_shift_BLH=None,
    chunk_size=64,
    run_ids_BL=None,
):
    """Causal feature-map attention by chunked prefix sums, float32 ``[B, L, H, D]``.

    ``key_shift_BLH`` (optional) is the stabiliser the key features were divided by
    (``exp(-shift)``), non-decreasing within each run; without it the features are used as
    they are. ``run_ids_BL`` (optional, from ``segments.run_ids``): the prefix sums restart
    at every run start.
    """
    batch, length, heads, _ = num_q_BLHM.shape
    chunk_size = max(1, min(chunk_size, length))
    num_chunks = -(-length // chunk_size)
    padded = num_chunks * chunk_size - length
    v_BLHD = v_BLHD.astype(jnp.float32)
    segmented = run_ids_BL is not None
    if key_shift_BLH is None:
        key_shift_BLH = jnp.zeros((batch, length, heads), jnp.float32)
    if not segmented:
        run_ids_BL = jnp.zeros((batch, length), jnp.int32)
    if padded:
        # Padding sits after every real position, so it can influence no real output.
        num_q_BLHM, num_k_BLHM, den_q_BLHM, den_k_BLHM, v_BLHD = (
            _pad_length(x, padded) for x in (num_q_BLHM, num_k_BLHM, den_q_BLHM, den_k_BLHM, v_BLHD)
        )
        key_shift_BLH = _pad_length(key_shift_BLH, padded, mode="edge")
        run_ids_BL = _pad_length(run_ids_BL, padded, mode="edge")

    chunks = tuple(
        _chunked(x, num_chunks, chunk_size)
        for x in (
            num_q_BLHM,
            num_k_BLHM,
            den_q_BLHM,
            den_k_BLHM,
            v_BLHD,
            key_shift_BLH,
            run_ids_BL,
        )
    )
    lower_11TS = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))[None, None]

    def one_chunk(carry, chunk):
        state, state_run_B = carry
        num_q, num_k, den_q, den_k, v, shift_BCH, run_BC = chunk
        # Pair weights exp(shift_s - shift_t) <= 1 for s <= t in t's run; else exactly 0.
        visible_BHTS = lower_11TS
        if segmented:
            same_run_BTS = run_BC[:, :, None] == run_BC[:, None, :]
            visible_BHTS = visible_BHTS & same_run_BTS[:, None]
        shift_BHC = shift_BCH.transpose(0, 2, 1)
        exponent_BHTS = shift_BHC[:, :, None, :] - shift_BHC[:, :, :, None]
        pair_BHTS = _masked_exp(exponent_BHTS, visible_BHTS)
        scores_BHTS = jnp.einsum("BTHM,BSHM->BHTS", num_q, num_k) * pair_BHTS
        numerator_BTHD = jnp.einsum("BHTS,BSHD->BTHD", scores_BHTS, v)
        den_scores_BHTS = jnp.einsum("BTHM,BSHM->BHTS", den_q, den_k) * pair_BHTS
        denominator_BTH = jnp.einsum("BHTS->BTH", den_scores_BHTS)

        # The carried sums hold the keys of run state_run before this chunk.
        reads_BT1 = (run_BC == state_run_B[:, None])[:, :, None]
        carried_BTH = _masked_exp(state.shift[:, None, :] - shift_BCH, reads_BT1)
        numerator_BTHD += jnp.einsum("BTHM,BHMD->BTHD", num_q, state.kv) * carried_BTH[..., None]
        denominator_BTH += jnp.einsum("BTHM,BHM->BTH", den_q, state.ksum) * carried_BTH
        out_BTHD = _inputs.safe_divide(numerator_BTHD, denominator_BTH)

        # New carry: the keys of the run open at the chunk's end (old sums only if that run
        # is the carried one).
        end_run_B = run_BC[:, -1]
        end_shift_BH = shift_BCH[:, -1, :]
        in_end_run_BS1 = (run_BC == end_run_B[:, None])[:, :, None]
        to_end_BCH = _masked_exp(shift_BCH - end_shift_BH[:, None, :], in_end_run_BS1)
        keeps_B1 = (state_run_B == end_run_B)[:, None]
        decay_BH = _masked_exp(state.shift - end_shift_BH, keeps_B1)
        kv = state.kv * decay_BH[:, :, None, None] + jnp.einsum(
            "BSHM,BSH,BSHD->BHMD", num_k, to_end_BCH, v
        )
        ksum = state.ksum * decay_BH[:, :, None] + jnp.einsum("BSHM,BSH->BHM", den_k, to_end_BCH)
        return (FeatureState(kv, ksum, end_shift_BH), end_run_B), out_BTHD

    state = init_feature_state(batch, heads, num_k_BLHM.shape[-1], v_BLHD.shape[-1])
    state = state._replace(shift=key_shift_BLH[:, 0, :])
    # The first chunk's queries read no carried sums (zeros) and, segmented, no run's.
    first_run_B = run_ids_BL[:, 0] if not segmented else jnp.full((batch,), -1, jnp.int32)
    _, out_NBCHD = jax.lax.scan(one_chunk, (state, first_run_B), chunks)
    out_BLHD = jnp.moveaxis(out_NBCHD, 0, 1).reshape((batch, -1, heads, v_BLHD.shape[-1]))
    return out_BLHD[:, :length]


def segmented_bidirectional(
    num_q_BLHM, num_k_BLHM, den_q_BLHM, den_k_BLHM, v_BLHD, run_ids_BL, chunk_size=64
):
    """Bidirectional feature-map attention within runs of a packed row, float32 ``[B, L, H, D]``.

    Query ``t`` sums over all keys of its run. Chunks of ``C`` positions: a block-diagonal
    ``C x C`` product inside each chunk (same-run pairs), plus the keys of the run open at the
    chunk's start from earlier chunks (a forward scan over chunk sums) and of the run open at
    its end from later chunks (a backward scan), each tagged with its run so only that run's
    queries read it. Memory is ``O(L (C + M + D) + (L / C) M D)``, linear in L; no ``L x L``
    matrix. Key features must share one scale within a run (a per-run stabiliser).

    Why this form: a one-hot over segments (``[B, S, G]`` times the features) costs G times
    the unpacked sums and G is not bounded below L; ``jax.ops.segment_sum`` of the per-key
    outer products ``phi(k_s) v_s^T`` materialises ``[B, L, H, M, D]``; prefix-sum
    differences need the running ``[M, D]`` state at every position, the same size. Chunk
    sums keep the state per chunk, not per position, and reuse the causal kernel's blocks.
    """
    batch, length, heads, _ = num_q_BLHM.shape
    value_dim = v_BLHD.shape[-1]
    chunk_size = max(1, min(chunk_size, length))
    num_chunks = -(-length // chunk_size)
    padded = num_chunks * chunk_size - length
    v_BLHD = v_BLHD.astype(jnp.float32)
    if padded:
        # Padded slots form a run of their own (-1) with zero features: they add nothing.
        num_q_BLHM, num_k_BLHM, den_q_BLHM, den_k_BLHM, v_BLHD = (
            _pad_length(x, padded) for x in (num_q_BLHM, num_k_BLHM, den_q_BLHM, den_k_BLHM, v_BLHD)
        )
        run_ids_BL = jnp.pad(run_ids_BL, [(0, 0), (0, padded)], constant_values=-1)
    num_q, num_k, den_q, den_k, v, run_NBC = (
        _chunked(x, num_chunks, chunk_size)
        for x in (num_q_BLHM, num_k_BLHM, den_q_BLHM, den_k_BLHM, v_BLHD, run_ids_BL)
    )

    same_run_NB1TS = (run_NBC[..., :, None] == run_NBC[..., None, :])[:, :, None]
    scores_NBHTS = jnp.einsum("NBTHM,NBSHM->NBHTS", num_q, num_k) * same_run_NB1TS
    numerator_NBCHD = jnp.einsum("NBHTS,NBSHD->NBTHD", scores_NBHTS, v)
    den_scores_NBHTS = jnp.einsum("NBTHM,NBSHM->NBHTS", den_q, den_k) * same_run_NB1TS
    denominator_NBCH = jnp.einsum("NBHTS->NBTH", den_scores_NBHTS)

    def run_sums(run_NB):
        """Per chunk, the sums over its keys that belong to run ``run_NB``."""
        weight_NBC = (run_NBC == run_NB[..., None]).astype(jnp.float32)
        kv_NBHMD = jnp.einsum("NBSHM,NBS,NBSHD->NBHMD", num_k, weight_NBC, v)
        ksum_NBHM = jnp.einsum("NBSHM,NBS->NBHM", den_k, weight_NBC)
        return kv_NBHMD, ksum_NBHM, run_NB

    def carry_along(carry, chunk):
        """Emits the carry before this chunk, then moves it past the chunk."""
        kv, ksum, run_B = carry
        chunk_kv, chunk_ksum, chunk_run_B, entry_run_B = chunk
        keep_B = (run_B == entry_run_B) & (chunk_run_B == entry_run_B)
        new_kv = jnp.where(keep_B[:, None, None, None], kv, 0.0) + chunk_kv
        new_ksum = jnp.where(keep_B[:, None, None], ksum, 0.0) + chunk_ksum
        return (new_kv, new_ksum, chunk_run_B), (kv, ksum, run_B)

    empty = (
        jnp.zeros((batch, heads, num_k.shape[-1], value_dim), jnp.float32),
        jnp.zeros((batch, heads, num_k.shape[-1]), jnp.float32),
        jnp.full((batch,), -2, jnp.int32),
    )
    start_run_NB, end_run_NB = run_NBC[..., 0], run_NBC[..., -1]
    # Forward: the carry leaving chunk n holds the keys of the run open at its end. It keeps
    # the old carry only if the whole chunk continued that run (start run == end run).
    forward_chunks = run_sums(end_run_NB) + (start_run_NB,)
    _, (before_kv, before_ksum, before_run) = jax.lax.scan(carry_along, empty, forward_chunks)
    backward_chunks = run_sums(start_run_NB) + (end_run_NB,)
    _, (after_kv, after_ksum, after_run) = jax.lax.scan(
        carry_along, empty, backward_chunks, reverse=True
    )

    for kv_NBHMD, ksum_NBHM, run_NB in (
        (before_kv, before_ksum, before_run),
        (after_kv, after_ksum, after_run),
    ):
        reads_NBC11 = (run_NBC == run_NB[..., None])[..., None, None]
        numerator_NBCHD += jnp.where(
            reads_NBC11, jnp.einsum("NBCHM,NBHMD->NBCHD", num_q, kv_NBHMD), 0.0
        )
        denominator_NBCH += jnp.where(
            reads_NBC11[..., 0], jnp.einsum("NBCHM,NBHM->NBCH", den_q, ksum_NBHM), 0.0
        )
    out_NBCHD = _inputs.safe_divide(numerator_NBCHD, denominator_NBCH)
    out_BLHD = jnp.moveaxis(out_NBCHD, 0, 1).reshape((batch, -1, heads, value_dim))
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
