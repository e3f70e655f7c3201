"""The token-level cross entropy (float32, sums not means) and the masked-position MLM head's
choice of positions. Which model call a batch needs is the model family's business
(``rope_jax.families``), not this module's.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax


def default_max_predictions(mask_rate: float, length: int) -> int:
    """Cap on predicted (masked) positions per row for a masking rate and a row length.

    BERT's ``max_predictions_per_seq`` is "around max_seq_length * masked_lm_prob" (its
    README: 20 for 128 tokens, 80 for 512). ``objectives.mlm`` masks ``round(rate * n)``
    tokens (at least one) of each example; a packed row holds several examples that round
    on their own, so it can hold a few more than ``rate * length``. The cap is that count
    plus 20 %, rounded up to a multiple of 8: 96 for 512 tokens at 0.15, 24 for 128.
    """
    if not 0.0 < mask_rate <= 1.0 or length < 1:
        raise ValueError(
            f"mask_rate must be in (0, 1] and length positive, got {mask_rate} and {length}."
        )
    per_row = max(1, round(mask_rate * length))
    return min(length, 8 * math.ceil(math.ceil(1.2 * per_row) / 8))


def resolve_max_predictions(
    setting: int | None, *, objective: str, mask_rate: float, length: int
) -> int:
    """``config.mlm_max_predictions`` -> the cap the step uses (0 = head at every position).

    None (default): ``default_max_predictions(mask_rate, length)`` for the ``mlm`` objective,
    0 for the others (their losses are at every target position); 0: the full head; a
    positive value: that cap, at most the row length.
    """
    if setting is not None and setting < 0:
        raise ValueError(
            f"mlm_max_predictions must be None (derive), 0 (off) or positive, got {setting}."
        )
    if objective != "mlm" or setting == 0:
        return 0
    if setting is None:
        return default_max_predictions(mask_rate, length)
    if setting > length:
        raise ValueError(
            f"mlm_max_predictions={setting} exceeds the row length {length}; use at most "
            f"{length}, or None to derive it from the masking rate."
        )
    return setting


def masked_positions(weights_BL: jax.Array, max_predictions: int):
    """The first ``max_predictions`` positions of each row with a positive loss weight.

    Returns ``(positions_BP, valid_BP, dropped)``: positions in increasing order (slots past
    the row's count point at some position with weight 0 and are ``valid`` False), and the
    number of weighted positions beyond the cap in the whole batch (int32), which the train
    step reports as ``mlm_dropped_tokens`` (see ``families.EncoderTask.predict``).
    """
    length = weights_BL.shape[-1]
    if not 0 < max_predictions <= length:
        raise ValueError(
            f"max_predictions must be in [1, {length}] (the row length), got {max_predictions}."
        )
    is_target_BL = weights_BL > 0
    # Earlier targets score higher; non-targets score 0, so top_k takes targets in order.
    score_BL = jnp.where(is_target_BL, length - jnp.arange(length, dtype=jnp.int32), 0)
    score_BP, positions_BP = lax.top_k(score_BL, max_predictions)
    count_B = jnp.sum(is_target_BL, axis=-1, dtype=jnp.int32)
    dropped = jnp.sum(jnp.maximum(count_B - max_predictions, 0))
    return positions_BP.astype(jnp.int32), score_BP > 0, dropped


@jax.custom_vjp
def log_normalizer_and_target(logits_BLV, targets_BL):
    """``(row max, logsumexp, target logit)`` per row of float32 logits.

    Forward as ``jax.nn.logsumexp`` and ``take_along_axis``. The backward is written out:
    ``dlogits = d_lse * softmax + d_target * onehot(target)`` in one elementwise pass over
    ``[B, L, V]``, with the one-hot an iota comparison. Autodiff of the gather would
    scatter into a zero ``[B, L, V]`` array and add the softmax part in a second pass (on
    CPU XLA also transposed that sum for the output layer's weight gradient). The row max
    carries no gradient (it is a stabiliser).
    """
    max_BL = jnp.max(logits_BLV, axis=-1)
    sum_exp_BL = jnp.sum(jnp.exp(logits_BLV - max_BL[..., None]), axis=-1)
    target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
    return max_BL, max_BL + jnp.log(sum_exp_BL), target_logit_BL


def _log_normalizer_and_target_fwd(logits_BLV, targets_BL):
    out = log_normalizer_and_target(logits_BLV, targets_BL)
    return out, (logits_BLV, targets_BL, out[1])


def _log_normalizer_and_target_bwd(residuals, cotangents):
    logits_BLV, targets_BL, log_normalizer_BL = residuals
    _, d_lse_BL, d_target_BL = cotangents
    vocab_V = lax.broadcasted_iota(
        targets_BL.dtype, (1,) * targets_BL.ndim + (logits_BLV.shape[-1],), targets_BL.ndim
    )
    softmax_BLV = jnp.exp(logits_BLV - log_normalizer_BL[..., None])
    dlogits_BLV = d_lse_BL[..., None] * softmax_BLV + jnp.where(
        vocab_V == targets_BL[..., None], d_target_BL[..., None], 0.0
    )
    return dlogits_BLV.astype(logits_BLV.dtype), None


log_normalizer_and_target.defvjp(_log_normalizer_and_target_fwd, _log_normalizer_and_target_bwd)


def weighted_cross_entropy(
    logits_BLV: jax.Array, targets_BL: jax.Array, weights_BL: jax.Array, *, z_loss: float = 0.0
) -> dict[str, jax.Array]:
    """Sums (not means) over tokens, so microbatches add up to the full batch exactly.

    ``cross_entropy = logsumexp(logits) - logits[target]`` per token, in float32.
    ``z_loss`` adds ``z_loss * logsumexp(logits)**2`` per token (PaLM, Chowdhery et al. 2022,
    sec. 5; T5X's ``z_loss=1e-4``), which keeps the softmax normaliser near 1.
    Returns ``loss_sum`` (cross entropy + z-loss, the quantity differentiated),
    ``cross_entropy_sum``, ``z_loss_sum``, ``weight_sum`` and ``correct_sum``.

    Accuracy: a token is correct when its target logit is ``>=`` the row maximum, the maximum
    the log-sum-exp subtracts anyway. Away from ties this is ``argmax == target``; when the
    target ties with another token for the maximum it counts as correct (``argmax`` would
    count it only if the target were the first of the tied ids). It costs one compare per
    token instead of a value-and-index reduction over ``[B, L, V]`` (on CPU an unvectorised
    loop that took 0.28 s of a RoFormer-small step).
    """
    weights_BL = weights_BL.astype(jnp.float32)
    max_BL, log_normalizer_BL, target_logit_BL = log_normalizer_and_target(
        logits_BLV.astype(jnp.float32), targets_BL
    )
    cross_entropy_BL = log_normalizer_BL - target_logit_BL
    z_loss_BL = z_loss * jnp.square(log_normalizer_BL)
    correct_BL = (target_logit_BL >= max_BL).astype(jnp.float32)
    cross_entropy_sum = jnp.sum(cross_entropy_BL * weights_BL)
    z_loss_sum = jnp.sum(z_loss_BL * weights_BL)
    return {
        "loss_sum": cross_entropy_sum + z_loss_sum,
        "cross_entropy_sum": cross_entropy_sum,
        "z_loss_sum": z_loss_sum,
        "weight_sum": jnp.sum(weights_BL),
        "correct_sum": jnp.sum(correct_BL * weights_BL),
    }
