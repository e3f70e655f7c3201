"""Attention kernels by config name: one ``KernelSpec`` each (see ``spec``).

A new kernel is its file (the pure function, and its decoding form and FLOP count if it has
them) plus one entry here; the attention layer, config checks, FLOP counts, the ablation
grid and ``docs/kernels.md`` (``python -m rope_jax.attention.registry`` writes it) follow.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax

from rope_jax.attention import (
    linear,
    local,
    nystrom,
    performer,
    softmax,
    sparse,
    synthesizer,
)
from rope_jax.attention.spec import (
    ConfigField,
    KernelSpec,
    KernelTraits,
    KernelVariable,
    Recurrent,
)

# What the feature-map kernels cannot do, said once.
_NO_SCORE_MATRIX = {"bias": "it never forms the T x S score matrix"}
_FEATURE_MAP = KernelTraits(
    full_mask=False, causal=True, bias=False, segments=True, rope="kernel", scale="none"
)

KERNELS: dict[str, KernelSpec] = {
    spec.name: spec
    for spec in (
        KernelSpec(
            name="softmax",
            fn=softmax.softmax_attention,
            summary="exact scaled dot-product attention (Vaswani et al. 2017)",
            traits=KernelTraits(
                full_mask=True, causal=True, bias=True, dropout=True, independent_queries=True
            ),
            flops=softmax.forward_flops,
            heads_major_fn=softmax.softmax_attention_heads_major,
        ),
        KernelSpec(
            name="performer",
            fn=performer.performer_attention,
            summary="FAVOR+ random features (Choromanski et al. 2021)",
            traits=dataclasses.replace(_FEATURE_MAP, scale="fixed"),
            flops=performer.forward_flops,
            config_fields=(
                ConfigField("num_features", int, 256, "random features per head", minimum=1),
                ConfigField(
                    "performer_kernel", str, "softmax", "feature map", choices=performer.KERNELS
                ),
            ),
            hyperparameters={"kernel": "performer_kernel"},
            variables=(
                KernelVariable(
                    name="projection",
                    argument="projection",
                    collection="random_features",
                    shape=lambda cfg: (cfg.num_features, cfg.head_dim),
                    init=lambda cfg: (
                        lambda key, shape, dtype: performer.performer_projection(
                            key, *shape, orthogonal=True
                        )
                    ),
                ),
            ),
            recurrent=Recurrent(
                performer.init_state,
                performer.step,
                init_arguments=("projection",),
                step_arguments=("projection", "kernel"),
            ),
            why_not=_NO_SCORE_MATRIX,
        ),
        KernelSpec(
            name="nystrom",
            fn=nystrom.nystrom_attention,
            summary="Nystromformer landmarks, iterative pseudo-inverse (Xiong et al. 2021)",
            traits=KernelTraits(
                full_mask=False, causal=False, bias=False, packed=False, cross=False
            ),
            flops=nystrom.forward_flops,
            config_fields=(
                ConfigField("num_landmarks", int, 64, "landmarks per head", minimum=1),
                ConfigField(
                    "conv_kernel_size",
                    int,
                    0,
                    "depthwise convolution skip on V (0 = none)",
                    minimum=0,
                ),
            ),
            hyperparameters={"num_landmarks": "num_landmarks"},
            variables=(
                KernelVariable(
                    name="conv_weights",
                    argument="conv_weights",
                    collection="params",
                    shape=lambda cfg: (cfg.conv_kernel_size, cfg.num_heads),
                    init=lambda cfg: jax.nn.initializers.normal(stddev=cfg.conv_kernel_size**-0.5),
                    axes=(None, "heads"),
                    used=lambda cfg, cross: bool(cfg.conv_kernel_size) and not cross,
                ),
            ),
            why_not={
                **_NO_SCORE_MATRIX,
                "causal": "its landmarks average over all positions, so every output would "
                "see future tokens",
                "cross": "its query landmarks average decoder positions, including later "
                "ones, so it would leak future decoder tokens",
                "packed": "its landmarks average over the whole row",
            },
            check_length=nystrom.landmarks_message,
        ),
        KernelSpec(
            name="linear",
            fn=linear.linear_attention,
            summary="elu + 1 feature map (Katharopoulos et al. 2020)",
            traits=_FEATURE_MAP,
            flops=linear.linear_forward_flops,
            recurrent=Recurrent(linear.init_state, linear.step),
            why_not=_NO_SCORE_MATRIX,
        ),
        KernelSpec(
            name="taylor",
            fn=linear.taylor_attention,
            summary="1 + s + s^2/2, exact in linear time (second-order Taylor of exp)",
            traits=dataclasses.replace(_FEATURE_MAP, scale="argument"),
            flops=linear.taylor_forward_flops,
            recurrent=Recurrent(
                linear.taylor_init_state, linear.taylor_step, step_arguments=("scale",)
            ),
            why_not=_NO_SCORE_MATRIX,
            ablation=False,
        ),
        KernelSpec(
            name="random_synthesizer",
            fn=synthesizer.random_synthesizer_attention,
            summary="learned [H, L, L] logits, not from q and k (Tay et al. 2021)",
            traits=KernelTraits(
                full_mask=True,
                causal=True,
                bias=True,
                packed=False,
                rope="none",
                scale="none",
                slot_weights=True,
            ),
            flops=synthesizer.forward_flops,
            variables=(
                KernelVariable(
                    name="synthesizer_logits",
                    argument="logits",
                    collection="params",
                    shape=lambda cfg: (cfg.num_heads, cfg.max_length, cfg.max_length),
                    init=lambda cfg: jax.nn.initializers.normal(
                        stddev=cfg.initializer_range or 1.0
                    ),
                    axes=("heads", None, None),
                    read=synthesizer.logits_for_call,
                ),
            ),
            why_not={
                "rope": "its attention logits are learned per position pair",
                "packed": "it learns one logit per (query slot, key slot) of a row, so a "
                "packed example that starts mid-row would get other attention weights than "
                "on its own",
            },
            ablation=False,
        ),
        KernelSpec(
            name="sparse_topk",
            fn=sparse.sparse_topk_attention,
            summary="softmax over the top-k logits per query (Explicit Sparse Transformer)",
            traits=KernelTraits(
                full_mask=True, causal=True, bias=True, dropout=True, independent_queries=True
            ),
            flops=sparse.forward_flops,
            config_fields=(
                ConfigField("sparse_top_k", int, 8, "logits kept per query", minimum=1),
            ),
            hyperparameters={"top_k": "sparse_top_k"},
        ),
        KernelSpec(
            name="sliding_window",
            fn=local.sliding_window_attention,
            summary="softmax within a window of slots (Longformer; Mistral's rolling cache)",
            traits=KernelTraits(
                full_mask=False, causal=True, bias=False, segments=True, cross=False
            ),
            flops=local.forward_flops,
            config_fields=(
                ConfigField("window_size", int, 16, "keys each side, itself included", minimum=1),
            ),
            hyperparameters={"window": "window_size"},
            recurrent=Recurrent(
                local.init_state, local.step, init_arguments=("window",), step_arguments=("scale",)
            ),
            why_not={
                **_NO_SCORE_MATRIX,
                "cross": "its window is a band of slots of one sequence",
            },
        ),
    )
}

# Kernel functions by name (the pure functions alone).
ATTENTION_FNS = {name: spec.fn for name, spec in KERNELS.items()}


def get_spec(name: str, field: str = "attention") -> KernelSpec:
    """The spec of kernel ``name``; an unknown name is an error listing the known ones."""
    if name not in KERNELS:
        raise ValueError(
            f"{field}={name!r} is not a known attention kernel; choose one of {', '.join(KERNELS)}."
        )
    return KERNELS[name]


def get_attention_fn(name, **hyperparameters):
    """The kernel called ``name`` with ``hyperparameters`` bound as keyword defaults.

    The result has the common signature ``fn(q, k, v, *, mask=None, bias=None, ...,
    q_positions=None, kv_positions=None, rope=None)``; keywords given at call time override
    the bound ones (e.g. a performer ``projection`` held in a variable collection).
    Unknown names and keywords the kernel does not take raise ValueError.
    """
    if name not in KERNELS:
        raise ValueError(f"Unknown attention kernel {name!r}; known kernels: {sorted(KERNELS)}.")
    fn = KERNELS[name].fn
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


def config_fields() -> tuple[ConfigField, ...]:
    """Every kernel's config fields, in registry order (each name once)."""
    fields = {}
    for spec in KERNELS.values():
        for field in spec.config_fields:
            if field.name in fields and fields[field.name] != field:
                raise ValueError(f"config field {field.name!r} is declared twice, differently.")
            fields[field.name] = field
    return tuple(fields.values())
