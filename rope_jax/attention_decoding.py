"""Incremental decoding and cross-attention for ``attention_layer.MultiHeadAttention``.

Functions of the bound layer (``layer``): they create and update its "cache" and
"cross_cache" variables and call its kernel through ``layer.attend`` / ``layer.kernel_kwargs``.
Which path a kernel takes follows its ``KernelSpec``: a recurrent form advances a state
token by token; otherwise a key/value cache of every position is attended with a full mask.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from rope_jax.attention import masks
from rope_jax.projections import fused_projections


def slot_starts(index, ndim: int, axis: int = 1) -> tuple:
    """Start indices ``(0, .., index, .., 0)`` for ``lax.dynamic_(update_)slice`` at ``axis``.

    Every start takes the dtype of ``index`` (the int32 cache counter): a bare Python ``0``
    next to it becomes int64 under ``JAX_ENABLE_X64=1``, and XLA rejects start indices of
    mixed types.
    """
    index = jnp.asarray(index)
    zero = jnp.zeros((), index.dtype)
    return tuple(index if dim == axis else zero for dim in range(ndim))


def cached_decode(layer, q_BTHD, k_BTHD, v_BTHD, mask, kv_valid_BT, bias):
    """Writes the new keys/values into the cache and attends to all filled slots.

    At init the cache is created with the length of the given inputs (the maximum decode
    length); later calls may pass any number of new tokens T (a prompt, then 1 at a time).
    ``mask``/``bias`` then cover the whole cache: ``[B|1, 1|H, T, S_max]``.

    A kernel with a heads-major form (``KernelSpec.heads_major_fn``: softmax) and no RoPE
    inside the kernel keeps its cache heads-major, keys ``[B, H, D, S]`` and values
    ``[B, H, S, D]``, the layouts its batched dots read (as the cross-attention cache does).
    A ``[B, S, H, D]`` cache is transposed whole at every step, O(S) per token: on CPU the
    eight ``[8, 6, 64, 64]`` copies per token of T5-small's greedy decoding took about 7 %
    of the decoding loop. Other kernels keep ``[B, S, H, D]``.
    """
    initialized = layer.has_variable("cache", "cached_key")
    batch, length, heads, head_dim = k_BTHD.shape
    dtype = layer.config.compute_dtype
    heads_major = _heads_major_cache(layer)
    key_shape = (batch, heads, head_dim, length) if heads_major else k_BTHD.shape
    value_shape = (batch, heads, length, head_dim) if heads_major else v_BTHD.shape
    cached_key = layer.variable("cache", "cached_key", jnp.zeros, key_shape, dtype)
    cached_value = layer.variable("cache", "cached_value", jnp.zeros, value_shape, dtype)
    cached_valid = layer.variable("cache", "cached_valid", jnp.zeros, (batch, length), bool)
    cache_index = layer.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    if not initialized:
        return layer.attend(q_BTHD, k_BTHD, v_BTHD, mask, kv_valid_BT, bias, None, None)
    if not layer.spec.traits.full_mask:
        raise ValueError(
            f"{layer.kernel_name} attention has no recurrent form and takes no full mask, so "
            f"it cannot decode from a key/value cache; use it in the encoder only."
        )
    index = cache_index.value
    new_valid_BT = (
        jnp.ones((batch, length), bool) if kv_valid_BT is None else kv_valid_BT.astype(bool)
    )
    if heads_major:
        new_key, key_starts = jnp.einsum("BTHD->BHDT", k_BTHD), slot_starts(index, 4, axis=3)
        new_value, value_starts = jnp.einsum("BTHD->BHTD", v_BTHD), slot_starts(index, 4, axis=2)
    else:
        new_key, key_starts = k_BTHD, slot_starts(index, 4)
        new_value, value_starts = v_BTHD, slot_starts(index, 4)
    cached_key.value = lax.dynamic_update_slice(cached_key.value, new_key.astype(dtype), key_starts)
    cached_value.value = lax.dynamic_update_slice(
        cached_value.value, new_value.astype(dtype), value_starts
    )
    cached_valid.value = lax.dynamic_update_slice(
        cached_valid.value, new_valid_BT, slot_starts(index, 2)
    )
    cache_index.value = index + length
    max_length = cached_valid.value.shape[1]
    # Unwritten slots are still False in cached_valid. The caller's mask says which
    # written slots each query sees (causal, prefix LM); plain causal if none is given.
    cache_mask = cached_valid.value[:, None, None, :]
    if mask is None and layer.causal:
        slot_S = jnp.arange(max_length)
        mask = (slot_S[None, :] <= index + jnp.arange(length)[:, None])[None, None]
    full_mask = masks.combine_masks(mask, cache_mask)
    kwargs = layer.kernel_kwargs(length, max_length, q_offset=index)
    fn = layer.spec.heads_major_fn if heads_major else layer.spec.fn
    return fn(q_BTHD, cached_key.value, cached_value.value, mask=full_mask, bias=bias, **kwargs)


def _heads_major_cache(layer) -> bool:
    """Whether the self-attention cache is kept heads-major (see :func:`cached_decode`)."""
    if layer.spec.heads_major_fn is None:
        return False
    return not (layer.use_rope and layer.spec.traits.rope == "kernel")


def recurrent_decode(layer, q_BTHD, k_BTHD, v_BTHD, positions_BT, kv_valid_BT):
    """Advances the kernel's recurrent state (``KernelSpec.recurrent``) over the T new
    tokens; equal to the causal kernel, position by position."""
    cfg, form = layer.config, layer.spec.recurrent
    batch, length = q_BTHD.shape[:2]
    call_kwargs = layer.kernel_kwargs(1, 1, q_positions=positions_BT, kv_positions=positions_BT)
    init_kwargs = {name: call_kwargs[name] for name in form.init_arguments}
    step_kwargs = {name: call_kwargs[name] for name in form.step_arguments}
    if "rope" in call_kwargs:
        step_kwargs["rope"] = call_kwargs["rope"]
    initialized = layer.has_variable("cache", "state")
    state = layer.variable(
        "cache",
        "state",
        lambda: form.init(batch, cfg.num_heads, cfg.head_dim, cfg.head_dim, **init_kwargs),
    )
    if not initialized:
        return layer.attend(q_BTHD, k_BTHD, v_BTHD, None, None, None, positions_BT, positions_BT)
    if positions_BT is None:
        positions_BT = jnp.zeros((batch, length), jnp.int32)
    positions_BT = jnp.broadcast_to(positions_BT, (batch, length))
    if kv_valid_BT is None:
        kv_valid_BT = jnp.ones((batch, length), bool)

    def body(carry, inputs):
        q_t, k_t, v_t, position_t, valid_t = inputs
        carry, out_t = form.step(
            carry,
            q_t[:, None],
            k_t[:, None],
            v_t[:, None],
            mask=valid_t[:, None, None, None],
            position=position_t,
            **step_kwargs,
        )
        return carry, out_t[:, 0]

    time_major = [
        jnp.moveaxis(a, 1, 0)
        for a in (q_BTHD, k_BTHD, v_BTHD, positions_BT, kv_valid_BT.astype(bool))
    ]
    new_state, out_TBHD = lax.scan(body, state.value, time_major)
    state.value = new_state
    return jnp.moveaxis(out_TBHD, 0, 1).astype(q_BTHD.dtype)


def cross_attention(
    layer, q_BTHD, x_kv_BSE, mask, kv_valid_BS, segment_ids, kv_segment_ids, deterministic, decode
):
    """Cross-attention of the (scaled) queries to ``x_kv`` or to the stored encoder keys."""
    cross_cache = read_cross_cache(layer) if decode else None
    if cross_cache is not None and layer.spec.heads_major_fn is not None:
        return cached_cross(layer, q_BTHD, *cross_cache, mask)
    if cross_cache is not None:
        k_BHDS, v_BHSD = cross_cache
        k_BSHD, v_BSHD = jnp.einsum("BHDS->BSHD", k_BHDS), jnp.einsum("BHSD->BSHD", v_BHSD)
    else:
        k_BSHD, v_BSHD = cross_keys_values(layer, x_kv_BSE, decode)
    q_offset = cross_query_offset(layer, q_BTHD.shape[1]) if decode else 0
    if q_BTHD.shape[0] != k_BSHD.shape[0]:
        return grouped_cross(layer, q_BTHD, k_BSHD, v_BSHD, mask, kv_valid_BS, q_offset)
    return layer.attend(
        q_BTHD, k_BSHD, v_BSHD, mask, kv_valid_BS, None, None, None,
        q_offset=q_offset,
        deterministic=deterministic or decode,
        segment_ids=None if decode else segment_ids,
        kv_segment_ids=None if decode else kv_segment_ids,
    )  # fmt: skip


def _groups(layer, rows, kv_rows):
    if rows % kv_rows:
        raise ValueError(
            f"{layer.name}: {rows} query rows cannot share {kv_rows} encoder rows; the "
            f"decoder batch must be a multiple of the encoder batch (beam rows b * K + k)."
        )
    return rows // kv_rows


def grouped_cross(layer, q_RTHD, k_BSHD, v_BSHD, mask, kv_valid_BS, q_offset):
    """Cross-attention of ``R = B * G`` query rows to ``B`` encoder rows (beam search).

    Query row ``b * G + g`` belongs to encoder row ``b`` (``jnp.repeat`` order, as
    ``decoding.beam_search`` expands rows). A kernel whose queries are independent
    (``KernelTraits.independent_queries``) attends the ``G`` rows of one encoder row as
    ``G * T`` queries of one row: the same result without repeating the encoder keys/values
    ``G`` times. Other kernels (Nystrom landmarks are means over the queries; the random
    synthesizer's logits depend on the query slot) get the keys, values and masks repeated.
    """
    rows, length, heads, head_dim = q_RTHD.shape
    kv_rows = k_BSHD.shape[0]
    group = _groups(layer, rows, kv_rows)
    if layer.spec.traits.independent_queries:
        q_BGHD = q_RTHD.reshape(kv_rows, group * length, heads, head_dim)
        out_BGHD = layer.attend(q_BGHD, k_BSHD, v_BSHD, mask, kv_valid_BS, None, None, None)
        return out_BGHD.reshape(rows, length, heads, head_dim)

    def repeat(x):
        if x is None or x.ndim == 0 or x.shape[0] != kv_rows:
            return x
        return jnp.repeat(x, group, axis=0)

    k_RSHD, v_RSHD, mask, kv_valid_RS = (repeat(x) for x in (k_BSHD, v_BSHD, mask, kv_valid_BS))
    return layer.attend(
        q_RTHD, k_RSHD, v_RSHD, mask, kv_valid_RS, None, None, None, q_offset=q_offset
    )


def cross_query_offset(layer, length):
    """Decoder slot of the first new query, for kernels whose weights depend on it
    (``KernelTraits.slot_weights``: a ``[H, T, S]`` table indexed by the query's slot);
    other kernels need no count (and get no cache entry)."""
    if not layer.spec.traits.slot_weights:
        return 0
    initialized = layer.has_variable("cache", "cross_query_index")
    index = layer.variable("cache", "cross_query_index", lambda: jnp.zeros((), jnp.int32))
    if not initialized:
        return 0
    offset = index.value
    index.value = offset + length
    return offset


def cross_keys_values(layer, x_kv, decode: bool):
    """Cross-attention keys and values ``[B, S, H, D]``; stored in "cross_cache" when
    decoding with that collection mutable.

    The encoder output is the same at every decoding step, so its key/value projections
    are computed once before the loop (``EncoderDecoderTask.encode_for_decoding`` applies
    the decoder with ``mutable=["cross_cache"]``, which stores them here) and then read
    each step (:func:`read_cross_cache`) from a collection that is not mutable: they stay
    loop constants instead of being carried, copied and (in beam search) repeated and
    reordered per step. Stored heads-major, keys ``[B, H, D, S]`` and values ``[B, H, S,
    D]``, the layouts of ``softmax_attention_heads_major``. A decode call without that
    collection computes them from ``x_kv`` (Hugging Face's Flax T5 does that at every step).
    """
    k_BSHD, v_BSHD = fused_projections(x_kv, [layer.key, layer.value])
    if decode and layer.is_mutable_collection("cross_cache"):
        dtype = layer.config.compute_dtype
        layer.put_variable("cross_cache", "key", jnp.einsum("BSHD->BHDS", k_BSHD).astype(dtype))
        layer.put_variable("cross_cache", "value", jnp.einsum("BSHD->BHSD", v_BSHD).astype(dtype))
    return k_BSHD, v_BSHD


def read_cross_cache(layer):
    """``(k_BHDS, v_BHSD)`` from "cross_cache", or None."""
    if layer.has_variable("cross_cache", "key"):
        return layer.get_variable("cross_cache", "key"), layer.get_variable("cross_cache", "value")
    return None


def cached_cross(layer, q_RTHD, k_BHDS, v_BHSD, mask):
    """The kernel's heads-major form on the stored keys/values; ``R = B * G`` query rows
    (beam search) are attended as ``G * T`` queries of their encoder row, as in
    :func:`grouped_cross` (heads-major forms are of kernels with independent queries)."""
    rows, length, heads, head_dim = q_RTHD.shape
    kv_rows = k_BHDS.shape[0]
    group = _groups(layer, rows, kv_rows)
    q_BGHD = q_RTHD.reshape(kv_rows, group * length, heads, head_dim)
    out_BGHD = layer.spec.heads_major_fn(
        q_BGHD, k_BHDS, v_BHSD, mask=mask, **layer.kernel_kwargs(0, 0)
    )
    return out_BGHD.reshape(rows, length, heads, head_dim)
