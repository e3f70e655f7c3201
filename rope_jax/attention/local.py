"""Sliding-window (local) softmax attention (Beltagy et al. 2020, "Longformer", section 3.1;
the causal form with a rolling key/value buffer as in Jiang et al. 2023, "Mistral 7B").

Query ``t`` attends, with exact softmax, to the keys within ``window`` slots of it:
``t - window < s <= t`` when causal (``window`` keys, itself included), ``|t - s| < window``
when bidirectional (``2 window - 1`` keys). Slots are positions in the row; with packed rows
(``segment_ids``) a query also sees only its own segment, so the window is over positions
within the example. Where the papers differ: Longformer's ``w`` is the two-sided width
(``w / 2`` on each side) and Mistral's window lets position ``i`` see ``i - W .. i``
(``W + 1`` keys); here ``window`` is the one-sided reach including the query itself.

Computed in blocks of ``C = min(window, L)`` queries: block ``n`` attends to key blocks
``n - 1, n`` (and ``n + 1`` when bidirectional), so time and memory grow as ``L x window``,
never ``L x L``. Decoding keeps only the last ``window`` keys and values (``init_state`` /
``step``: a ring buffer, written at slot ``count mod window``), so a step costs
``O(window)`` whatever the length decoded.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rope_jax.attention import _inputs, segments
from rope_jax.attention.softmax import masked_softmax


def sliding_window_attention(
    q_BTHD,
    k_BSHD,
    v_BSHD,
    *,
    window,
    mask=None,
    bias=None,
    causal=False,
    scale=None,
    q_positions=None,
    kv_positions=None,
    rope=None,
    segment_ids=None,
):
    """Softmax attention of each query to the keys within ``window`` slots (self-attention).

    Args:
      q_BTHD, k_BSHD, v_BSHD: ``[B, L, H, D]`` (T == S: one sequence).
      window: one-sided reach (>= 1), the query's own slot included.
      mask: key-padding mask broadcastable to ``[B, 1, 1, S]``.
      bias: must be None (no ``T x S`` score matrix is formed).
      causal: keys ``t - window < s <= t``; else ``|t - s| < window``.
      scale: logit scale, ``1 / sqrt(D)`` when None.
      q_positions, kv_positions, rope: RoPE (``RopeSpec``) on q and k first.
      segment_ids: ``[B, L]`` packed-row ids (0 = padding): a query sees its own segment.

    Returns:
      ``[B, T, H, D]`` in q's dtype (float32 logits and softmax); a query with no visible
      key returns zeros.
    """
    name = "sliding_window_attention"
    _inputs.check_qkv(name, q_BTHD, k_BSHD, v_BSHD)
    _inputs.reject_bias(name, bias)
    batch, length, heads, head_dim = q_BTHD.shape
    if k_BSHD.shape[1] != length:
        raise ValueError(f"{name} is self-attention: q and k lengths must match, got "
                         f"{length} and {k_BSHD.shape[1]}.")  # fmt: skip
    if window < 1:
        raise ValueError(f"{name}: window must be >= 1, got {window}.")
    key_valid_BS = _inputs.key_valid_from_mask(name, mask, batch, length, length)
    if key_valid_BS is None:
        key_valid_BS = jnp.ones((batch, length), bool)
    if segment_ids is None:
        segment_BL = jnp.ones((batch, length), jnp.int32)
    else:
        segment_BL = segments.check_segment_ids(name, segment_ids, batch, length)
        key_valid_BS = key_valid_BS & (segment_BL != 0)
    if rope is not None:
        q_BTHD = _inputs.rotate(q_BTHD, q_positions, rope)
        k_BSHD = _inputs.rotate(k_BSHD, kv_positions, rope)
    scale = head_dim**-0.5 if scale is None else scale

    block = min(window, length)
    num_blocks = -(-length // block)
    neighbours = (1, 0) if causal else (1, 1)  # key blocks before / after the query block
    padded = num_blocks * block - length

    def key_blocks(x_BL, fill):
        """``[B, N, K * C, ...]``: for query block n, key blocks n - 1 .. n (+ 1)."""
        pad = [(0, 0), (neighbours[0] * block, padded + neighbours[1] * block)]
        x_BL = jnp.pad(x_BL, pad + [(0, 0)] * (x_BL.ndim - 2), constant_values=fill)
        x_BMC = x_BL.reshape((batch, -1, block) + x_BL.shape[2:])
        spans = [x_BMC[:, i : i + num_blocks] for i in range(sum(neighbours) + 1)]
        x_BNKC = jnp.stack(spans, axis=2)
        return x_BNKC.reshape((batch, num_blocks, -1) + x_BL.shape[2:])

    def query_blocks(x_BL):
        x_BL = jnp.pad(x_BL, [(0, 0), (0, padded)] + [(0, 0)] * (x_BL.ndim - 2))
        return x_BL.reshape((batch, num_blocks, block) + x_BL.shape[2:])

    k_BNSHD, v_BNSHD = key_blocks(k_BSHD, 0), key_blocks(v_BSHD, 0)
    key_valid_BNS = key_blocks(key_valid_BS, False)
    key_segment_BNS = key_blocks(segment_BL, -1)
    q_BNCHD = query_blocks(q_BTHD)
    query_segment_BNC = query_blocks(segment_BL)

    # Slot distance query - key: query i of block n sits at n C + i, key j of its span at
    # (n - 1) C + j, so the distance is C + i - j whatever n is.
    distance_CS = block + jnp.arange(block)[:, None] - jnp.arange(k_BNSHD.shape[2])[None, :]
    if causal:
        near_CS = (distance_CS >= 0) & (distance_CS < window)
    else:
        near_CS = jnp.abs(distance_CS) < window
    visible_BNCS = (
        near_CS[None, None]
        & key_valid_BNS[:, :, None, :]
        & (query_segment_BNC[:, :, :, None] == key_segment_BNS[:, :, None, :])
    )
    logits_BNHCS = jnp.einsum(
        "BNCHD,BNSHD->BNHCS", q_BNCHD, k_BNSHD, preferred_element_type=jnp.float32
    )
    weights_BNHCS = masked_softmax(logits_BNHCS * jnp.float32(scale), visible_BNCS[:, :, None])
    out_BNCHD = jnp.einsum("BNHCS,BNSHD->BNCHD", weights_BNHCS.astype(v_BSHD.dtype), v_BNSHD)
    out_BLHD = out_BNCHD.reshape(batch, num_blocks * block, heads, v_BSHD.shape[-1])
    return out_BLHD[:, :length].astype(q_BTHD.dtype)


class WindowState(NamedTuple):
    """The last ``W`` keys and values of causal decoding (a ring buffer).

    keys, values: ``[B, W, H, D]`` float32; valid: ``[B, W]`` (written and not padding);
    count: int32 scalar, keys written so far (the next goes to slot ``count mod W``).
    """

    keys: jax.Array
    values: jax.Array
    valid: jax.Array
    count: jax.Array


def init_state(batch, heads, head_dim, value_dim, *, window):
    """An empty buffer of ``window`` keys/values for causal ``sliding_window_attention``."""
    return WindowState(
        keys=jnp.zeros((batch, window, heads, head_dim), jnp.float32),
        values=jnp.zeros((batch, window, heads, value_dim), jnp.float32),
        valid=jnp.zeros((batch, window), bool),
        count=jnp.zeros((), jnp.int32),
    )


def step(state, q_t, k_t, v_t, *, mask=None, position=None, rope=None, scale=None):
    """One causal decoding step: writes the new key/value over the oldest, attends to the
    ``window`` keys held; ``(state, out_t [B, 1, H, D])``, equal to ``causal=True``.

    ``mask``: validity of the new key, broadcastable to ``[B, 1, 1, 1]``; ``position`` and
    ``rope`` rotate q and k (needed together); ``scale`` as in the full kernel.
    """
    name = "local.step"
    _inputs.check_qkv(name, q_t, k_t, v_t)
    if q_t.shape[1] != 1:
        raise ValueError(f"{name}: expects one position, q_t [B, 1, H, D], got {q_t.shape}.")
    batch, _, _, head_dim = q_t.shape
    key_valid_B1 = _inputs.key_valid_from_mask(name, mask, batch, 1, 1)
    positions_B1 = _inputs.step_positions(name, position, rope, batch)
    if rope is not None:
        q_t, k_t = _inputs.rotate(q_t, positions_B1, rope), _inputs.rotate(k_t, positions_B1, rope)
    scale = head_dim**-0.5 if scale is None else scale
    window = state.keys.shape[1]
    slot = state.count % window
    new_valid_B = jnp.ones((batch,), bool) if key_valid_B1 is None else key_valid_B1[:, 0]
    keys_BWHD = state.keys.at[:, slot].set(k_t[:, 0].astype(jnp.float32))
    values_BWHD = state.values.at[:, slot].set(v_t[:, 0].astype(jnp.float32))
    valid_BW = state.valid.at[:, slot].set(new_valid_B)
    logits_BHW = jnp.einsum("BHD,BWHD->BHW", q_t[:, 0].astype(jnp.float32), keys_BWHD)
    weights_BHW = masked_softmax(logits_BHW * jnp.float32(scale), valid_BW[:, None, :])
    out_BHD = jnp.einsum("BHW,BWHD->BHD", weights_BHW, values_BWHD)
    state = WindowState(keys_BWHD, values_BWHD, valid_BW, state.count + 1)
    return state, out_BHD[:, None].astype(q_t.dtype)


def forward_flops(cfg, q_len, kv_len, causal):
    """What the blocked kernel computes: ``C = min(window, L)`` queries per block against
    ``2 C`` (causal) or ``3 C`` keys, for ``q k^T`` and ``weights v``."""
    block = min(cfg.window_size, q_len)
    padded = -(-q_len // block) * block
    keys = (2 if causal else 3) * block
    return 4.0 * padded * keys * cfg.num_heads * cfg.head_dim
