"""Parameter counts and model training FLOPs, counted per part.

Training FLOPs are ``3 x`` the forward matmul FLOPs (backward = 2 x forward), with the
forward counted as

* ``2 x (encoder matmul weights) x input tokens``,
* ``2 x (decoder matmul weights + output layer) x target tokens``, except the key and value
  projections of cross-attention, which project the encoder output: ``x input tokens``
  (T5's K/V of cross-attention see the 512 encoder tokens, not the 114 targets),
* the attention matmuls of every layer (score and value products, or the feature-space
  products of linear kernels), for the lengths each attention sees,
* an MLM head at every position, or at ``mlm_predictions`` positions per row when the
  step gathers the masked positions first (``families.EncoderTask.predict``).

Embedding lookups, norms, biases, activations and softmax are not counted (they are not
matmuls; the convention of Kaplan et al. 2020 and PaLM's MFU). Causal attention is counted
as the full ``T x S`` product because that is what the softmax kernel computes (each
kernel's spec counts what its function computes). This is
what "6 x params x tokens" gets wrong for an encoder-decoder: with 512 input and 114 target
tokens (T5 span corruption) it charges every weight for all 626 tokens and overcounts a
T5 by about 2.7x.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax

from rope_jax.attention import registry
from rope_jax.model_config import ModelConfig


def count_params(params) -> int:
    """Number of scalars in a parameter pytree (boxed logical-partitioning leaves are fine)."""
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.unbox(params))))


def attention_forward_flops(
    cfg: ModelConfig, kernel: str, q_len: int, kv_len: int, causal: bool = False
) -> float:
    """Forward matmul FLOPs of one attention layer's kernel (projections excluded), from
    the kernel's registry entry (``KernelSpec.flops``)."""
    return registry.get_spec(kernel).flops(cfg, q_len, kv_len, causal)


@dataclasses.dataclass(frozen=True)
class TrainingFlops:
    """Training FLOPs of one example, by part (all already include the 3x for fwd + bwd)."""

    encoder_weights: float
    decoder_weights: float
    output_layer: float
    attention: float

    @property
    def total(self) -> float:
        return self.encoder_weights + self.decoder_weights + self.output_layer + self.attention


def _layer_weights(cfg: ModelConfig, cross: bool) -> int:
    """Matmul weights a token of the layer's own sequence meets (cross K/V excluded)."""
    projection = cfg.d_model * cfg.num_heads * cfg.head_dim
    mlp = (3 if cfg.gated_mlp else 2) * cfg.d_model * cfg.d_ff
    # Self-attention q, k, v, out; cross-attention adds q and out on the decoder side.
    return projection * (6 if cross else 4) + mlp


def training_flops(
    cfg: ModelConfig, input_len: int, target_len: int = 0, *, mlm_predictions: int = 0
) -> TrainingFlops:
    """Training FLOPs (forward + backward) of one example of the given lengths.

    encoder: ``input_len`` tokens, MLM logits at every position, or at ``mlm_predictions``
    positions when > 0 (or a classifier on the first token). decoder: ``input_len`` tokens
    (``target_len`` is ignored; inputs and targets are the same sequence shifted).
    encoder_decoder: ``input_len`` encoder and ``target_len`` decoder tokens; the
    cross-attention key/value projections run over the ``input_len`` encoder outputs.
    """
    e, v = cfg.d_model, cfg.vocab_size
    if cfg.family == "encoder":
        encoder = _layer_weights(cfg, cross=False) * cfg.num_layers * input_len
        if cfg.num_labels:
            output = (e * e + e * cfg.num_labels) * 1
        else:
            output = (e * e + e * v) * (mlm_predictions or input_len)
        attention = cfg.num_layers * attention_forward_flops(
            cfg, cfg.attention, input_len, input_len
        )
        decoder = 0
    elif cfg.family == "decoder":
        encoder = 0
        decoder = _layer_weights(cfg, cross=False) * cfg.num_layers * input_len
        output = e * v * input_len
        attention = cfg.num_layers * attention_forward_flops(
            cfg, cfg.attention, input_len, input_len, causal=True
        )
    else:
        encoder = _layer_weights(cfg, cross=False) * cfg.num_layers * input_len
        cross_key_value = 2 * e * cfg.num_heads * cfg.head_dim * input_len
        decoder = cfg.decoder_layers * (
            _layer_weights(cfg, cross=True) * target_len + cross_key_value
        )
        output = e * v * target_len
        attention = cfg.num_layers * attention_forward_flops(
            cfg, cfg.attention, input_len, input_len
        ) + cfg.decoder_layers * (
            attention_forward_flops(
                cfg, cfg.decoder_self_attention, target_len, target_len, causal=True
            )
            + attention_forward_flops(cfg, cfg.decoder_cross_attention, target_len, input_len)
        )
    # 2 FLOPs per multiply-add, 3x for forward + backward.
    return TrainingFlops(
        encoder_weights=6.0 * encoder,
        decoder_weights=6.0 * decoder,
        output_layer=6.0 * output,
        attention=3.0 * attention,
    )


def training_flops_per_example(cfg: ModelConfig, input_len: int, target_len: int = 0) -> float:
    """Total training FLOPs of one example (see ``training_flops`` for the parts)."""
    return training_flops(cfg, input_len, target_len).total


def flops_per_token(cfg: ModelConfig, input_len: int, target_len: int = 0) -> float:
    """Training FLOPs per INPUT token: ``training_flops_per_example / input_len``.

    Multiply by ``batch x input_len`` for the FLOPs of a step. For an encoder-decoder the
    decoder and output-layer FLOPs (which scale with ``target_len``) are spread over the
    input tokens, so the product is exact.
    """
    if input_len < 1:
        raise ValueError(f"input_len must be positive, got {input_len}.")
    return training_flops_per_example(cfg, input_len, target_len) / input_len
