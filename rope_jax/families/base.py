"""The base of the per-family task objects: batch contract, initialisation, LM loss sums.

In the spirit of T5X's ``BaseTransformerModel`` subclasses (``EncoderOnlyModel``,
``EncoderDecoderModel``, ``DecoderOnlyModel``): one object per ``ModelConfig.family`` that
knows how to call its flax module on a batch, so the trainer, fine-tuning, decoding, the
ablation and Hugging Face conversion never re-derive call signatures. Where it differs from
T5X: losses come back as token-weighted *sums* (``training.losses.weighted_cross_entropy``),
not means, so gradient accumulation divides once by the whole batch's weight; and the
object holds the module only (params stay plain pytrees passed in).

Batch formats (contracts.md "Batch format") per family are ``batch_keys``; a batch missing
one is an error naming the family and the missing keys.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from rope_jax.training import losses

RANDOM_FEATURES = "random_features"
# The entry of a decoding state (a dict) holding per-input constants that every step reads
# and none writes: beam search neither repeats them per beam nor reorders them.
SHARED = "shared"


def variables_of(params, random_features=None, cache=None) -> dict[str, Any]:
    """The flax variable collections of ``params`` (+ Performer features, + decode cache)."""
    variables = {"params": params}
    if random_features:
        variables[RANDOM_FEATURES] = random_features
    if cache is not None:
        variables["cache"] = cache
    return variables


def dummy_batch(example_batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Single-row zeros with the example's trailing shape (segment ids 1: nothing is padding)."""
    out = {}
    for name, value in example_batch.items():
        fill = 1 if name.endswith("segment_ids") else 0
        out[name] = np.full((1,) + tuple(np.shape(value))[1:], fill, np.int32)
    return out


class ModelTask(abc.ABC):
    """How to call one model family. Subclasses set ``family``, ``batch_keys`` and
    ``model_inputs`` (batch -> positional and keyword arguments of the module call)."""

    family: ClassVar[str] = ""
    batch_keys: ClassVar[tuple[str, ...]] = ()
    # The batch keys holding the input and the target tokens.
    input_key: ClassVar[str] = "input_tokens"
    target_key: ClassVar[str] = "target_tokens"
    weight_key: ClassVar[str] = "loss_weights"
    # Whether ``decoding.generate`` can run this family.
    generates: ClassVar[bool] = False

    def __init__(self, model):
        self.model = model

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__})"

    # Tasks are static arguments of jitted functions: equal when their modules are.
    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.model == other.model

    def __hash__(self) -> int:
        return hash((type(self), self.model))

    @property
    def config(self):
        """The model's ``ModelConfig`` (None for a hand-written test module)."""
        return getattr(self.model, "config", None)

    # --------------------------------------------------------------- batches

    def check_batch(self, batch: Mapping[str, Any], keys: tuple[str, ...] | None = None) -> None:
        missing = [k for k in (keys or self.batch_keys) if k not in batch]
        if missing:
            raise KeyError(
                f"a {self.family} batch needs {list(keys or self.batch_keys)}; {missing} "
                f"missing from {sorted(batch)}. Is model.family={self.family!r} the family "
                "the data was made for?"
            )

    def input_length(self, batch: Mapping[str, Any]) -> int:
        return int(np.shape(batch[self.input_key])[-1])

    def target_length(self, batch: Mapping[str, Any]) -> int:
        return int(np.shape(batch[self.target_key])[-1])

    def targets_and_weights(self, batch):
        return batch[self.target_key], batch[self.weight_key]

    def example_batch(self, length: int = 8) -> dict[str, np.ndarray]:
        """A one-row batch of this family's keys (shapes for ``init`` when no data is at hand)."""
        return {key: np.zeros((1, length), np.int32) for key in self.batch_keys}

    @abc.abstractmethod
    def model_inputs(self, batch) -> tuple[tuple, dict[str, Any]]:
        """``(args, kwargs)`` of the module call for a batch of this family."""

    # ------------------------------------------------------------ init, apply

    def init(self, rngs, example_batch: Mapping[str, Any] | None = None):
        """Boxed variables (with logical partition metadata) from a one-row dummy of
        ``example_batch`` (default: ``example_batch()``)."""
        example = self.example_batch() if example_batch is None else example_batch
        batch = {k: jnp.asarray(v) for k, v in dummy_batch(example).items()}
        args, kwargs = self.model_inputs(batch)
        return self.model.init(rngs, *args, **kwargs, deterministic=True)

    def init_rngs(self, key) -> dict[str, jax.Array]:
        params_key, dropout_key, features_key = jax.random.split(key, 3)
        return {"params": params_key, "dropout": dropout_key, RANDOM_FEATURES: features_key}

    def logits(self, variables, batch, *, deterministic: bool = True, rngs=None, **extra):
        """The module's output for the batch: float32 LM logits ``[B, L, V]``."""
        args, kwargs = self.model_inputs(batch)
        return self.model.apply(
            variables, *args, **kwargs, **extra, deterministic=deterministic, rngs=rngs
        )

    # ------------------------------------------------------------ LM losses

    def predict(
        self, variables, batch, *, deterministic: bool, rngs=None, mlm_max_predictions: int = 0
    ):
        """``(logits, targets, weights, dropped)`` ready for the cross entropy (``dropped``
        counts masked tokens beyond an MLM head's cap; 0 for every other family)."""
        del mlm_max_predictions
        self.check_batch(batch)
        targets, weights = self.targets_and_weights(batch)
        logits = self.logits(variables, batch, deterministic=deterministic, rngs=rngs)
        return logits, targets, weights, jnp.zeros((), jnp.int32)

    def loss_sums(
        self,
        variables,
        batch,
        *,
        deterministic: bool,
        rngs=None,
        z_loss: float = 0.0,
        mlm_max_predictions: int = 0,
    ) -> dict[str, jax.Array]:
        """Token-weighted sums of the batch (``losses.weighted_cross_entropy``) plus
        ``dropped_sum``; the train step divides by ``weight_sum`` of the whole batch."""
        logits, targets, weights, dropped = self.predict(
            variables,
            batch,
            deterministic=deterministic,
            rngs=rngs,
            mlm_max_predictions=mlm_max_predictions,
        )
        sums = losses.weighted_cross_entropy(logits, targets, weights, z_loss=z_loss)
        sums["dropped_sum"] = dropped.astype(jnp.float32)
        return sums

    def token_losses(self, variables, batch) -> jax.Array:
        """Cross entropy of every target token ``[B, L]`` (float32, deterministic), zero
        weight included: the loss-by-position curves weight it themselves."""
        self.check_batch(batch)
        targets_BL, _ = self.targets_and_weights(batch)
        logits_BLV = self.logits(variables, batch, deterministic=True).astype(jnp.float32)
        _, log_normalizer_BL, target_logit_BL = losses.log_normalizer_and_target(
            logits_BLV, targets_BL
        )
        return log_normalizer_BL - target_logit_BL

    def score(self, variables, batch) -> jax.Array:
        """Per-example log-likelihood of the weighted targets ``[B]`` (rank classification:
        T5X's ``score_batch``; the candidate with the highest score wins)."""
        _, weights_BL = self.targets_and_weights(batch)
        token_losses_BL = self.token_losses(variables, batch)
        return -jnp.sum(token_losses_BL * weights_BL.astype(jnp.float32), axis=-1)
