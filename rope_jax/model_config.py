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

from rope_jax import config_fields, position_encodings, scanning
from rope_jax.attention import registry as kernel_registry
from rope_jax.attention.registry import KERNELS
from rope_jax.attention.spec import KernelTraits
from rope_jax.position_encodings import POSITION_ENCODINGS, get_position_spec

FAMILIES = ("encoder", "encoder_decoder", "decoder")
MLP_ACTIVATIONS = ("gated-gelu", "gelu", "relu", "gated-silu")
NORMS = ("rms", "layer")
NORM_PLACEMENTS = ("pre", "post")
POSITIONS = tuple(POSITION_ENCODINGS)
DTYPES = ("float32", "bfloat16", "float16")


# What each kernel can express (``rope_jax.attention.spec.KernelTraits``), by name.
KERNEL_TRAITS: dict[str, KernelTraits] = {name: spec.traits for name, spec in KERNELS.items()}


@dataclasses.dataclass(frozen=True)
class ModelFields:
    """Everything that decides the shape and the computation of a model.

    Lengths are not part of the model except ``max_length``, the size of a learned absolute
    position table (and the default size of a sinusoidal one). The attention kernels' and
    position encodings' own fields (``num_features``, ``num_landmarks``, ``rope_base``,
    ``relpos_num_buckets``, ...) come from their registry entries (``config_fields`` of
    ``KernelSpec`` / ``PositionSpec``; listed in docs/kernels.md) and complete
    :class:`ModelConfig`.
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

    # Position encoding by name (rope_jax.position_encodings registry).
    position: str = "t5_bias"
    max_length: int = 512

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


# The model config: the fields above plus every registered kernel's and position
# encoding's config fields.
ModelConfig = dataclasses.make_dataclass(
    "ModelConfig",
    [
        (field.name, field.type, dataclasses.field(default=field.default))
        for field in (*kernel_registry.config_fields(), *position_encodings.config_fields())
    ],
    bases=(ModelFields,),
    frozen=True,
    namespace={"__module__": __name__, "__doc__": ModelFields.__doc__},
)


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


def _kernels_with(trait: str) -> str:
    """The registered kernels that have ``trait``, for error messages."""
    return ", ".join(name for name, spec in KERNELS.items() if getattr(spec.traits, trait))


def _check_kernel_roles(cfg, kernels, specs, *, prefix_lm: bool, packed_inputs: bool) -> None:
    """What each attention role asks of its kernel: a causal form (decoder self-attention),
    cross-attention, a per-query mask (prefix LM), packed rows."""
    causal_roles = {"decoder": ["attention"], "encoder_decoder": ["decoder_attention"]}
    for role in causal_roles.get(cfg.family, []):
        if not specs[role].traits.causal:
            raise ValueError(
                f"{role}={kernels[role]!r} has no causal form{specs[role].reason('causal')}; "
                f"a causal decoder needs one of {_kernels_with('causal')}"
                + (
                    f" (set decoder_attention='softmax' to keep {kernels[role]} in the encoder)."
                    if role == "decoder_attention"
                    else "."
                )
            )
    if prefix_lm and cfg.family == "decoder" and not specs["attention"].traits.full_mask:
        raise ValueError(
            f"objective='prefix_lm' lets prefix tokens attend to later prefix tokens, a "
            f"per-query mask which attention={kernels['attention']!r} cannot apply (it takes "
            f"key padding, segment ids and causal only). Use objective='causal_lm' with this "
            f"kernel, or attention='softmax' for a prefix LM (the kernels that take a full "
            f"mask: {_kernels_with('full_mask')})."
        )
    if "cross_attention" in kernels and not specs["cross_attention"].traits.cross:
        raise ValueError(
            f"cross_attention={kernels['cross_attention']!r} cannot attend from one sequence "
            f"to another{specs['cross_attention'].reason('cross')}. Set cross_attention to one "
            f"of {_kernels_with('cross')}."
        )
    if packed_inputs:
        for role, spec in specs.items():
            traits = spec.traits
            if not traits.packed or not (traits.full_mask or traits.segments):
                raise ValueError(
                    f"{role}={kernels[role]!r} cannot keep packed examples in one row apart"
                    f"{spec.reason('packed')}. Turn packing off for this kernel (pad each "
                    f"example to its own row) or use one of "
                    f"{', '.join(n for n, s in KERNELS.items() if s.traits.packed)}."
                )


def _check_position(cfg, position, kernels, specs, max_sequence_length: int) -> None:
    """What the position encoding asks of the self-attention kernels, its own settings,
    and the longest sequence the data will give."""
    for role in ("attention", "decoder_attention"):
        if role not in kernels:
            continue
        traits = specs[role].traits
        if position.kind == "bias" and not traits.bias:
            raise ValueError(
                f"position={cfg.position!r} is an additive bias on the T x S score "
                f"matrix, which {role}={kernels[role]!r} cannot take"
                f"{specs[role].reason('bias')}. Use position='rope' (applied inside linear "
                f"kernels by the RoFormer recipe), 'sinusoidal', 'learned' or 'none', or "
                f"one of the kernels that take a bias: {_kernels_with('bias')}."
            )
        if position.kind == "rotary" and traits.rope == "none":
            raise ValueError(
                f"position={cfg.position!r} rotates q and k, which {role}={kernels[role]!r} "
                f"never uses{specs[role].reason('rope')}; choose a position encoding of "
                f"another kind: "
                f"{', '.join(n for n, p in POSITION_ENCODINGS.items() if p.kind != 'rotary')}."
            )
    if position.check is not None:
        position.check(cfg)
    if max_sequence_length:
        position.check_length(cfg, max_sequence_length)


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
    _choice(cfg, "dtype", DTYPES)
    _choice(cfg, "param_dtype", DTYPES)
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
    specs = {role: kernel_registry.get_spec(name, role) for role, name in kernels.items()}
    position = get_position_spec(cfg.position)
    # A component checks the fields it owns (performer_kernel when a performer is used).
    for spec in (*specs.values(), position):
        for field in spec.config_fields:
            field.check(getattr(cfg, field.name))
    if cfg.family != "encoder_decoder" and (cfg.decoder_attention or cfg.cross_attention):
        raise ValueError(
            f"decoder_attention/cross_attention only apply to family='encoder_decoder'; for "
            f"family={cfg.family!r} set attention= instead."
        )
    _check_kernel_roles(cfg, kernels, specs, prefix_lm=prefix_lm, packed_inputs=packed_inputs)

    _check_position(cfg, position, kernels, specs, max_sequence_length)

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
