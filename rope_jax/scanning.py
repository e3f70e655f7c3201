"""Scanned layers: named remat policies and the per-layer <-> stacked parameter trees.

A stack built with ``scan_layers=True`` holds its layers as one module ``layers`` run by
``nn.scan`` (flaxformer's and MaxText's ``scan_layers``): every parameter, Performer
projection, decode-cache entry and cross-attention key/value of the layers gains a leading
``layers`` axis (logical axis name ``layers``), so the layer is traced and compiled once
whatever the depth. Unscanned stacks name their layers ``layers_0, layers_1, ...``.
:func:`stack_layers` and :func:`unstack_layers` turn one tree into the other (parameters,
"random_features", optimizer moments of the same layout); the two models compute the same
function of the same weights.

Remat (gradient checkpointing) is chosen by name, after ``jax.checkpoint_policies``:

* ``none``: keep every activation for the backward pass (no recomputation);
* ``full``: keep only each layer's input and recompute the layer in the backward pass
  (``nothing_saveable``);
* ``save_dots``: keep the outputs of the matrix products with the weights (projections and
  MLP: ``dots_with_no_batch_dims_saveable`` and every output named :data:`PROJECTION`) and
  recompute the rest (norms, activations, the attention scores, whose batched products are
  the large ``[B, H, T, S]`` ones), as MaxText's ``minimal`` policy does.

The weight products run through ``projections.dense_contract``, a ``custom_vjp`` whose
``dot_general`` the dots policies do not see (they saved none of them, and ``save_dots``
recomputed every projection); each projection's output is therefore named
:data:`PROJECTION` (``jax.ad_checkpoint.checkpoint_name``) and the policies save the name.

A scanned stack cannot leave the residuals to XLA. In the loop, XLA sees the forward and the
backward of every layer at once and fuses the elementwise work of the backward into its
consumers, keeping little more than the matmul outputs. Under ``nn.scan`` every residual that
autodiff names crosses the loop boundary: it is written, layer by layer, into a stacked
``[L, ...]`` buffer that the scan first fills with zeros and copies (``jax.lax.scan`` creates
its outputs with ``lax.empty2`` + ``broadcast``, then one ``dynamic-update-slice`` per layer),
and read back by the backward loop: for a T5 layer (gated GELU) about twenty ``[B, T, F]`` and
``[B, T, E]`` buffers and the ``[B, H, T, S]`` attention weights per layer. So
:func:`layer_policy` runs a scanned layer with ``remat='none'`` under :data:`SCANNED_NONE`,
which saves every matmul's output (the projections by name, the attention scores as
``dot_general`` outputs) and nothing else: no product is recomputed, as in the loop, and the
backward pass recomputes only the elementwise work, the norms and the softmax from those
outputs, as XLA's fusions do in the loop (``benchmarks/startup.py``; figures in the README).

Configs recorded before the names existed hold a boolean: ``True`` reads as ``full``,
``False`` as ``none`` (:func:`remat_name`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

# The module name of a scanned stack's layers, and so the key under which every stacked
# variable sits (decoding and the optimizer find stacked leaves by it).
LAYERS = "layers"
# The logical axis name of the stacked axis (nn.scan's metadata); sharding rules map it.
LAYERS_AXIS = "layers"

# The checkpoint name of every projection's output (``rope_jax.projections``), which the
# policies save by name (module docstring).
PROJECTION = "projection"

_policies = jax.checkpoint_policies
REMAT_POLICIES = {
    "none": None,
    "full": _policies.nothing_saveable,
    "save_dots": _policies.save_from_both_policies(
        _policies.dots_with_no_batch_dims_saveable,
        _policies.save_only_these_names(PROJECTION),
    ),
}
# What a scanned layer keeps under remat "none": every matmul's output, the attention scores
# included, so that no product is recomputed; the elementwise work in between is (module
# docstring).
SCANNED_NONE = _policies.save_from_both_policies(
    _policies.dots_saveable, _policies.save_only_these_names(PROJECTION)
)

_LEGACY_REMAT = {True: "full", False: "none", "true": "full", "false": "none"}
_LAYER_KEY = re.compile(r"layers_(\d+)")


def remat_name(value: Any) -> Any:
    """A legacy boolean (or its string form ``"True"``/``"False"``) as its policy name;
    anything else unchanged (``validate_model_config`` rejects unknown names)."""
    if isinstance(value, bool):
        return _LEGACY_REMAT[value]
    if isinstance(value, str) and value.lower() in _LEGACY_REMAT:
        return _LEGACY_REMAT[value.lower()]
    return value


def layer_policy(remat: str, scan_layers: bool):
    """The ``jax.checkpoint`` policy a stack's layer runs under, or None for no remat: the
    named policy, except that a scanned stack runs ``none`` as :data:`SCANNED_NONE` (module
    docstring)."""
    if remat not in REMAT_POLICIES:
        raise ValueError(remat_message(remat))
    return SCANNED_NONE if scan_layers and remat == "none" else REMAT_POLICIES[remat]


def remat_message(value: Any) -> str:
    return (
        f"remat={value!r} is not a remat policy; choose one of "
        f"{', '.join(REMAT_POLICIES)} (none: keep activations; full: recompute each layer; "
        f"save_dots: keep the weight matmuls' outputs, recompute the rest)."
    )


def is_stacked_path(path) -> bool:
    """Whether a pytree key path runs through a scanned stack's ``layers`` entry."""
    return any(getattr(entry, "key", None) == LAYERS for entry in path)


def _layer_keys(tree: Mapping) -> list[str]:
    indices = sorted(
        int(match.group(1)) for key in tree if (match := _LAYER_KEY.fullmatch(str(key)))
    )
    if indices and indices != list(range(len(indices))):
        raise ValueError(f"layers are not numbered 0..{len(indices) - 1}: {indices}")
    return [f"layers_{i}" for i in indices]


def stack_layers(tree: Any) -> Any:
    """Every ``{layers_0: t0, layers_1: t1, ...}`` in a nested dict as ``{layers: t}`` with
    ``t``'s leaves stacked on a new leading axis (what a scanned stack holds)."""
    if not isinstance(tree, Mapping):
        return tree
    keys = _layer_keys(tree)
    if keys and LAYERS in tree:
        raise ValueError(f"a tree holds both {LAYERS!r} and {keys[0]!r}; it is half stacked.")
    out = {key: stack_layers(value) for key, value in tree.items() if key not in keys}
    if keys:
        layers = [stack_layers(tree[key]) for key in keys]
        out[LAYERS] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *layers)
    return out


def unstack_layers(tree: Any) -> Any:
    """Inverse of :func:`stack_layers`: every ``{layers: t}`` as ``layers_0, layers_1, ...``,
    slices of ``t``'s leading axis."""
    if not isinstance(tree, Mapping):
        return tree
    out = {key: unstack_layers(value) for key, value in tree.items() if key != LAYERS}
    if LAYERS in tree:
        stacked = unstack_layers(tree[LAYERS])
        sizes = {leaf.shape[0] for leaf in jax.tree.leaves(stacked)}
        if len(sizes) != 1:
            raise ValueError(f"stacked layers disagree on the number of layers: {sorted(sizes)}")
        for i in range(sizes.pop()):
            out[f"layers_{i}"] = jax.tree.map(lambda leaf, i=i: leaf[i], stacked)
    return out


def has_stacked_layers(tree: Any) -> bool:
    if not isinstance(tree, Mapping):
        return False
    return LAYERS in tree or any(has_stacked_layers(value) for value in tree.values())
