"""Resuming a run across ``model.scan_layers``: a checkpoint's train state converted between
per-layer (``layers_0, layers_1, ...``) and stacked (one ``layers`` subtree, ``[L, ...]``
arrays) form.

The two forms compute the same function of the same weights (``rope_jax.scanning``), so a run
trained with the layer loop can continue scanned and the reverse. The parameters and random
features convert by stacking or unstacking. The optimizer state follows from how
``optim.per_layer`` builds it: without stacked leaves it is ``tx``'s state over the whole
tree; with them it is ``optax.multi_transform``'s, ``inner_states["rest"]`` (``tx``'s state
over the other leaves) and ``inner_states["layers"]`` (``jax.vmap(tx.init)``'s over the
stacked leaves: every per-layer state stacked, its step counts ``[L]``). Every leaf of the
target form is therefore found in the source by its path with the ``multi_transform``
wrapper taken out and ``layers`` <-> ``layers_<i>`` exchanged: stacked from the ``L``
per-layer leaves, a slice of a stacked leaf, or a step count broadcast to ``[L]`` (or the
scalar count of the same transformation). No arithmetic is done: the state after conversion
holds the same numbers.

:func:`restore` restores the saved form (its shapes and shardings derived from the wanted
form's) and converts it on device; a state that cannot be converted raises
``CheckpointError`` naming both settings and the fix. It reads a fine-tune's best checkpoint
(``training.best``: params and random features, no optimizer) the same way. A tree already
in memory (the pretrained params a fine-tune or an evaluation starts from:
``evaluation.pretrained``) is put in the form of the model it loads into with
:func:`to_layout_of`.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from rope_jax import scanning
from rope_jax.training import checkpoint as checkpoint_lib
from rope_jax.training.checkpoint import path_tokens

STACKED = "stacked"
PER_LAYER = "per-layer"
_LAYER_TOKEN = re.compile(r"layers_(\d+)")
# optax.multi_transform's state: .inner_states[label].inner_state (optim.per_layer).
_INNER_STATES, _INNER_STATE = "inner_states", "inner_state"


def _core(tokens: tuple[str, ...]) -> tuple[str, ...]:
    """The path without ``per_layer``'s multi_transform wrapper (``inner_states/<label>/
    inner_state``), so both forms name a transformation's state alike."""
    for i in range(len(tokens) - 2):
        if tokens[i] == _INNER_STATES and tokens[i + 2] == _INNER_STATE:
            return tokens[:i] + tokens[i + 3 :]
    return tokens


def layout_of_names(names) -> str | None:
    """``STACKED`` if any '/'-joined path runs through a ``layers`` entry, ``PER_LAYER`` if
    any through ``layers_<i>``, None if neither (a model without layers) or both."""
    stacked = per_layer = False
    for name in names:
        parts = name.split("/")
        stacked |= scanning.LAYERS in parts
        per_layer |= any(_LAYER_TOKEN.fullmatch(part) for part in parts)
    if stacked == per_layer:
        return None
    return STACKED if stacked else PER_LAYER


def layout_of(tree) -> str | None:
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    return layout_of_names("/".join(path_tokens(path)) for path, _ in paths)


def _with_spec(leaf, shape, spec_fn):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding):
        sharding = NamedSharding(sharding.mesh, PartitionSpec(*spec_fn(tuple(sharding.spec))))
    return jax.ShapeDtypeStruct(shape, leaf.dtype, sharding=sharding)


class _ArrayOps:
    """The conversion on arrays (under jit)."""

    stack = staticmethod(lambda leaves: jnp.stack(leaves))
    take = staticmethod(lambda leaf, i: leaf[i])
    broadcast = staticmethod(lambda leaf, n: jnp.broadcast_to(leaf, (n, *leaf.shape)))


class _AbstractOps:
    """The conversion on ``ShapeDtypeStruct``s: shapes, and shardings with the layers axis
    unsharded (added in front of, or taken off, the per-layer partition spec)."""

    @staticmethod
    def stack(leaves):
        first = leaves[0]
        return _with_spec(first, (len(leaves), *first.shape), lambda spec: (None, *spec))

    @staticmethod
    def take(leaf, i):
        return _with_spec(leaf, leaf.shape[1:], lambda spec: spec[1:])

    @staticmethod
    def broadcast(leaf, n):
        return _with_spec(leaf, (n, *leaf.shape), lambda spec: (None, *spec))


def convert(source: Any, target_like: Any, ops=_ArrayOps) -> Any:
    """``source`` (a train state, or any tree, in one form) in the structure of
    ``target_like`` (the other form, or the same); see the module docstring. Raises
    ``ValueError`` naming the first target leaf that has no source."""
    found: dict[tuple[str, ...], list] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(source)[0]:
        found.setdefault(_core(path_tokens(path)), []).append(leaf)

    def same_shape(core, shape):
        for leaf in found.get(core, ()):
            if tuple(leaf.shape) == tuple(shape):
                return leaf
        return None

    def leaf_for(path, like):
        core = _core(path_tokens(path))
        shape = tuple(like.shape)
        if (leaf := same_shape(core, shape)) is not None and not any(
            _LAYER_TOKEN.fullmatch(t) or t == scanning.LAYERS for t in core
        ):
            return leaf  # not a layer's: the same leaf (a count, an embedding's moment)
        for pos, token in enumerate(core):
            if token == scanning.LAYERS:  # stacked wanted: stack layers_0..L-1
                per_layer = [
                    same_shape(core[:pos] + (f"layers_{i}",) + core[pos + 1 :], shape[1:])
                    for i in range(shape[0])
                ]
                if all(leaf is not None for leaf in per_layer):
                    return ops.stack(per_layer)
                return same_shape(core, shape)
            if match := _LAYER_TOKEN.fullmatch(token):  # one layer of a stacked leaf
                stacked_core = core[:pos] + (scanning.LAYERS,) + core[pos + 1 :]
                for leaf in found.get(stacked_core, ()):
                    if tuple(leaf.shape[1:]) == shape and int(match.group(1)) < leaf.shape[0]:
                        return ops.take(leaf, int(match.group(1)))
                return same_shape(core, shape)
        if len(shape) == 1 and (leaf := same_shape(core, ())) is not None:
            return ops.broadcast(leaf, shape[0])  # per-layer step counts from the scalar
        return None

    leaves = []
    for path, like in jax.tree_util.tree_flatten_with_path(target_like)[0]:
        leaf = leaf_for(path, like)
        if leaf is None:
            raise ValueError(
                f"nothing in the checkpoint converts to {'/'.join(path_tokens(path))} "
                f"{tuple(like.shape)}"
            )
        leaves.append(leaf)
    return jax.tree.unflatten(jax.tree.structure(target_like), leaves)


def _flipped(tree, layout):
    """``tree`` (in ``layout``) in the other form."""
    return scanning.unstack_layers(tree) if layout == STACKED else scanning.stack_layers(tree)


def to_layout_of(tree: Any, like: Any) -> tuple[Any, str | None]:
    """``(tree in the form of like, the form it was converted from or None)``: params or
    random features (nested dicts of arrays) stacked or unstacked to the layers of ``like``
    (the model they load into; a tree of the same names, it may hold more or fewer of them,
    e.g. a new head). Unchanged, with None, when both have the same form or either has no
    layers."""
    have, want = layout_of(tree), layout_of(like)
    if have is None or want is None or have == want:
        return tree, None
    return _flipped(tree, have), have


def _check_saved(source_abstract, saved: dict[str, tuple[int, ...]]) -> None:
    """Raises ``ValueError`` naming the first array the converted form expects and the
    checkpoint does not hold (or holds in another shape): a model of other sizes."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(source_abstract)[0]:
        name = "/".join(path_tokens(path))
        if name not in saved:
            raise ValueError(f"the checkpoint has no {name}")
        if tuple(saved[name]) != tuple(leaf.shape):
            raise ValueError(
                f"{name} has shape {tuple(saved[name])} there, {tuple(leaf.shape)} here"
            )


def restore(
    checkpointer, step: int, abstract_state, tx=None, *, setting: str = "model.scan_layers"
) -> tuple[Any, Any]:
    """``checkpointer.restore(step, abstract_state)``, converting the state when the
    checkpoint holds the other ``scan_layers`` form (module docstring).

    ``abstract_state``: a ``step.TrainState`` of ``ShapeDtypeStruct``s with shardings and
    ``tx`` the run's optimizer; or, with ``tx`` None, a tree of parameter-like collections
    (the best checkpoint's ``{"params", "random_features"}``), converted leaf for leaf.
    ``setting``: the config key that chooses the form, named in the log and the error
    (``scan_layers`` in a fine-tune's config)."""
    step_dir = checkpointer.directory / str(step)
    saved = checkpoint_lib.saved_shapes(step_dir) if step_dir.exists() else None
    have = layout_of_names(saved) if saved else None
    want = layout_of(abstract_state if tx is None else abstract_state.params)
    if have is None or want is None or have == want:
        return checkpointer.restore(step, abstract_state)
    settings = (
        f"{step_dir} was written with {setting}={have == STACKED} ({have} "
        f"parameters) and this config has {setting}={want == STACKED}"
    )
    try:

        def saved_form(state):
            if tx is None:
                return _flipped(state, want)
            params = _flipped(state.params, want)
            return state.replace(
                params=params,
                opt_state=tx.init(params),
                random_features=_flipped(state.random_features, want),
            )

        source_like = jax.eval_shape(saved_form, abstract_state)
        source_abstract = convert(abstract_state, source_like, _AbstractOps)
        _check_saved(source_abstract, saved)
    except ValueError as err:
        raise checkpoint_lib.CheckpointError(
            f"{settings}, and its state cannot be converted ({err}). Resume with "
            f"--config.{setting}={have == STACKED}, the setting it was written with."
        ) from err
    state, data_state = checkpointer.restore(step, source_abstract)
    shardings = jax.tree.map(lambda leaf: leaf.sharding, abstract_state)
    state = jax.jit(lambda source: convert(source, abstract_state), out_shardings=shardings)(state)
    logging.info(
        "Converted the %s of %s from %s to %s layers: the checkpoint was written with %s=%s.",
        "train state (parameters, random features and optimizer state)"
        if tx is not None
        else "parameters and random features",
        step_dir,
        have,
        want,
        setting,
        have == STACKED,
    )
    return state, data_state
