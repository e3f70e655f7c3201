"""The families that generate: encoder-decoder (T5 / mT5 / PEGASUS) and decoder-only LMs.

Besides the loss (``ModelTask``), each gives ``rope_jax.decoding`` what it needs to decode:
``decode_start`` (the prompt the loop starts from and the state after encoding / prefill)
and a step function ``step_fn(token_ids_B, state) -> (logits_BV, state)``, either against
the flax "cache" collection (``models.init_cache``: key/value caches of softmax-family
attention and the running sums of causal linear kernels, all batch-major so beam search can
repeat and reorder them) or by re-running the decoder over the whole prefix
(``use_cache=False``: what the cache saves is measured against it, and it is its reference).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rope_jax.families.base import SHARED, ModelTask, variables_of


def _collections(params, variables, cache=None):
    collections = {"params": params, **(variables or {})}
    if cache is not None:
        collections["cache"] = cache
    return collections


def _recompute_state(state, batch: int, max_length: int):
    return {
        **state,
        "tokens": jnp.zeros((batch, max_length), jnp.int32),
        "position": jnp.zeros((), jnp.int32),
    }


class EncoderDecoderTask(ModelTask):
    family = "encoder_decoder"
    batch_keys = (
        "encoder_input_tokens",
        "encoder_segment_ids",
        "encoder_positions",
        "decoder_input_tokens",
        "decoder_target_tokens",
        "decoder_segment_ids",
        "decoder_positions",
        "decoder_loss_weights",
    )
    input_key = "encoder_input_tokens"
    target_key = "decoder_target_tokens"
    weight_key = "decoder_loss_weights"
    generates = True

    def model_inputs(self, batch):
        kwargs = {
            name: batch.get(name)
            for name in (
                "encoder_segment_ids",
                "decoder_segment_ids",
                "encoder_positions",
                "decoder_positions",
            )
        }
        return (batch["encoder_input_tokens"], batch["decoder_input_tokens"]), kwargs

    # ------------------------------------------------------------- decoding

    def decode_start(self, params, inputs_BL, *, max_length, variables, use_cache, **unused):
        """``(state, start_position)``: the decoder starts from ``decoder_start_id`` (filled
        in by the caller) after one encoder pass.

        Cached: the encoder side is computed once, cross-attention keys/values of every
        decoder layer included, and held under ``state[SHARED]``, which beam search neither
        repeats per beam nor reorders (beam rows attend to their encoder row,
        ``layers.MultiHeadAttention._grouped_cross``); only the decoder's own cache is
        carried per row.
        """
        del unused
        from rope_jax import models as models_lib

        batch, encoder_length = inputs_BL.shape
        if not use_cache:
            encoded = self.model.apply(_collections(params, variables), inputs_BL, method="encode")
            state = {"encoded": encoded, "encoder_tokens": inputs_BL}
            return _recompute_state(state, batch, max_length), 0
        cache = models_lib.init_cache(self.model, batch, max_length, encoder_length=encoder_length)
        return {"cache": cache, SHARED: self.encode_for_decoding(params, inputs_BL, variables)}, 0

    def encode_for_decoding(self, params, inputs_BL, variables=None) -> dict:
        """Encoder output, encoder tokens and every decoder layer's cross-attention keys/values
        (the "cross_cache" collection, ``[B, S, H, D]`` per layer).

        The keys/values are what one decoder call stores when "cross_cache" is mutable; that
        call runs on a throw-away one-slot cache. Hugging Face's Flax T5 instead recomputes
        them from the encoder output at every step.
        """
        from rope_jax import models as models_lib

        batch, encoder_length = inputs_BL.shape
        encoded = self.model.apply(_collections(params, variables), inputs_BL, method="encode")
        scratch = models_lib.init_cache(self.model, batch, 1, encoder_length=encoder_length)
        _, mutated = self.model.apply(
            _collections(params, variables, scratch),
            encoded,
            inputs_BL,
            jnp.zeros((batch, 1), jnp.int32),
            decode=True,
            mutable=["cache", "cross_cache"],
            method="decode",
        )
        return {
            "encoded": encoded,
            "encoder_tokens": inputs_BL,
            "cross_cache": mutated["cross_cache"],
        }

    def step_fn(self, params, variables=None):
        """Cached step: one decoder token against the cache, attending to the encoding.

        The encoder side is read from ``state[SHARED]``; a state without it carries the
        encoder side at top level (per row: beam search repeats and reorders it, the
        reference the shared form is tested against).
        """

        def step(token_ids_B, state):
            encoder = state.get(SHARED, state)
            collections = _collections(params, variables, state["cache"])
            if "cross_cache" in encoder:
                collections["cross_cache"] = encoder["cross_cache"]
            logits_BTV, mutated = self.model.apply(
                collections,
                encoder["encoded"],
                encoder["encoder_tokens"],
                token_ids_B[:, None],
                decode=True,
                mutable=["cache"],
                method="decode",
            )
            return logits_BTV[:, -1].astype(jnp.float32), {**state, "cache": mutated["cache"]}

        return step

    def recompute_step_fn(self, params, variables=None):
        """Step without a cache: the decoder runs over the ``[B, max_length]`` prefix buffer
        (causal attention makes the unwritten tail irrelevant)."""

        def step(token_ids_B, state):
            position = state["position"]
            tokens_BL = state["tokens"].at[:, position].set(token_ids_B)
            logits_BLV = self.model.apply(
                _collections(params, variables),
                state["encoded"],
                state["encoder_tokens"],
                tokens_BL,
                method="decode",
            )
            logits_BV = jax.lax.dynamic_index_in_dim(logits_BLV, position, axis=1, keepdims=False)
            return logits_BV.astype(jnp.float32), {
                **state,
                "tokens": tokens_BL,
                "position": position + 1,
            }

        return step


class DecoderTask(ModelTask):
    """Decoder-only LM: causal, or prefix LM (``prefix_mask`` 1 = bidirectional prefix)."""

    family = "decoder"
    batch_keys = (
        "input_tokens",
        "target_tokens",
        "loss_weights",
        "segment_ids",
        "positions",
        "prefix_mask",
    )
    generates = True

    def model_inputs(self, batch):
        kwargs = {
            "segment_ids": batch.get("segment_ids"),
            "positions": batch.get("positions"),
            "prefix_mask": batch.get("prefix_mask"),
        }
        return (batch["input_tokens"],), kwargs

    def check_batch(self, batch, keys=None):
        # A causal-LM batch may leave out prefix_mask (all zeros: nothing bidirectional).
        wanted = keys or tuple(k for k in self.batch_keys if k != "prefix_mask")
        super().check_batch(batch, wanted)

    def example_batch(self, length: int = 8):
        # A causal-LM row: no prefix mask, which linear-family kernels do not take.
        keys = [k for k in self.batch_keys if k != "prefix_mask"]
        return {key: np.zeros((1, length), np.int32) for key in keys}

    # ------------------------------------------------------------- decoding

    def decode_start(
        self, params, inputs_BL, *, max_length, variables, use_cache, prefill_length=0
    ):
        """The state after feeding the first ``prefill_length`` prompt tokens in one call
        (cached), or the prefix buffer (recomputed); decoding continues from there."""
        from rope_jax import models as models_lib

        if not use_cache:
            return _recompute_state({}, inputs_BL.shape[0], max_length), 0
        cache = models_lib.init_cache(self.model, inputs_BL.shape[0], max_length)
        if prefill_length > 0:
            _, mutated = self.model.apply(
                _collections(params, variables, cache),
                inputs_BL[:, :prefill_length],
                decode=True,
                mutable=["cache"],
            )
            cache = mutated["cache"]
        return {"cache": cache}, prefill_length

    def step_fn(self, params, variables=None):
        def step(token_ids_B, state):
            logits_BTV, mutated = self.model.apply(
                _collections(params, variables, state["cache"]),
                token_ids_B[:, None],
                decode=True,
                mutable=["cache"],
            )
            return logits_BTV[:, -1].astype(jnp.float32), {"cache": mutated["cache"]}

        return step

    def recompute_step_fn(self, params, variables=None):
        def step(token_ids_B, state):
            position = state["position"]
            tokens_BL = state["tokens"].at[:, position].set(token_ids_B)
            logits_BLV = self.model.apply(_collections(params, variables), tokens_BL)
            logits_BV = jax.lax.dynamic_index_in_dim(logits_BLV, position, axis=1, keepdims=False)
            return logits_BV.astype(jnp.float32), {
                **state,
                "tokens": tokens_BL,
                "position": position + 1,
            }

        return step


__all__ = ["DecoderTask", "EncoderDecoderTask", "variables_of"]
