"""Summarization fine-tuning and evaluation: ``finetune_and_evaluate(config, workdir)``.

The run (``configs/summarization.py``; ``python eval.py --config=configs/summarization.py:tiny
--config.train_path=... --config.eval_path=... --config.init_checkpoint=... --workdir=...``):

1. Start checks, before any model work: the config's values (``check_config``), both data
   files read in full (``summarization.read_summaries``: a missing file or a malformed line
   fails with ``<file>:<line>: ...``), the work directory against the config it recorded
   (``training.workdir``: a restart that would change the experiment is refused before
   anything is written), mesh, optimizer and batch size; then the pretrained model, opened
   read-only (``pretrained.load_source``: a ``train.py`` workdir, a Hugging Face folder, or
   random init), which must be an encoder-decoder.
2. Inputs as ZhuiyiTechnology/t5-pegasus ``finetune.py`` builds them with bert4keras'
   ``tokenizer.encode(text, maxlen=...)``: the encoder reads ``[CLS] source [SEP]`` cut to
   ``max_source_length`` tokens (the script's ``max_c_len=256``; the source is cut, ``[SEP]``
   kept), the decoder ``[CLS] title`` and predicts ``title [SEP]``, where ``[CLS] title
   [SEP]`` is cut to ``max_target_length`` tokens (``max_t_len=32``), so decoder rows have
   ``max_target_length - 1`` positions. With a SentencePiece tokenizer the same limits give
   T5's plain form: ``source EOS`` in, ``title EOS`` out behind the start id 0.
   (``inputs.seq2seq_arrays`` does the cutting and shifting; ``source_prefix`` is put before
   every source, e.g. T5's ``"summarize: "``.)
3. Fine-tuning by the same run as pretraining and SuperGLUE (``training.runner.run``: the
   sharded, jitted, donated step, gradient accumulation, Orbax checkpoints in
   ``<workdir>/checkpoints``, SIGINT/SIGTERM save and exact resume, ``metrics.jsonl``,
   TensorBoard, the progress line). Batches are rows of the training pairs in seeded epochs
   (``inputs.EpochIterator``).
4. Every ``eval_every_steps`` (and after the last step) the evaluators of
   ``config.evaluators``: ``summarization`` decodes the evaluation file
   (:class:`SummaryPredictor`) and reports ``summarization/rouge-1``, ``rouge-2``,
   ``rouge-l``, ``bleu`` (``summary_metrics``: character-level, as the T5 PEGASUS tables);
   ``held_out_loss`` and ``loss_by_position`` score the evaluation targets. The best
   checkpoint is kept by ``best_metric`` (``<workdir>/best``); the reference keeps the best
   epoch by BLEU, here the default is ROUGE-L.
5. From the best checkpoint (the final state without one) the evaluation file is decoded
   again: ``<workdir>/predictions/<eval file name>.jsonl`` (id, reference, prediction) and
   ``<workdir>/metrics.json`` (``rouge-1``, ``rouge-2``, ``rouge-l``, ``bleu``,
   ``num_examples``, ``best_step``) via ``summarization.evaluate_summaries``.

Decoding is ``rope_jax.decoding.generate`` with ``method="beam"`` through the model family's
decoding steps, from ``[CLS]`` (jieba_bert) or 0 (SentencePiece) for up to
``decode_max_length`` tokens (the script's ``maxlen=max_t_len``). The script evaluates with
``topk=1``, one beam, which is greedy decoding, as ``beam_size=1, beam_alpha=0`` is here.
Deliberate difference for wider beams: bert4keras ranks by summed log-probability (alpha 0)
but drops a finished beam that is not the best at the step it ends, while this beam search
keeps the best finished hypotheses until none can be beaten (T5's rule).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from rope_jax import decoding, families
from rope_jax.evaluation import formats, summarization
from rope_jax.evaluation import inputs as inputs_lib
from rope_jax.evaluation import pretrained as pretrained_lib
from rope_jax.evaluation.predictor import TaskModel, padded_batches
from rope_jax.evaluation.summary_metrics import METRICS, summarization_metrics
from rope_jax.training import best as best_lib
from rope_jax.training import evaluators as loop_evaluators
from rope_jax.training import optim, preflight, runner, sharding
from rope_jax.training import workdir as workdir_lib

EVALUATOR = "summarization"
# The scalars each evaluator reports (``best_metric`` must be one of them).
EVALUATOR_SCALARS = {
    EVALUATOR: METRICS,
    "held_out_loss": ("loss", "accuracy"),
    "loss_by_position": None,  # loss_at_<start>-<end>, by bucket
}


def best_mode(metric: str) -> str:
    """``"min"`` for a loss (``held_out_loss/loss``, ``loss_by_position/loss_at_0-3``),
    else ``"max"``."""
    return "min" if metric.rsplit("/", 1)[-1].startswith("loss") else "max"


def check_config(config, workdir: str) -> None:
    """Every check that needs no file: paths given, lengths, decoding and the best metric."""

    def require(ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise preflight.ConfigError(
                f"{key}={config[key]!r}: {rule}; set --config.{key}=<value> accordingly."
            )

    for key in ("train_path", "eval_path"):
        require(
            bool(config[key]),
            key,
            "give a title<TAB>content .tsv file or a .jsonl file of (source, summary) records",
        )
    require(
        config.format in summarization.FORMATS, "format", f"choose one of {summarization.FORMATS}"
    )
    require(config.max_source_length >= 3, "max_source_length", "must be >= 3 ([CLS] x [SEP])")
    require(config.max_target_length >= 3, "max_target_length", "must be >= 3 ([CLS] x [SEP])")
    require(config.decode_max_length >= 1, "decode_max_length", "must be >= 1")
    require(config.beam_size >= 1, "beam_size", "must be >= 1 (1 = greedy)")
    require(config.beam_alpha >= 0, "beam_alpha", "must be >= 0 (0 = no length penalty)")
    require(config.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
    names = []
    for spec in config.evaluators:
        require(
            isinstance(spec, Sequence)
            and not isinstance(spec, str)
            and len(spec) == 3
            and isinstance(spec[2], Mapping),
            "evaluators",
            f"entry {spec!r} is not (name, every_steps, kwargs), e.g. "
            "('summarization', None, {})",
        )
        require(
            spec[0] in EVALUATOR_SCALARS,
            "evaluators",
            f"unknown evaluator {spec[0]!r}; choose from {sorted(EVALUATOR_SCALARS)}",
        )
        names.append(spec[0])
    if config.best_metric:
        name, _, scalar = config.best_metric.partition("/")
        require(
            name in names,
            "best_metric",
            f"no evaluator of config.evaluators reports it (they are {names}); give "
            "'<evaluator>/<scalar>', e.g. 'summarization/rouge-l', or '' for no best checkpoint",
        )
        known = EVALUATOR_SCALARS[name]
        require(
            known is None or scalar in known,
            "best_metric",
            f"{name} reports {list(known or ())}",
        )
    if config.init_checkpoint and os.path.realpath(config.init_checkpoint) == os.path.realpath(
        workdir
    ):
        raise preflight.ConfigError(
            f"--workdir={workdir} is the init_checkpoint: the fine-tune would resume the "
            "pretraining run in place. Give the fine-tune a new work directory."
        )


def read_pairs(config) -> tuple[list, list]:
    """The training and evaluation pairs, each file read and checked in full."""

    def read(path):
        return summarization.read_summaries(
            path,
            format=config.format,
            source_field=config.source_field,
            target_field=config.target_field,
            id_field=config.id_field,
        )

    return read(config.train_path), read(config.eval_path)


def summary_arrays(examples, codec, config) -> dict[str, np.ndarray]:
    """Encoder-decoder arrays of the pairs (module docstring, item 2)."""
    texts = [
        formats.TextExample(config.source_prefix + e.source, e.target, i)
        for i, e in enumerate(examples)
    ]
    return inputs_lib.seq2seq_arrays(
        texts,
        codec,
        max_input_length=config.max_source_length,
        # The decoder start token is the row's first input, not one of its targets.
        max_target_length=config.max_target_length - 1,
    )


class SummaryPredictor:
    """Summaries decoded with beam search (module docstring) from the variables it is given:
    the train state's in the loop, the best checkpoint's at the end. Batches have
    ``eval_batch_size`` rows (the last padded with copies of its last row), so
    ``decoding.generate`` compiles once."""

    def __init__(self, tm: TaskModel, config):
        self.tm, self.config = tm, config

    def token_ids(self, variables, encoder_tokens_NL: np.ndarray) -> np.ndarray:
        """Generated ids ``[N, decode_max_length]`` of the best beam, start id dropped."""
        config, codec = self.config, self.tm.codec
        extra = {k: v for k, v in variables.items() if k != "params" and v}
        arrays = {"encoder_input_tokens": np.asarray(encoder_tokens_NL, np.int32)}
        n = len(encoder_tokens_NL)
        out = []
        for start, batch in zip(
            range(0, n, config.eval_batch_size),
            padded_batches(arrays, config.eval_batch_size, weight_key="rows"),
            strict=True,
        ):
            beams = decoding.generate(
                self.tm.task,
                variables["params"],
                batch["encoder_input_tokens"],
                max_length=config.decode_max_length + 1,  # + the decoder start id
                method="beam",
                eos_id=codec.eos_id,
                pad_id=codec.pad_id,
                decoder_start_id=codec.decoder_start_id,
                beam_size=config.beam_size,
                alpha=config.beam_alpha,
                variables=extra or None,
                use_cache=config.kv_cache,
            )
            rows = min(config.eval_batch_size, n - start)
            out.append(np.asarray(beams.sequences)[:rows, 0, 1:])
        return np.concatenate(out)

    def __call__(self, variables, encoder_tokens_NL: np.ndarray) -> list[str]:
        """The decoded text of every row (``[SEP]``/EOS ends it; special tokens vanish)."""
        ids = self.token_ids(variables, encoder_tokens_NL)
        return [self.tm.codec.decode(row.tolist()) for row in ids]


def _loop_evaluators(config, tm: TaskModel, predictor: SummaryPredictor, examples, arrays):
    held_out = padded_batches(arrays, config.eval_batch_size, weight_key="decoder_loss_weights")
    references = [e.target for e in examples]

    def summaries():
        def run(state):
            variables = families.variables_of(state.params, state.random_features)
            predictions = predictor(variables, arrays["encoder_input_tokens"])
            return summarization_metrics(zip(references, predictions, strict=True))

        return run

    builders = {
        EVALUATOR: summaries,
        "held_out_loss": lambda: loop_evaluators.held_out_loss(tm.task, lambda: held_out),
        "loss_by_position": lambda bucket_width=4: loop_evaluators.loss_by_position(
            tm.task, lambda: held_out, bucket_width=bucket_width
        ),
    }
    return loop_evaluators.from_config(
        config.evaluators, builders, default_every=config.eval_every_steps
    )


def load_model(config) -> TaskModel:
    """The pretrained encoder-decoder of ``init_checkpoint`` (read-only) with its codec."""
    source = pretrained_lib.load_source(config)
    if source.cfg.family != "encoder_decoder":
        where = (
            f"init_checkpoint {config.init_checkpoint}"
            if config.init_checkpoint
            else "config.model (random init)"
        )
        raise preflight.ConfigError(
            f"{where} is a {source.cfg.family} model; summarization needs an encoder_decoder: "
            "a train.py workdir of configs/t5_pegasus.py or configs/mt5.py, or a Hugging Face "
            "T5/MT5 folder (T5 PEGASUS: MT5 weights with a BERT vocab.txt)."
        )
    # The task name only matters for encoders (the size of a classification head).
    return pretrained_lib.load_for_task(EVALUATOR, config, source=source)


def split_name(config) -> str:
    """The evaluation file's name without extension: predictions/<name>.jsonl."""
    return os.path.splitext(os.path.basename(config.eval_path))[0]


def finetune_and_evaluate(config, workdir: str, *, devices: list | None = None) -> dict:
    """Fine-tunes on ``train_path`` and evaluates on ``eval_path`` (module docstring); returns
    and writes the metrics. ``devices`` (default: all) restricts the mesh."""
    check_config(config, workdir)
    train_examples, eval_examples = read_pairs(config)
    # Read-only: a refused restart leaves the work directory as it was.
    resume = workdir_lib.plan_resume(config, workdir)
    with preflight.config_errors():
        runner.set_prng_impl(config.prng_impl)
        mesh = sharding.make_mesh(config.mesh, devices)
        rules = sharding.rules_from_config(config.logical_axis_rules)
        tx, schedule = optim.make_optimizer(config.optimizer, config.num_train_steps)
        runner.check_batch_size(config.batch_size, config.optimizer.grad_accum_steps, mesh)
    tm = load_model(config)
    train = inputs_lib.EpochIterator(
        summary_arrays(train_examples, tm.codec, config),
        batch_size=config.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    eval_arrays = summary_arrays(eval_examples, tm.codec, config)
    predictor = SummaryPredictor(tm, config)
    with preflight.config_errors():
        loop_evals = _loop_evaluators(config, tm, predictor, eval_examples, eval_arrays)
    best = None
    if config.best_metric:
        best = best_lib.BestCheckpoint(
            os.path.join(workdir, "best"), config.best_metric, mode=best_mode(config.best_metric)
        )
    logging.info(
        "Summarization: fine-tuning on %d pairs of %s, evaluating on %d of %s; mesh %s; "
        "run directory %s",
        len(train_examples),
        config.train_path,
        len(eval_examples),
        config.eval_path,
        sharding.describe(mesh),
        workdir,
    )
    result = runner.run(
        config,
        workdir,
        task=tm.task,
        inputs=runner.Inputs(train=train),
        resume=resume,
        mesh=mesh,
        rules=rules,
        tx=tx,
        schedule=schedule,
        model_cfg=tm.cfg,
        initial_params=(tm.params, tm.random_features),
        evaluators=loop_evals,
        best=best,
    )
    params, random_features = runner.final_params(result, best)
    variables = families.variables_of(params, random_features)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        predictions = predictor(variables, eval_arrays["encoder_input_tokens"])
    triples = [(e.id, e.target, p) for e, p in zip(eval_examples, predictions, strict=True)]
    if jax.process_index() == 0:
        metrics = summarization.evaluate_summaries(
            triples, workdir=workdir, split=split_name(config)
        )
    else:
        metrics = summarization_metrics((reference, p) for _, reference, p in triples)
    metrics["num_examples"] = float(len(triples))
    if best is not None:
        metrics["best_step"] = float(best.step)
    if jax.process_index() == 0:
        path = os.path.join(workdir, "metrics.json")
        with open(f"{path}.tmp", "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2, sort_keys=True)
        os.replace(f"{path}.tmp", path)
        print(markdown_table(metrics, split_name(config)))
    return metrics


def markdown_table(metrics: dict, split: str) -> str:
    """One row of the four scores (x 100, as the T5 PEGASUS tables print them)."""
    header = "| split | " + " | ".join(METRICS) + " |"
    rule = "|" + " --- |" * (len(METRICS) + 1)
    row = f"| {split} | " + " | ".join(f"{100 * metrics[m]:.2f}" for m in METRICS) + " |"
    return "\n".join([header, rule, row])
