"""Packed rows for feature-map attention: segment runs, segmented maxima, cross-stream merge.

A packed row holds several examples one after the other; ``segment_ids [B, L]`` number them
(1, 2, ... in order, 0 = padding), as T5's packing (seqio ``trim_and_pack``) and
``rope_jax.data.packing`` produce them. The feature-map kernels never form the ``[T, S]``
score matrix, so they cannot apply ``masks.segment_mask``; they take the segment ids instead
and work on *runs*: maximal stretches of equal ids along the row. ``run_ids`` gives every
run a distinct number, so "same run" is a plain equality test even when an id value recurs.
For rows built by a packer (each example one contiguous stretch) a run is a segment, and the
result equals ``segment_mask``'s.

Cross-attention between two packed streams (a T5 decoder row reading its encoder row) needs
segment *ids* to match across the two rows, which runs cannot express. ``merge_streams``
puts keys and queries of both rows into one sequence ordered by segment id (a stable sort),
where each id is one run; bidirectional attention over that sequence's runs is the
cross-attention, read back at the query slots by ``MergedStreams.split``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rope_jax.attention import _inputs


def check_segment_ids(name, segment_ids, batch, length, what="segment_ids"):
    """``segment_ids`` as int32 ``[B, L]`` (broadcast over a batch of 1); a clear error else."""
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.ndim != 2 or segment_ids.shape[0] not in (1, batch):
        raise ValueError(
            f"{name}: {what} must be [batch, length] = [{batch}, {length}], got shape "
            f"{segment_ids.shape}."
        )
    if segment_ids.shape[1] != length:
        raise ValueError(
            f"{name}: {what} has length {segment_ids.shape[1]} but the sequence has {length}."
        )
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"{name}: {what} must be integers, got dtype {segment_ids.dtype}.")
    return jnp.broadcast_to(segment_ids.astype(jnp.int32), (batch, length))


def run_starts(segment_ids_BL):
    """True where a run of equal segment ids begins (position 0 always)."""
    first_B1 = jnp.ones_like(segment_ids_BL[:, :1], bool)
    return jnp.concatenate([first_B1, segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]], axis=1)


def run_ids(segment_ids_BL):
    """A distinct int32 number (1, 2, ...) for every run of equal ids along each row."""
    return jnp.cumsum(run_starts(segment_ids_BL).astype(jnp.int32), axis=1, dtype=jnp.int32)


def _segmented_max(values_BLH, resets_BL, reverse):
    """Running maximum along L that restarts where ``resets`` is True (a segmented scan)."""
    resets_BLH = jnp.broadcast_to(resets_BL[:, :, None], values_BLH.shape)

    def combine(earlier, later):
        earlier_max, earlier_reset = earlier
        later_max, later_reset = later
        merged = jnp.where(later_reset, later_max, jnp.maximum(earlier_max, later_max))
        return merged, earlier_reset | later_reset

    maxima, _ = jax.lax.associative_scan(combine, (values_BLH, resets_BLH), reverse=reverse, axis=1)
    return maxima


def running_max_in_runs(values_BLH, run_ids_BL):
    """``max`` of ``values`` over the positions ``<= t`` of t's run (``lax.cummax`` per run)."""
    return _segmented_max(values_BLH, run_starts(run_ids_BL), reverse=False)


def max_over_runs(values_BLH, run_ids_BL):
    """``max`` of ``values`` over the whole run of each position, broadcast to the run."""
    ends_BL = jnp.concatenate(
        [run_ids_BL[:, 1:] != run_ids_BL[:, :-1], jnp.ones_like(run_ids_BL[:, :1], bool)], axis=1
    )
    forward = _segmented_max(values_BLH, run_starts(run_ids_BL), reverse=False)
    backward = _segmented_max(values_BLH, ends_BL, reverse=True)
    return jnp.maximum(forward, backward)


class MergedStreams(NamedTuple):
    """Keys and queries of two packed rows in one sequence sorted by segment id.

    ``q, k, v [B, S + T, H, D]`` hold queries at query slots and keys/values at key slots
    (zeros elsewhere); ``key_valid [B, S + T]`` is False at query slots; ``positions`` holds
    each slot's own position; ``query_slots [B, T]`` says where query ``t`` went.
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    key_valid: jax.Array
    positions: jax.Array
    query_slots: jax.Array

    def split(self, out_BXHD):
        """The outputs at the query slots, ``[B, T, H, D]`` in query order."""
        return jnp.take_along_axis(out_BXHD, self.query_slots[:, :, None, None], axis=1)


def _gather(x_BX, order_BX):
    index = order_BX.reshape(order_BX.shape + (1,) * (x_BX.ndim - 2))
    return jnp.take_along_axis(x_BX, index, axis=1)


def merge_streams(
    q_BTHD, k_BSHD, v_BSHD, q_segment_ids_BT, kv_segment_ids_BS, key_valid_BS, q_pos, kv_pos
):
    """Sorts keys (first) and queries of two packed rows by segment id, stably.

    Each id becomes one run of the merged sequence, whatever order the ids had in either row,
    so bidirectional attention within runs is attention between equal ids. Costs an argsort
    of ``S + T`` ints and gathers of the ``[B, S + T, ...]`` arrays: O(S + T) memory.
    """
    batch, q_len = q_segment_ids_BT.shape
    kv_len = kv_segment_ids_BS.shape[1]
    ids_BX = jnp.concatenate([kv_segment_ids_BS, q_segment_ids_BT], axis=1)
    order_BX = jnp.argsort(ids_BX, axis=1, stable=True)
    slot_of_BX = jnp.argsort(order_BX, axis=1)
    zeros_q = jnp.zeros_like(q_BTHD)
    zeros_k = jnp.zeros((batch, kv_len) + q_BTHD.shape[2:], q_BTHD.dtype)
    zeros_v = jnp.zeros((batch, q_len) + v_BSHD.shape[2:], v_BSHD.dtype)
    is_key_BX = jnp.arange(kv_len + q_len) < kv_len
    valid_BX = jnp.concatenate([key_valid_BS, jnp.zeros((batch, q_len), bool)], axis=1)
    valid_BX = valid_BX & is_key_BX[None, :] & (ids_BX != 0)
    positions_BX = jnp.concatenate(
        [jnp.broadcast_to(kv_pos, (batch, kv_len)), jnp.broadcast_to(q_pos, (batch, q_len))],
        axis=1,
    )
    return MergedStreams(
        q=_gather(jnp.concatenate([zeros_k, q_BTHD], axis=1), order_BX),
        k=_gather(jnp.concatenate([k_BSHD.astype(q_BTHD.dtype), zeros_q], axis=1), order_BX),
        v=_gather(jnp.concatenate([v_BSHD, zeros_v], axis=1), order_BX),
        segment_ids=_gather(ids_BX, order_BX),
        key_valid=_gather(valid_BX, order_BX),
        positions=_gather(positions_BX, order_BX),
        query_slots=slot_of_BX[:, kv_len:],
    )


def self_attention_runs(name, segment_ids, key_valid_BS, batch, q_len, kv_len):
    """``(run_ids, query_valid, key_valid)``, each ``[B, L]``, for self-attention over a
    packed row; positions of segment 0 (padding) are neither valid queries nor valid keys.

    Without ids: ``(None, None, key_valid)`` unchanged.
    """
    if segment_ids is None:
        return None, None, key_valid_BS
    if q_len != kv_len:
        raise ValueError(
            f"{name}: segment_ids alone describe self-attention over one packed row (q and k "
            f"of equal length), got lengths {q_len} and {kv_len}; for cross-attention between "
            "two packed rows pass the keys' ids as kv_segment_ids."
        )
    segment_ids_BL = check_segment_ids(name, segment_ids, batch, q_len)
    not_padding_BL = segment_ids_BL != 0
    key_valid_BS = not_padding_BL if key_valid_BS is None else key_valid_BS & not_padding_BL
    return run_ids(segment_ids_BL), not_padding_BL, key_valid_BS


def cross_attention_by_merge(
    name,
    kernel_fn,
    q_BTHD,
    k_BSHD,
    v_BSHD,
    *,
    key_valid_BS,
    segment_ids,
    kv_segment_ids,
    causal,
    q_positions,
    kv_positions,
):
    """Cross-attention between two packed rows: query t sees the keys with its segment id.

    ``kernel_fn(q, k, v, mask=, segment_ids=, q_positions=, kv_positions=)`` is the kernel
    itself (other arguments bound). It runs bidirectionally over the merged sequence
    (``merge_streams``), and the query slots are read back. Rows that hold one example each
    (both streams padded, not packed) need no merge: when every row of the batch has at most
    one nonzero id, the kernel runs directly with the padding masked (``lax.cond`` picks at
    run time), as fast as without segment ids.
    """
    if causal:
        raise ValueError(
            f"{name}: kv_segment_ids (cross-attention between two packed rows) has no causal "
            "form; causal self-attention over a packed row takes segment_ids only."
        )
    if segment_ids is None:
        raise ValueError(
            f"{name}: kv_segment_ids needs the queries' segment ids too (segment_ids=...)."
        )
    batch, q_len = q_BTHD.shape[:2]
    kv_len = k_BSHD.shape[1]
    q_ids_BT = check_segment_ids(name, segment_ids, batch, q_len)
    kv_ids_BS = check_segment_ids(name, kv_segment_ids, batch, kv_len, what="kv_segment_ids")
    if key_valid_BS is None:
        key_valid_BS = jnp.ones((batch, kv_len), bool)
    q_pos = _inputs.default_positions(q_positions, q_len).astype(jnp.int32)
    kv_pos = _inputs.default_positions(kv_positions, kv_len).astype(jnp.int32)

    def merged_attention(q_BTHD, k_BSHD, v_BSHD):
        merged = merge_streams(
            q_BTHD, k_BSHD, v_BSHD, q_ids_BT, kv_ids_BS, key_valid_BS, q_pos, kv_pos
        )
        out_BXHD = kernel_fn(
            merged.q,
            merged.k,
            merged.v,
            mask=merged.key_valid[:, None, None, :],
            segment_ids=merged.segment_ids,
            q_positions=merged.positions,
            kv_positions=merged.positions,
        )
        return merged.split(out_BXHD)

    def one_example_per_row(q_BTHD, k_BSHD, v_BSHD):
        valid_BS = key_valid_BS & (kv_ids_BS != 0)
        out_BTHD = kernel_fn(
            q_BTHD,
            k_BSHD,
            v_BSHD,
            mask=valid_BS[:, None, None, :],
            segment_ids=None,
            q_positions=q_pos,
            kv_positions=kv_pos,
        )
        return jnp.where((q_ids_BT != 0)[:, :, None, None], out_BTHD, jnp.zeros_like(out_BTHD))

    ids_BX = jnp.concatenate([q_ids_BT, kv_ids_BS], axis=1)
    real_BX = ids_BX != 0
    lowest_B = jnp.min(jnp.where(real_BX, ids_BX, jnp.iinfo(jnp.int32).max), axis=1)
    highest_B = jnp.max(jnp.where(real_BX, ids_BX, jnp.iinfo(jnp.int32).min), axis=1)
    return jax.lax.cond(
        jnp.all(highest_B <= lowest_B),
        one_example_per_row,
        merged_attention,
        q_BTHD,
        k_BSHD,
        v_BSHD,
    )
