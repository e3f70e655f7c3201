"""Attention kernels as pure functions on ``[B, L, H, D]`` (no parameters inside).

Every kernel: ``fn(q, k, v, *, mask=None, bias=None, <hyper-parameters>, q_positions=None,
kv_positions=None, rope=None) -> [B, T, H, D]`` in q's dtype; ``get_attention_fn(name)``
picks one by config name, ``KERNELS[name]`` is its ``KernelSpec`` (traits, variables,
decoding form, FLOPs; see ``registry``).
"""

from rope_jax.attention import linear, performer
from rope_jax.attention.kernelized import FeatureState
from rope_jax.attention.linear import (
    elu_features,
    linear_attention,
    taylor_attention,
    taylor_features,
)
from rope_jax.attention.masks import causal_mask, combine_masks, padding_mask, segment_mask
from rope_jax.attention.nystrom import iterative_pinv, nystrom_attention
from rope_jax.attention.performer import performer_attention, performer_projection
from rope_jax.attention.registry import ATTENTION_FNS, KERNELS, get_attention_fn, get_spec
from rope_jax.attention.softmax import (
    masked_softmax,
    softmax_attention,
    softmax_attention_heads_major,
)
from rope_jax.attention.spec import KernelSpec, KernelTraits
from rope_jax.attention.synthesizer import random_synthesizer_attention

# Recurrent (incremental decoding) forms of the causal linear-family kernels.
performer_init_state = performer.init_state
performer_step = performer.step
linear_init_state = linear.init_state
linear_step = linear.step
taylor_init_state = linear.taylor_init_state
taylor_step = linear.taylor_step

__all__ = [
    "ATTENTION_FNS",
    "FeatureState",
    "KERNELS",
    "KernelSpec",
    "KernelTraits",
    "causal_mask",
    "combine_masks",
    "elu_features",
    "get_attention_fn",
    "get_spec",
    "iterative_pinv",
    "linear_attention",
    "linear_init_state",
    "linear_step",
    "masked_softmax",
    "nystrom_attention",
    "padding_mask",
    "performer_attention",
    "performer_init_state",
    "performer_projection",
    "performer_step",
    "random_synthesizer_attention",
    "segment_mask",
    "softmax_attention",
    "softmax_attention_heads_major",
    "taylor_attention",
    "taylor_features",
    "taylor_init_state",
    "taylor_step",
]
