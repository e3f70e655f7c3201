"""SuperGLUE fine-tuning and evaluation: ``finetune_and_evaluate(config, workdir)``.

First every split the run will use is read, checked and cast (``splits.read_run_splits``),
so a bad file fails in seconds, before any model work. Then for each task:

1. the task's work directory ``<workdir>/<task>`` is checked against the config it recorded
   (``training.workdir``: a restart that would change the experiment is refused before
   anything is read or written);
2. the pretrained model is opened read-only (``pretrained``: a ``train.py`` workdir, a
   Hugging Face folder, or nothing = random init for smoke tests) and cast for the family
   (text-to-text for encoder-decoders, classification / multiple choice for encoders);
3. it is fine-tuned by the same run as pretraining (``training.runner.run``: the config's
   ``mesh``, ``logical_axis_rules``, ``optimizer`` incl. ``grad_accum_steps`` read as typed
   sections by ``runner.loop_setup`` as for pretraining, ``prng_impl``; the sharded,
   jitted, donated step; Orbax checkpoints in ``<workdir>/<task>/checkpoints``;
   SIGINT/SIGTERM save and exact resume; ``metrics.jsonl``, TensorBoard and the progress
   line);
4. every ``eval_every_steps`` (and after the last step) the loop runs the evaluators of
   ``config.evaluators`` (``superglue``: the validation metrics; ``held_out_loss``;
   ``loss_by_position``) and keeps the best checkpoint by the validation ``score``
   (``<workdir>/<task>/best``): the task's official metric, or the mean of its metrics
   where it has several (CB: accuracy and macro-F1; MultiRC: F1a and EM; ReCoRD: F1 and
   EM), as T5's SuperGLUE average does; T5 reports each task at its best validation
   checkpoint;
5. from the best checkpoint it predicts the validation split (metrics +
   ``predictions/<Task>_val.jsonl``, the file they scored) and the test split when present
   (``submission/<Task>.jsonl``). AX-b and AX-g are predicted by the RTE model, as the
   benchmark prescribes.

Results go to ``<workdir>/metrics.json`` and a printed table; ``task="all"`` runs every task
found in ``data_dir`` and writes ``summary.md``. A stop by SIGINT/SIGTERM raises
``interrupts.StoppedBySignal`` after the checkpoint is saved (eval.py exits 128 + signal);
the same command again resumes.

Few-shot (FewGLUE): ``train_data_dir`` holds the 32-example ``train.jsonl`` sets while
``data_dir`` holds the official validation files; or ``eval_split="dev32"`` to score on
FewGLUE's own held-out 32 examples.
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import ml_collections
from absl import logging

from rope_jax import families
from rope_jax.evaluation import evaluators, splits, tasks_report
from rope_jax.evaluation import inputs as inputs_lib
from rope_jax.evaluation import pretrained as pretrained_lib
from rope_jax.evaluation.predictor import Predictor, TaskModel, padded_batches, task_arrays
from rope_jax.training import best as best_lib
from rope_jax.training import evaluators as loop_evaluators
from rope_jax.training import preflight, runner, sharding
from rope_jax.training import workdir as workdir_lib

# The validation scalar the best checkpoint is chosen by (see the module docstring).
BEST_METRIC = "superglue/score"


def _loop_evaluators(config, task: str, tm: TaskModel, predictor: Predictor, val):
    """The evaluators of ``config.evaluators`` for the validation split ``val``."""
    _, arrays = task_arrays(task, tm, val.data.records, config, training=True)
    weight_key = "decoder_loss_weights" if tm.text_to_text else "example_weights"
    held_out = padded_batches(arrays, config.eval_batch_size, weight_key=weight_key)

    def superglue():
        evaluator = evaluators.create_evaluator(
            predictor.predict_fn(task), task=task, data=val.data
        )

        def run(state):
            variables = families.variables_of(state.params, state.random_features)
            return {
                name: value
                for name, value in evaluator.run(variables)
                if name not in ("skipped_records", "num_examples")
            }

        return run

    def loss_by_position(bucket_width: int = 4):
        if not tm.text_to_text:
            raise preflight.ConfigError(
                "evaluator loss_by_position needs token targets (a text-to-text model); an "
                "encoder classifies. Remove it from --config.evaluators."
            )
        return loop_evaluators.loss_by_position(
            tm.task, lambda: held_out, bucket_width=bucket_width
        )

    builders = {
        "superglue": superglue,
        "held_out_loss": lambda: loop_evaluators.held_out_loss(tm.task, lambda: held_out),
        "loss_by_position": loss_by_position,
    }
    return loop_evaluators.from_config(
        config.evaluators, builders, default_every=config.eval_every_steps
    )


def _last_train_loss(task_dir: str, history) -> float:
    """The last logged training loss (from ``metrics.jsonl`` when this start ran no step)."""
    if history:
        return history[max(history)]["loss"]
    loss = float("nan")
    path = os.path.join(task_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if "loss" in row:
                    loss = float(row["loss"])
    return loss


def run_task(
    task: str,
    config,
    workdir: str,
    *,
    source=None,
    task_splits: splits.TaskSplits | None = None,
    devices: list | None = None,
) -> dict[str, dict[str, float]]:
    """Fine-tunes and evaluates one task (plus AX-b/AX-g after RTE); metrics per split.

    ``task_splits``: the splits as read up front (read here when not given). ``devices``
    (default: all) restricts the mesh, e.g. one device as the reference of sharded runs.
    """
    task_splits = task_splits or splits.read_task_splits(task, config)
    task_dir = os.path.join(workdir, task)
    # Read-only: a refused restart leaves the work directory as it was.
    resume = workdir_lib.plan_resume(config, task_dir)
    with preflight.config_errors():
        runner.set_prng_impl(config.prng_impl)
        setup = runner.loop_setup(config, devices)
    mesh, rules = setup.mesh, setup.rules
    tm = pretrained_lib.load_for_task(task, config, source=source)
    _, arrays = task_arrays(task, tm, task_splits.train.records, config, training=True)
    if not len(next(iter(arrays.values()))):
        raise ValueError(f"{task}: no labelled training examples")
    train = inputs_lib.EpochIterator(
        arrays,
        batch_size=config.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    predictor = Predictor(tm, config)
    val = task_splits.select
    with preflight.config_errors():
        loop_evals = _loop_evaluators(config, task, tm, predictor, val)
    ranks = any(ev.name == "superglue" for ev in loop_evals) and _labelled(val)
    best = best_lib.BestCheckpoint(os.path.join(task_dir, "best"), BEST_METRIC) if ranks else None
    logging.info(
        "%s: fine-tuning %s (%s) on %d examples, mesh %s; run directory %s",
        task,
        tm.cfg.family,
        "text-to-text" if tm.text_to_text else "classification head",
        len(task_splits.train.records),
        sharding.describe(mesh),
        task_dir,
    )
    result = runner.run(
        config,
        task_dir,
        task=tm.task,
        inputs=runner.Inputs(train=train),
        resume=resume,
        mesh=mesh,
        rules=rules,
        tx=setup.tx,
        schedule=setup.schedule,
        model_cfg=tm.cfg if tm.text_to_text else None,
        initial_params=(tm.params, tm.random_features),
        evaluators=loop_evals,
        best=best,
    )
    params, random_features = runner.final_params(result, best)
    # The predictor is the one the loop used (it takes the variables it is given), so its
    # compiled functions are reused.
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
    results[task]["train_skipped_records"] = float(len(task_splits.train.skipped))
    if best is not None:
        results[task]["best_step"] = float(best.step)
    return results


def _labelled(val) -> bool:
    records = val.data.records
    if val.data.task == "ReCoRD":
        return all(r["answers"] for r in records)
    return all(r["label"] is not None for r in records)


def check_dropout_rate(rate) -> None:
    """``config.dropout_rate``: a rate in [0, 1), or None to keep the checkpoint's."""
    if rate is not None and not 0.0 <= rate < 1.0:
        raise preflight.ConfigError(
            f"dropout_rate={rate}: give a rate in [0, 1), or None to keep the checkpoint's "
            "(None goes in the config argument, e.g. --config=configs/superglue.py:"
            "tiny,dropout_rate=None; a --config.dropout_rate flag cannot be None)"
        )


def finetune_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, devices: list | None = None
) -> dict[str, dict[str, float]]:
    """Runs ``config.task`` (or every task with ``"all"``); writes metrics.json and tables."""
    check_dropout_rate(config.dropout_rate)
    # Every file first: a bad or missing split fails here, before a model is loaded.
    run_splits = splits.read_run_splits(config)
    os.makedirs(workdir, exist_ok=True)
    source = pretrained_lib.load_source(config)
    results: dict[str, dict[str, float]] = {}
    for task_splits in run_splits:
        results.update(
            run_task(
                task_splits.task,
                config,
                workdir,
                source=source,
                task_splits=task_splits,
                devices=devices,
            )
        )
        # Every process holds the same results; process 0 writes and prints them.
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "metrics.json"), "w") as f:
                json.dump(results, f, indent=2, sort_keys=True)
    if jax.process_index() == 0:
        print(tasks_report.markdown_table(results))
        if config.task == "all":
            with open(os.path.join(workdir, "summary.md"), "w") as f:
                f.write(tasks_report.summary_markdown(results, config))
    return results
