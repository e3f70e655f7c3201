"""Boolean attention masks, broadcastable to ``[B, H, T, S]`` with True = may attend."""

from __future__ import annotations

import jax.numpy as jnp


def padding_mask(valid_BL):
    """Key-padding mask ``[B, 1, 1, L]`` from a ``[B, L]`` validity array (nonzero = valid).

    Token-id arrays work directly on the encoder side, where id 0 is padding.
    """
    valid_BL = jnp.asarray(valid_BL)
    if valid_BL.ndim != 2:
        raise ValueError(f"padding_mask expects a [B, L] array, got shape {valid_BL.shape}.")
    return (valid_BL != 0)[:, None, None, :]


def causal_mask(q_len, kv_len, offset=0):
    """Causal mask ``[1, 1, T, S]``: query ``t`` may attend key ``s`` iff ``s <= t + offset``.

    ``offset = S - T`` aligns the last query with the last key (queries are the newest
    positions, as in incremental decoding with a cache).
    """
    q_T = jnp.arange(q_len)[:, None]
    kv_S = jnp.arange(kv_len)[None, :]
    return (kv_S <= q_T + offset)[None, None, :, :]


def segment_mask(q_segment_ids_BT, kv_segment_ids_BS):
    """Packed-sequence mask ``[B, 1, T, S]``: attend only within the same segment.

    Segment id 0 marks padding, which neither attends nor is attended to.
    """
    q_segment_ids_BT = jnp.asarray(q_segment_ids_BT)
    kv_segment_ids_BS = jnp.asarray(kv_segment_ids_BS)
    if q_segment_ids_BT.ndim != 2 or kv_segment_ids_BS.ndim != 2:
        raise ValueError(
            "segment_mask expects [B, T] and [B, S] segment ids, got shapes "
            f"{q_segment_ids_BT.shape} and {kv_segment_ids_BS.shape}."
        )
    same_BTS = q_segment_ids_BT[:, :, None] == kv_segment_ids_BS[:, None, :]
    not_padding_BTS = (q_segment_ids_BT[:, :, None] != 0) & (kv_segment_ids_BS[:, None, :] != 0)
    return (same_BTS & not_padding_BTS)[:, None, :, :]


def combine_masks(*masks):
    """Logical AND of boolean masks with broadcasting; ``None`` entries are skipped.

    Returns ``None`` when every argument is ``None``.
    """
    present = [jnp.asarray(mask, dtype=bool) for mask in masks if mask is not None]
    if not present:
        return None
    for mask in present:
        if mask.ndim != 4:
            raise ValueError(
                f"combine_masks expects masks broadcastable as [B, H, T, S] (4-D), got shape "
                f"{mask.shape}."
            )
    combined = present[0]
    for mask in present[1:]:
        combined = jnp.logical_and(combined, mask)
    return combined
