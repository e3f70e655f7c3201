"""``train_and_evaluate(config, workdir)``: the pretraining loop.

Order of work per step (STYLE.md "Numerics and scale"): fetch the host batch, dispatch step
N, and only then fetch step N-1's metrics to the host, so the device never waits for Python.
Process 0 writes metrics; every process saves its shards of the checkpoint. SIGTERM (the
usual preemption notice) makes the loop save at the next step boundary and return.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging

from rope_jax.training import checkpoint as checkpoint_lib
from rope_jax.training import losses, metrics, optim, sharding
from rope_jax.training import step as step_lib


class NonFiniteLossError(FloatingPointError):
    """Raised when a step reports a NaN/Inf loss or gradient norm."""


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


@dataclasses.dataclass
class TrainResult:
    """Returned to callers and tests: final state and the per-step host metrics."""

    state: step_lib.TrainState
    history: dict[int, dict[str, float]]
    eval_history: dict[int, dict[str, float]]
    workdir: str
    stopped_by_signal: bool = False


class _StopSignal:
    """Records SIGTERM so the loop can checkpoint and exit between steps (Ctrl-C still
    interrupts at once, without a save)."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM,):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        logging.warning("Received signal %d: saving a checkpoint and stopping.", signum)
        self.received = signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


def set_prng_impl(name: str) -> None:
    allowed = ("threefry2x32", "threefry", "rbg", "unsafe_rbg")
    if name not in allowed:
        raise ValueError(f"prng_impl={name!r}; choose one of {allowed}.")
    jax.config.update("jax_default_prng_impl", "threefry2x32" if name == "threefry" else name)


def build_model(config: ml_collections.ConfigDict):
    """(flax module, frozen model config) from ``config.model``; packing and the objective
    from ``config.data`` decide which attention kernels are allowed (packed rows need full
    masks or segment ids, a prefix LM a full mask), and its row lengths how long a learned
    position table must be."""
    from rope_jax.model_config import model_config_from_dict
    from rope_jax.models import build_model as build

    try:
        cfg = model_config_from_dict(config.model)
        longest = max(config.data.inputs_length, config.data.targets_length)
        model = build(
            cfg,
            packed_inputs=bool(config.data.pack),
            max_sequence_length=longest,
            prefix_lm=config.data.objective == "prefix_lm",
        )
        return model, cfg
    except ValueError as err:
        raise ValueError(
            f"config.model: {err} (model keys are --config.model.<key>; packing is "
            f"--config.data.pack={config.data.pack}, the objective "
            f"--config.data.objective={config.data.objective})"
        ) from err


def data_settings(config: ml_collections.ConfigDict) -> dict:
    """``config.data`` as ``DataConfig`` fields (batch size and seed from the top level)."""
    data = config.data.to_dict()
    data["targets_length"] = None if data["targets_length"] < 0 else data["targets_length"]
    data["num_epochs"] = data["num_epochs"] or None
    data.update(batch_size=config.batch_size, seed=config.seed)
    return data


def build_tokenizer(config: ml_collections.ConfigDict, workdir: str):
    """The configured SentencePiece model, or one trained on the training corpus (cached);
    with ``tokenizer.kind=jieba_bert`` the T5 PEGASUS tokenizer (``data/bert_vocab.py``).

    A loaded model keeps ``tokenizer.num_extra_ids`` extra ids after its pieces, whatever the
    model's vocabulary: mT5's ``spiece.model`` (250000 pieces + 100) puts ``<extra_id_0>`` at
    250099 while the mT5 embedding has 250112 rows. ``model.vocab_size`` must be at least
    the tokenizer's; a trained tokenizer fills it exactly.
    """
    from rope_jax.data import embedded
    from rope_jax.data.corpora import DocumentIndex
    from rope_jax.data.tokenizer import Tokenizer

    vocab_size = config.model.vocab_size
    if _tokenizer_kind(config) == "jieba_bert":
        tokenizer = _jieba_bert_tokenizer(config, workdir)
    elif config.tokenizer.path:
        tokenizer = Tokenizer.load(
            config.tokenizer.path, num_extra_ids=config.tokenizer.num_extra_ids
        )
    elif config.data.paths:
        documents = DocumentIndex(
            config.data.paths,
            format=config.data.format,
            text_mode=config.data.text_mode,
            text_field=config.data.text_field,
        )
        tokenizer = embedded.load_or_train_tokenizer(
            workdir,
            vocab_size=vocab_size,
            num_extra_ids=config.tokenizer.num_extra_ids,
            documents=(documents[i] for i in range(len(documents))),
            corpus_name=config.data.paths,
        )
    else:
        tokenizer = embedded.load_or_train_tokenizer(
            workdir, vocab_size=vocab_size, num_extra_ids=config.tokenizer.num_extra_ids
        )
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} ids ({tokenizer.piece_size} pieces + "
            f"{tokenizer.num_extra_ids} extra ids) but model.vocab_size={vocab_size}; set "
            f"--config.model.vocab_size={tokenizer.vocab_size} or more."
        )
    return tokenizer


def _tokenizer_kind(config: ml_collections.ConfigDict) -> str:
    """``config.tokenizer.kind``, checked against the keys given for it."""
    from rope_jax.data.tokenizers import check_kind

    kind = check_kind(config.tokenizer.get("kind", "sentencepiece"))
    if kind == "jieba_bert" and config.tokenizer.path:
        raise ValueError(
            "tokenizer.path names a SentencePiece model; for tokenizer.kind=jieba_bert give a "
            "BERT vocab.txt as --config.tokenizer.vocab_path (or nothing, to build one)"
        )
    if kind == "sentencepiece" and config.tokenizer.get("vocab_path"):
        raise ValueError(
            "tokenizer.vocab_path is a BERT vocab.txt, read by tokenizer.kind=jieba_bert; set "
            "--config.tokenizer.kind=jieba_bert, or tokenizer.path for a SentencePiece model"
        )
    return kind


def _jieba_bert_tokenizer(config: ml_collections.ConfigDict, workdir: str):
    """T5 PEGASUS' jieba + BERT-vocabulary tokenizer: ``tokenizer.vocab_path``, or a
    ``model.vocab_size``-token vocabulary built on the training corpus (cached)."""
    from rope_jax.data import bert_vocab, embedded
    from rope_jax.data.corpora import DocumentIndex

    vocab_path = config.tokenizer.vocab_path
    if vocab_path:
        documents, corpus_name = None, ""
    elif config.data.paths:
        index = DocumentIndex(
            config.data.paths,
            format=config.data.format,
            text_mode=config.data.text_mode,
            text_field=config.data.text_field,
        )
        documents, corpus_name = (index[i] for i in range(len(index))), config.data.paths
    else:
        documents, corpus_name = embedded.embedded_documents(), embedded.EMBEDDED_NAME
    return bert_vocab.load_or_build_tokenizer(
        workdir,
        vocab_size=config.model.vocab_size,
        vocab_path=vocab_path,
        documents=documents,
        corpus_name=corpus_name,
    )


def build_inputs(config: ml_collections.ConfigDict, workdir: str) -> Inputs:
    """Training and held-out inputs from ``config.data`` for this process."""
    from rope_jax.data import pipeline

    data = data_settings(config)
    tokenizer = build_tokenizer(config, workdir)
    shard = dict(process_index=jax.process_index(), process_count=jax.process_count())
    train = pipeline.make_pipeline(data, tokenizer, **shard)
    train.stats.log("training corpus")

    def eval_batches():
        return pipeline.make_eval_pipeline(data, tokenizer, num_batches=config.eval_steps, **shard)

    return Inputs(train=train, eval_batches=eval_batches if config.eval_steps > 0 else None)


def model_flops_per_step(
    model_cfg, batch: dict[str, np.ndarray], global_batch: int, mlm_predictions: int = 0
) -> float:
    """Training FLOPs (fwd + bwd) of one global batch, from the model's own FLOP count."""
    from rope_jax.flops import training_flops

    per_example = training_flops(
        model_cfg,
        losses.input_length(batch),
        losses.target_length(batch),
        mlm_predictions=mlm_predictions,
    ).total
    return float(per_example) * global_batch


def _check_batch_size(global_batch: int, grad_accum_steps: int, mesh) -> None:
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


def _check_batch_rows(batch, global_batch: int) -> None:
    rows = {name: np.shape(value)[0] for name, value in batch.items()}
    expected = global_batch // jax.process_count()
    if any(r != expected for r in rows.values()):
        raise ValueError(f"input batch rows {rows} differ from batch_size per process {expected}.")


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    inputs: Inputs | None = None,
    model: Any = None,
    model_cfg: Any = None,
    devices: list | None = None,
) -> TrainResult:
    """Trains ``config`` in ``workdir``, resuming from its latest complete checkpoint.

    ``inputs``, ``model`` and ``model_cfg`` default to what ``config`` describes; passing
    them lets tests and notebooks supply their own. ``devices`` (default: all) restricts the
    mesh to a subset, e.g. one device as the reference for sharded runs.
    """
    set_prng_impl(config.prng_impl)
    sharding.maybe_initialize_distributed(config)
    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    if model is None:
        model, model_cfg = build_model(config)
    # Config errors surface before the tokenizer is trained and the corpus is read.
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.rules_from_config(config.logical_axis_rules)
    tx, schedule = optim.make_optimizer(config.optimizer, config.num_train_steps)
    _check_batch_size(config.batch_size, config.optimizer.grad_accum_steps, mesh)
    if inputs is None:
        inputs = build_inputs(config, workdir)

    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    logging.info(
        "%s model (%s attention, %s positions), %s objective, batch %d, %d steps; config in %s",
        config.model.family,
        config.model.attention,
        config.model.position,
        config.data.objective,
        config.batch_size,
        config.num_train_steps,
        os.path.join(workdir, "config.json"),
    )
    logging.info("mesh: %s over %d devices", sharding.describe(mesh), mesh.size)

    first_host_batch = next(inputs.train)
    _check_batch_rows(first_host_batch, config.batch_size)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    base_key = jax.random.key(config.seed)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract_state, state_shardings, init_state = step_lib.plan_state(
            model, tx, first_host_batch, base_key, mesh, rules
        )
    checkpointer = checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=config.keep_checkpoints,
        async_save=config.async_checkpointing,
    )
    latest = checkpointer.latest_step()
    if latest is None:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            state = init_state(base_key)
    else:
        abstract = checkpoint_lib.abstract_with_shardings(abstract_state, state_shardings)
        state, data_state = checkpointer.restore(latest, abstract)
        if data_state is not None:
            inputs.train.set_state(data_state)
            first_host_batch = next(inputs.train)
        # The run's key comes from the checkpoint (a changed seed does not fork a resumed run).
        base_key = jax.random.wrap_key_data(np.asarray(jax.device_get(state.rng)))
        logging.info("Resumed from %s at step %d.", checkpointer.directory / str(latest), latest)
    start_step = int(jax.device_get(state.step))

    mlm_max_predictions = losses.resolve_max_predictions(
        config.mlm_max_predictions,
        objective=config.data.objective,
        mask_rate=config.data.mlm_rate,
        length=config.data.inputs_length,
    )
    train_step = step_lib.make_train_step(
        model,
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
        step_lib.make_eval_step(model, mlm_max_predictions=mlm_max_predictions),
        in_shardings=(state_shardings.params, state_shardings.random_features, batch_shardings),
        out_shardings=sharding.replicated(mesh),
    )

    writer = metrics.MetricWriter(workdir)
    # The step's FLOPs are those of the global batch, so MFU divides by the whole mesh's rate.
    device_peak = metrics.measure_matmul_peak() if config.measure_matmul_peak else 0.0
    peak = metrics.total_matmul_peak(device_peak, mesh.devices.flat)
    flops_per_step = 0.0
    if model_cfg is not None:
        flops_per_step = model_flops_per_step(
            model_cfg, first_host_batch, config.batch_size, mlm_max_predictions
        )
    tokens_per_step = config.batch_size * losses.input_length(first_host_batch)
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
    num_steps = config.num_train_steps
    stopped_by_signal = False

    def consume(step_number: int, device_metrics) -> None:
        """Host side of a finished step: NaN guard, logging."""
        nonlocal window_start, timed_steps
        host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        history[step_number] = host
        if host["finite"] < 1.0:
            checkpointer.wait()
            last = checkpointer.latest_step()
            raise NonFiniteLossError(
                f"Non-finite loss ({host['loss']}) or gradient norm ({host['grad_norm']}) at "
                f"step {step_number}; stopping without saving. The last good checkpoint is "
                f"step {last} in {checkpointer.directory} (lower the learning rate, enable "
                "clipping or z_loss, or check the data before resuming)."
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
            writer.write_scalars(step_number, scalars)
            if jax.process_index() == 0:
                logging.info(
                    metrics.progress_line(step_number, num_steps, scalars, seconds_per_step)
                )
            window.clear()
            window_start = time.perf_counter()
            timed_steps = 0

    host_batch = first_host_batch
    with _StopSignal() as stop, jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        try:
            for step_number in range(start_step, num_steps):
                if step_number > start_step:
                    host_batch = next(inputs.train)
                batch = sharding.host_local_to_global(host_batch, batch_sharding)
                rng = jax.random.fold_in(base_key, step_number)
                state, device_metrics = jit_train_step(state, batch, rng)
                if pending is not None:
                    consume(*pending)
                pending = (step_number + 1, device_metrics)
                done = step_number + 1
                if stop.received is not None:
                    consume(*pending)
                    pending = None
                    save(done, state, force=True)
                    stopped_by_signal = True
                    break
                if config.checkpoint_every_steps > 0 and done % config.checkpoint_every_steps == 0:
                    consume(*pending)
                    pending = None
                    save(done, state)
                if (
                    inputs.eval_batches is not None
                    and config.eval_every_steps > 0
                    and done % config.eval_every_steps == 0
                ):
                    if pending is not None:
                        consume(*pending)
                        pending = None
                    eval_start = time.perf_counter()
                    eval_history[done] = run_eval(state)
                    # Evaluation time does not count against training throughput.
                    window_start += time.perf_counter() - eval_start
                    writer.write_scalars(done, eval_history[done], prefix="eval_")
                    logging.info("eval at step %d: loss %.4f", done, eval_history[done]["loss"])
            if pending is not None:
                consume(*pending)
                pending = None
            final_step = int(jax.device_get(state.step))
            if not stopped_by_signal and final_step > start_step:
                save(final_step, state, force=True)
        finally:
            checkpointer.close()
            writer.close()
    if jax.process_index() == 0:
        last = history[max(history)] if history else {}
        summary = f"loss {last['loss']:.4f}" if last else "no steps run"
        if eval_history:
            summary += f", held-out loss {eval_history[max(eval_history)]['loss']:.4f}"
        logging.info(
            "Done at step %d (%s).\n  checkpoints: %s (run the same command again to resume)"
            "\n  metrics:     %s\n  TensorBoard: tensorboard --logdir %s",
            int(jax.device_get(state.step)),
            summary,
            checkpointer.directory,
            writer.jsonl_path,
            writer.tensorboard_dir,
        )
    return TrainResult(
        state=state,
        history=history,
        eval_history=eval_history,
        workdir=workdir,
        stopped_by_signal=stopped_by_signal,
    )
