"""The steps of a training run: ``run_steps`` from the restored state to ``num_train_steps``.

Order of work per step (STYLE.md "Numerics and scale"): fetch the host batch, dispatch step
N, and only then fetch step N-1's metrics to the host, so the device never waits for Python.
After each step the loop runs the evaluations due at it (held-out loss, the evaluators,
the best checkpoint), then checks for a stop request (``interrupts.StopRequest``: the first
SIGINT/SIGTERM saves at that step boundary and returns with ``stop_signal`` set; with
several processes a signal reaching any of them stops all at the same step, one step
later, ``interrupts.StopAgreement``), then the checkpoint period; evaluating first means a
stopped and resumed run evaluates the same steps as an uninterrupted one. A NaN or Inf
loss raises ``NonFiniteLossError`` without saving. The first step's wall time (tracing,
compilation and the step: what every start and restart waits for) is logged and written as
``compile_seconds`` into the first ``metrics.jsonl`` record of each start. Setting up
(restore or initialise) is ``runner.run``'s job.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from rope_jax import families
from rope_jax.training import interrupts, metrics, sharding
from rope_jax.training import step as step_lib


class NonFiniteLossError(FloatingPointError):
    """Raised when a step reports a NaN/Inf loss or gradient norm."""


@dataclasses.dataclass
class TrainResult:
    """Returned to callers and tests: final state and the per-step host metrics."""

    state: step_lib.TrainState
    history: dict[int, dict[str, float]]
    eval_history: dict[int, dict[str, float]]
    workdir: str
    # The signal that stopped the run after saving (None: it ran to num_train_steps).
    stop_signal: int | None = None
    # "step N (metric value)" of the best checkpoint, when the run keeps one.
    best: str | None = None

    @property
    def stopped_by_signal(self) -> bool:
        return self.stop_signal is not None


def model_flops_per_step(
    model_cfg,
    batch: dict[str, np.ndarray],
    global_batch: int,
    mlm_predictions: int = 0,
    task=None,
) -> float:
    """Training FLOPs (fwd + bwd) of one global batch, from the model's own FLOP count;
    ``task`` (default: the family of ``model_cfg``) says where the lengths are."""
    from rope_jax.flops import training_flops

    if task is None:
        task = families.TASKS[model_cfg.family](None)
    per_example = training_flops(
        model_cfg,
        task.input_length(batch),
        task.target_length(batch),
        mlm_predictions=mlm_predictions,
    ).total
    return float(per_example) * global_batch


def log_summary(result: TrainResult, checkpointer, writer) -> None:
    history, eval_history = result.history, result.eval_history
    last = history[max(history)] if history else {}
    summary = f"loss {last['loss']:.4f}" if last else "no steps run"
    last_eval = eval_history[max(eval_history)] if eval_history else {}
    if "loss" in last_eval:
        summary += f", held-out loss {last_eval['loss']:.4f}"
    if getattr(result, "best", None):
        summary += f", best {result.best}"
    step = int(jax.device_get(result.state.step))
    if result.stop_signal is not None:
        headline = (
            f"Stopped by {interrupts.signal_name(result.stop_signal)} at step {step} "
            f"({summary}); checkpoint saved. Exit code "
            f"{interrupts.exit_code(result.stop_signal)}."
        )
    else:
        headline = f"Done at step {step} ({summary})."
    logging.info(
        "%s\n  checkpoints: %s (run the same command again to resume)"
        "\n  metrics:     %s\n  TensorBoard: %s",
        headline,
        checkpointer.directory,
        writer.jsonl_path,
        metrics.tensorboard_command(writer.tensorboard_dir),
    )


def run_steps(
    config,
    workdir,
    *,
    model,
    model_cfg,
    tx,
    schedule,
    mesh,
    rules,
    inputs,
    state,
    state_shardings,
    abstract_state,
    first_host_batch,
    batch_sharding,
    base_key,
    checkpointer,
    writer,
    mlm_max_predictions: int = 0,
    evaluators: Sequence[Any] = (),
    best: Any = None,
) -> TrainResult:
    """Steps from the state's step to ``num_train_steps`` (see the module docstring).
    ``mlm_max_predictions``: the MLM head's cap of masked positions per row
    (``losses.resolve_max_predictions``; 0 = the head at every position).

    ``evaluators`` (``training.evaluators``: ``name``, ``every_steps``, ``run(state) ->
    scalars``) run every ``every_steps`` steps and after the last step; their scalars go to
    ``metrics.jsonl`` / TensorBoard as ``<name>/<scalar>`` and into ``eval_history``. They run
    before the step's checkpoint and before a stop request is honoured, so a stopped and
    resumed run evaluates the same steps as an uninterrupted one. ``best``
    (``training.best.BestCheckpoint``) is offered every evaluation and keeps the params of
    the best step."""
    start_step = int(jax.device_get(state.step))
    task = families.as_task(model)
    train_step = step_lib.make_train_step(
        task,
        tx,
        schedule,
        grad_clip_norm=config.optimizer.grad_clip_norm,
        grad_accum_steps=config.optimizer.grad_accum_steps,
        z_loss=config.z_loss,
        redraw_features_every=config.redraw_features_every,
        example_batch=first_host_batch,
        debug_nan_step=config.debug_nan_step,
        mlm_max_predictions=mlm_max_predictions,
    )
    batch_shardings = {name: batch_sharding for name in first_host_batch}
    jit_train_step = jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_shardings, sharding.replicated(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    jit_eval_step = jax.jit(
        step_lib.make_eval_step(task, mlm_max_predictions=mlm_max_predictions),
        in_shardings=(state_shardings.params, state_shardings.random_features, batch_shardings),
        out_shardings=sharding.replicated(mesh),
    )

    # The step's FLOPs are those of the global batch, so MFU divides by the whole mesh's rate.
    device_peak = metrics.measure_matmul_peak() if config.measure_matmul_peak else 0.0
    peak = metrics.total_matmul_peak(device_peak, mesh.devices.flat)
    flops_per_step = 0.0
    if model_cfg is not None:
        flops_per_step = model_flops_per_step(
            model_cfg, first_host_batch, config.batch_size, mlm_max_predictions, task
        )
    tokens_per_step = config.batch_size * task.input_length(first_host_batch)
    if jax.process_index() == 0:
        num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(abstract_state.params))
        logging.info(
            "%.2fM params; %.2f GFLOP and %d tokens per step; float32 matmul peak %.1f GFLOP/s "
            "on one device, %.1f for the mesh",
            num_params / 1e6,
            flops_per_step / 1e9,
            tokens_per_step,
            device_peak / 1e9,
            peak / 1e9,
        )

    def run_eval(state_now) -> dict[str, float]:
        totals: dict[str, float] = {}
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            for host_batch in inputs.eval_batches():
                sums = jit_eval_step(
                    state_now.params,
                    state_now.random_features,
                    sharding.host_local_to_global(host_batch, batch_sharding),
                )
                for name, value in jax.device_get(sums).items():
                    totals[name] = totals.get(name, 0.0) + float(value)
        weight = max(totals.get("weight_sum", 0.0), 1.0)
        return {
            "loss": totals.get("cross_entropy_sum", float("nan")) / weight,
            "accuracy": totals.get("correct_sum", float("nan")) / weight,
        }

    def save(step_number: int, state_now, *, force: bool = False) -> None:
        checkpointer.save(step_number, state_now, inputs.train.get_state(), force=force)

    history: dict[int, dict[str, float]] = {}
    eval_history: dict[int, dict[str, float]] = {}
    window: list[dict[str, float]] = []
    window_start = time.perf_counter()
    timed_steps = 0  # steps in the window that count for throughput (not the compiling one)
    pending: tuple[int, Any] | None = None
    first_dispatch = time.perf_counter()
    num_steps = config.num_train_steps
    stop_signal: int | None = None

    # compile_seconds joins the first record this start writes, whichever step it is at.
    startup: dict[str, float] = {}

    def write(step_number: int, scalars: dict[str, float]) -> None:
        writer.write_scalars(step_number, {**scalars, **startup})
        startup.clear()

    def consume(step_number: int, device_metrics) -> None:
        """Host side of a finished step: NaN guard, logging."""
        nonlocal window_start, timed_steps
        host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        if step_number == start_step + 1:
            # Tracing, compiling and running the first step: what a (re)start waits for.
            startup["compile_seconds"] = time.perf_counter() - first_dispatch
            if jax.process_index() == 0:
                logging.info(
                    "first step after %.1f s (tracing and compilation included)",
                    startup["compile_seconds"],
                )
        history[step_number] = host
        if host["finite"] < 1.0:
            checkpointer.wait()
            last = checkpointer.latest_step()
            raise NonFiniteLossError(
                f"Non-finite loss ({host['loss']}) or gradient norm ({host['grad_norm']}) at "
                f"step {step_number}; stopping without saving. The last good checkpoint is "
                f"step {last} in {checkpointer.directory}. Check the data, or resume with a "
                "lower learning rate (--config.optimizer.learning_rate=<lower> "
                "--config.accept_changes=optimizer.learning_rate), clipping or z_loss."
            )
        window.append(host)
        if step_number == start_step + 1:
            # The first step includes compilation: time the window from its end instead.
            window_start = time.perf_counter()
        else:
            timed_steps += 1
        log_every = config.log_every_steps  # 0 = only the last step, like the other periods
        if (log_every > 0 and step_number % log_every == 0) or step_number == num_steps:
            scalars = metrics.mean_of_step_metrics(window)
            scalars.pop("finite", None)
            scalars["learning_rate"] = host["learning_rate"]
            # A window holding only the compiling step has no timing: no throughput, ETA "?".
            seconds_per_step = float("nan")
            if timed_steps > 0:
                seconds_per_step = (time.perf_counter() - window_start) / timed_steps
                scalars["steps_per_sec"] = 1.0 / max(seconds_per_step, 1e-9)
                scalars["tokens_per_sec"] = tokens_per_step / max(seconds_per_step, 1e-9)
                if peak > 0 and flops_per_step > 0:
                    scalars["mfu"] = flops_per_step / max(seconds_per_step, 1e-9) / peak
            write(step_number, scalars)
            if jax.process_index() == 0:
                logging.info(
                    metrics.progress_line(step_number, num_steps, scalars, seconds_per_step)
                )
            window.clear()
            window_start = time.perf_counter()
            timed_steps = 0

    host_batch = first_host_batch
    agreement = interrupts.StopAgreement(mesh) if jax.process_count() > 1 else None
    with interrupts.StopRequest() as stop, jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for step_number in range(start_step, num_steps):
            if step_number > start_step:
                try:
                    host_batch = next(inputs.train)
                except StopIteration:
                    # A finite data.num_epochs (one process only, trainer checks): the
                    # steps so far are saved below, as at the end of the run.
                    logging.info(
                        "The training data ran out (data.num_epochs) after step %d of %d; "
                        "saving step %d and stopping.",
                        step_number,
                        num_steps,
                        step_number,
                    )
                    break
            batch = sharding.host_local_to_global(host_batch, batch_sharding)
            rng = jax.random.fold_in(base_key, step_number)
            if step_number == start_step:
                first_dispatch = time.perf_counter()
            state, device_metrics = jit_train_step(state, batch, rng)
            if pending is not None:
                consume(*pending)
            pending = (step_number + 1, device_metrics)
            done = step_number + 1
            if (
                inputs.eval_batches is not None
                and config.eval_every_steps > 0
                and done % config.eval_every_steps == 0
            ):
                if pending is not None:
                    consume(*pending)
                    pending = None
                eval_start = time.perf_counter()
                held_out = run_eval(state)
                eval_history.setdefault(done, {}).update(held_out)
                # Evaluation time does not count against training throughput.
                window_start += time.perf_counter() - eval_start
                write(done, {f"eval_{k}": v for k, v in held_out.items()})
                logging.info("eval at step %d: loss %.4f", done, held_out["loss"])
            due = [
                ev
                for ev in evaluators
                if (ev.every_steps > 0 and done % ev.every_steps == 0) or done == num_steps
            ]
            if due:
                if pending is not None:
                    consume(*pending)
                    pending = None
                eval_start = time.perf_counter()
                scalars = {}
                for evaluator in due:
                    found = evaluator.run(state)
                    scalars.update({f"{evaluator.name}/{k}": v for k, v in found.items()})
                eval_history.setdefault(done, {}).update(scalars)
                write(done, scalars)
                logging.info(
                    "eval at step %d: %s",
                    done,
                    ", ".join(f"{k} {v:.4f}" for k, v in sorted(scalars.items())),
                )
                if best is not None:
                    best.update(done, state, scalars)
                window_start += time.perf_counter() - eval_start
            # One process: its own signal. Several: the signal all of them agreed on.
            agreed = stop.signum if agreement is None else agreement.exchange(stop.signum)
            if agreed is not None:
                if agreement is not None:
                    logging.info(
                        "process %d: %s reached the run; all processes save step %d and stop",
                        jax.process_index(),
                        interrupts.signal_name(agreed),
                        done,
                    )
                if pending is not None:
                    consume(*pending)
                    pending = None
                save(done, state, force=True)
                stop_signal = agreed
                break
            if config.checkpoint_every_steps > 0 and done % config.checkpoint_every_steps == 0:
                if pending is not None:
                    consume(*pending)
                    pending = None
                save(done, state)
        if pending is not None:
            consume(*pending)
            pending = None
        final_step = int(jax.device_get(state.step))
        if stop_signal is None and final_step > start_step:
            save(final_step, state, force=True)
        # A signal during the last step or the final save: the save is done, report it
        # (on every process, if any process had it).
        if stop_signal is None:
            stop_signal = stop.signum if agreement is None else agreement.finish(stop.signum)
    return TrainResult(
        state=state,
        history=history,
        eval_history=eval_history,
        workdir=workdir,
        stop_signal=stop_signal,
        best=None if best is None else best.describe(),
    )
