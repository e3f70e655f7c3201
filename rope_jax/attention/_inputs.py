"""Argument checks shared by the attention kernels (shapes, key-padding masks, RoPE)."""

from __future__ import annotations

import jax.numpy as jnp

from rope_jax.positions import apply_rope


def check_qkv(name, q_BTHD, k_BSHD, v_BSHD):
    """Raises a ValueError naming the kernel unless q, k, v follow ``[B, L, H, D]``."""
    if q_BTHD.ndim != 4 or k_BSHD.ndim != 4 or v_BSHD.ndim != 4:
        raise ValueError(
            f"{name}: q, k, v must be [batch, length, heads, head_dim], got shapes "
            f"{q_BTHD.shape}, {k_BSHD.shape}, {v_BSHD.shape}."
        )
    batch, _, heads, head_dim = q_BTHD.shape
    if k_BSHD.shape[0] != batch or k_BSHD.shape[2] != heads or k_BSHD.shape[3] != head_dim:
        raise ValueError(
            f"{name}: k {k_BSHD.shape} must share batch, heads and head_dim with q {q_BTHD.shape}."
        )
    if v_BSHD.shape[:3] != k_BSHD.shape[:3]:
        raise ValueError(
            f"{name}: v {v_BSHD.shape} must share batch, length and heads with k {k_BSHD.shape}."
        )


def default_positions(positions, length):
    """``positions`` as an int array ``[B|1, L]``; ``arange(L)`` when None."""
    if positions is None:
        return jnp.arange(length, dtype=jnp.int32)[None, :]
    positions = jnp.asarray(positions)
    if positions.ndim == 1:
        positions = positions[None, :]
    return positions


def rotate(x_BLHD, positions, rope):
    """RoPE rotation of ``x`` as ``rope`` (a ``RopeSpec``) says; positions default to 0..L-1."""
    positions_BL = default_positions(positions, x_BLHD.shape[1])
    return apply_rope(x_BLHD, positions_BL, base=rope.base, layout=rope.layout, scale=rope.scale)


def step_positions(name, position, rope, batch):
    """Position of a single decoding step as ``[B, 1]`` (or None without RoPE)."""
    if position is None:
        if rope is not None:
            raise ValueError(f"{name}: rope needs the position of the new token (position=...).")
        return None
    position = jnp.asarray(position).reshape(-1, 1)
    if position.shape[0] not in (1, batch):
        raise ValueError(f"{name}: position must be a scalar, [B] or [B, 1], got {position.shape}.")
    return jnp.broadcast_to(position, (batch, 1))


def key_valid_from_mask(name, mask, batch, q_len, kv_len):
    """Key-validity ``[B, S]`` bool from a key-padding mask broadcastable to ``[B, 1, 1, S]``.

    Kernels that never form the ``[T, S]`` score matrix cannot apply a general mask; a mask
    that varies over heads or over queries (with ``T > 1``) is rejected.
    """
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.ndim != 4:
        raise ValueError(
            f"{name}: mask must be 4-D and broadcastable to [B, 1, 1, S], got shape {mask.shape}."
        )
    if mask.shape[1] != 1 or (mask.shape[2] != 1 and q_len > 1):
        raise ValueError(
            f"{name} accepts only key-padding masks broadcastable to [B, 1, 1, S] (e.g. from "
            f"masks.padding_mask), got shape {mask.shape}. Causal masking is the `causal=True` "
            "argument, packed segments the `segment_ids=` argument; other per-query or per-head "
            "masks (prefix-LM) need softmax attention."
        )
    if mask.shape[0] not in (1, batch) or mask.shape[3] not in (1, kv_len):
        raise ValueError(
            f"{name}: mask shape {mask.shape} does not broadcast to [{batch}, 1, 1, {kv_len}]."
        )
    return jnp.broadcast_to(mask[:, 0, 0, :].astype(bool), (batch, kv_len))


def reject_bias(name, bias):
    if bias is not None:
        raise ValueError(
            f"{name} cannot add an additive bias: it never forms the [T, S] score matrix. "
            "Use softmax attention for T5 relative bias or ALiBi."
        )


def safe_divide(numerator_BTHD, denominator_BTH):
    """``numerator / denominator`` with rows of zero denominator (no valid key) set to 0."""
    positive_BTH = denominator_BTH > 0
    safe_BTH = jnp.where(positive_BTH, denominator_BTH, 1.0)
    return jnp.where(positive_BTH[..., None], numerator_BTHD / safe_BTH[..., None], 0.0)
