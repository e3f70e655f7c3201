"""Cloze scoring and losses for every model family: PET and P-tuning as a ``ModelTask``.

``ClozeTask(family_task, ...)`` wraps the task object of a model family (``rope_jax.families``)
and the optional P-tuning prompt encoder; the train loop (``training.runner``) runs it like
any family: ``init``, ``loss_sums`` (token- or example-weighted sums), and the evaluators
call ``candidate_scores`` / ``generate``. Params: the language model's tree plus
``prompt_encoder`` when the pattern has prompt positions.

Scores (arrays of ``cloze_inputs``): a candidate's score is the sum over its slots of the
model's log-probability of the candidate token at the slot (encoder: the MLM at the mask,
PET; decoder: the next token; encoder-decoder: the token after the sentinel). For one-token
verbalizers this is PET's ``convert_mlm_logits_to_cls_logits`` up to a constant per row
(PET takes raw MLM logits, which differ from log-probabilities by the row's log normaliser:
the softmax over labels and the argmax are the same). Multi-token candidates on an encoder
are scored ``"iterative"``ly by default (PET ``MultiMaskTaskHelper._get_choice_probabilities_
batched``, decoding_strategy "default": fill the most probable remaining mask with its
candidate token, run again, sum the log-probabilities) or ``"parallel"``y (one pass);
decoders and encoder-decoders score exact left-to-right log-likelihoods in one pass.

Losses (``loss_sums``):

* choice tasks: cross entropy over the candidates' scores, the right ones' probability
  summed (``families.classification_sums``; PET's ``mlm_train_step`` is the cross entropy
  over verbalizer logits); ``multiple_choice_loss="hinge"`` is PET's COPA/ReCoRD loss
  instead: ``max(0, 1 + CE(right) - CE(wrong))`` per wrong candidate, CE the mean token
  cross entropy of a candidate (``CopaTaskHelper.train_step``);
* generative tasks (WSC): token cross entropy of the referent at its slots
  (``WscTaskHelper.train_step``: the MLM loss on the target ids);
* ``pet_alpha < 1`` (encoders): PET's auxiliary language modelling,
  ``alpha * L_cloze + (1 - alpha) * L_mlm`` (``wrapper.mlm_train_step``), the MLM loss on
  BERT-masked copies of the same rows (15 %: 80 % mask, 10 % random, 10 % kept), drawn from
  the step's dropout key. PET masks its unlabelled set; FewGLUE's 32 examples are all there
  is here. With gradient accumulation the MLM mean is per microbatch.
* ``freeze_lm``: the language model's params are ``stop_gradient``-ed, so its gradients are
  zero and the clipping norm is the prompts' alone (the optimizer also masks them out,
  ``fewshot.make_optimizer``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rope_jax import families
from rope_jax.families.base import ModelTask
from rope_jax.prompts import PromptEncoder

PROMPT_PARAMS = "prompt_encoder"
_NEG = -1e9


class ClozeTask(ModelTask):
    """PET / P-tuning on a model family (see the module docstring)."""

    def __init__(
        self,
        inner: ModelTask,
        *,
        num_prompts: int = 0,
        prompt_kind: str = "lstm",
        freeze_lm: bool = False,
        generative: bool = False,
        multiple_choice_loss: str = "cross_entropy",
        decoding: str = "iterative",
        pet_alpha: float = 1.0,
        mask_id: int | None = None,
    ):
        super().__init__(inner.model)
        if multiple_choice_loss not in ("cross_entropy", "hinge"):
            raise ValueError(
                f"multiple_choice_loss={multiple_choice_loss!r}; choose cross_entropy or hinge"
            )
        if decoding not in ("iterative", "parallel"):
            raise ValueError(f"decoding={decoding!r}; choose iterative or parallel")
        if not 0.0 <= pet_alpha <= 1.0:
            raise ValueError(f"pet_alpha={pet_alpha} must be in [0, 1] (1 = no MLM loss)")
        if pet_alpha < 1.0 and (inner.family != "encoder" or mask_id is None):
            raise ValueError("pet_alpha < 1 (auxiliary MLM loss) needs an encoder with a mask id")
        self.inner, self.family = inner, inner.family
        self.num_prompts, self.prompt_kind = num_prompts, prompt_kind
        self.freeze_lm, self.generative = freeze_lm, generative
        self.multiple_choice_loss, self.decoding = multiple_choice_loss, decoding
        self.pet_alpha, self.mask_id = pet_alpha, mask_id
        d_model = inner.config.d_model
        self.prompts = PromptEncoder(num_prompts, d_model, prompt_kind) if num_prompts else None

    def _key(self):
        return (
            type(self.inner), self.model, self.num_prompts, self.prompt_kind, self.freeze_lm,
            self.generative, self.multiple_choice_loss, self.decoding, self.pet_alpha,
            self.mask_id,
        )  # fmt: skip

    def __eq__(self, other) -> bool:
        return isinstance(other, ClozeTask) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    # ------------------------------------------------------------- contract

    def model_inputs(self, batch):
        return self.inner.model_inputs(batch)

    def input_length(self, batch) -> int:
        return int(np.shape(batch["tokens"])[-1])

    def target_length(self, batch) -> int:
        return int(np.shape(batch["slot_positions"])[-1])

    def init(self, rngs, example_batch=None):
        """The family's variables (from its own one-row example) plus the prompt encoder."""
        del example_batch
        variables = self.inner.init(rngs)
        if self.prompts is None:
            return variables
        # Prompt parameters carry no logical axes: they are small and replicated.
        prompt_params = nn.unbox(self.prompts.init({"params": rngs["params"]})["params"])
        return {**variables, "params": {**variables["params"], PROMPT_PARAMS: prompt_params}}

    def split(self, variables) -> tuple[dict, Any]:
        """(the language model's variables, prompt params or None)."""
        params = dict(variables["params"])
        prompt_params = params.pop(PROMPT_PARAMS, None)
        if self.freeze_lm:
            params = jax.lax.stop_gradient(params)
        return {**variables, "params": params}, prompt_params

    # ------------------------------------------------------------- forward

    def _rows(self, batch, tokens=None):
        """The family's model batch of the ``[N, R, ...]`` rows folded to ``[N * R, ...]``."""

        def fold(x):
            return x.reshape((-1,) + tuple(x.shape[2:]))

        tokens = batch["tokens"] if tokens is None else tokens
        if self.family == "encoder":
            rows = {
                "input_tokens": tokens,
                "segment_ids": batch["segment_ids"],
                "positions": batch["positions"],
            }
            if getattr(self.inner.config, "type_vocab_size", 0):
                rows["token_type_ids"] = batch["types"]
        elif self.family == "decoder":
            rows = {
                "input_tokens": tokens,
                "segment_ids": batch["segment_ids"],
                "positions": batch["positions"],
            }
        else:
            rows = {
                "encoder_input_tokens": batch["tokens"],
                "encoder_segment_ids": batch["segment_ids"],
                "encoder_positions": batch["positions"],
                "decoder_input_tokens": tokens,
                "decoder_segment_ids": batch["decoder_segment_ids"],
                "decoder_positions": batch["decoder_positions"],
            }
        return {k: fold(v) for k, v in rows.items()}

    def _prompt_kwargs(self, prompt_params, batch):
        if self.prompts is None:
            return {}
        vectors_PE = self.prompts.apply({"params": prompt_params})
        mask_BL = batch["prompt_mask"].reshape((-1, batch["prompt_mask"].shape[-1]))
        index_BL = jnp.clip(jnp.cumsum(mask_BL, axis=-1) - 1, 0, self.num_prompts - 1)
        return {"prompt_embeddings": vectors_PE[index_BL], "prompt_mask": mask_BL}

    def slot_log_probs(self, variables, batch, *, tokens=None, deterministic=True, rngs=None):
        """Log-probabilities ``[N, R, M, V]`` (float32) at every slot of every row;
        ``tokens`` replaces the rows' editable tokens (encoder / decoder input, or the
        encoder-decoder's decoder input)."""
        lm_variables, prompt_params = self.split(variables)
        editable = batch["decoder_tokens"] if self.family == "encoder_decoder" else batch["tokens"]
        tokens = editable if tokens is None else tokens
        n, r = editable.shape[:2]
        rows = self._rows(batch, tokens)
        extra = self._prompt_kwargs(prompt_params, batch)
        slots_BM = batch["slot_positions"].reshape(n * r, -1)
        if self.family == "encoder":
            extra["masked_positions"] = slots_BM
            logits_BMV = self.inner.logits(
                lm_variables, rows, deterministic=deterministic, rngs=rngs, **extra
            )
        else:
            logits_BLV = self.inner.logits(
                lm_variables, rows, deterministic=deterministic, rngs=rngs, **extra
            )
            logits_BMV = jnp.take_along_axis(logits_BLV, slots_BM[..., None], axis=1)
        log_probs = jax.nn.log_softmax(logits_BMV.astype(jnp.float32), axis=-1)
        return log_probs.reshape((n, r) + log_probs.shape[1:])

    def _candidate_token_log_probs(self, log_probs_NRMV, batch):
        """``(log p [N, K, M], slot weights [N, K, M])`` of each candidate's tokens."""
        row_NK = batch["candidate_row"]
        tokens_NKM = batch["candidate_tokens"]
        n, k, m = tokens_NKM.shape
        n_idx = jnp.arange(n)[:, None, None]
        m_idx = jnp.arange(m)[None, None, :]
        picked = log_probs_NRMV[n_idx, row_NK[:, :, None], m_idx, tokens_NKM]
        weights = batch["slot_weights"][n_idx, row_NK[:, :, None], m_idx].astype(jnp.float32)
        weights = weights * batch["choice_mask"][:, :, None].astype(jnp.float32)
        return picked * weights, weights

    def candidate_scores(self, variables, batch, *, deterministic=True, rngs=None, iterative=None):
        """``[N, K]`` summed log-probabilities of each candidate (invalid ones ``-1e9``)."""
        iterative = self.decoding == "iterative" if iterative is None else iterative
        multi_token = batch["slot_positions"].shape[-1] > 1
        if iterative and multi_token and self.family == "encoder":
            # One row per candidate (cloze_inputs): fill each row with its own candidate.
            targets_NRM = batch["candidate_tokens"][:, : batch["tokens"].shape[1]]
            total_NR, _ = fill_slots(self, variables, batch, targets_NRM)
            scores_NK = jnp.take_along_axis(total_NR, batch["candidate_row"], axis=1)
        else:
            log_probs = self.slot_log_probs(
                variables, batch, deterministic=deterministic, rngs=rngs
            )
            picked, _ = self._candidate_token_log_probs(log_probs, batch)
            scores_NK = picked.sum(-1)
        return jnp.where(batch["choice_mask"] > 0, scores_NK, _NEG)

    def generate(self, variables, batch):
        """Greedy fill of the first row's slots: ``(token ids [N, M], slot weights [N, M])``;
        an encoder fills the most confident mask first (PET ``WscTaskHelper.eval_step``),
        the others left to right."""
        _, tokens_NRM = fill_slots(self, variables, batch, None)
        return tokens_NRM[:, 0], batch["slot_weights"][:, 0]

    # ---------------------------------------------------------------- loss

    def loss_sums(
        self, variables, batch, *, deterministic, rngs=None, z_loss=0.0, mlm_max_predictions=0
    ):
        del mlm_max_predictions
        example_weight_N = batch.get("example_weights")
        log_probs = self.slot_log_probs(variables, batch, deterministic=deterministic, rngs=rngs)
        picked, weights = self._candidate_token_log_probs(log_probs, batch)
        if self.generative:
            sums = _token_sums(log_probs, picked, weights, batch, example_weight_N)
        elif self.multiple_choice_loss == "hinge":
            sums = _hinge_sums(picked, weights, batch, example_weight_N)
        else:
            scores_NK = jnp.where(batch["choice_mask"] > 0, picked.sum(-1), _NEG)
            sums = families.classification_sums(
                scores_NK[..., None],
                {
                    k: v
                    for k, v in batch.items()
                    if k in ("labels", "choice_mask", "example_weights")
                },
                z_loss=z_loss,
            )
        if self.pet_alpha < 1.0 and not deterministic:
            mlm_mean = self._mlm_loss(variables, batch, rngs["dropout"])
            weight = sums["weight_sum"]
            sums = dict(sums)
            sums["loss_sum"] = self.pet_alpha * sums["loss_sum"] + (
                1.0 - self.pet_alpha
            ) * mlm_mean * jnp.maximum(weight, 1.0)
        return sums

    def _mlm_loss(self, variables, batch, key):
        """Mean MLM cross entropy on BERT-masked copies of the first row of each example."""
        lm_variables, prompt_params = self.split(variables)
        first = {k: v[:, :1] for k, v in batch.items() if np.ndim(v) == 3 and k != "labels"}
        tokens_BL = first["tokens"][:, 0]
        inputs_BL, chosen_BL = bert_masking(
            tokens_BL,
            mlm_maskable(first, self.mask_id),
            key,
            mask_id=self.mask_id,
            vocab_size=self.inner.config.vocab_size,
        )
        rows = self._rows(first, inputs_BL[:, None])
        extra = self._prompt_kwargs(prompt_params, first)
        logits_BLV = self.inner.logits(
            lm_variables, rows, deterministic=False, rngs={"dropout": key}, **extra
        ).astype(jnp.float32)
        log_probs = jax.nn.log_softmax(logits_BLV, axis=-1)
        nll_BL = -jnp.take_along_axis(log_probs, tokens_BL[..., None], axis=-1)[..., 0]
        weights_BL = chosen_BL.astype(jnp.float32)
        if "example_weights" in batch:
            weights_BL = weights_BL * batch["example_weights"][:, None].astype(jnp.float32)
        return jnp.sum(nll_BL * weights_BL) / jnp.maximum(jnp.sum(weights_BL), 1.0)


def mlm_maskable(rows, mask_id: int) -> jax.Array:
    """``[B, L]``: the first row's positions PET's MLM loss may mask: not padding, not a
    prompt position, not the cloze's own masks (PET leaves special tokens, the mask among
    them, unmasked; the separators are not told apart here and may be chosen)."""
    tokens_BL = rows["tokens"][:, 0]
    return (
        (rows["segment_ids"][:, 0] > 0) & (rows["prompt_mask"][:, 0] == 0) & (tokens_BL != mask_id)
    )


def bert_masking(tokens_BL, maskable_BL, key, *, mask_id: int, vocab_size: int, rate=0.15):
    """BERT's corruption (Devlin et al. 2019; PET ``wrapper.mask_tokens``): each maskable
    position is chosen with probability ``rate``; a chosen one becomes the mask (80 %), a
    random id (10 %) or stays (10 %). Returns ``(inputs [B, L], chosen [B, L])``; the draws
    come from ``fold_in(key, 1)`` (the step's dropout key is ``key``)."""
    select_key, kind_key, random_key = jax.random.split(jax.random.fold_in(key, 1), 3)
    chosen_BL = maskable_BL & jax.random.bernoulli(select_key, rate, tokens_BL.shape)
    kind_BL = jax.random.uniform(kind_key, tokens_BL.shape)
    random_BL = jax.random.randint(random_key, tokens_BL.shape, 0, vocab_size, tokens_BL.dtype)
    corrupted = jnp.where(kind_BL < 0.8, mask_id, jnp.where(kind_BL < 0.9, random_BL, tokens_BL))
    return jnp.where(chosen_BL, corrupted, tokens_BL), chosen_BL


def _example_weights(batch, example_weight_N, n):
    if example_weight_N is None:
        return jnp.ones((n,), jnp.float32)
    return example_weight_N.astype(jnp.float32)


def _token_sums(log_probs_NRMV, picked_NKM, weights_NKM, batch, example_weight_N):
    """Token cross entropy of the right candidate (``labels``), weighted per token."""
    gold_NK = (batch["labels"] > 0).astype(jnp.float32)
    row_weight_N = _example_weights(batch, example_weight_N, gold_NK.shape[0])
    token_weights = weights_NKM * gold_NK[:, :, None] * row_weight_N[:, None, None]
    best_NRM = jnp.argmax(log_probs_NRMV, axis=-1)
    row_NK = batch["candidate_row"]
    best_NKM = jnp.take_along_axis(best_NRM, row_NK[:, :, None], axis=1)
    correct = (best_NKM == batch["candidate_tokens"]).astype(jnp.float32)
    loss = -jnp.sum(picked_NKM * token_weights)
    zero = jnp.zeros((), jnp.float32)
    return {
        "loss_sum": loss,
        "cross_entropy_sum": loss,
        "z_loss_sum": zero,
        "weight_sum": jnp.sum(token_weights),
        "correct_sum": jnp.sum(correct * token_weights),
        "dropped_sum": zero,
    }


def _hinge_sums(picked_NKM, weights_NKM, batch, example_weight_N):
    """PET's hinge: per wrong candidate ``max(0, 1 + CE(right) - CE(wrong))``, CE the mean
    token cross entropy; one right candidate per example (PET's COPA and ReCoRD training)."""
    ce_NK = -picked_NKM.sum(-1) / jnp.maximum(weights_NKM.sum(-1), 1.0)
    gold_NK = (batch["labels"] > 0) & (batch["choice_mask"] > 0)
    wrong_NK = (batch["labels"] <= 0) & (batch["choice_mask"] > 0)
    ce_gold_N = jnp.sum(jnp.where(gold_NK, ce_NK, 0.0), -1) / jnp.maximum(gold_NK.sum(-1), 1)
    hinge_NK = jnp.maximum(0.0, 1.0 + ce_gold_N[:, None] - ce_NK) * wrong_NK
    weight_N = jnp.any(gold_NK, -1).astype(jnp.float32)
    weight_N = weight_N * _example_weights(batch, example_weight_N, weight_N.shape[0])
    scores_NK = jnp.where(batch["choice_mask"] > 0, -ce_NK, _NEG)
    best_K = jnp.argmax(scores_NK, -1)
    correct_N = jnp.take_along_axis(gold_NK, best_K[:, None], axis=-1)[:, 0].astype(jnp.float32)
    loss = jnp.sum(hinge_NK.sum(-1) * weight_N)
    zero = jnp.zeros((), jnp.float32)
    return {
        "loss_sum": loss,
        "cross_entropy_sum": loss,
        "z_loss_sum": zero,
        "weight_sum": jnp.sum(weight_N),
        "correct_sum": jnp.sum(correct_N * weight_N),
        "dropped_sum": zero,
    }


def fill_slots(task: ClozeTask, variables, batch, targets_NRM):
    """Fills every row's slots one token per pass, ``M`` passes (a fixed-shape loop).

    With ``targets_NRM`` each slot takes its target token and the log-probabilities are
    summed (PET's "default" decoding of a candidate: the most probable remaining mask
    first); without, each slot takes its argmax token (WSC generation). Encoders choose the
    slot (most confident open one); other families go left to right. Returns
    ``(summed log p [N, R], tokens [N, R, M])``.
    """
    editable = batch["decoder_tokens"] if task.family == "encoder_decoder" else batch["tokens"]
    weights_NRM = batch["slot_weights"] > 0
    fill_NRM = batch["fill_positions"]
    n, r, m = weights_NRM.shape

    def step(_, carry):
        tokens, open_NRM, total_NR, chosen_NRM = carry
        log_probs = task.slot_log_probs(variables, batch, tokens=tokens)
        if targets_NRM is None:
            token_NRM = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
        else:
            token_NRM = targets_NRM
        lp_NRM = jnp.take_along_axis(log_probs, token_NRM[..., None], axis=-1)[..., 0]
        if task.family == "encoder":
            slot_NR = jnp.argmax(jnp.where(open_NRM, lp_NRM, -jnp.inf), axis=-1)
        else:
            slot_NR = jnp.argmax(open_NRM, axis=-1)  # first open slot
        any_open_NR = jnp.any(open_NRM, axis=-1)
        pick_NRM = jax.nn.one_hot(slot_NR, m, dtype=jnp.bool_) & any_open_NR[..., None]
        chosen_token_NR = jnp.sum(jnp.where(pick_NRM, token_NRM, 0), axis=-1)
        total_NR = total_NR + jnp.sum(jnp.where(pick_NRM, lp_NRM, 0.0), axis=-1)
        position_NR = jnp.sum(jnp.where(pick_NRM, fill_NRM, 0), axis=-1)
        write_NRL = (
            jnp.arange(tokens.shape[-1])[None, None, :] == position_NR[..., None]
        ) & any_open_NR[..., None]
        tokens = jnp.where(write_NRL, chosen_token_NR[..., None], tokens)
        chosen_NRM = jnp.where(pick_NRM, chosen_token_NR[..., None], chosen_NRM)
        return tokens, open_NRM & ~pick_NRM, total_NR, chosen_NRM

    init = (
        editable,
        weights_NRM,
        jnp.zeros((n, r), jnp.float32),
        jnp.zeros((n, r, m), jnp.int32),
    )
    _, _, total_NR, chosen_NRM = jax.lax.fori_loop(0, m, step, init)
    return total_NR, chosen_NRM
