"""Few-shot SuperGLUE by cloze: PET patterns (``method="pet"``) and P-tuning continuous
prompts (``method="ptuning"``) on any model family: ``run_fewshot(config, workdir)``.

Each task of ``config.task`` (or ``"all"``) is cast by its pattern (``pvp``; ``pattern_id``
None = the method's first), tokenised for the model's family (``cloze_inputs``) and trained
by the same run as pretraining and SuperGLUE fine-tuning (``training.runner.run``: mesh,
checkpoints, SIGINT/SIGTERM save and resume, the loop's evaluators and best checkpoint),
with the loss of ``cloze.ClozeTask``. ``num_train_steps=0`` scores zero-shot. Outputs are
those of ``finetune``: ``metrics.json``, the printed table, ``predictions/<Task>_<split>
.jsonl`` and ``submission/`` files, per-task run directories.

Optimisation (``make_optimizer``): with ``method="ptuning"`` the prompt encoder has its own
learning rate (``prompt_learning_rate``; P-tuning's few-shot code trains prompts at
``learning_rate`` and the LM at 1e-5, ``PT-Fewshot/pet/wrapper.py`` ``train``), and
``freeze_lm=True`` trains the prompts alone: ``optax.multi_transform`` gives the LM
``optax.set_to_zero()`` (no update, no optimizer state) and ``ClozeTask`` stops its gradient.

Seeds (``num_seeds``, "the order of few-shot training data affects a lot"): run ``i`` uses
``seed + i`` (data order, dropout, prompt initialisation, WSC padding) in
``<workdir>/seed_<seed>/`` (the workdir itself when ``num_seeds=1``); the table of mean ±
std over seeds is written as ``fewshot.md`` and ``fewshot.json`` (``fewshot_report``).
"""

from __future__ import annotations

import copy
import functools
import json
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from absl import logging

from rope_jax import families
from rope_jax.evaluation import cloze, cloze_inputs, evaluators, fewshot_report, pvp, splits
from rope_jax.evaluation import inputs as inputs_lib
from rope_jax.evaluation import pretrained as pretrained_lib
from rope_jax.evaluation.finetune import (
    BEST_METRIC,
    _labelled,
    _last_train_loss,
    check_dropout_rate,
)
from rope_jax.evaluation.predictor import padded_batches
from rope_jax.training import best as best_lib
from rope_jax.training import evaluators as loop_evaluators
from rope_jax.training import optim, preflight, runner, sharding
from rope_jax.training import workdir as workdir_lib

GENERATIVE_TASKS = ("WSC",)


def pattern_of(config, task: str) -> int:
    """``config.pattern_id``, or with None the method's first pattern for ``task``."""
    pattern_id = config.pattern_id
    return pvp.default_pattern_id(task, config.method) if pattern_id is None else pattern_id


def check_config(config) -> None:
    """Everything the config alone decides, before any file or model is read."""
    check_dropout_rate(config.dropout_rate)
    with preflight.config_errors():
        if config.method not in pvp.METHODS:
            raise ValueError(f"method={config.method!r}; choose one of {pvp.METHODS}")
        pattern_id = config.pattern_id
        if pattern_id is not None and (isinstance(pattern_id, bool) or pattern_id < 0):
            raise ValueError(
                f"pattern_id={pattern_id}: give a pattern number (rope_jax/evaluation/pvp.py "
                "PATTERN_IDS) or None for each task's first (None goes in the config argument, "
                "e.g. --config=configs/fewshot.py:tiny,pattern_id=None; -1 is no longer read "
                "as the default)"
            )
        rate = config.prompt_learning_rate
        if rate is not None and not rate > 0:
            raise ValueError(
                f"prompt_learning_rate={rate}: give a positive rate, or None for "
                "optimizer.learning_rate (None goes in the config argument, e.g. "
                "--config=configs/fewshot.py:tiny,prompt_learning_rate=None)"
            )
        if not 0.0 <= config.pet_alpha <= 1.0:
            raise ValueError(
                f"pet_alpha={config.pet_alpha} must be in [0, 1] (1 = no auxiliary MLM loss)"
            )
        if config.num_seeds < 1:
            raise ValueError(f"num_seeds={config.num_seeds} must be >= 1")
        if config.prompt_encoder not in ("lstm", "mlp", "embedding"):
            raise ValueError(
                f"prompt_encoder={config.prompt_encoder!r}; choose lstm, mlp or embedding"
            )
        if config.freeze_lm and config.method != "ptuning":
            raise ValueError(
                "freeze_lm=True leaves nothing to train with method=pet (no prompts); use "
                "method=ptuning or num_train_steps=0 for zero-shot scoring"
            )
        for task in splits.run_tasks(config) if config.task != "all" else ():
            pvp.check_pattern(task, config.method, pattern_of(config, task))


def _clozes(task: str, records, config, *, training: bool, seed: int):
    return pvp.cloze_examples(
        task,
        records,
        method=config.method,
        pattern_id=pattern_of(config, task),
        training=training,
        seed=seed,
    )


def build_task(task: str, config, source) -> tuple[cloze.ClozeTask, dict, dict]:
    """``(cloze task, params, random features)``: the LM from ``source`` (its own head: MLM
    for an encoder, LM for the others) plus a fresh prompt encoder for P-tuning."""
    from rope_jax.models import build_model

    cfg = source.cfg
    if cfg.family == "encoder" and cfg.num_labels:
        raise ValueError("PET scores with the MLM head; this encoder has a classification head")
    cfg = pretrained_lib.task_model_config(cfg, config)
    inner = families.for_model(build_model(cfg))
    pattern_id = pattern_of(config, task)
    num_prompts = 0
    if config.method == "ptuning":
        a, b = pvp.ptuning_parts(task, _sample_record(task), pattern_id)
        num_prompts = sum(p.kind == "prompt" for p in (*a, *b))
    specials = cloze_inputs.Specials.of(source.codec)
    task_obj = cloze.ClozeTask(
        inner,
        num_prompts=num_prompts,
        prompt_kind=config.prompt_encoder,
        freeze_lm=config.freeze_lm,
        generative=task in GENERATIVE_TASKS,
        multiple_choice_loss=config.multiple_choice_loss,
        decoding=config.decoding,
        pet_alpha=config.pet_alpha,
        mask_id=specials.mask if cfg.family == "encoder" else None,
    )
    variables = _init(task_obj, jax.random.key(config.seed))
    params = dict(variables["params"])
    random_features = variables.get(families.RANDOM_FEATURES, {})
    if source.params is not None:
        prompt_params = params.pop(cloze.PROMPT_PARAMS, None)
        params = dict(
            pretrained_lib.merge_pretrained(
                params, source.params, source.description, new_prefixes=()
            )
        )
        if prompt_params is not None:
            params[cloze.PROMPT_PARAMS] = prompt_params
        if source.random_features:
            random_features = pretrained_lib.merge_pretrained(
                random_features, source.random_features, source.description, new_prefixes=()
            )
    return task_obj, params, random_features


# Jitted with the cloze task static (ClozeTask compares by its settings): the seeds of a
# run, and tasks whose arrays have one shape, trace and compile these once.
@functools.partial(jax.jit, static_argnums=0)
def _init(task_obj: cloze.ClozeTask, key):
    return nn.unbox(task_obj.init(task_obj.init_rngs(key)))


@functools.partial(jax.jit, static_argnums=0)
def _scores(task_obj: cloze.ClozeTask, variables, batch):
    return task_obj.candidate_scores(variables, batch)


@functools.partial(jax.jit, static_argnums=0)
def _generate(task_obj: cloze.ClozeTask, variables, batch):
    return task_obj.generate(variables, batch)


_SAMPLE = {
    "premise": "p.",
    "hypothesis": "h.",
    "sentence1": "a",
    "sentence2": "b",
    "passage": "p",
    "question": "q",
    "paragraph": "p",
    "answer": "a",
    "word": "w",
    "choice1": "A",
    "choice2": "B",
    "text": "a b",
    "span1_text": "a",
    "span2_text": "b",
    "span2_index": 1,
    "query": "q @placeholder",
}


def _sample_record(task: str) -> dict:
    """A stand-in record: prompt positions depend on the pattern only, not on the text."""
    record = dict(_SAMPLE)
    record["question"] = "cause" if task == "COPA" else "q"
    return record


def make_optimizer(config, task_obj: cloze.ClozeTask):
    """``(tx, schedule)``: ``config.optimizer`` for the LM; with prompts, the same optimizer
    at ``prompt_learning_rate`` for them; ``freeze_lm`` zeroes the LM's updates."""
    tx, schedule = optim.make_optimizer(config.optimizer, config.num_train_steps)
    if not task_obj.num_prompts:
        return tx, schedule
    prompt_config = ml_collections.ConfigDict(config.optimizer.to_dict())
    if config.prompt_learning_rate is not None:
        prompt_config.learning_rate = config.prompt_learning_rate
    prompt_tx, prompt_schedule = optim.make_optimizer(prompt_config, config.num_train_steps)

    def labels(params):
        def label(name, sub):
            kind = "prompt" if name == cloze.PROMPT_PARAMS else "lm"
            return jax.tree.map(lambda _: kind, sub)

        return {name: label(name, sub) for name, sub in params.items()}

    lm_tx = optax.set_to_zero() if config.freeze_lm else tx
    combined = optax.multi_transform({"lm": lm_tx, "prompt": prompt_tx}, labels)
    return combined, (prompt_schedule if config.freeze_lm else schedule)


def _arrays(task: str, task_obj, records, config, codec, *, training: bool, seed: int):
    clozes = _clozes(task, records, config, training=training, seed=seed)
    if not clozes:
        return clozes, None
    arrays = cloze_inputs.cloze_arrays(
        clozes, codec, family=task_obj.family, max_length=config.max_input_length
    )
    return clozes, arrays


class ClozePredictor:
    """``predict_fn(task)(variables, records) -> canonical predictions`` for the evaluators:
    the argmax candidate (label word, COPA choice, ReCoRD entity), or for WSC the decoded
    masks compared with the referent as PET does (``WscTaskHelper.eval_step``: lowercased
    words of ``[a-zA-Z]``; True when one side's words all occur in the other's)."""

    def __init__(self, task_obj: cloze.ClozeTask, codec, config):
        self.task_obj, self.codec, self.config = task_obj, codec, config

    def predict_fn(self, task: str):
        config, codec = self.config, self.codec
        sp = cloze_inputs.Specials.of(codec)

        def predict(variables, records):
            clozes, arrays = _arrays(
                task, self.task_obj, records, config, codec, training=False, seed=config.seed
            )
            arrays = {k: v for k, v in arrays.items() if k != "labels"}
            size = config.eval_batch_size
            outputs = []
            for batch in padded_batches(arrays, size, weight_key="example_weights"):
                batch = {k: v for k, v in batch.items() if k != "example_weights"}
                if task in GENERATIVE_TASKS:
                    tokens, weights = jax.device_get(_generate(self.task_obj, variables, batch))
                    outputs.extend(zip(np.asarray(tokens), np.asarray(weights), strict=True))
                else:
                    scores = _scores(self.task_obj, variables, batch)
                    outputs.extend(np.asarray(jax.device_get(scores)))
            predictions = []
            for example, output in zip(clozes, outputs, strict=False):
                record = records[example.record]
                if task in GENERATIVE_TASKS:
                    tokens, weights = output
                    ids = [int(t) for t, w in zip(tokens, weights, strict=True) if w]
                    ids = [t for t in ids if t not in (sp.pad, sp.eos)]
                    predictions.append(wsc_match(codec.decode(ids), record["span1_text"]))
                    continue
                best = int(np.argmax(output[: len(example.candidates)]))
                if task == "ReCoRD":
                    predictions.append(record["entities"][best] if record["entities"] else "")
                else:
                    names = pvp.LABEL_NAMES["RTE" if task in ("AX-b", "AX-g") else task]
                    predictions.append(names[best])
            return predictions

        return predict


def wsc_match(decoded: str, referent: str) -> bool:
    """PET ``WscTaskHelper.eval_step``'s comparison of the decoded masks with the referent."""
    import re

    def words(text):
        return [w for w in re.split("[^a-zA-Z]", text.lower().strip()) if w]

    actual, expected = words(decoded), words(referent)
    return all(w in expected for w in actual) or all(w in actual for w in expected)


def run_task(task: str, config, workdir: str, *, source, task_splits, devices=None):
    """One task of one seed (the steps of ``finetune.run_task`` with a cloze task)."""
    task_dir = os.path.join(workdir, task)
    resume = workdir_lib.plan_resume(config, task_dir)
    with preflight.config_errors():
        runner.set_prng_impl(config.prng_impl)
        mesh = sharding.make_mesh(config.mesh, devices)
        rules = sharding.rules_from_config(config.logical_axis_rules)
        runner.check_batch_size(config.batch_size, config.optimizer.grad_accum_steps, mesh)
        task_obj, params, random_features = build_task(task, config, source)
        tx, schedule = make_optimizer(config, task_obj)
    codec = source.codec
    _, train_arrays = _arrays(
        task, task_obj, task_splits.train.records, config, codec, training=True, seed=config.seed
    )
    if train_arrays is None:
        raise ValueError(f"{task}: no labelled training examples")
    train = inputs_lib.EpochIterator(
        train_arrays,
        batch_size=config.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    predictor = ClozePredictor(task_obj, codec, config)
    val = task_splits.select
    _, held_arrays = _arrays(
        task, task_obj, val.data.records, config, codec, training=True, seed=config.seed
    )

    def superglue():
        evaluator = evaluators.create_evaluator(
            predictor.predict_fn(task), task=task, data=val.data
        )

        def run(state):
            variables = families.variables_of(state.params, state.random_features)
            return {
                k: v
                for k, v in evaluator.run(variables)
                if k not in ("skipped_records", "num_examples")
            }

        return run

    builders = {"superglue": superglue}
    if held_arrays is not None:
        held_out = padded_batches(held_arrays, config.eval_batch_size, weight_key="example_weights")
        builders["held_out_loss"] = lambda: loop_evaluators.held_out_loss(
            task_obj, lambda: held_out
        )
    with preflight.config_errors():
        loop_evals = loop_evaluators.from_config(
            config.evaluators, builders, default_every=config.eval_every_steps
        )
    ranks = (
        config.num_train_steps > 0
        and any(ev.name == "superglue" for ev in loop_evals)
        and _labelled(val)
    )
    best = best_lib.BestCheckpoint(os.path.join(task_dir, "best"), BEST_METRIC) if ranks else None
    logging.info(
        "%s: %s pattern %d on the %s family (%d prompt positions%s), %d training clozes, mesh %s",
        task,
        config.method,
        pattern_of(config, task),
        task_obj.family,
        task_obj.num_prompts,
        ", LM frozen" if config.freeze_lm else "",
        train.n,
        sharding.describe(mesh),
    )
    result = runner.run(
        config,
        task_dir,
        task=task_obj,
        inputs=runner.Inputs(train=train),
        resume=resume,
        mesh=mesh,
        rules=rules,
        tx=tx,
        schedule=schedule,
        initial_params=(params, random_features),
        evaluators=loop_evals,
        best=best,
    )
    params, random_features = runner.final_params(result, best)
    variables = families.variables_of(params, random_features)
    results: dict[str, dict[str, float]] = {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for job in task_splits.evaluations:
            evaluator = evaluators.create_evaluator(
                predictor.predict_fn(job.data.task),
                task=job.data.task,
                data=job.data,
                workdir=workdir,
            )
            results[job.name] = dict(evaluator.run(variables))
    results[task]["final_train_loss"] = _last_train_loss(task_dir, result.history)
    if best is not None:
        results[task]["best_step"] = float(best.step)
    return results


def _seed_config(config, offset: int):
    seeded = copy.deepcopy(config)
    with seeded.unlocked():
        seeded.seed = config.seed + offset
    return seeded


def run_fewshot(config, workdir: str, *, devices=None) -> dict:
    """Every task of ``config.task`` for every seed; the per-seed ``metrics.json`` and the
    mean ± std table (module docstring). Returns ``{seed: {split: metrics}}``."""
    check_config(config)
    run_splits = splits.read_run_splits(config)
    for task_splits in run_splits:
        with preflight.config_errors():
            pvp.check_pattern(task_splits.task, config.method, pattern_of(config, task_splits.task))
    os.makedirs(workdir, exist_ok=True)
    source = pretrained_lib.load_source(config)
    by_seed: dict[int, dict] = {}
    for offset in range(config.num_seeds):
        seeded = _seed_config(config, offset)
        seed_dir = (
            workdir if config.num_seeds == 1 else os.path.join(workdir, f"seed_{seeded.seed}")
        )
        os.makedirs(seed_dir, exist_ok=True)
        results: dict[str, dict[str, float]] = {}
        for task_splits in run_splits:
            results.update(
                run_task(
                    task_splits.task,
                    seeded,
                    seed_dir,
                    source=source,
                    task_splits=task_splits,
                    devices=devices,
                )
            )
            # Every process holds the same results; process 0 writes and prints them.
            if jax.process_index() == 0:
                with open(os.path.join(seed_dir, "metrics.json"), "w") as f:
                    json.dump(results, f, indent=2, sort_keys=True)
        by_seed[seeded.seed] = results
    if jax.process_index() == 0:
        print(fewshot_report.write(workdir, by_seed, config))
    return by_seed
