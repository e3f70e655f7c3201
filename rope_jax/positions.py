"""Position encodings as pure functions.

Rotary position embedding (RoPE) follows RoFormer (Su et al. 2021, "RoFormer: Enhanced
Transformer with Rotary Position Embedding"), eq. (13)-(15): dimension pair ``i`` of a head
vector at position ``m`` is rotated by the angle ``m * theta_i`` with
``theta_i = base ** (-2 i / d)``. The other encodings here are the Transformer's sinusoidal
table, T5 relative-position buckets and bias, ALiBi, and the hierarchical extension of a
learned absolute table; each function cites what it follows.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

__all__ = [
    "RopeSpec",
    "alibi_bias",
    "alibi_slopes",
    "apply_rope",
    "check_length",
    "extend_positions_hierarchical",
    "rope_inverse_frequencies",
    "rope_ntk_base",
    "sinusoidal_positions",
    "t5_relative_bias",
    "t5_relative_position_bucket",
]

ROPE_LAYOUTS = ("interleaved", "half")
ROPE_RECIPES = ("feature", "input")


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """How an attention kernel applies RoPE to q and k.

    Attributes:
      base: the ``base`` in ``theta_i = base ** (-2 i / d)``; 10000 in RoFormer.
      layout: which head dimensions form a rotated pair. ``"interleaved"`` pairs
        ``(0, 1), (2, 3), ...`` as RoFormer does; ``"half"`` pairs ``(i, i + d/2)`` as
        GPT-NeoX and LLaMA do.
      scale: position-interpolation factor; positions are MULTIPLIED by it before the
        rotation (Chen et al. 2023, "Extending Context Window of Large Language Models via
        Positional Interpolation", use ``L_train / L_target`` < 1).
      recipe: for linear-family kernels only. ``"feature"`` = RoFormer eq. (19): rotate the
        feature-mapped q and k in the numerator, unrotated features in the denominator;
        ``"input"`` = rotate q and k before the feature map.
    """

    base: float = 10000.0
    layout: str = "interleaved"
    scale: float = 1.0
    recipe: str = "feature"

    def __post_init__(self):
        _check_rope_args(self.base, self.layout, self.scale)
        if self.recipe not in ROPE_RECIPES:
            raise ValueError(f"RopeSpec.recipe must be one of {ROPE_RECIPES}, got {self.recipe!r}.")

    def apply(self, x_BLHD, positions_BL):
        """``apply_rope`` with this spec's base, layout and scale."""
        return apply_rope(
            x_BLHD, positions_BL, base=self.base, layout=self.layout, scale=self.scale
        )


def _check_rope_args(base, layout, scale):
    if layout not in ROPE_LAYOUTS:
        raise ValueError(f"RoPE layout must be one of {ROPE_LAYOUTS}, got {layout!r}.")
    if not float(base) > 1.0:
        raise ValueError(f"RoPE base must be a number > 1, got {base!r}.")
    if not float(scale) > 0.0:
        raise ValueError(f"RoPE scale (position interpolation factor) must be > 0, got {scale!r}.")


def rope_inverse_frequencies(head_dim, base=10000.0):
    """``theta_i = base ** (-2 i / d)`` for ``i = 0 .. d/2 - 1``, float32 ``[D/2]``."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got head_dim={head_dim}.")
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return jnp.asarray(base, jnp.float32) ** (-exponents)


def apply_rope(x_BLHD, positions_BL, *, base=10000.0, layout="interleaved", scale=1.0):
    """Rotates head-dimension pairs of ``x`` by ``(position * scale) * theta_i``.

    Args:
      x_BLHD: ``[B, L, H, D]`` queries or keys, any float dtype; ``D`` must be even.
      positions_BL: integer (or float) positions, ``[B, L]`` or ``[1, L]`` (broadcast over
        the batch); a 1-D ``[L]`` array is treated as ``[1, L]``.
      base: ``theta_i = base ** (-2 i / D)``.
      layout: ``"interleaved"`` rotates pairs ``(2i, 2i+1)`` (RoFormer);
        ``"half"`` rotates pairs ``(i, i + D/2)`` (GPT-NeoX / LLaMA).
      scale: positions are multiplied by ``scale`` (position interpolation, Chen et al.
        2023: ``scale = L_train / L_target``).

    Returns:
      The rotated array, same shape and dtype as ``x_BLHD``. Angles, sines/cosines and the
      rotation itself run in float32.
    """
    _check_rope_args(base, layout, scale)
    if x_BLHD.ndim != 4:
        raise ValueError(f"apply_rope expects x of shape [B, L, H, D], got shape {x_BLHD.shape}.")
    batch, length, _, head_dim = x_BLHD.shape
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got head_dim={head_dim}.")
    positions_BL = jnp.asarray(positions_BL)
    if positions_BL.ndim == 1:
        positions_BL = positions_BL[None, :]
    if (
        positions_BL.ndim != 2
        or positions_BL.shape[1] != length
        or positions_BL.shape[0] not in (1, batch)
    ):
        raise ValueError(
            f"apply_rope positions must have shape [{batch} or 1, {length}] to match x of "
            f"shape {x_BLHD.shape}, got {positions_BL.shape}."
        )

    return _rotate_pairs(x_BLHD, positions_BL, jnp.float32(base), jnp.float32(scale), layout)


@functools.partial(jax.jit, static_argnames=("layout",))
def _rotate_pairs(x_BLHD, positions_BL, base, scale, layout):
    """The rotation of ``apply_rope`` on validated arguments, jitted once per shape/layout."""
    head_dim = x_BLHD.shape[-1]
    exponents_K = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim  # K = D/2 pairs
    inv_freq_K = base ** (-exponents_K)
    scaled_positions_BL = positions_BL.astype(jnp.float32) * scale
    angles_BLK = jnp.einsum("BL,K->BLK", scaled_positions_BL, inv_freq_K)
    cos_BL1K = jnp.cos(angles_BLK)[:, :, None, :]
    sin_BL1K = jnp.sin(angles_BLK)[:, :, None, :]

    x_f32 = x_BLHD.astype(jnp.float32)
    if layout == "interleaved":
        first_BLHK, second_BLHK = x_f32[..., 0::2], x_f32[..., 1::2]
    else:
        first_BLHK, second_BLHK = jnp.split(x_f32, 2, axis=-1)
    rotated_first = first_BLHK * cos_BL1K - second_BLHK * sin_BL1K
    rotated_second = first_BLHK * sin_BL1K + second_BLHK * cos_BL1K
    if layout == "interleaved":
        out_BLHD = jnp.stack([rotated_first, rotated_second], axis=-1).reshape(x_f32.shape)
    else:
        out_BLHD = jnp.concatenate([rotated_first, rotated_second], axis=-1)
    return out_BLHD.astype(x_BLHD.dtype)


def rope_ntk_base(base, head_dim, factor):
    """NTK-aware scaled RoPE base for a context ``factor`` times longer than trained.

    ``base' = base * factor ** (d / (d - 2))`` ("NTK-Aware Scaled RoPE", bloc97, 2023;
    restated as eq. (16) of Peng et al. 2023, "YaRN"). The exponent is chosen so that the
    lowest frequency ``theta_{d/2-1}`` is divided by exactly ``factor`` (it is interpolated
    like position interpolation would) while the highest frequency ``theta_0 = 1`` is left
    untouched (it is extrapolated).
    """
    if head_dim % 2 or head_dim <= 2:
        raise ValueError(f"rope_ntk_base needs an even head_dim > 2, got {head_dim}.")
    if not float(factor) >= 1.0:
        raise ValueError(
            f"rope_ntk_base factor (target length / trained length) must be >= 1, got {factor!r}."
        )
    if not float(base) > 1.0:
        raise ValueError(f"RoPE base must be a number > 1, got {base!r}.")
    return float(base) * float(factor) ** (head_dim / (head_dim - 2))


def sinusoidal_positions(length, dim, *, base=10000.0):
    """Sinusoidal absolute position table of Vaswani et al. 2017, section 3.5, ``[L, E]``.

    ``PE[pos, 2i] = sin(pos / base ** (2i / d))`` and ``PE[pos, 2i + 1] = cos(...)``: the
    paper's interleaved layout (tensor2tensor's ``get_timing_signal_1d`` concatenates all
    sines before all cosines instead; this function follows the paper). Float32.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal_positions needs an even dim, got dim={dim}.")
    if length < 0:
        raise ValueError(f"sinusoidal_positions needs length >= 0, got {length}.")
    inv_freq_K = rope_inverse_frequencies(dim, base)
    angles_LK = jnp.einsum("L,K->LK", jnp.arange(length, dtype=jnp.float32), inv_freq_K)
    return jnp.stack([jnp.sin(angles_LK), jnp.cos(angles_LK)], axis=-1).reshape(length, dim)


def check_length(length, max_length, what):
    """Raises a ValueError when ``length`` positions do not fit a table of ``max_length``.

    ``what`` names the encoding (e.g. ``"learned absolute position embedding"``) so the
    message says which table is too short. Use on static (Python int) lengths.
    """
    if length > max_length:
        raise ValueError(
            f"{what} holds {max_length} positions but a sequence of length {length} was "
            f"given; shorten the input, raise max_length, or extend the table (e.g. "
            f"extend_positions_hierarchical)."
        )


def _as_positions_2d(positions, name):
    positions = jnp.asarray(positions)
    if positions.ndim == 1:
        positions = positions[None, :]
    if positions.ndim != 2:
        raise ValueError(f"{name} must have shape [B or 1, L] (or [L]), got {positions.shape}.")
    return positions


def _relative_positions_BTS(q_positions, kv_positions):
    """``kv_position - q_position`` (T5's ``memory_position - query_position``), ``[B|1, T, S]``."""
    q_BT = _as_positions_2d(q_positions, "q_positions")
    kv_BS = _as_positions_2d(kv_positions, "kv_positions")
    if q_BT.shape[0] != kv_BS.shape[0] and 1 not in (q_BT.shape[0], kv_BS.shape[0]):
        raise ValueError(
            f"q_positions batch {q_BT.shape[0]} and kv_positions batch {kv_BS.shape[0]} do "
            "not broadcast."
        )
    return kv_BS.astype(jnp.int32)[:, None, :] - q_BT.astype(jnp.int32)[:, :, None]


def t5_relative_position_bucket(
    relative_position, *, bidirectional, num_buckets=32, max_distance=128
):
    """T5's bucket of ``relative_position = memory_position - query_position`` (int32).

    Follows Raffel et al. 2020 (section 2.1) and the Mesh TensorFlow reference: with
    ``n = -relative_position``, bidirectional attention spends half of the buckets on each
    sign (``n < 0``, i.e. keys after the query, get the upper half) and uses ``|n|``; causal
    attention clips ``n`` at 0. Of the remaining ``num_buckets`` (halved when
    bidirectional), the first ``max_exact = num_buckets // 2`` are exact distances 0..max_exact-1;
    larger distances are log-spaced up to ``max_distance``:
    ``max_exact + floor(log(n / max_exact) / log(max_distance / max_exact) * (num_buckets -
    max_exact))``, clipped to the last bucket. The log is taken in float32 as the reference.
    """
    if num_buckets < 2 or (bidirectional and num_buckets < 4):
        raise ValueError(f"t5_relative_position_bucket needs more buckets, got {num_buckets}.")
    buckets_per_sign = num_buckets // 2 if bidirectional else num_buckets
    if max_distance <= buckets_per_sign // 2:
        raise ValueError(
            f"t5_relative_position_bucket needs max_distance > {buckets_per_sign // 2} "
            f"(num_buckets={num_buckets}, bidirectional={bidirectional}), got {max_distance}."
        )
    return _t5_bucket(
        jnp.asarray(relative_position, jnp.int32), bidirectional, num_buckets, max_distance
    )


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _t5_bucket(relative_position, bidirectional, num_buckets, max_distance):
    """The bucketing of ``t5_relative_position_bucket`` on validated arguments."""
    n = -relative_position
    bucket = jnp.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    # Keeps log() finite on the exact branch; those entries are discarded by the where.
    n_for_log = jnp.maximum(n, max_exact).astype(jnp.float32)
    log_ratio = jnp.log(n_for_log / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(n < max_exact, n, large)


def t5_relative_bias(
    table_NH, q_positions, kv_positions, *, bidirectional, num_buckets=32, max_distance=128
):
    """T5 relative-position bias ``table[bucket(kv_pos - q_pos)]``, float32 ``[B|1, H, T, S]``.

    ``table_NH`` is the learned ``[num_buckets, heads]`` embedding (shared by all layers of
    a stack in T5). Positions are ``[B|1, T]`` / ``[B|1, S]`` (or 1-D); with packed
    examples pass the per-segment positions, and mask cross-segment pairs separately.
    """
    if table_NH.ndim != 2 or table_NH.shape[0] != num_buckets:
        raise ValueError(
            f"t5_relative_bias table must have shape [num_buckets={num_buckets}, heads], "
            f"got {table_NH.shape}."
        )
    relative_BTS = _relative_positions_BTS(q_positions, kv_positions)
    buckets_BTS = t5_relative_position_bucket(
        relative_BTS,
        bidirectional=bidirectional,
        num_buckets=num_buckets,
        max_distance=max_distance,
    )
    # Its gradient transposes [B, H, T, S] back to [B, T, S, H] for the scatter into the
    # table (89-126 ms of a T5-small step on CPU). A custom gradient that scattered
    # heads-major instead, [H, B*T*S] values in order, was slower in the step (7.41 against
    # 7.17 s, 12 alternating steps); so was a heads-major gather.
    bias_BTSH = jnp.take(table_NH.astype(jnp.float32), buckets_BTS, axis=0)
    return jnp.einsum("BTSH->BHTS", bias_BTSH)


def alibi_slopes(num_heads):
    """ALiBi head slopes (Press et al. 2022, section 3), float32 ``[H]``.

    For ``n`` a power of two: the geometric sequence ``2 ** (-8 k / n)``, ``k = 1..n``
    (8 heads: 1/2, 1/4, ..., 1/256). Otherwise the authors' rule (their reference
    implementation): the slopes of the closest power of two ``p < n``, followed by every
    other slope of ``2p`` heads (its 1st, 3rd, ...), ``n - p`` of them.
    """
    if num_heads < 1:
        raise ValueError(f"alibi_slopes needs num_heads >= 1, got {num_heads}.")

    def power_of_two_slopes(n):
        return [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]

    closest = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = power_of_two_slopes(closest)
    if closest < num_heads:
        slopes += power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    return jnp.asarray(slopes, jnp.float32)


def alibi_bias(num_heads, q_positions, kv_positions, *, causal):
    """ALiBi additive bias (Press et al. 2022), float32 ``[B|1, H, T, S]``.

    ``causal=True``: ``-slope_h * (i - j)`` for keys at or before the query (``j <= i``) and
    0 for later keys, which the causal mask must remove (the bias does not mask).
    ``causal=False`` (symmetric, for bidirectional attention): ``-slope_h * |i - j|``.
    ``i``/``j`` are the given query/key positions, so packed examples with per-segment
    positions are handled like separate sequences.
    """
    slopes_H = alibi_slopes(num_heads)
    distance_BTS = -_relative_positions_BTS(q_positions, kv_positions)  # i - j
    if causal:
        distance_BTS = jnp.maximum(distance_BTS, 0)
    else:
        distance_BTS = jnp.abs(distance_BTS)
    return -jnp.einsum("H,BTS->BHTS", slopes_H, distance_BTS.astype(jnp.float32))


def extend_positions_hierarchical(table_NE, new_length, alpha=0.4):
    """Extends a learned absolute table of ``n`` positions to up to ``n ** 2`` positions.

    Hierarchical decomposition (Su 2020, "层次分解位置编码，让BERT可以处理超长文本"), 1-based:
    ``u_i = (p_i - alpha p_1) / (1 - alpha)`` and ``q_{(i-1) n + j} = alpha u_i +
    (1 - alpha) u_j`` for ``i, j = 1..n``. For ``i = 1`` the formula gives back ``p_j``;
    the first ``n`` rows are copied from the table so they are bit-exact. ``alpha`` must lie
    in (0, 1) and differ from 0.5 (at 0.5 positions (i, j) and (j, i) coincide); the post
    uses 0.4. Computed in float32, returned in the table's dtype, ``[new_length, E]``.
    """
    if table_NE.ndim != 2:
        raise ValueError(
            f"extend_positions_hierarchical expects a [positions, dim] table, got shape "
            f"{table_NE.shape}."
        )
    if not 0.0 < alpha < 1.0 or alpha == 0.5:
        raise ValueError(
            f"extend_positions_hierarchical needs 0 < alpha < 1 and alpha != 0.5, got {alpha}."
        )
    n = table_NE.shape[0]
    if new_length < 0:
        raise ValueError(f"extend_positions_hierarchical needs new_length >= 0, got {new_length}.")
    if new_length > n * n:
        raise ValueError(
            f"extend_positions_hierarchical can extend a table of {n} positions to at most "
            f"{n * n} positions, got new_length={new_length}."
        )
    if new_length <= n:
        return jnp.asarray(table_NE)[:new_length]
    table_f32 = table_NE.astype(jnp.float32)
    u_NE = (table_f32 - alpha * table_f32[:1]) / (1.0 - alpha)
    num_blocks = -(-new_length // n)  # ceil: outer index i only up to what is needed
    extended_IJE = alpha * u_NE[:num_blocks, None, :] + (1.0 - alpha) * u_NE[None, :, :]
    extended_LE = extended_IJE.reshape(num_blocks * n, -1)[n:new_length]
    return jnp.concatenate([table_NE, extended_LE.astype(table_NE.dtype)], axis=0)
