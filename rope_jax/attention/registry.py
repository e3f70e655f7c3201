"""Attention kernels by config name: ``get_attention_fn("performer", kernel="relu")``."""

from __future__ import annotations

import functools
import inspect

from rope_jax.attention.linear import linear_attention, taylor_attention
from rope_jax.attention.nystrom import nystrom_attention
from rope_jax.attention.performer import performer_attention
from rope_jax.attention.softmax import softmax_attention
from rope_jax.attention.synthesizer import random_synthesizer_attention

ATTENTION_FNS = {
    "softmax": softmax_attention,
    "performer": performer_attention,
    "nystrom": nystrom_attention,
    "linear": linear_attention,
    "taylor": taylor_attention,
    "random_synthesizer": random_synthesizer_attention,
}


def get_attention_fn(name, **hyperparameters):
    """The kernel called ``name`` with ``hyperparameters`` bound as keyword defaults.

    The result has the common signature ``fn(q, k, v, *, mask=None, bias=None, ...,
    q_positions=None, kv_positions=None, rope=None)``; keywords given at call time override
    the bound ones (e.g. a performer ``projection`` held in a variable collection).
    Unknown names and keywords the kernel does not take raise ValueError.
    """
    if name not in ATTENTION_FNS:
        raise ValueError(
            f"Unknown attention kernel {name!r}; known kernels: {sorted(ATTENTION_FNS)}."
        )
    fn = ATTENTION_FNS[name]
    accepted = {
        parameter.name
        for parameter in inspect.signature(fn).parameters.values()
        if parameter.kind == inspect.Parameter.KEYWORD_ONLY
    }
    unknown = sorted(set(hyperparameters) - accepted)
    if unknown:
        raise ValueError(
            f"Attention kernel {name!r} does not take {unknown}; its keyword arguments are "
            f"{sorted(accepted)}."
        )
    return functools.partial(fn, **hyperparameters) if hyperparameters else fn
