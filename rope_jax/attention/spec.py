"""What an attention kernel says about itself: ``KernelSpec`` (one per registry entry).

The attention layer, the model-config checks, the FLOP counter, the ablation grid and the
kernel table in ``docs/kernels.md`` read these fields instead of knowing kernel names
(flaxformer passes an ``attention_fn``; MaxText picks one inside its ``AttentionOp``; here
the spec also carries what the shells need around the function).

``cfg`` below is the model config (``rope_jax.model_config.ModelConfig``), read by attribute
only (``cfg.num_heads``, ``cfg.head_dim``, ``cfg.max_length`` and the spec's own
``config_fields``): kernels know no modules.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

from rope_jax.config_fields import ConfigField

# Where a kernel variable lives: trained parameters, or random features drawn from the
# "params" rng at init that the trainer redraws every ``redraw_features_every`` steps (by
# initialising again) and that no optimizer touches.
COLLECTIONS = ("params", "random_features")
# How a kernel takes RoPE: "inputs" = q and k rotated before the call (the layer does it,
# so cached keys are stored rotated); "kernel" = the kernel rotates (``rope=RopeSpec``, with
# its linear-attention ``recipe``); "none" = it forms no q . k logits to rotate.
ROPE_FORMS = ("inputs", "kernel", "none")
# Logit scale: "argument" = takes ``scale=``; "fixed" = approximates softmax(q k^T / sqrt(D))
# with no argument (the layer multiplies q by ``scale * sqrt(D)``); "none" = no softmax to
# match (the kernel takes q as it is).
SCALE_FORMS = ("argument", "fixed", "none")


@dataclasses.dataclass(frozen=True)
class KernelTraits:
    """What a kernel can express, as far as the model shells are concerned.

    full_mask: takes any boolean ``[B, H, T, S]`` mask (packed segments, prefix LM);
      otherwise only a key-padding mask ``[B, 1, 1, S]`` plus ``causal=`` (and
      ``segment_ids=`` when ``segments``).
    causal: has a causal form that never looks at later positions.
    bias: takes an additive ``[B|1, H|1, T, S]`` bias (T5 relative bias, ALiBi).
    segments: takes packed-row ``segment_ids=`` / ``kv_segment_ids=`` and keeps the packed
      examples apart without a full mask.
    packed: may train on packed rows (needs ``full_mask`` or ``segments`` as well).
    cross: may serve as cross-attention (queries of one sequence, keys of another).
    rope: see ``ROPE_FORMS``; scale: see ``SCALE_FORMS``.
    dropout: drops attention weights (takes ``dropout_rate=`` and ``dropout_rng=``).
    independent_queries: each query's output depends on that query alone, so beam rows that
      share an encoder row can be attended as more queries of one row.
    slot_weights: the weights depend on the query slot in the row (a learned table), so
      incremental cross-attention must count the decoder slots it has seen.
    """

    full_mask: bool
    causal: bool
    bias: bool
    segments: bool = False
    packed: bool = True
    cross: bool = True
    rope: str = "inputs"
    scale: str = "argument"
    dropout: bool = False
    independent_queries: bool = False
    slot_weights: bool = False

    def __post_init__(self):
        if self.rope not in ROPE_FORMS or self.scale not in SCALE_FORMS:
            raise ValueError(f"KernelTraits: rope in {ROPE_FORMS}, scale in {SCALE_FORMS}.")


@dataclasses.dataclass(frozen=True)
class KernelVariable:
    """An array a kernel takes that the attention layer owns (kernels hold no state).

    name: the variable's name in the layer (part of checkpoints: never rename).
    argument: the kernel keyword it is passed as.
    collection: one of ``COLLECTIONS``.
    shape: ``shape(cfg) -> tuple``.
    init: ``init(cfg) -> initializer(key, shape, dtype)``; params are stored in the
      config's ``param_dtype``, random features in float32.
    axes: logical axis names of a params variable (sharding).
    used: ``used(cfg, cross) -> bool``; False = the layer creates no such variable.
    read: ``read(value, cfg, q_offset, q_len, kv_len) -> array`` for one call (e.g. a slice
      of a per-position table); None = the value as it is.
    """

    name: str
    argument: str
    collection: str
    shape: Callable[[Any], tuple]
    init: Callable[[Any], Callable]
    axes: tuple = ()
    used: Callable[[Any, bool], bool] = lambda cfg, cross: True
    read: Callable[..., Any] | None = None

    def __post_init__(self):
        if self.collection not in COLLECTIONS:
            raise ValueError(f"KernelVariable {self.name}: collection must be in {COLLECTIONS}.")


@dataclasses.dataclass(frozen=True)
class Recurrent:
    """Incremental (token-by-token) causal decoding, equal to the causal kernel.

    ``init(batch, heads, head_dim, value_dim, **{name: call_kwargs[name] for name in
    init_arguments})`` makes the state (every array batch-first; scalars are counters);
    ``step(state, q_t, k_t, v_t, *, mask, position, **step keywords) -> (state, out_t)``
    takes ``[B, 1, H, D]`` inputs, the new key's validity ``mask [B, 1, 1, 1]``, its
    ``position`` ``[B, 1]``, ``rope=`` when the kernel rotates (``traits.rope == "kernel"``)
    and the named ``step_arguments`` from the kernel's call keywords (hyperparameters,
    variables, ``scale``).
    """

    init: Callable
    step: Callable
    init_arguments: tuple[str, ...] = ()
    step_arguments: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One attention kernel and everything the model shells need to use it.

    fn: the pure function ``fn(q, k, v, *, mask=None, bias=None, <keywords>) -> out``.
    summary: one line for the docs table (what it computes, whom it follows).
    traits: ``KernelTraits``.
    config_fields: the model-config fields the kernel owns (``ConfigField``; they become
      fields of ``ModelConfig``).
    hyperparameters: kernel keyword -> config field, bound when the layer is built.
    variables: ``KernelVariable`` s the layer creates and passes in.
    recurrent: incremental decoding form, or None (decoding then keeps a key/value cache of
      every position and needs ``traits.full_mask``).
    heads_major_fn: the same kernel on keys ``[B, H, D, S]`` and values ``[B, H, S, D]``
      (the layout decoding stores encoder keys in), or None.
    flops: ``flops(cfg, q_len, kv_len, causal) -> float``, forward matmul FLOPs of one
      layer's kernel (projections excluded), counting what the function computes.
    why_not: for traits that are False, why (a clause for error messages and the docs),
      keyed by trait name.
    ablation: part of the default position x kernel ablation grid.
    check_length: ``check_length(cfg, length) -> str``, a reason the kernel should not run
      at that length ("" = fine), or None.
    """

    name: str
    fn: Callable
    summary: str
    traits: KernelTraits
    flops: Callable[[Any, int, int, bool], float]
    config_fields: tuple[ConfigField, ...] = ()
    hyperparameters: Mapping[str, str] = dataclasses.field(default_factory=dict)
    variables: tuple[KernelVariable, ...] = ()
    recurrent: Recurrent | None = None
    heads_major_fn: Callable | None = None
    why_not: Mapping[str, str] = dataclasses.field(default_factory=dict)
    ablation: bool = True
    check_length: Callable[[Any, int], str] | None = None

    def bind(self, cfg) -> Callable:
        """``fn`` with the config's hyperparameters bound as keyword defaults."""
        values = {keyword: getattr(cfg, field) for keyword, field in self.hyperparameters.items()}
        return functools.partial(self.fn, **values) if values else self.fn

    def reason(self, trait: str) -> str:
        """Why the kernel lacks ``trait``, as `` (<reason>)``, or "" when none is given."""
        return f" ({self.why_not[trait]})" if trait in self.why_not else ""
