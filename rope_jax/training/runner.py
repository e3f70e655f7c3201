"""``run(...)``: one training run in a work directory, for pretraining and fine-tuning alike.

Given a model family's task (``rope_jax.families``), the inputs, the mesh and optimizer, it
plans the sharded state, restores the latest complete checkpoint of ``<workdir>/checkpoints``
(or initialises: from ``initial_params`` when fine-tuning, else from the seed), records the
start in the work directory (``workdir.record_start``), opens ``metrics.jsonl`` and
TensorBoard, and hands over to ``loop.run_steps`` (dispatch order, periods, NaN guard,
SIGINT/SIGTERM save, evaluators and the best checkpoint). ``trainer.train_and_evaluate``
(pretraining) and ``evaluation.finetune`` (SuperGLUE) both call it, so fine-tuning has the
mesh, donation, gradient accumulation, checkpoints and exact resume of pretraining.

On an error the Orbax checkpointers are closed before the error propagates, so their
background threads finish quietly and the error is the last thing printed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from rope_jax import config_boundary
from rope_jax.training import checkpoint as checkpoint_lib
from rope_jax.training import interrupts, loop, metrics, optim, preflight, relayout, sharding
from rope_jax.training import step as step_lib
from rope_jax.training import workdir as workdir_lib


class CheckpointableIterator(Protocol):
    """What the trainer needs from the training input: batches plus saveable state."""

    def __next__(self) -> dict[str, np.ndarray]: ...

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


@dataclasses.dataclass
class Inputs:
    """Training iterator (this process's rows of each global batch) and held-out batches."""

    train: CheckpointableIterator
    eval_batches: Callable[[], Iterable[dict[str, np.ndarray]]] | None = None


def set_prng_impl(name: str) -> None:
    allowed = ("threefry2x32", "threefry", "rbg", "unsafe_rbg")
    if name not in allowed:
        raise ValueError(f"prng_impl={name!r}; choose one of {allowed}.")
    jax.config.update("jax_default_prng_impl", "threefry2x32" if name == "threefry" else name)


@dataclasses.dataclass(frozen=True)
class LoopSetup:
    """What a run needs besides its model and inputs: mesh, axis rules, optimizer."""

    mesh: Any
    rules: Any
    tx: Any
    schedule: Callable[[Any], Any]
    optimizer: Any  # optim.OptimizerConfig


def loop_setup(config, devices: Sequence | None = None) -> LoopSetup:
    """The mesh, ``logical_axis_rules`` and optimizer of a run from the typed ``mesh`` and
    ``optimizer`` sections (``config_boundary``: an unknown key or a wrong type names
    ``<section>.<key>``), with the optimizer's values and the batch split checked.
    Pretraining and fine-tuning both call it: one boundary for every loop. ``devices``
    (default: all) restricts the mesh."""
    optimizer = config_boundary.optimizer_section(config)
    preflight.check_optimizer(optimizer)
    mesh = sharding.make_mesh(config_boundary.mesh_section(config), devices)
    rules = sharding.rules_from_config(config.logical_axis_rules)
    tx, schedule = optim.make_optimizer(optimizer, config.num_train_steps)
    check_batch_size(config.batch_size, optimizer.grad_accum_steps, mesh)
    return LoopSetup(mesh=mesh, rules=rules, tx=tx, schedule=schedule, optimizer=optimizer)


def check_batch_size(global_batch: int, grad_accum_steps: int, mesh) -> None:
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % data_parallel:
        raise ValueError(
            f"batch_size={global_batch} is not divisible by data x fsdp = {data_parallel}."
        )
    if global_batch % grad_accum_steps or (global_batch // grad_accum_steps) % data_parallel:
        raise ValueError(
            f"batch_size={global_batch} must split into grad_accum_steps={grad_accum_steps} "
            f"microbatches that are each divisible by data x fsdp = {data_parallel}."
        )


def _first_batch(train, resumed_step: int | None = None):
    """The first training batch, or a ``preflight.ConfigError`` that says why there is none
    (a finite ``data.num_epochs``; ``resumed_step``: the checkpoint the input resumed from)."""
    try:
        return next(train)
    except StopIteration:
        if resumed_step is None:
            why = "the corpus does not fill one batch within data.num_epochs"
            fix = "raise data.num_epochs, lower batch_size or leave data.num_epochs unset"
        else:
            why = (
                f"the checkpoint at step {resumed_step} has read all of data.num_epochs "
                "(the run ended when its data ran out)"
            )
            fix = "start a new work directory to train again"
        raise preflight.ConfigError(f"No training batch: {why}; {fix}.") from None


def _check_batch_rows(batch, global_batch: int) -> None:
    rows = {name: np.shape(value)[0] for name, value in batch.items()}
    expected = global_batch // jax.process_count()
    if any(r != expected for r in rows.values()):
        raise ValueError(f"input batch rows {rows} differ from batch_size per process {expected}.")


def close_after_error(*closers) -> None:
    """Closes checkpointers (waits for a save in flight) and metric writers while an error
    propagates; a failure here is logged, never raised over the original error."""
    for close in closers:
        try:
            close()
        except Exception as err:  # The original error is the one the user needs.
            logging.warning("while stopping after an error: %s: %s", type(err).__name__, err)


def _initial_state(init_state, key, initial_params, state_shardings, tx):
    """A step-0 state: from the seed, or with ``(params, random_features)`` given (fine-tuning
    from a pretrained model), placed straight into the state's shardings."""
    if initial_params is None:
        return init_state(key)
    params, random_features = initial_params

    def build(params, random_features, k):
        return step_lib.TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            random_features=random_features,
            rng=jax.random.key_data(k),
        )

    # Host copies placed into the target shardings: a pretrained model arrives on one
    # device (or as numpy), and every process holds all of it.
    params = jax.device_put(jax.device_get(params), state_shardings.params)
    random_features = jax.device_put(
        jax.device_get(random_features), state_shardings.random_features
    )
    build = jax.jit(build, out_shardings=state_shardings)
    return build(params, random_features, key)


def run(
    config,
    workdir: str,
    *,
    task,
    inputs: Inputs,
    resume: workdir_lib.Resume,
    mesh,
    rules,
    tx,
    schedule,
    model_cfg=None,
    mlm_max_predictions: int = 0,
    initial_params: tuple[Any, Any] | None = None,
    evaluators: Sequence[Any] = (),
    best: Any = None,
) -> loop.TrainResult:
    """Restores or initialises the state and runs ``loop.run_steps`` (see module doc).

    ``initial_params``: ``(params, random_features)`` host trees for a fresh start (ignored
    when a checkpoint exists). ``evaluators`` and ``best``: see ``loop.run_steps``.
    """
    first_host_batch = _first_batch(inputs.train)
    _check_batch_rows(first_host_batch, config.batch_size)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    base_key = jax.random.key(config.seed)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract_state, state_shardings, init_state = step_lib.plan_state(
            task, tx, first_host_batch, base_key, mesh, rules
        )
    checkpointer = checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=config.keep_checkpoints,
        async_save=config.async_checkpointing,
    )
    writer = None
    closers = [checkpointer.close] + ([best.close] if best is not None else [])
    try:
        latest = checkpointer.latest_step()
        if latest is None:
            if resume.has_record:
                logging.warning(
                    "No complete checkpoint in %s: starting at step 0.", checkpointer.directory
                )
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                state = _initial_state(init_state, base_key, initial_params, state_shardings, tx)
        else:
            abstract = checkpoint_lib.abstract_with_shardings(abstract_state, state_shardings)
            # The checkpoint may hold the other scan_layers form: converted (relayout). A
            # fine-tune's config chooses the form with its own scan_layers key.
            setting = "scan_layers" if "scan_layers" in config else "model.scan_layers"
            state, data_state = relayout.restore(
                checkpointer, latest, abstract, tx, setting=setting
            )
            if data_state is not None:
                try:
                    inputs.train.set_state(data_state)
                except ValueError as err:
                    logging.warning(
                        "The checkpoint's input position does not apply to this input (%s); "
                        "the model and optimizer resume, the input starts from the beginning.",
                        err,
                    )
                else:
                    first_host_batch = _first_batch(inputs.train, latest)
            # The run's key comes from the checkpoint (the seed is part of the experiment).
            base_key = jax.random.wrap_key_data(np.asarray(jax.device_get(state.rng)))
            logging.info(
                "Resumed from %s at step %d.", checkpointer.directory / str(latest), latest
            )
        start_step = int(jax.device_get(state.step))
        workdir_lib.record_start(resume, start_step, is_primary=jax.process_index() == 0)
        workdir_lib.log_accepted_changes(resume)
        note = workdir_lib.schedule_note(resume)
        if note:
            logging.warning(note)
        if best is not None:
            best.resume(start_step)
        writer = metrics.MetricWriter(workdir, resume_step=start_step)
        closers.append(writer.close)
        result = loop.run_steps(
            config,
            workdir,
            model=task,
            model_cfg=model_cfg,
            tx=tx,
            schedule=schedule,
            mesh=mesh,
            rules=rules,
            inputs=inputs,
            state=state,
            state_shardings=state_shardings,
            abstract_state=abstract_state,
            first_host_batch=first_host_batch,
            batch_sharding=batch_sharding,
            base_key=base_key,
            checkpointer=checkpointer,
            writer=writer,
            mlm_max_predictions=mlm_max_predictions,
            evaluators=evaluators,
            best=best,
        )
    except BaseException:
        close_after_error(*closers)
        raise
    for close in closers:
        close()
    if jax.process_index() == 0:
        loop.log_summary(result, checkpointer, writer)
    return result


def final_params(result: loop.TrainResult, best) -> tuple[Any, Any]:
    """``(params, random_features)`` a fine-tune reports on after :func:`run`: the best
    checkpoint's when ``best`` (a ``training.best.BestCheckpoint``) kept one, restored with
    the trained state's shardings (and ``best`` closed), else the last step's. A run a
    signal stopped raises ``interrupts.StoppedBySignal`` instead: its checkpoint is saved,
    and the caller exits with 128 + the signal."""
    if result.stop_signal is not None:
        raise interrupts.StoppedBySignal(result.stop_signal)
    params, random_features = result.state.params, result.state.random_features
    if best is not None:
        params, random_features = best.restore(_abstract(params), _abstract(random_features))
        best.close()
    return params, random_features


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
