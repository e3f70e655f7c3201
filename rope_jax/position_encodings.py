"""Position encodings by config name: one ``PositionSpec`` each.

A spec says what kind of encoding it is, which model-config fields it owns, what it builds
from them (an absolute table added to the embeddings, an additive ``[B|1, H, T, S]`` bias on
the attention logits, or nothing for rotary, which the attention layer applies to q and k),
the longest sequence it supports and how it extends beyond the training length. The model
stacks, the config checks, the ablation and ``docs/kernels.md`` read these specs; the math
is in ``rope_jax.positions``. ``cfg`` is the model config, read by attribute.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from rope_jax import positions
from rope_jax.config_fields import ConfigField

KINDS = ("none", "absolute", "bias", "rotary")


@dataclasses.dataclass(frozen=True)
class PositionSpec:
    """One position encoding.

    kind: one of ``KINDS``. "absolute": ``table(cfg, learned_PE, length) -> [P >= length, E]``
      is added to the embeddings (``learned_PE`` is the stack's ``[max_length, E]``
      "position_embedder" table when ``learned_table``, else None). "bias": ``bias(cfg,
      table, q_positions, kv_positions, causal) -> [B|1, H, T, S]`` is added to the logits
      of every self-attention layer (``table`` is the stack's "relpos_bias" parameter of
      shape ``bias_table(cfg)`` with logical ``bias_table_axes``, when given). "rotary": the
      attention layer rotates q and k (``rope_jax.attention_layer.rope_spec``).
    shift_invariant: the bias is a function of ``kv_position - q_position`` alone. Then the
      stack computes it once for all rows, ``[1, H, T, S]`` from the row index, whenever the
      positions are its own (the row index, or the index restarting at each packed segment:
      within a segment both give the same differences, and pairs across segments are masked),
      instead of ``[B, H, T, S]`` from per-row positions (8x less memory and gradient work
      for T5-small's 8 rows).
    summary: one line for the docs table.
    beyond_training: how it extends beyond the training length (docs and ablation notes).
    config_fields: the model-config fields it owns (``ModelConfig`` gathers them).
    max_length: ``max_length(cfg) -> int | None``, the longest sequence it supports (None =
      any); ``beyond_support(cfg, length) -> str`` says what to do past it.
    check: ``check(cfg)`` raises ValueError for settings it cannot use.
    """

    name: str
    kind: str
    summary: str
    beyond_training: str
    config_fields: tuple[ConfigField, ...] = ()
    table: Callable | None = None
    learned_table: bool = False
    bias: Callable | None = None
    bias_table: Callable[[Any], tuple] | None = None
    bias_table_axes: tuple = ()
    shift_invariant: bool = False
    max_length: Callable[[Any], int | None] = lambda cfg: None
    beyond_support: Callable[[Any, int], str] | None = None
    check: Callable[[Any], None] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"PositionSpec {self.name}: kind must be one of {KINDS}.")

    def check_length(self, cfg, length: int) -> None:
        """Raises the spec's error when ``length`` positions exceed what it supports."""
        limit = self.max_length(cfg)
        if limit is not None and length > limit:
            raise ValueError(self.beyond_support(cfg, length))


def _sinusoidal_table(cfg, learned_PE, length):
    del learned_PE
    return positions.sinusoidal_positions(max(cfg.max_length, length), cfg.d_model)


def _learned_table(cfg, learned_PE, length):
    POSITION_ENCODINGS["learned"].check_length(cfg, length)
    return learned_PE


def _hierarchical_table(cfg, learned_PE, length):
    POSITION_ENCODINGS["learned_hierarchical"].check_length(cfg, length)
    if length <= cfg.max_length:
        return learned_PE
    return positions.extend_positions_hierarchical(learned_PE, length, alpha=cfg.hierarchical_alpha)


def _learned_beyond(cfg, length):
    return (
        f"position='learned' has a table of max_length={cfg.max_length} rows but the model "
        f"is asked for {length} positions. Set position='learned_hierarchical' to extend the "
        f"table by hierarchical decomposition (to max_length**2 positions), raise max_length, "
        f"or use a relative encoding (rope, t5_bias, alibi)."
    )


def _hierarchical_beyond(cfg, length):
    return (
        f"position='learned_hierarchical' extends a {cfg.max_length}-row table to "
        f"{cfg.max_length**2} positions, fewer than {length}; raise max_length."
    )


def _check_sinusoidal(cfg):
    if cfg.d_model % 2:
        raise ValueError(f"sinusoidal positions need an even d_model, got {cfg.d_model}.")


def _check_hierarchical(cfg):
    alpha = cfg.hierarchical_alpha
    if not 0.0 < alpha < 1.0 or alpha == 0.5:
        raise ValueError(
            f"hierarchical_alpha must be in (0, 1) and not 0.5 (positions (i, j) and (j, i) "
            f"would coincide), got {alpha}; the published choice is 0.4."
        )


def _check_rope(cfg):
    if cfg.head_dim % 2:
        raise ValueError(
            f"position='rope' rotates pairs of dimensions, so head_dim must be even "
            f"(got {cfg.head_dim}); choose an even head_dim."
        )
    if cfg.rope_scale <= 0 or cfg.rope_ntk_factor <= 0:
        raise ValueError("rope_scale and rope_ntk_factor must be positive.")


def _t5_bias(cfg, table_NH, q_positions, kv_positions, causal):
    return positions.t5_relative_bias(
        table_NH,
        q_positions,
        kv_positions,
        bidirectional=not causal,
        num_buckets=cfg.relpos_num_buckets,
        max_distance=cfg.relpos_max_distance,
    )


def _alibi_bias(cfg, table, q_positions, kv_positions, causal):
    del table
    return positions.alibi_bias(cfg.num_heads, q_positions, kv_positions, causal=causal)


POSITION_ENCODINGS: dict[str, PositionSpec] = {
    spec.name: spec
    for spec in (
        PositionSpec(
            name="none",
            kind="none",
            summary="no position information (a causal mask still orders a decoder)",
            beyond_training="any length",
        ),
        PositionSpec(
            name="sinusoidal",
            kind="absolute",
            summary="sin/cos table of Vaswani et al. 2017, added to the embeddings",
            beyond_training="the table is computed for any length (unseen positions)",
            table=_sinusoidal_table,
            check=_check_sinusoidal,
        ),
        PositionSpec(
            name="learned",
            kind="absolute",
            summary="learned [max_length, E] table (BERT), added to the embeddings",
            beyond_training="none: an error past max_length rows",
            table=_learned_table,
            learned_table=True,
            max_length=lambda cfg: cfg.max_length,
            beyond_support=_learned_beyond,
        ),
        PositionSpec(
            name="learned_hierarchical",
            kind="absolute",
            summary="the learned table, extended by hierarchical decomposition (Su 2020)",
            beyond_training="rows (i, j) = alpha u_i + (1 - alpha) u_j, to max_length**2",
            config_fields=(
                ConfigField("hierarchical_alpha", float, 0.4, "alpha of the decomposition"),
            ),
            table=_hierarchical_table,
            learned_table=True,
            max_length=lambda cfg: cfg.max_length**2,
            beyond_support=_hierarchical_beyond,
            check=_check_hierarchical,
        ),
        PositionSpec(
            name="rope",
            kind="rotary",
            summary="rotary position embedding of q and k (RoFormer, Su et al. 2021)",
            beyond_training="unseen angles; rope_scale (interpolation), rope_ntk_factor (NTK)",
            config_fields=(
                ConfigField("rope_base", float, 10000.0, "theta_i = base ** (-2i / d)"),
                ConfigField(
                    "rope_layout", str, "interleaved", "pairs", choices=positions.ROPE_LAYOUTS
                ),
                ConfigField("rope_scale", float, 1.0, "positions x scale (interpolation)"),
                ConfigField("rope_ntk_factor", float, 1.0, "NTK-aware base factor (1 = off)"),
                ConfigField(
                    "rope_recipe",
                    str,
                    "feature",
                    "linear kernels: rotate features or inputs",
                    choices=positions.ROPE_RECIPES,
                ),
            ),
            check=_check_rope,
        ),
        PositionSpec(
            name="t5_bias",
            kind="bias",
            summary="T5 relative-position buckets, a learned bias per bucket and head",
            beyond_training="distances past relpos_max_distance share the last bucket",
            config_fields=(
                ConfigField("relpos_num_buckets", int, 32, "buckets", minimum=2),
                ConfigField("relpos_max_distance", int, 128, "last bucket's distance", minimum=1),
            ),
            bias=_t5_bias,
            bias_table=lambda cfg: (cfg.relpos_num_buckets, cfg.num_heads),
            bias_table_axes=("relpos_buckets", "heads"),
            shift_invariant=True,
        ),
        PositionSpec(
            name="alibi",
            kind="bias",
            summary="linear distance penalty per head (ALiBi, Press et al. 2022)",
            beyond_training="the penalty grows linearly with distance, for any length",
            bias=_alibi_bias,
            shift_invariant=True,
        ),
    )
}


def get_position_spec(name: str) -> PositionSpec:
    """The spec of position encoding ``name``; unknown names list the known ones."""
    if name not in POSITION_ENCODINGS:
        raise ValueError(f"position={name!r} is not one of {', '.join(POSITION_ENCODINGS)}.")
    return POSITION_ENCODINGS[name]


def config_fields() -> tuple[ConfigField, ...]:
    """Every position encoding's config fields, in registry order."""
    return tuple(field for spec in POSITION_ENCODINGS.values() for field in spec.config_fields)
