"""Weight import from (and export to) Hugging Face checkpoint folders.

``model, params = from_hf(path)`` reads a local folder written by ``save_pretrained``:
``config.json`` plus ``model.safetensors`` (or a sharded ``model.safetensors.index.json``), or
else ``pytorch_model.bin``, which is read only with PyTorch's weights-only unpickler
(``torch.load(..., weights_only=True)``: a downloaded file can never run code). PyTorch is
imported only for ``.bin`` files, so the package itself does not need it.

Supported architectures (``config.json`` field ``architectures``):

* ``T5ForConditionalGeneration``, ``MT5ForConditionalGeneration``: T5 v1.1 / mT5 (RMSNorm,
  gated-GELU with the tanh approximation HF calls ``gelu_new``, untied output layer) and the
  original T5 (ReLU MLP, output layer tied to the embeddings with the decoder output scaled by
  ``d_model**-0.5``). HF stores ``tie_word_embeddings`` (transformers 4) or
  ``scale_decoder_outputs`` (transformers 5) to tell them apart.
* ``BertForMaskedLM``, ``BertForSequenceClassification``, ``RoFormerForMaskedLM`` (post-norm
  LayerNorm encoders; RoFormer rotates q and k with interleaved pairs ``(0, 1), (2, 3), ...``,
  HF's layout, and has no absolute position table).

The mapping from HF names to this project's parameter tree is a list of
``(project path, HF tensor name, kind)``; kinds say how a tensor is laid out in PyTorch
(``linear``: ``[out, in]`` weight, transposed to a ``[in, out]`` kernel and reshaped to the
model's ``[E, H, D]`` / ``[H, D, E]`` kernels, whose head-major order matches HF's;
``plain``: copied). The model's own parameter shapes (from ``jax.eval_shape`` of its init)
are the target: a checkpoint tensor with the wrong shape is an error naming the tensor and
both shapes, and so is a missing tensor or a model parameter nothing maps to. Tensors the
model does not use are reported with a warning (or an error with ``strict=True``).

``tokenizer_from_hf(path)`` reads the tokenizer of a T5-family folder: ``spiece.model``, or
the ``vocab.txt`` of Chinese T5 PEGASUS (an ``MT5ForConditionalGeneration`` with a BERT
vocabulary), which gives the jieba_bert tokenizer with ``[CLS]``/``[SEP]`` as decoder start
and EOS.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rope_jax import families, scanning
from rope_jax import model_config as model_config_lib
from rope_jax import models as models_lib
from rope_jax.model_config import ModelConfig

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"


class ConversionError(ValueError):
    """A checkpoint that cannot be mapped onto this project's model."""


# ----------------------------------------------------------------------------- reading


_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _read_safetensors(filename: str) -> dict[str, np.ndarray]:
    """Reads a safetensors file into numpy arrays.

    numpy dtypes go through ``safetensors.numpy``; bfloat16 (which numpy lacks) is read from
    the documented layout (8-byte little-endian header size, JSON header, raw little-endian
    data) as ``ml_dtypes.bfloat16``.
    """
    with open(filename, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
        header.pop("__metadata__", None)
        if all(entry["dtype"] in _SAFETENSORS_DTYPES for entry in header.values()):
            from safetensors.numpy import load_file

            return dict(load_file(filename))
        import ml_dtypes

        data = f.read()
    dtypes = {**_SAFETENSORS_DTYPES, "BF16": ml_dtypes.bfloat16}
    tensors = {}
    for name, entry in header.items():
        if entry["dtype"] not in dtypes:
            raise ConversionError(f"{filename}: tensor {name!r} has unsupported {entry['dtype']}")
        start, end = entry["data_offsets"]
        array = np.frombuffer(
            data[start:end], dtype=np.dtype(dtypes[entry["dtype"]]).newbyteorder("<")
        )
        tensors[name] = array.reshape(entry["shape"])
    return tensors


def _read_torch_bin(filename: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ConversionError(
            f"{filename} is a PyTorch checkpoint; install torch to read it, or convert it to "
            f"{SAFETENSORS_FILE}"
        ) from err
    state = torch.load(filename, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ConversionError(f"{filename} holds a {type(state).__name__}, not a state dict")
    tensors = {}
    for name, tensor in state.items():
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        tensors[name] = tensor.detach().cpu().numpy()
    return tensors


def load_hf_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Returns ``(config.json as a dict, {tensor name: numpy array})`` of a checkpoint folder."""
    path = os.fspath(path)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ConversionError(f"{path} has no config.json; is it a Hugging Face checkpoint?")
    with open(config_file) as f:
        hf_config = json.load(f)
    if os.path.isfile(os.path.join(path, SAFETENSORS_FILE)):
        tensors = _read_safetensors(os.path.join(path, SAFETENSORS_FILE))
    elif os.path.isfile(os.path.join(path, SAFETENSORS_INDEX)):
        with open(os.path.join(path, SAFETENSORS_INDEX)) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors = {}
        for shard in shards:
            tensors.update(_read_safetensors(os.path.join(path, shard)))
    elif os.path.isfile(os.path.join(path, TORCH_FILE)):
        tensors = _read_torch_bin(os.path.join(path, TORCH_FILE))
    else:
        raise ConversionError(
            f"{path} has neither {SAFETENSORS_FILE}, {SAFETENSORS_INDEX} nor {TORCH_FILE}"
        )
    return hf_config, tensors


# ----------------------------------------------------------------------------- configs


def _architecture(hf_config: Mapping[str, Any]) -> str:
    architectures = hf_config.get("architectures") or []
    for name in architectures:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    raise ConversionError(
        f"unsupported architecture {architectures or hf_config.get('model_type')!r}; "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _hf_activation(name: str, field: str) -> tuple[str, bool]:
    """HF activation name -> (mlp activation, gelu_approximate)."""
    if name in ("gelu", "gelu_python"):
        return "gelu", False
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return "gelu", True
    if name == "relu":
        return "relu", False
    raise ConversionError(f"{field}={name!r} is not supported; use gelu, gelu_new or relu")


def _t5_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    projection = hf.get("feed_forward_proj", "relu")
    gated = projection.startswith("gated-")
    activation = projection.split("-")[-1]
    if activation == "gelu":
        # HF maps "gated-gelu" to gelu_new (tanh approximation), as T5 v1.1 was trained.
        activation, approximate = "gelu", True
        if not gated:
            activation, approximate = _hf_activation(hf.get("dense_act_fn", "gelu"), "act")
    elif activation == "silu":
        approximate = True
    else:
        activation, approximate = _hf_activation(activation, "feed_forward_proj")
    if gated and activation not in ("gelu", "silu"):
        raise ConversionError(f"feed_forward_proj={projection!r} is not supported")
    if hf.get("model_type") == "mt5" or "MT5ForConditionalGeneration" in (
        hf.get("architectures") or []
    ):
        # Every mT5 release follows T5 v1.1: own output layer, no d_model**-0.5 rescale
        # (transformers 5 ties the layer when the checkpoint has no lm_head.weight).
        tied = False
    elif "scale_decoder_outputs" in hf:
        tied = bool(hf["scale_decoder_outputs"])
    else:
        tied = bool(hf.get("tie_word_embeddings", True))
    return dict(
        family="encoder_decoder",
        vocab_size=hf["vocab_size"],
        d_model=hf["d_model"],
        num_heads=hf["num_heads"],
        head_dim=hf["d_kv"],
        d_ff=hf["d_ff"],
        num_layers=hf["num_layers"],
        # None = as many as the encoder (ModelConfig's convention).
        num_decoder_layers=(
            None
            if (hf.get("num_decoder_layers") or hf["num_layers"]) == hf["num_layers"]
            else hf["num_decoder_layers"]
        ),
        mlp_activation=("gated-" if gated else "") + activation,
        gelu_approximate=approximate,
        norm="rms",
        norm_placement="pre",
        layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
        use_bias=False,
        tie_embeddings=tied,
        scale_queries=False,
        position="t5_bias",
        relpos_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relpos_max_distance=hf.get("relative_attention_max_distance", 128),
        dropout_rate=float(hf.get("dropout_rate", 0.1)),
    )


def _bert_like_config(hf: Mapping[str, Any], *, rope: bool) -> dict[str, Any]:
    hidden = hf["hidden_size"]
    heads = hf["num_attention_heads"]
    if hidden % heads:
        raise ConversionError(f"hidden_size={hidden} is not divisible by {heads} heads")
    if rope and hf.get("embedding_size", hidden) != hidden:
        raise ConversionError(
            f"embedding_size={hf['embedding_size']} differs from hidden_size={hidden}; the "
            f"embedding projection of such RoFormer checkpoints is not supported"
        )
    if rope and hf.get("rotary_value", False):
        raise ConversionError("rotary_value=True (RoPE applied to values) is not supported")
    position_type = hf.get("position_embedding_type", "absolute")
    if not rope and position_type != "absolute":
        raise ConversionError(f"position_embedding_type={position_type!r} is not supported")
    activation, approximate = _hf_activation(hf.get("hidden_act", "gelu"), "hidden_act")
    values = dict(
        family="encoder",
        vocab_size=hf["vocab_size"],
        d_model=hidden,
        num_heads=heads,
        head_dim=hidden // heads,
        d_ff=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        mlp_activation=activation,
        gelu_approximate=approximate,
        norm="layer",
        norm_placement="post",
        layer_norm_epsilon=float(hf.get("layer_norm_eps", 1e-12)),
        use_bias=True,
        tie_embeddings=True,
        scale_queries=True,
        max_length=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2),
        dropout_rate=float(hf.get("hidden_dropout_prob", 0.1)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        pad_id=hf.get("pad_token_id") or 0,
    )
    if rope:
        values.update(position="rope", rope_layout="interleaved", rope_base=10000.0)
    else:
        values.update(position="learned")
    return values


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """Maps a Hugging Face ``config.json`` dict to a :class:`ModelConfig`.

    ``overrides`` replace fields afterwards (e.g. ``dtype="bfloat16"``, ``dropout_rate=0.0``).
    """
    architecture = _architecture(hf_config)
    values = SUPPORTED_ARCHITECTURES[architecture](hf_config)
    values.update(overrides)
    return model_config_lib.model_config_from_dict(values)


def _classification_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    values = _bert_like_config(hf, rope=False)
    num_labels = hf.get("num_labels") or len(hf.get("id2label") or {}) or 2
    values["num_labels"] = num_labels
    return values


SUPPORTED_ARCHITECTURES = {
    "T5ForConditionalGeneration": _t5_config,
    "MT5ForConditionalGeneration": _t5_config,
    "BertForMaskedLM": lambda hf: _bert_like_config(hf, rope=False),
    "BertForSequenceClassification": _classification_config,
    "RoFormerForMaskedLM": lambda hf: _bert_like_config(hf, rope=True),
}


# ----------------------------------------------------------------------------- name mapping

# Kinds: "linear" (PyTorch [out, in] weight -> kernel [in, out], reshaped to the model's
# DenseGeneral kernel; ``in_ndim`` of the model kernel's axes are inputs), "plain" (same
# layout, reshaped if only the grouping of axes differs, e.g. a [H*D] bias -> [H, D]).
LINEAR, LINEAR_FROM_HEADS, PLAIN = "linear", "linear_from_heads", "plain"


def _norm_entries(path, hf_prefix, *, rms):
    if rms:
        return [(f"{path}/scale", f"{hf_prefix}.weight", PLAIN)]
    return [
        (f"{path}/scale", f"{hf_prefix}.weight", PLAIN),
        (f"{path}/bias", f"{hf_prefix}.bias", PLAIN),
    ]


def _dense_entries(path, hf_prefix, *, bias, kind=LINEAR):
    entries = [(f"{path}/kernel", f"{hf_prefix}.weight", kind)]
    if bias:
        entries.append((f"{path}/bias", f"{hf_prefix}.bias", PLAIN))
    return entries


def _t5_mapping(cfg: ModelConfig) -> list[tuple[str, str | tuple[str, ...], str]]:
    entries = [("token_embedder/embedding", "shared.weight", PLAIN)]
    if not cfg.tie_embeddings:
        # transformers 5 ties and omits lm_head.weight when saving; transformers 4 (and the
        # original T5 v1.1 / mT5 releases) store it.
        entries.append(("lm_head/kernel", ("lm_head.weight", "shared.weight"), LINEAR))
    mlp_names = ("wi_0", "wi_1", "wo") if cfg.gated_mlp else ("wi", "wo")
    for stack, num_layers in (("encoder", cfg.num_layers), ("decoder", cfg.decoder_layers)):
        entries.append(
            (
                f"{stack}/relpos_bias",
                f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                PLAIN,
            )
        )
        entries.append((f"{stack}/final_norm/scale", f"{stack}.final_layer_norm.weight", PLAIN))
        for i in range(num_layers):
            ours, hf = f"{stack}/layers_{i}", f"{stack}.block.{i}.layer"
            sublayers = [("attention", "SelfAttention")]
            if stack == "decoder":
                sublayers.append(("cross_attention", "EncDecAttention"))
            for j, (name, hf_name) in enumerate(sublayers):
                for ours_proj, hf_proj in (("query", "q"), ("key", "k"), ("value", "v")):
                    entries.append(
                        (
                            f"{ours}/{name}/{ours_proj}/kernel",
                            f"{hf}.{j}.{hf_name}.{hf_proj}.weight",
                            LINEAR,
                        )
                    )
                entries.append(
                    (f"{ours}/{name}/out/kernel", f"{hf}.{j}.{hf_name}.o.weight", LINEAR_FROM_HEADS)
                )
                entries.append((f"{ours}/{name}_norm/scale", f"{hf}.{j}.layer_norm.weight", PLAIN))
            j = len(sublayers)
            for mlp_name in mlp_names:
                entries.append(
                    (
                        f"{ours}/mlp/{mlp_name}/kernel",
                        f"{hf}.{j}.DenseReluDense.{mlp_name}.weight",
                        LINEAR,
                    )
                )
            entries.append((f"{ours}/mlp_norm/scale", f"{hf}.{j}.layer_norm.weight", PLAIN))
    return entries


def _bert_like_mapping(
    cfg: ModelConfig, prefix: str
) -> list[tuple[str, str | tuple[str, ...], str]]:
    entries = [
        ("token_embedder/embedding", f"{prefix}.embeddings.word_embeddings.weight", PLAIN),
        *_norm_entries("encoder/embedding_norm", f"{prefix}.embeddings.LayerNorm", rms=False),
    ]
    if cfg.type_vocab_size:
        entries.append(
            (
                "token_type_embedder/embedding",
                f"{prefix}.embeddings.token_type_embeddings.weight",
                PLAIN,
            )
        )
    if cfg.position == "learned":
        entries.append(
            (
                "encoder/position_embedder/embedding",
                f"{prefix}.embeddings.position_embeddings.weight",
                PLAIN,
            )
        )
    for i in range(cfg.num_layers):
        ours, hf = f"encoder/layers_{i}", f"{prefix}.encoder.layer.{i}"
        for name in ("query", "key", "value"):
            entries += _dense_entries(
                f"{ours}/attention/{name}", f"{hf}.attention.self.{name}", bias=True
            )
        entries += _dense_entries(
            f"{ours}/attention/out",
            f"{hf}.attention.output.dense",
            bias=True,
            kind=LINEAR_FROM_HEADS,
        )
        entries += _norm_entries(
            f"{ours}/attention_norm", f"{hf}.attention.output.LayerNorm", rms=False
        )
        entries += _dense_entries(f"{ours}/mlp/wi", f"{hf}.intermediate.dense", bias=True)
        entries += _dense_entries(f"{ours}/mlp/wo", f"{hf}.output.dense", bias=True)
        entries += _norm_entries(f"{ours}/mlp_norm", f"{hf}.output.LayerNorm", rms=False)
    if cfg.num_labels:
        entries += _dense_entries("pooler", f"{prefix}.pooler.dense", bias=True)
        entries += _dense_entries("classifier", "classifier", bias=True)
    else:
        entries += _dense_entries(
            "mlm_head/transform", "cls.predictions.transform.dense", bias=True
        )
        entries += _norm_entries(
            "mlm_head/transform_norm", "cls.predictions.transform.LayerNorm", rms=False
        )
        entries.append(
            (
                "mlm_head/output_bias",
                ("cls.predictions.bias", "cls.predictions.decoder.bias"),
                PLAIN,
            )
        )
        if not cfg.tie_embeddings:
            entries.append(("mlm_head/decoder/kernel", "cls.predictions.decoder.weight", LINEAR))
    return entries


def hf_mapping(architecture: str, cfg: ModelConfig) -> list[tuple[str, str | tuple[str, ...], str]]:
    """``(project param path, HF tensor name or alternatives, kind)`` for every parameter."""
    if architecture in ("T5ForConditionalGeneration", "MT5ForConditionalGeneration"):
        return _t5_mapping(cfg)
    prefix = "roformer" if architecture.startswith("RoFormer") else "bert"
    return _bert_like_mapping(cfg, prefix)


# Tensors a checkpoint may hold that the model has no use for: aliases of tied weights,
# buffers, heads of other tasks, and the unused relative-bias table of T5's cross-attention.
_IGNORED_TENSOR_SUFFIXES = (
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
    "EncDecAttention.relative_attention_bias.weight",
    "embeddings.position_ids",
    "encoder.embed_positions.weight",
    "cls.predictions.decoder.weight",
    "cls.predictions.decoder.bias",
    "lm_head.weight",
)


def _normalise_names(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Old TF-converted BERT checkpoints name LayerNorm parameters gamma/beta."""
    renamed = {}
    for name, array in tensors.items():
        if "LayerNorm" in name:
            name = name.replace("LayerNorm.gamma", "LayerNorm.weight")
            name = name.replace("LayerNorm.beta", "LayerNorm.bias")
        renamed[name] = array
    return renamed


def _split_kernel(shape: tuple[int, ...], inputs: int) -> int | None:
    """Number of leading model-kernel axes that multiply to ``inputs`` (None if none)."""
    for split in range(1, len(shape)):
        if math.prod(shape[:split]) == inputs:
            return split
    return None


def _convert_tensor(path, hf_name, kind, tensor, target_shape):
    def mismatch(detail=""):
        return ConversionError(
            f"tensor {hf_name!r} has shape {tuple(tensor.shape)} but model parameter {path!r} "
            f"has shape {tuple(target_shape)}{detail}"
        )

    if kind in (LINEAR, LINEAR_FROM_HEADS):
        if tensor.ndim != 2:
            raise mismatch(" (expected a 2-D PyTorch Linear weight [out, in])")
        out_features, in_features = tensor.shape
        split = _split_kernel(target_shape, in_features)
        if split is None or math.prod(target_shape[split:]) != out_features:
            raise mismatch(" (PyTorch Linear weights are [out, in], kernels [in, out])")
        return np.ascontiguousarray(tensor.T).reshape(target_shape)
    if tensor.shape != tuple(target_shape):
        if tensor.size != math.prod(target_shape) or tensor.ndim > 1 and len(target_shape) > 1:
            raise mismatch()
        tensor = tensor.reshape(target_shape)
    return tensor


def _params_from_tensors(
    architecture: str,
    cfg: ModelConfig,
    tensors: Mapping[str, np.ndarray],
    target: Mapping[str, jax.ShapeDtypeStruct],
    *,
    strict: bool,
) -> dict[str, np.ndarray]:
    flat = {}
    used = set()
    for path, hf_names, kind in hf_mapping(architecture, cfg):
        if path not in target:
            raise ConversionError(
                f"the {architecture} mapping fills {path!r}, which the model built from this "
                f"config does not have; the model's parameters are: {', '.join(sorted(target))}"
            )
        names = (hf_names,) if isinstance(hf_names, str) else hf_names
        found = next((name for name in names if name in tensors), None)
        if found is None:
            raise ConversionError(
                f"checkpoint is missing tensor {names[0]!r} (needed for model parameter "
                f"{path!r}, shape {tuple(target[path].shape)})"
            )
        used.add(found)
        array = _convert_tensor(path, found, kind, tensors[found], target[path].shape)
        flat[path] = array.astype(target[path].dtype)
    unfilled = sorted(set(target) - set(flat))
    if unfilled:
        raise ConversionError(
            f"no checkpoint tensor maps to model parameters {', '.join(unfilled)}; this "
            f"config has parts the {architecture} checkpoint cannot provide"
        )
    unused = sorted(
        name for name in tensors if name not in used and not name.endswith(_IGNORED_TENSOR_SUFFIXES)
    )
    if unused:
        message = f"checkpoint tensors not used by the model: {', '.join(unused)}"
        if strict:
            raise ConversionError(message)
        warnings.warn(message, stacklevel=3)
    return flat


def flatten_params(tree, prefix=""):
    """``{"a": {"b": x}}`` -> ``{"a/b": x}`` (the paths used in error messages and mappings)."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, path))
        else:
            flat[path] = value
    return flat


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_params`."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return tree


def param_shapes(model) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat ``{path: ShapeDtypeStruct}`` of the model's params, without running an init."""
    task = families.for_model(model)
    variables = jax.eval_shape(lambda: task.init(task.init_rngs(jax.random.key(0))))
    return flatten_params(nn.unbox(variables["params"]))


def from_hf(
    path: str | os.PathLike, *, strict: bool = False, **config_overrides: Any
) -> tuple[Any, dict[str, Any]]:
    """Loads a Hugging Face checkpoint folder as ``(flax model, params)``.

    ``config_overrides`` replace :class:`ModelConfig` fields (``dtype="bfloat16"``,
    ``dropout_rate=0.0``, ``attention="performer"``, ...). ``strict`` makes unused checkpoint
    tensors an error instead of a warning. Params are float32 jax arrays. With
    ``attention="performer"`` the model also needs its "random_features" collection, which no
    checkpoint holds: take it from ``model.init(key, ...)["random_features"]``.
    """
    hf_config, tensors = load_hf_checkpoint(path)
    architecture = _architecture(hf_config)
    tensors = _normalise_names(tensors)
    overrides = dict(config_overrides)
    if (
        architecture in ("BertForMaskedLM", "RoFormerForMaskedLM")
        and hf_config.get("tie_word_embeddings") is False
    ):
        overrides.setdefault("tie_embeddings", False)
    cfg = config_from_hf(hf_config, **overrides)
    model = models_lib.build_model(cfg)
    # The mapping names layers one by one (HF's block.{i}); a scanned model gets them stacked.
    per_layer = models_lib.build_model(dataclasses.replace(cfg, scan_layers=False))
    flat = _params_from_tensors(architecture, cfg, tensors, param_shapes(per_layer), strict=strict)
    params = unflatten_params(flat)
    if cfg.scan_layers:
        params = scanning.stack_layers(params)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return model, params


# ----------------------------------------------------------------------------- tokenizers

SENTENCEPIECE_FILES = ("spiece.model", "tokenizer.model", "sentencepiece.model")
BERT_VOCAB_FILE = "vocab.txt"


def tokenizer_from_hf(path: str | os.PathLike, *, num_extra_ids: int = 100):
    """The ``rope_jax.data`` tokenizer of a T5-family Hugging Face folder, from disk only.

    * ``vocab.txt`` (a ``BertTokenizer`` vocabulary next to a ``T5``/``MT5`` model): the
      Chinese T5 PEGASUS release in its Hugging Face form. Returns the jieba_bert tokenizer
      (``JiebaBertTokenizer``): EOS ``[SEP]``, decoder start and encoder BOS ``[CLS]``, as
      the model was trained by bert4keras (its fine-tuning script decodes from
      ``start_id=[CLS]`` to ``end_id=[SEP]``). Whatever the folder's ``config.json`` records
      as ``decoder_start_token_id`` / ``eos_token_id`` (a port may keep mT5's 0 and 1) is
      not used: the ids come from the vocabulary; pass them to ``decoding.generate``.
    * ``spiece.model`` (T5, mT5): the SentencePiece tokenizer with ``num_extra_ids``.

    BERT and RoFormer folders keep their Hugging Face tokenizer files
    (``rope_jax.evaluation.inputs.HFCodec``). A tokenizer with more ids than the model's
    vocabulary is an error.
    """
    path = os.fspath(path)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ConversionError(f"{path} has no config.json; is it a Hugging Face checkpoint?")
    with open(config_file) as f:
        hf_config = json.load(f)
    if config_from_hf(hf_config).family != "encoder_decoder":
        raise ConversionError(
            f"{path} is a {_architecture(hf_config)}; its Hugging Face tokenizer files are read "
            "by rope_jax.evaluation.inputs.HFCodec, not by a rope_jax.data tokenizer"
        )
    vocab_file = os.path.join(path, BERT_VOCAB_FILE)
    spm_files = [os.path.join(path, n) for n in SENTENCEPIECE_FILES]
    if os.path.isfile(vocab_file):
        from rope_jax.data.bert_tokenizer import JiebaBertTokenizer

        tokenizer = JiebaBertTokenizer.load(vocab_file)
    elif any(os.path.isfile(f) for f in spm_files):
        from rope_jax.data.tokenizer import Tokenizer

        spm_file = next(f for f in spm_files if os.path.isfile(f))
        tokenizer = Tokenizer.load(spm_file, num_extra_ids=num_extra_ids)
    else:
        raise ConversionError(
            f"{path} has no tokenizer this project reads: a T5 folder needs "
            f"{' or '.join(SENTENCEPIECE_FILES)}, a T5 PEGASUS folder {BERT_VOCAB_FILE}"
        )
    if tokenizer.vocab_size > hf_config["vocab_size"]:
        raise ConversionError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
            f"{hf_config['vocab_size']} (vocab_size in config.json)"
        )
    return tokenizer


# ----------------------------------------------------------------------------- export


def _require(cfg: ModelConfig, architecture: str, **expected: Any) -> None:
    for field, value in expected.items():
        if getattr(cfg, field) != value:
            raise ConversionError(
                f"{architecture} has {field}={value!r}; this config has "
                f"{field}={getattr(cfg, field)!r}, which the Hugging Face model cannot express"
            )


def hf_config_from_model_config(cfg: ModelConfig) -> tuple[str, dict[str, Any]]:
    """``(architecture, config.json dict)`` for a config HF's T5 / BERT / RoFormer can run."""
    for field in ("attention", "decoder_attention", "cross_attention"):
        if getattr(cfg, field) not in ("", "softmax"):
            raise ConversionError(
                f"{field}={getattr(cfg, field)!r}: HF models use softmax attention"
            )
    if cfg.family == "encoder_decoder":
        architecture = "T5ForConditionalGeneration"
        _require(
            cfg,
            architecture,
            position="t5_bias",
            norm="rms",
            norm_placement="pre",
            use_bias=False,
            scale_queries=False,
        )
        if cfg.mlp_activation == "gated-gelu":
            _require(cfg, architecture, gelu_approximate=True)
        elif cfg.mlp_activation != "relu":
            raise ConversionError(f"mlp_activation={cfg.mlp_activation!r} has no T5 equivalent")
        return architecture, {
            "architectures": [architecture],
            "model_type": "t5",
            "vocab_size": cfg.vocab_size,
            "d_model": cfg.d_model,
            "d_kv": cfg.head_dim,
            "d_ff": cfg.d_ff,
            "num_layers": cfg.num_layers,
            "num_decoder_layers": cfg.decoder_layers,
            "num_heads": cfg.num_heads,
            "relative_attention_num_buckets": cfg.relpos_num_buckets,
            "relative_attention_max_distance": cfg.relpos_max_distance,
            "layer_norm_epsilon": cfg.layer_norm_epsilon,
            "feed_forward_proj": cfg.mlp_activation,
            "dropout_rate": cfg.dropout_rate,
            # transformers 4 reads tie_word_embeddings, transformers 5 scale_decoder_outputs.
            "tie_word_embeddings": cfg.tie_embeddings,
            "scale_decoder_outputs": cfg.tie_embeddings,
            "is_encoder_decoder": True,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "decoder_start_token_id": 0,
        }
    if cfg.family != "encoder":
        raise ConversionError(f"family={cfg.family!r} has no Hugging Face export")
    rope = cfg.position == "rope"
    if rope:
        architecture = "RoFormerForMaskedLM"
        _require(
            cfg,
            architecture,
            rope_layout="interleaved",
            rope_base=10000.0,
            rope_scale=1.0,
            rope_ntk_factor=1.0,
        )
    else:
        architecture = "BertForSequenceClassification" if cfg.num_labels else "BertForMaskedLM"
        _require(cfg, architecture, position="learned")
    _require(
        cfg,
        architecture,
        norm="layer",
        norm_placement="post",
        use_bias=True,
        scale_queries=True,
        tie_embeddings=True,
        head_dim=cfg.d_model // cfg.num_heads,
    )
    if rope and cfg.num_labels:
        raise ConversionError("RoFormer export covers the masked-LM head only (num_labels=0)")
    if cfg.mlp_activation not in ("gelu", "relu"):
        raise ConversionError(f"mlp_activation={cfg.mlp_activation!r} has no BERT equivalent")
    activation = cfg.mlp_activation
    if activation == "gelu" and cfg.gelu_approximate:
        activation = "gelu_new"
    values = {
        "architectures": [architecture],
        "model_type": "roformer" if rope else "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.d_ff,
        "hidden_act": activation,
        "max_position_embeddings": cfg.max_length,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.layer_norm_epsilon,
        "hidden_dropout_prob": cfg.dropout_rate,
        "attention_probs_dropout_prob": cfg.dropout_rate,
        "initializer_range": cfg.initializer_range or 0.02,
        "pad_token_id": cfg.pad_id,
    }
    if rope:
        values["embedding_size"] = cfg.d_model
    if cfg.num_labels:
        values["num_labels"] = cfg.num_labels
        values["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
        values["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
    if not cfg.type_vocab_size:
        raise ConversionError("BERT-style exports need token-type embeddings (type_vocab_size > 0)")
    return architecture, values


def to_hf_tensors(architecture: str, cfg: ModelConfig, params) -> dict[str, np.ndarray]:
    """This project's params as a Hugging Face state dict (float32 numpy); scanned layers
    (``scan_layers``) are unstacked to HF's one block per layer."""
    flat = flatten_params(scanning.unstack_layers(jax.device_get(nn.unbox(params))))
    tensors = {}
    for path, hf_names, kind in hf_mapping(architecture, cfg):
        name = hf_names if isinstance(hf_names, str) else hf_names[0]
        if path not in flat:
            raise ConversionError(f"params have no {path!r}, needed for {name!r}")
        array = np.asarray(flat[path], np.float32)
        if kind in (LINEAR, LINEAR_FROM_HEADS):
            inputs = 2 if kind == LINEAR_FROM_HEADS else 1
            array = array.reshape(math.prod(array.shape[:inputs]), -1).T
        elif name.endswith(".bias"):
            array = array.reshape(-1)
        tensors[name] = np.ascontiguousarray(array)
    return tensors


def to_hf(model_or_config, params, path: str | os.PathLike) -> str:
    """Writes ``config.json`` and ``model.safetensors`` that Hugging Face loads with
    ``AutoModelFor...from_pretrained(path)``. Returns the architecture name.
    """
    from safetensors.numpy import save_file

    cfg = getattr(model_or_config, "config", model_or_config)
    architecture, hf_config = hf_config_from_model_config(cfg)
    tensors = to_hf_tensors(architecture, cfg, params)
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    save_file(tensors, os.path.join(path, SAFETENSORS_FILE), metadata={"format": "pt"})
    return architecture
