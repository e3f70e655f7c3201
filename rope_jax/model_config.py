"""Frozen model configuration and its validation.

The model never sees an ``ml_collections.ConfigDict``: :func:`model_config_from_dict` turns
``config.model`` into a :class:`ModelConfig` (an unknown key is an error that names it), and
:func:`validate_model_config` rejects combinations that have no meaning, saying why and what
to choose instead. ``build_model`` (in ``rope_jax.models``) validates again, so a config built
by hand is checked too.

Three presets show how published architectures are expressed:

* BERT: ``family="encoder", norm="layer", norm_placement="post", use_bias=True,
  mlp_activation="gelu", gelu_approximate=False, position="learned", type_vocab_size=2,
  tie_embeddings=True, scale_queries=True, layer_norm_epsilon=1e-12``.
* RoFormer: as BERT with ``position="rope", rope_layout="interleaved"`` (no absolute
  position table; q and k are rotated in every layer).
* T5 v1.1 / mT5: ``family="encoder_decoder", norm="rms", norm_placement="pre",
  use_bias=False, mlp_activation="gated-gelu", gelu_approximate=True, position="t5_bias",
  tie_embeddings=False, scale_queries=False``. The original T5 ties the output layer to the
  embeddings (``tie_embeddings=True``) and then scales the decoder output by
  ``d_model**-0.5`` before the logits, as its reference implementation does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from rope_jax import config_fields, scanning

FAMILIES = ("encoder", "encoder_decoder", "decoder")
MLP_ACTIVATIONS = ("gated-gelu", "gelu", "relu", "gated-silu")
NORMS = ("rms", "layer")
NORM_PLACEMENTS = ("pre", "post")
POSITIONS = ("none", "sinusoidal", "learned", "learned_hierarchical", "rope", "t5_bias", "alibi")
ROPE_LAYOUTS = ("interleaved", "half")
ROPE_RECIPES = ("feature", "input")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class KernelTraits:
    """What an attention kernel can express, as far as the model shells are concerned.

    full_mask: accepts an arbitrary boolean ``[B, H, T, S]`` mask (packed segments, prefix LM);
      otherwise only a key-padding mask ``[B, 1, 1, S]`` plus ``causal``.
    causal: has a causal mode that never looks at later positions.
    bias: accepts an additive ``[B|1, H|1, T, S]`` bias (T5 relative bias, ALiBi).
    recurrent: has an ``init_state``/``step`` form for incremental decoding.
    segments: takes packed-row segment ids (``segment_ids=``, ``kv_segment_ids=``) and keeps
      the packed examples apart without a full mask (the linear family).
    """

    full_mask: bool
    causal: bool
    bias: bool
    recurrent: bool
    segments: bool = False


KERNEL_TRAITS: dict[str, KernelTraits] = {
    "softmax": KernelTraits(full_mask=True, causal=True, bias=True, recurrent=False),
    "performer": KernelTraits(
        full_mask=False, causal=True, bias=False, recurrent=True, segments=True
    ),
    "linear": KernelTraits(full_mask=False, causal=True, bias=False, recurrent=True, segments=True),
    "taylor": KernelTraits(full_mask=False, causal=True, bias=False, recurrent=True, segments=True),
    # Nystrom's landmarks are means over query and key segments: every output depends on
    # every position, so it has no causal form.
    "nystrom": KernelTraits(full_mask=False, causal=False, bias=False, recurrent=False),
    # Random Synthesizer: learned [H, max_length, max_length] logits, masked like softmax.
    "random_synthesizer": KernelTraits(full_mask=True, causal=True, bias=True, recurrent=False),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that decides the shape and the computation of a model.

    Lengths are not part of the model except ``max_length``, the size of a learned absolute
    position table (and the default size of a sinusoidal one).
    """

    family: str = "encoder_decoder"
    vocab_size: int = 32128
    d_model: int = 512
    num_heads: int = 8
    head_dim: int = 64
    d_ff: int = 1024
    # Encoder layers (encoder, encoder_decoder) or decoder layers (decoder family).
    num_layers: int = 8
    # Decoder layers of an encoder_decoder; None means the same as num_layers.
    num_decoder_layers: int | None = None
    mlp_activation: str = "gated-gelu"
    # True: tanh approximation (T5 v1.1 "gelu_new"); False: exact erf GELU (HF BERT "gelu").
    gelu_approximate: bool = True
    norm: str = "rms"
    norm_placement: str = "pre"
    layer_norm_epsilon: float = 1e-6
    use_bias: bool = False
    tie_embeddings: bool = False
    # Multiply queries by head_dim**-0.5 (BERT, RoFormer); T5 folds it into its init instead.
    scale_queries: bool = False

    # Attention kernels by name (rope_jax.attention registry). decoder_attention and
    # cross_attention default ("") to `attention`.
    attention: str = "softmax"
    decoder_attention: str = ""
    cross_attention: str = ""
    # Performer (FAVOR+) hyper-parameters.
    num_features: int = 256
    performer_kernel: str = "softmax"
    # Nystromformer hyper-parameters (conv_kernel_size 0 = no depthwise convolution skip).
    num_landmarks: int = 64
    conv_kernel_size: int = 0

    position: str = "t5_bias"
    rope_base: float = 10000.0
    rope_layout: str = "interleaved"
    # Position interpolation: positions are multiplied by rope_scale (L_train / L_target).
    rope_scale: float = 1.0
    # NTK-aware base scaling factor (1.0 = off): base becomes rope_ntk_base(base, D, factor).
    rope_ntk_factor: float = 1.0
    rope_recipe: str = "feature"
    max_length: int = 512
    hierarchical_alpha: float = 0.4
    relpos_num_buckets: int = 32
    relpos_max_distance: int = 128

    type_vocab_size: int = 0
    num_labels: int = 0
    dropout_rate: float = 0.1
    dtype: str = "float32"
    param_dtype: str = "float32"
    # Recomputation in the backward pass, by policy name (rope_jax.scanning): none, full,
    # save_dots. A legacy boolean reads as full (True) or none (False).
    remat: str = "none"
    # Run each stack's layers with nn.scan over a stacked `layers` axis: one traced layer,
    # so start-up does not grow with depth (parameters gain a leading layers axis).
    scan_layers: bool = False
    # 0.0: T5-style init (fan-in variance scaling, embeddings N(0, 1)); > 0: BERT-style
    # N(0, initializer_range) everywhere.
    initializer_range: float = 0.0
    pad_id: int = 0

    def __post_init__(self):
        object.__setattr__(self, "remat", scanning.remat_name(self.remat))

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def storage_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    @property
    def decoder_layers(self) -> int:
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

    @property
    def decoder_self_attention(self) -> str:
        return self.decoder_attention or self.attention

    @property
    def decoder_cross_attention(self) -> str:
        return self.cross_attention or self.attention

    @property
    def gated_mlp(self) -> bool:
        return self.mlp_activation.startswith("gated-")


def model_config_from_dict(d: Any) -> ModelConfig:
    """Builds and validates a ModelConfig from a dict or an ``ml_collections.ConfigDict``.

    An unknown key or a value of the wrong type is an error naming the key
    (``config_fields.from_mapping``).
    """
    if hasattr(d, "to_dict"):
        d = d.to_dict()
    d = dict(d)
    if "remat" in d:
        d["remat"] = scanning.remat_name(d["remat"])
    cfg = config_fields.from_mapping(ModelConfig, d, "model")
    validate_model_config(cfg)
    return cfg


def _choice(cfg: ModelConfig, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}.")


def _kernel(name: str, field: str) -> KernelTraits:
    if name not in KERNEL_TRAITS:
        raise ValueError(
            f"{field}={name!r} is not a known attention kernel; choose one of "
            f"{', '.join(KERNEL_TRAITS)}."
        )
    return KERNEL_TRAITS[name]


def used_kernels(cfg: ModelConfig) -> dict[str, str]:
    """Kernel name per attention role that the family actually has."""
    if cfg.family == "encoder":
        return {"attention": cfg.attention}
    if cfg.family == "decoder":
        return {"attention": cfg.attention}
    return {
        "attention": cfg.attention,
        "decoder_attention": cfg.decoder_self_attention,
        "cross_attention": cfg.decoder_cross_attention,
    }


def learned_table_message(cfg: ModelConfig, length: int) -> str:
    return (
        f"position='learned' has a table of max_length={cfg.max_length} rows but the model "
        f"is asked for {length} positions. Set position='learned_hierarchical' to extend the "
        f"table by hierarchical decomposition (to max_length**2 positions), raise max_length, "
        f"or use a relative encoding (rope, t5_bias, alibi)."
    )


def validate_model_config(
    cfg: ModelConfig,
    *,
    packed_inputs: bool = False,
    max_sequence_length: int = 0,
    prefix_lm: bool = False,
) -> None:
    """Raises ValueError for a config whose combination of choices has no meaning.

    Args:
      cfg: the config.
      packed_inputs: whether batches pack several examples per row (segment ids > 1).
        Kernels that take neither a full mask nor segment ids cannot keep packed examples
        apart.
      max_sequence_length: longest sequence the model will see (0 = unknown); checked
        against a learned absolute position table. The model checks static lengths again
        when it is called.
      prefix_lm: whether batches carry a prefix-LM mask (bidirectional prefix, causal
        rest), a per-query mask only full-mask kernels can apply.
    """
    _choice(cfg, "family", FAMILIES)
    _choice(cfg, "mlp_activation", MLP_ACTIVATIONS)
    _choice(cfg, "norm", NORMS)
    _choice(cfg, "norm_placement", NORM_PLACEMENTS)
    _choice(cfg, "position", POSITIONS)
    _choice(cfg, "rope_layout", ROPE_LAYOUTS)
    _choice(cfg, "rope_recipe", ROPE_RECIPES)
    _choice(cfg, "dtype", DTYPES)
    _choice(cfg, "param_dtype", DTYPES)
    _choice(cfg, "performer_kernel", ("softmax", "relu"))
    if cfg.remat not in scanning.REMAT_POLICIES:
        raise ValueError(scanning.remat_message(cfg.remat))
    for name in ("vocab_size", "d_model", "num_heads", "head_dim", "d_ff", "num_layers"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be positive, got {getattr(cfg, name)}.")
    if cfg.max_length < 1:
        raise ValueError(f"max_length must be positive, got {cfg.max_length}.")
    if not 0.0 <= cfg.dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {cfg.dropout_rate}.")

    kernels = used_kernels(cfg)
    traits = {role: _kernel(name, role) for role, name in kernels.items()}
    if cfg.family != "encoder_decoder" and (cfg.decoder_attention or cfg.cross_attention):
        raise ValueError(
            f"decoder_attention/cross_attention only apply to family='encoder_decoder'; for "
            f"family={cfg.family!r} set attention= instead."
        )

    causal_roles = []
    if cfg.family == "decoder":
        causal_roles.append("attention")
    if cfg.family == "encoder_decoder":
        causal_roles.append("decoder_attention")
    for role in causal_roles:
        if not traits[role].causal:
            raise ValueError(
                f"{role}={kernels[role]!r} has no causal form (its landmarks average over "
                f"all positions, so every output would see future tokens); a causal decoder "
                f"needs softmax, performer, linear or taylor attention"
                + (
                    " (set decoder_attention='softmax' to keep Nystrom in the encoder)."
                    if role == "decoder_attention"
                    else "."
                )
            )
    if prefix_lm and cfg.family == "decoder" and not traits["attention"].full_mask:
        raise ValueError(
            f"objective='prefix_lm' lets prefix tokens attend to later prefix tokens, a "
            f"per-query mask which attention={kernels['attention']!r} cannot apply (it takes "
            f"key padding, segment ids and causal only). Use objective='causal_lm' with this "
            f"kernel, or attention='softmax' for a prefix LM."
        )
    if cfg.family == "encoder_decoder" and kernels["cross_attention"] == "nystrom":
        raise ValueError(
            "cross_attention='nystrom' would leak future decoder tokens: its query landmarks "
            "average decoder positions, including later ones. Set cross_attention='softmax' "
            "(or performer/linear/taylor)."
        )

    if cfg.position in ("t5_bias", "alibi"):
        for role in ("attention", "decoder_attention"):
            if role in kernels and not traits[role].bias:
                raise ValueError(
                    f"position={cfg.position!r} is an additive bias on the T x S score "
                    f"matrix, which {role}={kernels[role]!r} never forms. Use position='rope' "
                    f"(applied inside linear kernels by the RoFormer recipe), 'sinusoidal', "
                    f"'learned' or 'none', or use softmax attention."
                )
    if cfg.position == "rope":
        for role in ("attention", "decoder_attention"):
            if kernels.get(role) == "random_synthesizer":
                raise ValueError(
                    f"position='rope' rotates q and k, which {role}='random_synthesizer' "
                    f"never uses (its attention logits are learned per position pair); choose "
                    f"position='none', 'learned', 'sinusoidal', 't5_bias' or 'alibi'."
                )
        if cfg.head_dim % 2:
            raise ValueError(
                f"position='rope' rotates pairs of dimensions, so head_dim must be even "
                f"(got {cfg.head_dim}); choose an even head_dim."
            )
        if cfg.rope_scale <= 0 or cfg.rope_ntk_factor <= 0:
            raise ValueError("rope_scale and rope_ntk_factor must be positive.")
    if cfg.position == "learned" and max_sequence_length > cfg.max_length:
        raise ValueError(learned_table_message(cfg, max_sequence_length))
    if cfg.position == "learned_hierarchical" and max_sequence_length > cfg.max_length**2:
        raise ValueError(
            f"position='learned_hierarchical' extends a {cfg.max_length}-row table to "
            f"{cfg.max_length**2} positions, fewer than {max_sequence_length}; raise max_length."
        )
    if cfg.position == "learned_hierarchical" and (
        not 0.0 < cfg.hierarchical_alpha < 1.0 or cfg.hierarchical_alpha == 0.5
    ):
        raise ValueError(
            f"hierarchical_alpha must be in (0, 1) and not 0.5 (positions (i, j) and (j, i) "
            f"would coincide), got {cfg.hierarchical_alpha}; the published choice is 0.4."
        )

    if packed_inputs:
        for role, trait in traits.items():
            if not trait.full_mask and not trait.segments:
                raise ValueError(
                    f"{role}={kernels[role]!r} takes neither a full mask nor segment ids, so "
                    f"packed examples in one row would attend to each other. Turn packing off "
                    f"for this kernel (pad each example to its own row) or use softmax, "
                    f"performer, linear or taylor attention."
                )
            if kernels[role] == "random_synthesizer":
                raise ValueError(
                    f"{role}='random_synthesizer' learns one logit per (query slot, key slot) "
                    f"of a row, so a packed example that starts mid-row would get other "
                    f"attention weights than on its own. Turn packing off (pad each example to "
                    f"its own row) or use softmax attention."
                )

    if cfg.family == "encoder":
        if cfg.num_labels < 0:
            raise ValueError(f"num_labels must be >= 0, got {cfg.num_labels}.")
    elif cfg.type_vocab_size or cfg.num_labels:
        raise ValueError(
            f"type_vocab_size and num_labels belong to family='encoder' (BERT-style token "
            f"types and classification head); family={cfg.family!r} has neither."
        )
    if cfg.num_decoder_layers is not None and cfg.num_decoder_layers < 1:
        raise ValueError(
            f"num_decoder_layers must be positive, got {cfg.num_decoder_layers}; None (the "
            f"default) gives the decoder num_layers layers."
        )
    if cfg.num_decoder_layers is not None and cfg.family != "encoder_decoder":
        raise ValueError(
            f"num_decoder_layers only applies to family='encoder_decoder'; for "
            f"family={cfg.family!r} set num_layers."
        )
