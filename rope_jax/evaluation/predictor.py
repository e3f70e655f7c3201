"""A model ready for one SuperGLUE task, its token arrays, and its prediction functions.

``TaskModel`` holds the module, config, params and codec; ``task_arrays`` casts records for
its family (text-to-text for encoder-decoders, classification / multiple choice for
encoders; see ``formats``); ``Predictor`` turns records into canonical predictions for the
evaluator plug-ins (``evaluators``), from the variables it is given (the train state's during
fine-tuning, the best checkpoint's at the end).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rope_jax import families
from rope_jax.evaluation import evaluators, formats
from rope_jax.evaluation import inputs as inputs_lib


@dataclasses.dataclass
class TaskModel:
    """A model ready for one task: module, config, params, codec and how to cast records."""

    model: Any
    cfg: Any
    params: Any
    random_features: Any
    codec: Any

    @property
    def text_to_text(self) -> bool:
        return self.cfg.family == "encoder_decoder"

    @property
    def task(self):
        """The model family's task object (losses, head outputs, decoding)."""
        return families.for_model(self.model)


def task_arrays(task: str, tm: TaskModel, records, config, *, training: bool):
    """``(examples, arrays)`` of ``records``; ``training`` keeps labelled examples only."""
    if tm.text_to_text:
        examples = formats.text_examples(task, records, training=training)
        arrays = inputs_lib.seq2seq_arrays(
            examples,
            tm.codec,
            max_input_length=config.max_input_length,
            max_target_length=config.max_target_length,
        )
        return examples, arrays
    examples = [formats.encoder_example(task, r, i) for i, r in enumerate(records)]
    if training:
        examples = [e for e in examples if e.label is not None and e.label != ()]
    arrays = inputs_lib.encoder_arrays(examples, tm.codec, max_length=config.max_input_length)
    return examples, arrays


def padded_batches(arrays: dict[str, np.ndarray], size: int, *, weight_key: str):
    """Fixed-size batches of ``arrays`` (one compile); the last is padded with copies of its
    last row whose ``weight_key`` is 0, so they add nothing to a weighted sum. A
    ``weight_key`` that is not in ``arrays`` is added (1 per row, 0 on padding)."""
    n = len(next(iter(arrays.values())))
    out = []
    for start in range(0, n, size):
        rows = np.arange(start, min(start + size, n))
        padded = np.concatenate([rows, np.full(size - len(rows), rows[-1])])
        batch = {k: v[padded] for k, v in arrays.items()}
        real = (np.arange(size) < len(rows)).astype(np.int32)
        if weight_key in batch:
            weights = batch[weight_key]
            batch[weight_key] = weights * real.reshape((-1,) + (1,) * (weights.ndim - 1))
        else:
            batch[weight_key] = real
        out.append(batch)
    return out


def host_value(array) -> np.ndarray:
    """A (possibly multi-process) array's whole value on this host. With several processes
    the model's outputs follow its parameters' shardings onto devices of other processes,
    which ``np.asarray`` cannot read; every process predicts the same rows and needs them."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


class Predictor:
    """Jitted prediction functions of one task model, shared by all its evaluators
    (validation, test, diagnostics): batches have a fixed shape, so each compiles once.

    Encoder-decoders decode with ``rope_jax.decoding.generate``: greedy by default, or beam
    search (``config.decode_method="beam"``, ``beam_size``, length penalty ``alpha``), with the
    key/value cache (``config.kv_cache``) or by re-running the decoder over the prefix.
    ``predict_fn(task)(variables, records)``: ``variables`` are the flax collections
    (``families.variables_of(params, random_features)``).
    """

    def __init__(self, tm: TaskModel, config):
        self.tm, self.config = tm, config
        self._head_logits = jax.jit(lambda variables, batch: tm.task.head_logits(variables, batch))

    def _generate(self, variables, batch) -> np.ndarray:
        """Generated target ids ``[N, max_target_length]`` (decoder start id dropped)."""
        from rope_jax import decoding

        extra = {k: v for k, v in variables.items() if k != "params" and v}
        out = decoding.generate(
            self.tm.task,
            variables["params"],
            batch["encoder_input_tokens"],
            max_length=self.config.max_target_length + 1,  # + the decoder start id
            method=self.config.decode_method,
            eos_id=self.tm.codec.eos_id,
            decoder_start_id=getattr(self.tm.codec, "decoder_start_id", 0),  # T5's 0
            beam_size=self.config.beam_size,
            alpha=self.config.beam_alpha,
            variables=extra or None,
            use_cache=self.config.kv_cache,
        )
        sequences = host_value(out.sequences)
        if sequences.ndim == 3:  # beam search: best beam first
            sequences = sequences[:, 0]
        return sequences[:, 1:]

    def predict_fn(self, task: str):
        """``predict_fn(variables, records) -> canonical predictions`` for an evaluator."""
        tm, config = self.tm, self.config

        def predict(variables, records):
            examples, arrays = task_arrays(task, tm, records, config, training=False)
            n, size = len(examples), config.eval_batch_size
            arrays = {k: v for k, v in arrays.items() if k != "labels"}
            batches = padded_batches(arrays, size, weight_key="example_weights")
            predictions: list[Any] = []
            texts: list[str] = []
            for start, batch in zip(range(0, n, size), batches, strict=True):
                rows = np.arange(start, min(start + size, n))
                batch = {k: jnp.asarray(v) for k, v in batch.items() if k != "example_weights"}
                if tm.text_to_text:
                    sequences = self._generate(variables, batch)[: len(rows)]
                    for row, ids in zip(rows, sequences, strict=True):
                        text = tm.codec.decode(ids.tolist())
                        record = records[examples[row].record]
                        predictions.append(formats.parse_text_prediction(task, text, record))
                        texts.append(text)
                    continue
                scores = host_value(self._head_logits(variables, batch))[: len(rows)]
                for row, scores_KC in zip(rows, scores, strict=True):
                    example = examples[row]
                    if len(example.pairs) == 1 and scores_KC.shape[-1] > 1:
                        flat = scores_KC[0]  # class logits
                    else:
                        flat = scores_KC[: len(example.pairs), 0]  # one score per candidate
                    record = records[example.record]
                    predictions.append(formats.encoder_prediction(task, record, flat.tolist()))
            if tm.text_to_text:
                return evaluators.Predictions(predictions, texts)
            return predictions

        return predict
