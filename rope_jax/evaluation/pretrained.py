"""Where fine-tuning starts: a pretraining workdir, a Hugging Face folder, or random init.

``config.init_checkpoint`` may be

* a ``train.py`` workdir (it has ``checkpoints/``): the params of its latest complete Orbax
  step; the model config is, in this order, the workdir's ``config.json`` ``model`` entry,
  the ``model`` of ``config.pretrain_config`` (the pretraining config as given to train.py,
  e.g. ``configs/mt5.py:tiny,attention=performer``), or ``config.model``; the tokenizer is
  the one train.py cached in ``<workdir>/tokenizer/spm.model`` (or ``vocab.txt`` for
  ``tokenizer.kind=jieba_bert``), or UTF-8 bytes when the run recorded
  ``tokenizer.kind=bytes`` (e.g. an ablation cell: ``data/byte_tokenizer.py``);
* a Hugging Face model folder (it has ``config.json`` and weights): imported with
  ``rope_jax.convert.from_hf``; its ``spiece.model`` (T5/mT5), ``vocab.txt`` (an
  encoder-decoder with a BERT vocabulary: T5 PEGASUS, read by ``convert.tokenizer_from_hf``
  as the jieba_bert tokenizer) or tokenizer files (BERT, RoFormer) are used for text;
* empty: ``config.model`` with random weights (smoke tests and from-scratch baselines).

The tokenizer is ``config.tokenizer`` (a SentencePiece ``.model``, or a BERT ``vocab.txt``
for the jieba_bert tokenizer) when set. For an encoder
the classification head is new: its parameters are initialised and every other parameter
is taken from the checkpoint; a parameter missing from the checkpoint is an error.

The fine-tuned model is the checkpoint's with ``config.dropout_rate`` and
``config.scan_layers`` when they are set (None keeps the checkpoint's):
:func:`task_model_config`. Its layers may therefore be in the other form than the
checkpoint's (per-layer ``layers_<i>`` or one stacked ``layers`` entry, ``rope_jax.scanning``;
a Hugging Face folder is per-layer, and a train.py run restarted with the other
``model.scan_layers`` records that setting before its next checkpoint holds it), so
:func:`merge_pretrained` converts the checkpoint's parameters and random features to the
model's form (``training.relayout.to_layout_of``) and logs it; the two forms compute the
same function of the same weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from rope_jax import families
from rope_jax.evaluation import formats
from rope_jax.evaluation import inputs as inputs_lib
from rope_jax.evaluation.predictor import TaskModel
from rope_jax.training import relayout

RANDOM_FEATURES = families.RANDOM_FEATURES
HEAD_PARAMS = ("pooler", "classifier")
_SPM_NAMES = (
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.model",
    "spm.model",
    os.path.join("tokenizer", "spm.model"),
)
_HF_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json")
_BERT_VOCAB_CACHE = os.path.join("tokenizer", "vocab.txt")


@dataclasses.dataclass
class Source:
    """A pretrained model as loaded: config, params (numpy or jax), random features, codec."""

    cfg: Any
    params: Any
    random_features: Any
    codec: Any
    description: str


def _sentencepiece_codec(path: str):
    from rope_jax.data.tokenizer import Tokenizer

    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer model not found: {path}")
    # train.py records the vocabulary its tokenizer was trained to fill beside the model
    # (``spm.json``); SentencePiece may stop short of the piece count asked for, and the
    # extra ids (sentinels, masks) then grow beyond 100. Without the record: T5's 100.
    meta_path = os.path.splitext(path)[0] + ".json"
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            return inputs_lib.SentencePieceCodec(
                Tokenizer.load(path, vocab_size=int(json.load(f)["vocab_size"]))
            )
    return inputs_lib.SentencePieceCodec(Tokenizer.load(path))


def _find_spm(folder: str) -> str | None:
    for name in _SPM_NAMES:
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def _bert_vocab_codec(path: str):
    """The jieba_bert (T5 PEGASUS) tokenizer of a BERT ``vocab.txt``."""
    from rope_jax.data.bert_tokenizer import JiebaBertTokenizer

    return inputs_lib.SentencePieceCodec(JiebaBertTokenizer.load(path))


def _codec(config, cfg, folder: str | None, recorded_kind: str = ""):
    """``recorded_kind``: the ``tokenizer.kind`` a train.py workdir recorded ("" if none)."""
    # A HF T5 pads its embedding to 32128 beyond 32000 pieces + 100 extra ids, so the
    # tokenizer's vocabulary is its own, never the model's.
    if config.tokenizer:
        if config.tokenizer.endswith(".txt"):
            return _bert_vocab_codec(config.tokenizer)
        return _sentencepiece_codec(config.tokenizer)
    if recorded_kind == "bytes":  # nothing on disk: the ids are the text's UTF-8 bytes
        from rope_jax.data.byte_tokenizer import ByteTokenizer

        return inputs_lib.SentencePieceCodec(ByteTokenizer())
    spm_path = _find_spm(folder) if folder else None
    if spm_path:
        return _sentencepiece_codec(spm_path)
    # A train.py workdir run with tokenizer.kind=jieba_bert caches its vocab.txt there.
    if folder and os.path.exists(os.path.join(folder, _BERT_VOCAB_CACHE)):
        return _bert_vocab_codec(os.path.join(folder, _BERT_VOCAB_CACHE))
    # An encoder-decoder folder with a BERT vocab.txt is T5 PEGASUS (jieba + BERT vocabulary).
    if (
        folder
        and cfg is not None
        and cfg.family == "encoder_decoder"
        and os.path.exists(os.path.join(folder, "vocab.txt"))
    ):
        from rope_jax import convert

        return inputs_lib.SentencePieceCodec(convert.tokenizer_from_hf(folder))
    # Hub BERT/RoFormer folders ship vocab.txt; transformers 5 save_pretrained writes only
    # tokenizer.json.
    if folder and any(os.path.exists(os.path.join(folder, n)) for n in _HF_TOKENIZER_FILES):
        return inputs_lib.HFCodec(folder)
    raise FileNotFoundError(
        f"no tokenizer: set config.tokenizer to a SentencePiece .model file or a BERT vocab.txt "
        f"(T5 PEGASUS; nothing usable in "
        f"{folder or 'the config'})"
    )


def _check_vocabulary(codec, cfg) -> None:
    tokenizer = getattr(codec, "tokenizer", None)
    pieces = getattr(tokenizer, "piece_size", None) or getattr(tokenizer, "vocab_size", None)
    if pieces is not None and pieces > cfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {pieces} pieces but the model only {cfg.vocab_size} ids; "
            "use the tokenizer the model was pretrained with"
        )


def _model_config(model_dict):
    from rope_jax.model_config import model_config_from_dict

    return model_config_from_dict(model_dict)


def _pretrain_model_dict(spec: str):
    """``config.model`` of a config file given as ``path/to/config.py[:arg]``."""
    import importlib.util

    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"pretrain_config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location("pretrain_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None).model


def _restore_params(workdir: str) -> tuple[Any, Any, str]:
    """Params and random features of the latest complete step of ``<workdir>/checkpoints``,
    read-only: the run there may still be training, so nothing in it is cleaned, renamed or
    set aside (``complete_steps_on_disk`` lists committed steps without opening a
    ``CheckpointManager``; temporary ``*.orbax-checkpoint-tmp-*`` directories are skipped),
    and the step's ``state`` item is restored on its own with a ``StandardCheckpointer``."""
    import orbax.checkpoint as ocp

    from rope_jax.training import checkpoint as checkpoint_lib

    directory = checkpoint_lib.absolute_path(os.path.join(workdir, "checkpoints"))
    steps = checkpoint_lib.complete_steps_on_disk(directory)
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {directory}")
    step = steps[-1]
    path = os.path.join(directory, str(step), checkpoint_lib.STATE)
    with ocp.StandardCheckpointer() as restorer:
        metadata = restorer.metadata(path)
        tree = metadata.item_metadata if hasattr(metadata, "item_metadata") else metadata
        tree = getattr(tree, "tree", tree)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree
        )
        state = restorer.restore(path, target)
    return state["params"], state.get(RANDOM_FEATURES) or {}, f"{directory}/{step}"


def load_source(config) -> Source:
    path = config.init_checkpoint
    if not path:
        cfg = _model_config(config.model)
        codec = _codec(config, cfg, None)
        _check_vocabulary(codec, cfg)
        return Source(cfg, None, None, codec, "random init")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"init_checkpoint {path} is not a directory")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        from rope_jax.training import workdir

        model_dict, kind = config.model, ""
        # The config of the run's last start (config_history.jsonl), else config.json.
        saved = workdir.recorded_config(path)
        if saved is not None:
            model_dict = saved.get("model", model_dict)
            kind = (saved.get("tokenizer") or {}).get("kind", "")
        elif config.pretrain_config:
            model_dict = _pretrain_model_dict(config.pretrain_config)
        cfg = _model_config(model_dict)
        # The tokenizer before the parameters: a missing one fails before a large read.
        codec = _codec(config, cfg, path, recorded_kind=kind)
        _check_vocabulary(codec, cfg)
        params, random_features, where = _restore_params(path)
        return Source(cfg, params, random_features, codec, where)
    if os.path.exists(os.path.join(path, "config.json")):
        from rope_jax import convert

        model, params = convert.from_hf(path)
        cfg = model.config
        codec = _codec(config, cfg, path)
        _check_vocabulary(codec, cfg)
        return Source(cfg, params, {}, codec, f"Hugging Face {path}")
    raise FileNotFoundError(
        f"init_checkpoint {path} is neither a train.py workdir (no checkpoints/) nor a Hugging "
        "Face folder (no config.json)"
    )


def merge_params(fresh, pretrained, *, new_prefixes=HEAD_PARAMS) -> Any:
    """``fresh`` with every leaf replaced by the pretrained one, except new heads (kept).

    A non-head parameter absent from ``pretrained`` or with another shape is an error.
    """
    fresh_flat = traverse_util.flatten_dict(fresh, sep="/")
    pretrained_flat = traverse_util.flatten_dict(pretrained, sep="/")
    merged = {}
    for name, value in fresh_flat.items():
        if name.split("/")[0] in new_prefixes:
            merged[name] = value
            continue
        if name not in pretrained_flat:
            raise KeyError(f"parameter {name} is missing from the checkpoint")
        loaded = pretrained_flat[name]
        if tuple(np.shape(loaded)) != tuple(np.shape(value)):
            raise ValueError(
                f"parameter {name}: checkpoint shape {np.shape(loaded)} != model {np.shape(value)}"
            )
        merged[name] = jnp.asarray(loaded, dtype=value.dtype)
    return traverse_util.unflatten_dict(merged, sep="/")


def merge_pretrained(fresh, pretrained, where: str, *, new_prefixes=HEAD_PARAMS) -> Any:
    """:func:`merge_params` of ``pretrained`` (read from ``where``) put in the form of
    ``fresh``'s layers first (per-layer or stacked: ``relayout.to_layout_of``), with a log
    line when it was converted; an error after a conversion names both forms."""
    have, want = relayout.layout_of(pretrained), relayout.layout_of(fresh)
    if have is None or want is None or have == want:
        return merge_params(fresh, pretrained, new_prefixes=new_prefixes)
    forms = (
        f"{where} holds {have} layers (written with scan_layers={have == relayout.STACKED}) "
        f"and this model has scan_layers={want == relayout.STACKED}"
    )
    try:
        converted, _ = relayout.to_layout_of(pretrained, fresh)
        merged = merge_params(fresh, converted, new_prefixes=new_prefixes)
    except (KeyError, ValueError) as err:
        raise ValueError(
            f"{forms}; converted to {want} layers, the checkpoint still does not fit: "
            f"{err.args[0] if err.args else err}. Set --config.scan_layers="
            f"{have == relayout.STACKED} (or None: the checkpoint's) to load it as written."
        ) from err
    logging.info(
        "Converted the pretrained weights: %s, so they were %s.",
        forms,
        "stacked" if want == relayout.STACKED else "unstacked",
    )
    return merged


def task_model_config(cfg, config):
    """The model config a fine-tune runs: the checkpoint's ``cfg`` with
    ``config.dropout_rate`` and ``config.scan_layers`` where they are not None."""
    changes = {}
    if config.dropout_rate is not None:
        changes["dropout_rate"] = config.dropout_rate
    scan_layers = config.get("scan_layers")
    if scan_layers is not None:
        changes["scan_layers"] = bool(scan_layers)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def load_for_task(task: str, config, *, source: Source | None = None):
    """The :class:`predictor.TaskModel` of ``task`` from a loaded source."""
    import flax.linen as nn

    from rope_jax.models import build_model

    source = source or load_source(config)
    cfg = source.cfg
    if cfg.family == "encoder":
        cfg = dataclasses.replace(cfg, num_labels=formats.num_classes(task))
    elif cfg.family != "encoder_decoder":
        raise ValueError(
            f"SuperGLUE fine-tuning needs an encoder or an encoder_decoder, not a {cfg.family} "
            "model (casts exist for these two families only)"
        )
    cfg = task_model_config(cfg, config)
    model = build_model(cfg)
    # Jitted: an eager init runs op by op and costs seconds even for a tiny model.
    task = families.for_model(model)
    init = jax.jit(lambda key: nn.unbox(task.init(task.init_rngs(key))))
    variables = init(jax.random.key(config.seed))
    params = variables["params"]
    random_features = variables.get(RANDOM_FEATURES, {})
    if source.params is not None:
        params = merge_pretrained(params, source.params, source.description)
        if source.random_features:
            random_features = merge_pretrained(
                random_features, source.random_features, source.description
            )
    return TaskModel(model, cfg, params, random_features, source.codec)
