"""Defaults shared by every pretraining config, and the ``get_config(arg)`` argument parser.

An argument string is a variant name followed by comma-separated overrides, e.g.
``"tiny,attention=performer,optimizer.learning_rate=3e-4"``; every config file parses it
with ``split_arg`` and ``apply_overrides`` (pretraining, SuperGLUE, the ablation). A bare key
is a top-level key when the config has one (SuperGLUE's ``task``, ``dropout_rate``), else it
is looked up in ``config.model`` and ``config.data`` (an error if both have it); dotted keys
are relative to the config root. ``None`` sets a field that may be unset (``targets_length
=None``); ``--config.<key>=None`` flags cannot, as ml_collections parses them by type.
Unknown keys and values of the wrong type raise an error that names the key.
"""

from __future__ import annotations

import ast
import difflib

import ml_collections
from ml_collections import config_dict

from rope_jax import config_fields
from rope_jax.data.pipeline import DataConfig
from rope_jax.model_config import ModelConfig
from rope_jax.training import optim, sharding

# Sections whose keys may be given without their prefix in the argument string.
BARE_KEY_SECTIONS = ("model", "data")


def base_config() -> ml_collections.ConfigDict:
    """Every top-level key the trainer reads (so a typo in an override is an error)."""
    config = ml_collections.ConfigDict()
    # Which entry point runs this config: train.py runs "pretrain", eval.py the others.
    config.kind = "pretrain"
    config.seed = 0
    config.num_train_steps = 1000
    # Periods in steps; 0 = only at the end (logging, checkpoints) or never (evaluation).
    config.log_every_steps = 50
    config.checkpoint_every_steps = 500
    config.eval_every_steps = 500
    # Held-out batches per evaluation (0 = no evaluation).
    config.eval_steps = 4
    # Global batch (all processes together), split into optimizer.grad_accum_steps microbatches.
    config.batch_size = 8
    config.model = model_config()
    config.data = data_config()
    # SentencePiece model: empty path = train one with model.vocab_size ids on the training
    # corpus (cached in <workdir>/tokenizer); otherwise load it (e.g. mT5's spiece.model),
    # with extra ids filling up to model.vocab_size.
    # kind="jieba_bert": T5 PEGASUS' jieba + BERT vocab.txt tokenizer (no sentinels); empty
    # vocab_path = build a model.vocab_size-token vocab.txt on the training corpus (cached).
    config.tokenizer = ml_collections.ConfigDict(
        {"kind": "sentencepiece", "path": "", "vocab_path": "", "num_extra_ids": 100}
    )
    config.optimizer = optim.default_optimizer_config()
    # Mesh axis sizes; -1 fills with the remaining devices.
    config.mesh = sharding.default_mesh_config()
    config.logical_axis_rules = [
        (name, list(axes) if isinstance(axes, tuple) else axes)
        for name, axes in sharding.DEFAULT_LOGICAL_AXIS_RULES
    ]
    # "auto": jax.distributed.initialize() when the environment describes a multi-host job.
    config.distributed = "auto"
    # Multi-process runs: a process silent this long counts as dead, and the others stop
    # with an error naming it (jax.distributed's heartbeat timeout).
    config.distributed_timeout_seconds = 100
    config.keep_checkpoints = 3
    config.async_checkpointing = True
    # PaLM/T5X auxiliary loss weight on logsumexp(logits)**2 (0 = off).
    config.z_loss = 0.0
    # MLM: run the output head only at up to this many masked positions per row (BERT's
    # max_predictions_per_seq). None = derived from data.mlm_rate and data.inputs_length
    # (losses.default_max_predictions); 0 = the head at every position.
    config.mlm_max_predictions = config_dict.placeholder(int)
    # jax_default_prng_impl: "threefry" (jax default), "rbg" or "unsafe_rbg" (T5X and
    # MaxText use rbg). It sets how keys and other draws are made; dropout masks hash each
    # layer's key with the element's position (rope_jax/dropout.py) whichever is set.
    config.prng_impl = "rbg"
    # Performer: redraw the random projection every K steps (0 = keep the initial draw).
    config.redraw_features_every = 1000
    # Testing aid: make the loss NaN at this step (None = never).
    config.debug_nan_step = config_dict.placeholder(int)
    # Time a float32 GEMM at start-up; MFU is reported against it.
    config.measure_matmul_peak = True
    # Restarting a workdir: config keys whose change from the recorded run is intended,
    # comma-separated ("optimizer.learning_rate,batch_size"; a section name accepts all its
    # keys; "*" accepts everything). See rope_jax/training/workdir.py and docs/training.md.
    config.accept_changes = ""
    return config


# The train loop's keys (rope_jax.training.runner / loop) besides model, data and batch:
# a fine-tuning config takes them from here, so it runs on any mesh pretraining runs on.
LOOP_KEYS = (
    "checkpoint_every_steps",
    "eval_every_steps",
    "optimizer",
    "mesh",
    "logical_axis_rules",
    "distributed",
    "distributed_timeout_seconds",
    "keep_checkpoints",
    "async_checkpointing",
    "z_loss",
    "prng_impl",
    "redraw_features_every",
    "debug_nan_step",
    "measure_matmul_peak",
    "accept_changes",
)


def add_loop_keys(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with every key of ``LOOP_KEYS`` at its pretraining default."""
    base = base_config()
    for key in LOOP_KEYS:
        config[key] = base[key]
    return config


def model_config(**values) -> ml_collections.ConfigDict:
    """Every ``ModelConfig`` field (so any can be overridden), defaults replaced by ``values``."""
    return config_fields.as_config_dict(ModelConfig, **values)


def data_config(**values) -> ml_collections.ConfigDict:
    """Every ``DataConfig`` field except batch size and seed (top-level keys, copied in)."""
    return config_fields.as_config_dict(DataConfig, exclude=("batch_size", "seed"), **values)


def shrink_to_tiny(
    config: ml_collections.ConfigDict,
    *,
    inputs_length: int = 128,
    targets_length: int | None = None,
    num_train_steps: int = 600,
    every: int = 200,
) -> None:
    """The ``tiny`` variant of a pretraining config: rows of ``inputs_length`` (and
    ``targets_length``) tokens, batch 16, ``num_train_steps`` steps, a log line every 50,
    checkpoints and evaluations every ``every`` steps; a laptop CPU runs it in minutes."""
    config.data.inputs_length = inputs_length
    if targets_length is not None:
        config.data.targets_length = targets_length
    config.batch_size = 16
    config.num_train_steps = num_train_steps
    config.log_every_steps = 50
    config.checkpoint_every_steps = every
    config.eval_every_steps = every


def parse_value(text: str):
    """Python literal if it parses (``3e-4``, ``True``, ``(1, 2)``), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """Applies ``key=value`` strings; see the module docstring for key resolution."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"config override {item!r} is not key=value.")
        key, text = (part.strip() for part in item.split("=", 1))
        value = parse_value(text)
        if "." not in key and not (key in config and not _is_section(config[key])):
            sections = [n for n in BARE_KEY_SECTIONS if n in config and key in config[n]]
            if len(sections) > 1:
                raise KeyError(
                    f"config override {item!r}: {key!r} exists in {sections}; give the dotted "
                    f"path, e.g. {sections[0]}.{key}."
                )
            if sections:
                key = f"{sections[0]}.{key}"
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            if name not in node:
                raise KeyError(f"config override {item!r}: no config key {name!r}.")
            node = node[name]
        if leaf not in node:
            close = difflib.get_close_matches(key, _dotted_keys(config), n=3, cutoff=0.75)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise KeyError(
                f"config override {item!r}: no config key {key!r}; {hint}(model, data and "
                "top-level keys can be given bare, others need their dotted path)."
            )
        if isinstance(node[leaf], str) and not isinstance(value, str):
            value = text
        _set(node, leaf, value, f"config override {item!r}")


def _set(node: ml_collections.ConfigDict, leaf: str, value, where: str) -> None:
    """``node[leaf] = value`` with the field's type kept (an int is a float where a float is
    wanted, a list a tuple where a tuple is); a wrong type names ``where``."""
    current = node[leaf]
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    try:
        node[leaf] = value
    except TypeError as err:
        wanted = node.get_ref(leaf).get_type().__name__
        raise TypeError(
            f"{where}: {leaf} must be {wanted}, got {type(value).__name__} {value!r}."
        ) from err


def from_record(path: str) -> ml_collections.ConfigDict:
    """The pretraining config recorded in ``path`` (a ``config.json`` or a workdir), as
    ``base_config()`` with every recorded value set; a recorded key the defaults do not have
    or a value of the wrong type is an error naming it."""
    import json
    import os

    from rope_jax.training import workdir

    if os.path.isdir(path):
        recorded = workdir.recorded_config(path)
        if recorded is None:
            raise FileNotFoundError(f"{path} holds no {workdir.CONFIG_FILE}")
    else:
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
    config = base_config()
    _set_tree(config, recorded, path)
    return config


def _set_tree(node: ml_collections.ConfigDict, values: dict, path: str, prefix: str = "") -> None:
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in node:
            raise KeyError(f"{path}: recorded key {name!r} is not a pretraining config key.")
        if isinstance(node[key], ml_collections.ConfigDict):
            if not isinstance(value, dict):
                raise TypeError(f"{path}: recorded {name!r} must be a section, got {value!r}.")
            _set_tree(node[key], value, path, f"{name}.")
        else:
            _set(node, key, value, f"{path}: recorded key {name!r}")


def _is_section(value) -> bool:
    return isinstance(value, ml_collections.ConfigDict)


def _dotted_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every leaf key as a dotted path, plus bare names of model and data keys."""
    keys = []
    for name, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(_dotted_keys(value, f"{prefix}{name}."))
        else:
            keys.append(prefix + name)
    if not prefix:
        keys.extend(name for s in BARE_KEY_SECTIONS if s in config for name in config[s])
    return keys


def split_arg(arg: str | None, variants: tuple[str, ...]) -> tuple[str, list[str]]:
    """``"tiny,attention=performer"`` -> ``("tiny", ["attention=performer"])``."""
    parts = [p for p in (arg or "").split(",") if p.strip()]
    variant = parts[0].strip() if parts and "=" not in parts[0] else variants[0]
    overrides = parts[1:] if parts and "=" not in parts[0] else parts
    if variant not in variants:
        raise ValueError(f"unknown variant {variant!r}; choose one of {variants}.")
    return variant, overrides
