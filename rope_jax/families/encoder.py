"""Encoder family (BERT / RoFormer): masked-LM pretraining and classification heads.

Two heads, chosen by the model config (``num_labels``), never by the batch keys:

* MLM (``num_labels == 0``): batches ``input_tokens, target_tokens, loss_weights,
  segment_ids, positions``; with ``mlm_max_predictions = P > 0`` the output head runs only
  at the first P weighted positions of each row (BERT's ``gather_indexes`` with
  ``max_predictions_per_seq``; ``training.losses.masked_positions``).
* Classification / multiple choice (``num_labels > 0``, SuperGLUE fine-tuning): arrays
  ``[N, K, L]`` with a choice axis (``evaluation.inputs.encoder_arrays``): K = 1 and integer
  ``labels [N]`` for classification (softmax over ``num_labels`` classes), or one score per
  candidate (``num_labels = 1``) with ``choice_mask [N, K]`` and multi-hot ``labels [N, K]``:
  the loss is ``-log`` of the total probability of the right candidates among the valid
  ones, as PET/jiant score multiple choice (a softmax over candidates). Rows without a
  right candidate (unlabelled), and rows with ``example_weights`` 0 (padding), have weight 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rope_jax.families.base import ModelTask, dummy_batch
from rope_jax.training import losses

CLASSIFICATION_KEYS = ("input_tokens", "token_type_ids", "segment_ids", "positions", "labels")
_MODEL_KEYS = ("input_tokens", "segment_ids", "positions", "token_type_ids")


class EncoderTask(ModelTask):
    family = "encoder"
    batch_keys = ("input_tokens", "target_tokens", "loss_weights", "segment_ids", "positions")

    @property
    def classifies(self) -> bool:
        """True for a classification head (``num_labels > 0``), False for the MLM head."""
        return bool(getattr(self.config, "num_labels", 0))

    def model_inputs(self, batch):
        kwargs = {"segment_ids": batch.get("segment_ids"), "positions": batch.get("positions")}
        if "token_type_ids" in batch and getattr(self.config, "type_vocab_size", 0):
            kwargs["token_type_ids"] = batch["token_type_ids"]
        return (batch["input_tokens"],), kwargs

    def init(self, rngs, example_batch=None):
        if example_batch is not None and np.ndim(example_batch["input_tokens"]) == 3:
            example_batch = _fold_choices(dummy_batch(example_batch))
        return super().init(rngs, example_batch)

    def example_batch(self, length: int = 8):
        keys = _MODEL_KEYS if self.classifies else self.batch_keys
        return {key: np.zeros((1, length), np.int32) for key in keys}

    # ----------------------------------------------------------- MLM head

    def predict(self, variables, batch, *, deterministic, rngs=None, mlm_max_predictions=0):
        """``(logits, targets, weights, dropped)``; with ``mlm_max_predictions = P > 0`` the
        head runs at the first P weighted positions of each row only: logits ``[B, P, V]``
        and the targets and weights gathered there. The vocabulary projection is most of an
        MLM step's output-layer work and memory, and only ~15 % of positions have a loss.

        No masked token is dropped silently. Choice: count, not cap the masking. The data
        pipeline masks each packed example on its own, so a row of many short examples can
        exceed any cap derived from the rate; capping inside the objective would change the
        data every config sees. Tokens beyond the cap (none with ``default_max_predictions``
        on unpacked or ordinarily packed rows) are left out of the loss, the accuracy and
        the weight sum, and counted in ``dropped``, which the train step reports as
        ``mlm_dropped_tokens``. The loss is then exactly the full head's whenever
        ``dropped`` is 0.
        """
        if self.classifies:
            raise ValueError(
                "this encoder has a classification head (num_labels > 0); its loss is "
                "loss_sums on classification arrays, not token predictions"
            )
        if not mlm_max_predictions:
            return super().predict(variables, batch, deterministic=deterministic, rngs=rngs)
        self.check_batch(batch)
        targets_BL, weights_BL = self.targets_and_weights(batch)
        positions_BP, valid_BP, dropped = losses.masked_positions(weights_BL, mlm_max_predictions)
        logits_BPV = self.logits(
            variables, batch, deterministic=deterministic, rngs=rngs, masked_positions=positions_BP
        )
        targets_BP = jnp.take_along_axis(targets_BL, positions_BP, axis=-1)
        weights_BP = jnp.where(valid_BP, jnp.take_along_axis(weights_BL, positions_BP, axis=-1), 0)
        return logits_BPV, targets_BP, weights_BP, dropped

    # --------------------------------------------------- classification head

    def head_logits(self, variables, batch, *, deterministic=True, rngs=None) -> jax.Array:
        """Head outputs ``[N, K, C]`` (float32) for ``[N, K, L]`` arrays: the K choices are
        folded into rows for the module and unfolded after."""
        n, k, _ = batch["input_tokens"].shape
        folded = _fold_choices(batch)
        logits = self.logits(variables, folded, deterministic=deterministic, rngs=rngs)
        return logits.astype(jnp.float32).reshape(n, k, -1)

    def loss_sums(
        self, variables, batch, *, deterministic, rngs=None, z_loss=0.0, mlm_max_predictions=0
    ):
        if not self.classifies:
            return super().loss_sums(
                variables,
                batch,
                deterministic=deterministic,
                rngs=rngs,
                z_loss=z_loss,
                mlm_max_predictions=mlm_max_predictions,
            )
        self.check_batch(batch, CLASSIFICATION_KEYS)
        logits_NKC = self.head_logits(variables, batch, deterministic=deterministic, rngs=rngs)
        return classification_sums(logits_NKC, batch, z_loss=z_loss)

    def input_length(self, batch) -> int:
        return int(np.shape(batch["input_tokens"])[-1])

    def target_length(self, batch) -> int:
        return self.input_length(batch)


def _fold_choices(batch):
    """``[N, K, L]`` model inputs -> ``[N * K, L]`` (other keys dropped)."""
    out = {}
    for name in _MODEL_KEYS:
        if name in batch:
            value = batch[name]
            out[name] = value.reshape((-1,) + tuple(value.shape[2:]))
    return out


def classification_sums(logits_NKC, batch, *, z_loss: float = 0.0) -> dict[str, jax.Array]:
    """Sums over rows in the form of ``losses.weighted_cross_entropy`` (one weight per
    labelled row): classes (K = 1, ``labels [N]``) or candidates (multi-hot ``labels [N, K]``
    among ``choice_mask``). ``correct_sum``: the highest-scoring class / valid candidate is a
    right one. ``z_loss`` as in ``weighted_cross_entropy``, on the log normaliser."""
    labels = batch["labels"]
    if logits_NKC.shape[1] == 1 and labels.ndim == 1:
        logits_NC = logits_NKC[:, 0]
        log_normalizer_N = jax.nn.logsumexp(logits_NC, axis=-1)
        gold_N = jnp.take_along_axis(logits_NC, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
        weight_N = jnp.ones_like(log_normalizer_N)
        correct_N = (gold_N >= jnp.max(logits_NC, axis=-1)).astype(jnp.float32)
        gold_log_sum_N = gold_N
    else:
        valid_NK = batch["choice_mask"] > 0
        scores_NK = jnp.where(valid_NK, logits_NKC[..., 0], -1e9)
        gold_NK = valid_NK & (labels > 0)
        log_normalizer_N = jax.nn.logsumexp(scores_NK, axis=-1)
        gold_log_sum_N = jax.nn.logsumexp(jnp.where(gold_NK, scores_NK, -1e9), axis=-1)
        weight_N = jnp.any(gold_NK, axis=-1).astype(jnp.float32)
        best_K = jnp.argmax(scores_NK, axis=-1)
        correct_N = jnp.take_along_axis(gold_NK, best_K[:, None], axis=-1)[:, 0]
        correct_N = correct_N.astype(jnp.float32)
    if "example_weights" in batch:  # 0 on rows that only pad a batch to its fixed size
        weight_N = weight_N * batch["example_weights"].astype(jnp.float32)
    cross_entropy_sum = jnp.sum((log_normalizer_N - gold_log_sum_N) * weight_N)
    z_loss_sum = jnp.sum(z_loss * jnp.square(log_normalizer_N) * weight_N)
    return {
        "loss_sum": cross_entropy_sum + z_loss_sum,
        "cross_entropy_sum": cross_entropy_sum,
        "z_loss_sum": z_loss_sum,
        "weight_sum": jnp.sum(weight_N),
        "correct_sum": jnp.sum(correct_N * weight_N),
        "dropped_sum": jnp.zeros((), jnp.float32),
    }
