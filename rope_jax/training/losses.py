"""Model calls per batch family and the token-level cross-entropy, all in float32.

Batch families (contracts.md "Batch format"):

- encoder-decoder (span corruption, gap sentences, pseudo-summary): ``encoder_input_tokens``
  ... ``decoder_loss_weights``;
- prefix LM (decoder-only): ``input_tokens, target_tokens, loss_weights, segment_ids,
  positions, prefix_mask``;
- encoder MLM and decoder-only causal LM: ``input_tokens, target_tokens, loss_weights,
  segment_ids, positions`` (the same model call: a causal LM row has no prefix, so it carries
  no prefix mask, which linear-family kernels could not take).

The family is read from the batch keys, so the trainer needs no model-type switch.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

SEQ2SEQ = "seq2seq"
# Decoder-only with a prefix mask (prefix LM).
DECODER = "decoder"
# Token rows without a prefix mask: encoder MLM, or a decoder-only causal LM.
MLM = "mlm"

BATCH_KEYS = {
    SEQ2SEQ: (
        "encoder_input_tokens",
        "encoder_segment_ids",
        "encoder_positions",
        "decoder_input_tokens",
        "decoder_target_tokens",
        "decoder_segment_ids",
        "decoder_positions",
        "decoder_loss_weights",
    ),
    DECODER: (
        "input_tokens",
        "target_tokens",
        "loss_weights",
        "segment_ids",
        "positions",
        "prefix_mask",
    ),
    MLM: ("input_tokens", "target_tokens", "loss_weights", "segment_ids", "positions"),
}


def batch_family(batch: Mapping[str, object]) -> str:
    """Which model call a batch is for, from its keys; a clear error for anything else."""
    keys = set(batch)
    if "encoder_input_tokens" in keys:
        family = SEQ2SEQ
    elif "prefix_mask" in keys:
        family = DECODER
    else:
        family = MLM
    missing = [k for k in BATCH_KEYS[family] if k not in keys]
    if missing:
        raise KeyError(f"{family} batch is missing {missing}; it has {sorted(keys)}.")
    return family


def input_length(batch: Mapping[str, object]) -> int:
    tokens = (
        batch["encoder_input_tokens"] if "encoder_input_tokens" in batch else batch["input_tokens"]
    )
    return int(tokens.shape[-1])


def target_length(batch: Mapping[str, object]) -> int:
    tokens = (
        batch["decoder_target_tokens"]
        if "decoder_target_tokens" in batch
        else batch["target_tokens"]
    )
    return int(tokens.shape[-1])


def targets_and_weights(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    if "decoder_target_tokens" in batch:
        return batch["decoder_target_tokens"], batch["decoder_loss_weights"]
    return batch["target_tokens"], batch["loss_weights"]


def apply_model(model, variables, batch, *, deterministic: bool, rngs=None) -> jax.Array:
    """Logits ``[B, L, V]`` for the batch's family (model apply signatures per contracts)."""
    family = batch_family(batch)
    if family == SEQ2SEQ:
        return model.apply(
            variables,
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            encoder_segment_ids=batch["encoder_segment_ids"],
            decoder_segment_ids=batch["decoder_segment_ids"],
            encoder_positions=batch["encoder_positions"],
            decoder_positions=batch["decoder_positions"],
            deterministic=deterministic,
            rngs=rngs,
        )
    if family == DECODER:
        return model.apply(
            variables,
            batch["input_tokens"],
            segment_ids=batch["segment_ids"],
            positions=batch["positions"],
            prefix_mask=batch["prefix_mask"],
            deterministic=deterministic,
            rngs=rngs,
        )
    return model.apply(
        variables,
        batch["input_tokens"],
        segment_ids=batch["segment_ids"],
        positions=batch["positions"],
        deterministic=deterministic,
        rngs=rngs,
    )


def weighted_cross_entropy(
    logits_BLV: jax.Array, targets_BL: jax.Array, weights_BL: jax.Array, *, z_loss: float = 0.0
) -> dict[str, jax.Array]:
    """Sums (not means) over tokens, so microbatches add up to the full batch exactly.

    ``cross_entropy = logsumexp(logits) - logits[target]`` per token, in float32.
    ``z_loss`` adds ``z_loss * logsumexp(logits)**2`` per token (PaLM, Chowdhery et al. 2022,
    sec. 5; T5X's ``z_loss=1e-4``), which keeps the softmax normaliser near 1.
    Returns ``loss_sum`` (cross entropy + z-loss, the quantity differentiated),
    ``cross_entropy_sum``, ``z_loss_sum``, ``weight_sum`` and ``correct_sum`` (argmax hits).
    """
    logits_BLV = logits_BLV.astype(jnp.float32)
    weights_BL = weights_BL.astype(jnp.float32)
    log_normalizer_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
    cross_entropy_BL = log_normalizer_BL - target_logit_BL
    z_loss_BL = z_loss * jnp.square(log_normalizer_BL)
    correct_BL = (jnp.argmax(logits_BLV, axis=-1) == targets_BL).astype(jnp.float32)
    cross_entropy_sum = jnp.sum(cross_entropy_BL * weights_BL)
    z_loss_sum = jnp.sum(z_loss_BL * weights_BL)
    return {
        "loss_sum": cross_entropy_sum + z_loss_sum,
        "cross_entropy_sum": cross_entropy_sum,
        "z_loss_sum": z_loss_sum,
        "weight_sum": jnp.sum(weights_BL),
        "correct_sum": jnp.sum(correct_BL * weights_BL),
    }
