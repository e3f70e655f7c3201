"""Position encodings as pure functions.

Rotary position embedding (RoPE) follows RoFormer (Su et al. 2021, "RoFormer: Enhanced
Transformer with Rotary Position Embedding"), eq. (13)-(15): dimension pair ``i`` of a head
vector at position ``m`` is rotated by the angle ``m * theta_i`` with
``theta_i = base ** (-2 i / d)``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

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

    inv_freq_K = rope_inverse_frequencies(head_dim, base)  # K = D / 2 rotated pairs
    scaled_positions_BL = positions_BL.astype(jnp.float32) * jnp.float32(scale)
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
