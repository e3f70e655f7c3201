"""Continuous prompts for P-tuning (Liu et al. 2021, "GPT Understands, Too").

``PromptEncoder(num_prompts, d_model, kind)()`` returns the ``[P, E]`` vectors that replace
the token embeddings at a pattern's prompt positions (``models``: ``prompt_embeddings`` /
``prompt_mask``; the i-th prompt position of a row takes vector i, as THUDM/P-tuning
``PT-Fewshot/pet/wrapper.py`` ``generate_default_inputs`` does). Kinds:

* ``"lstm"`` (the paper's prompt encoder, ``PT-Fewshot/pet/wrapper.py`` ``ContinuousPrompt``):
  an embedding table ``[P, E]`` read in order, a 2-layer bidirectional LSTM with ``E`` units
  per direction, then ``Linear(2E, E) -> ReLU -> Linear(E, E)``. (The LAMA code,
  ``LAMA/p_tuning/prompt_encoder.py``, uses ``E / 2`` units per direction and
  ``Linear(E, E)`` first; the few-shot SuperGLUE code is followed here.)
* ``"mlp"``: the table then ``Linear(E, E) -> ReLU -> Linear(E, E)`` (the reference's
  ``prompt_encoder_type="mlp"``).
* ``"embedding"``: the table itself (the seed post's form: plain trainable vectors on
  ``[unused]`` tokens).

Initialisation follows flax defaults (PyTorch's differ: LSTM weights uniform in
``±1/sqrt(E)``, embeddings standard normal; the table here is standard normal too).
Parameters are float32; the vectors are cast to the model's compute dtype where they are
written into the embeddings.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

KINDS = ("lstm", "mlp", "embedding")


class PromptEncoder(nn.Module):
    num_prompts: int
    d_model: int
    kind: str = "lstm"

    @nn.compact
    def __call__(self):
        if self.kind not in KINDS:
            raise ValueError(f"prompt encoder kind={self.kind!r}; choose one of {KINDS}")
        if self.num_prompts < 1:
            raise ValueError("a prompt encoder needs at least one prompt position")
        table_PE = self.param(
            "embedding", nn.initializers.normal(1.0), (self.num_prompts, self.d_model), jnp.float32
        )
        if self.kind == "embedding":
            return table_PE
        x_1PE = table_PE[None]
        if self.kind == "lstm":
            for layer in range(2):
                x_1PE = nn.Bidirectional(
                    nn.RNN(nn.OptimizedLSTMCell(self.d_model), name=f"forward_{layer}"),
                    nn.RNN(nn.OptimizedLSTMCell(self.d_model), name=f"backward_{layer}"),
                    name=f"lstm_{layer}",
                )(x_1PE)
        hidden_1PE = nn.relu(nn.Dense(self.d_model, name="mlp_in")(x_1PE))
        return nn.Dense(self.d_model, name="mlp_out")(hidden_1PE)[0]
