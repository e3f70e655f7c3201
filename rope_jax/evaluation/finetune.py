"""SuperGLUE fine-tuning and evaluation: ``finetune_and_evaluate(config, workdir)``.

First every split the run will use is read, checked and cast (``splits.read_run_splits``),
so a bad file fails in seconds, before any model work. Then for each task: load a
pretrained model (a ``train.py`` workdir, a Hugging Face folder, or nothing = random init
for smoke tests), cast the task for the model family (text-to-text for encoder-decoders,
classification / multiple choice for encoders; see ``formats``), fine-tune on the training
split, then run the evaluator plug-ins on the validation split (metrics +
``predictions/<Task>_val.jsonl``, the file they scored) and on the test split when present
(``submission/<Task>.jsonl``). AX-b and AX-g are predicted by the RTE model, as the
benchmark prescribes. Results go to ``<workdir>/metrics.json`` and a printed table;
``task="all"`` runs every task found in ``data_dir`` and writes ``summary.md``.

Few-shot (FewGLUE): ``train_data_dir`` holds the 32-example ``train.jsonl`` sets while
``data_dir`` holds the official validation files; or ``eval_split="dev32"`` to score on
FewGLUE's own held-out 32 examples.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from rope_jax.evaluation import evaluators, formats, splits, tasks_report
from rope_jax.evaluation import inputs as inputs_lib
from rope_jax.evaluation import pretrained as pretrained_lib

RANDOM_FEATURES = "random_features"


def _variables(params, random_features):
    variables = {"params": params}
    if random_features:
        variables[RANDOM_FEATURES] = random_features
    return variables


def _encoder_logits(model, cfg, variables, batch, *, deterministic, rngs=None):
    """Head outputs ``[N, K, C]`` for ``[N, K, L]`` encoder arrays (choices folded into rows)."""
    n, k, length = batch["input_tokens"].shape
    flat = {
        name: batch[name].reshape(n * k, length)
        for name in ("input_tokens", "segment_ids", "positions", "token_type_ids")
    }
    extra = {"token_type_ids": flat["token_type_ids"]} if cfg.type_vocab_size else {}
    logits = model.apply(
        variables,
        flat["input_tokens"],
        segment_ids=flat["segment_ids"],
        positions=flat["positions"],
        deterministic=deterministic,
        rngs=rngs,
        **extra,
    )
    return logits.astype(jnp.float32).reshape(n, k, -1)


def encoder_loss(logits_NKC, batch) -> jax.Array:
    """Mean cross entropy: over classes (K = 1), or over the valid candidates (multiple
    choice, one score per candidate: -log of the total probability of the right ones)."""
    if logits_NKC.shape[1] == 1 and batch["labels"].ndim == 1:
        log_probs = jax.nn.log_softmax(logits_NKC[:, 0], axis=-1)
        picked = jnp.take_along_axis(log_probs, batch["labels"][:, None], axis=-1)[:, 0]
        return -jnp.mean(picked)
    scores_NK = jnp.where(batch["choice_mask"] > 0, logits_NKC[..., 0], -1e9)
    gold_NK = jnp.where(batch["labels"] > 0, scores_NK, -1e9)
    has_gold_N = (jnp.sum(batch["labels"], axis=-1) > 0).astype(jnp.float32)
    loss_N = jax.nn.logsumexp(scores_NK, axis=-1) - jax.nn.logsumexp(gold_NK, axis=-1)
    return jnp.sum(loss_N * has_gold_N) / jnp.maximum(jnp.sum(has_gold_N), 1.0)


def seq2seq_loss(model, variables, batch, *, deterministic, rngs=None) -> jax.Array:
    logits = model.apply(
        variables,
        batch["encoder_input_tokens"],
        batch["decoder_input_tokens"],
        encoder_segment_ids=batch["encoder_segment_ids"],
        decoder_segment_ids=batch["decoder_segment_ids"],
        encoder_positions=batch["encoder_positions"],
        decoder_positions=batch["decoder_positions"],
        deterministic=deterministic,
        rngs=rngs,
    ).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    token_ll = jnp.take_along_axis(log_probs, batch["decoder_target_tokens"][..., None], axis=-1)
    weights = batch["decoder_loss_weights"].astype(jnp.float32)
    return -jnp.sum(token_ll[..., 0] * weights) / jnp.maximum(jnp.sum(weights), 1.0)


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


def _task_arrays(task: str, tm: TaskModel, records, config, *, training: bool):
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


def train(task: str, tm: TaskModel, records, config) -> tuple[Any, list[float]]:
    """Fine-tunes ``tm.params`` on ``records``; returns (params, losses per logged step)."""
    from rope_jax.training import optim

    _, arrays = _task_arrays(task, tm, records, config, training=True)
    n = len(next(iter(arrays.values())))
    if n == 0:
        raise ValueError(f"{task}: no labelled training examples")
    tx, _ = optim.make_optimizer(config.optimizer, config.num_train_steps)
    opt_state = tx.init(tm.params)
    model, cfg = tm.model, tm.cfg

    def loss_fn(params, batch, rng):
        variables = _variables(params, tm.random_features)
        rngs = {"dropout": rng}
        if tm.text_to_text:
            return seq2seq_loss(model, variables, batch, deterministic=False, rngs=rngs)
        logits = _encoder_logits(model, cfg, variables, batch, deterministic=False, rngs=rngs)
        return encoder_loss(logits, batch)

    @jax.jit
    def step(params, opt_state, batch, rng):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, rng)
        grads, _ = optim.clip_by_global_norm(grads, config.optimizer.grad_clip_norm)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        return params, opt_state, loss

    rng = np.random.default_rng(config.seed)
    key = jax.random.key(config.seed)
    order = np.array([], np.int64)
    params, losses = tm.params, []
    batch_size = min(config.batch_size, n)
    for step_number in range(config.num_train_steps):
        if len(order) < batch_size:  # epochs of a seeded permutation
            order = np.concatenate([order, rng.permutation(n)])
        rows, order = order[:batch_size], order[batch_size:]
        batch = {k: jnp.asarray(v[rows]) for k, v in arrays.items()}
        params, opt_state, loss = step(
            params, opt_state, batch, jax.random.fold_in(key, step_number)
        )
        if (
            step_number + 1
        ) % config.log_every_steps == 0 or step_number + 1 == config.num_train_steps:
            losses.append(float(loss))
            logging.info(
                "%s step %d/%d loss %.4f", task, step_number + 1, config.num_train_steps, losses[-1]
            )
    return params, losses


class Predictor:
    """Jitted prediction functions of one fine-tuned model, shared by all its evaluators
    (validation, test, diagnostics): batches have a fixed shape, so each compiles once.

    Encoder-decoders decode with ``rope_jax.decoding.generate``: greedy by default, or beam
    search (``config.decode_method="beam"``, ``beam_size``, length penalty ``alpha``), with the
    key/value cache (``config.kv_cache``) or by re-running the decoder over the prefix.
    """

    def __init__(self, tm: TaskModel, config):
        self.tm, self.config = tm, config
        self._encoder_scores = jax.jit(self._encoder_scores_impl)

    def _encoder_scores_impl(self, params, batch):
        variables = _variables(params, self.tm.random_features)
        return _encoder_logits(self.tm.model, self.tm.cfg, variables, batch, deterministic=True)

    def _generate(self, params, batch) -> np.ndarray:
        """Generated target ids ``[N, max_target_length]`` (decoder start id dropped)."""
        from rope_jax import decoding

        extra = {RANDOM_FEATURES: self.tm.random_features} if self.tm.random_features else None
        out = decoding.generate(
            self.tm.model,
            params,
            batch["encoder_input_tokens"],
            max_length=self.config.max_target_length + 1,  # + the decoder start id
            method=self.config.decode_method,
            eos_id=self.tm.codec.eos_id,
            decoder_start_id=getattr(self.tm.codec, "decoder_start_id", 0),  # T5's 0
            beam_size=self.config.beam_size,
            alpha=self.config.beam_alpha,
            variables=extra,
            use_cache=self.config.kv_cache,
        )
        sequences = np.asarray(out.sequences)
        if sequences.ndim == 3:  # beam search: best beam first
            sequences = sequences[:, 0]
        return sequences[:, 1:]

    def predict_fn(self, task: str):
        """``predict_fn(params, records) -> canonical predictions`` for an evaluator."""
        tm, config = self.tm, self.config

        def predict(params, records):
            examples, arrays = _task_arrays(task, tm, records, config, training=False)
            n, size = len(examples), config.eval_batch_size
            predictions: list[Any] = []
            texts: list[str] = []
            for start in range(0, n, size):
                rows = np.arange(start, min(start + size, n))
                # Pad the last batch to the fixed size so each function compiles once.
                padded = np.concatenate([rows, np.full(size - len(rows), rows[-1])])
                batch = {k: jnp.asarray(v[padded]) for k, v in arrays.items() if k != "labels"}
                if tm.text_to_text:
                    sequences = self._generate(params, batch)[: len(rows)]
                    for row, ids in zip(rows, sequences, strict=True):
                        text = tm.codec.decode(ids.tolist())
                        record = records[examples[row].record]
                        predictions.append(formats.parse_text_prediction(task, text, record))
                        texts.append(text)
                    continue
                scores = np.asarray(self._encoder_scores(params, batch))[: len(rows)]
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


def run_task(
    task: str,
    config,
    workdir: str,
    *,
    source=None,
    task_splits: splits.TaskSplits | None = None,
) -> dict[str, dict[str, float]]:
    """Fine-tunes and evaluates one task (plus AX-b/AX-g after RTE); metrics per split.

    ``task_splits``: the splits as read up front (read here when not given).
    """
    task_splits = task_splits or splits.read_task_splits(task, config)
    tm = pretrained_lib.load_for_task(task, config, source=source)
    params, losses = train(task, tm, task_splits.train.records, config)
    tm = dataclasses.replace(tm, params=params)
    predictor = Predictor(tm, config)
    results: dict[str, dict[str, float]] = {}
    for job in task_splits.evaluations:
        evaluator = evaluators.create_evaluator(
            predictor.predict_fn(job.data.task), task=job.data.task, data=job.data, workdir=workdir
        )
        results[job.name] = dict(evaluator.run(params))
    results[task]["final_train_loss"] = losses[-1]
    results[task]["train_skipped_records"] = float(len(task_splits.train.skipped))
    return results


def finetune_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, dict[str, float]]:
    """Runs ``config.task`` (or every task with ``"all"``); writes metrics.json and tables."""
    # Every file first: a bad or missing split fails here, before a model is loaded.
    run_splits = splits.read_run_splits(config)
    os.makedirs(workdir, exist_ok=True)
    source = pretrained_lib.load_source(config)
    results: dict[str, dict[str, float]] = {}
    for task_splits in run_splits:
        results.update(
            run_task(task_splits.task, config, workdir, source=source, task_splits=task_splits)
        )
        with open(os.path.join(workdir, "metrics.json"), "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
    table = tasks_report.markdown_table(results)
    print(table)
    if config.task == "all":
        with open(os.path.join(workdir, "summary.md"), "w") as f:
            f.write(tasks_report.summary_markdown(results, config))
    return results
