"""Position encoding x attention kernel ablation: length extrapolation of short pretraining runs.

Every grid cell trains the same small decoder-only causal LM (``config.model``) with the
trainer of ``rope_jax.training`` on the same token stream for the same number of steps and
batch size, then measures next-token loss at the training length ``L`` and at ``k x L`` for
each ``k`` in ``config.eval_multipliers`` on held-out text: the mean over windows of the
loss at each position, reported per position bucket of ``L / buckets_per_train_length``
tokens (so buckets line up across lengths). Extrapolation shows up as the loss of the
buckets beyond ``L``.

Positions (``config.positions``): ``none`` (causal attention alone), ``sinusoidal``,
``learned`` (a table of L rows; nothing beyond L), ``learned_hierarchical`` (the same trained
table extended to L^2 positions by hierarchical decomposition at evaluation),
``rope`` (interleaved pairs, RoFormer), ``rope_half`` (half-split pairs, GPT-NeoX),
``rope_interpolation`` (the rope model evaluated with positions scaled by L / L_eval, position
interpolation of Chen et al. 2023 without fine-tuning), ``t5_bias`` (causal buckets) and
``alibi``. Variants that only change evaluation share the training run they derive from.
Pairs the model rejects (its config validation: Nystrom has no causal form; linear-family
kernels take no additive bias) are listed as skipped with the model's reason.

Outputs in ``workdir``: ``ablation.md`` (table), ``ablation.json`` (every number, including
per-position curves), ``plots/<kernel>_<position>.png`` (loss vs position at each length),
and ``runs/<kernel>_<training key>/`` (the trainer's checkpoints and metrics; a rerun resumes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from rope_jax.evaluation import ablation_report

POSITION_VARIANTS: dict[str, dict[str, Any]] = {
    "none": {"position": "none"},
    "sinusoidal": {"position": "sinusoidal"},
    "learned": {"position": "learned"},
    "learned_hierarchical": {"position": "learned_hierarchical"},
    "rope": {"position": "rope", "rope_layout": "interleaved"},
    "rope_half": {"position": "rope", "rope_layout": "half"},
    "rope_interpolation": {"position": "rope", "rope_layout": "interleaved"},
    "t5_bias": {"position": "t5_bias"},
    "alibi": {"position": "alibi"},
}
# Evaluation-only variants train exactly like the variant they name here.
TRAINED_AS = {"learned_hierarchical": "learned", "rope_interpolation": "rope"}


@dataclasses.dataclass
class Cell:
    kernel: str
    position: str
    train_key: str
    model_overrides: dict[str, Any]
    skip_reason: str = ""

    @property
    def name(self) -> str:
        return f"{self.kernel}_{self.position}"


def _model_dict(config, kernel: str, position: str) -> dict[str, Any]:
    model = dict(config.model.to_dict())
    model.update(POSITION_VARIANTS[position])
    model["attention"] = kernel
    model["family"] = "decoder"
    # A learned table has exactly L rows: training never sees more, and learned_hierarchical
    # extends this same table at evaluation time.
    model["max_length"] = config.train_length
    return model


def grid(config) -> list[Cell]:
    """All (kernel, position) cells, with the model's own reason for the meaningless ones."""
    from rope_jax.model_config import model_config_from_dict

    cells = []
    for kernel in config.kernels:
        for position in config.positions:
            if position not in POSITION_VARIANTS:
                raise ValueError(
                    f"unknown position {position!r}; known: {sorted(POSITION_VARIANTS)}"
                )
            overrides = _model_dict(config, kernel, position)
            train_key = f"{kernel}_{TRAINED_AS.get(position, position)}"
            cell = Cell(kernel, position, train_key, overrides)
            try:
                model_config_from_dict(overrides)
            except ValueError as err:
                cell.skip_reason = str(err)
            cells.append(cell)
    return cells


def token_stream(config, workdir: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(train tokens, held-out tokens, vocab size): documents joined with EOS (id 1).

    ``config.corpus`` empty = the embedded default corpus (``rope_jax.data``); else a glob of
    text files. Every ``heldout_every``-th document is held out. ``config.tokenizer``:
    ``"bytes"`` (UTF-8 bytes + 3, past pad/EOS/unk: no tokenizer to train) or ``"spm"``
    (SentencePiece trained on the training documents, cached in ``workdir``).
    """
    from rope_jax import data

    if config.corpus:
        documents = list(data.iter_documents(config.corpus))
    else:
        documents = data.embedded_documents()
    train_docs = [d for i, d in enumerate(documents) if i % config.heldout_every]
    eval_docs = [d for i, d in enumerate(documents) if i % config.heldout_every == 0]
    if config.tokenizer == "bytes":
        vocab_size = 259

        def encode(text):
            return np.frombuffer(text.encode(), np.uint8).astype(np.int32) + 3

    elif config.tokenizer == "spm":
        tokenizer = data.load_or_train_tokenizer(
            workdir,
            vocab_size=config.model.vocab_size,
            documents=train_docs,
            corpus_name=f"ablation:{config.corpus or 'embedded'}",
        )
        vocab_size = tokenizer.vocab_size
        encode = tokenizer.encode
    else:
        raise ValueError(f"tokenizer={config.tokenizer!r}; choose 'bytes' or 'spm'")

    def join(docs):
        parts = []
        for d in docs:
            parts += [encode(d), np.ones(1, np.int32)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)

    return join(train_docs), join(eval_docs), vocab_size


class WindowIterator:
    """Causal-LM batches of random windows of ``length + 1`` tokens; the state is the step
    count (batch k is drawn from ``seed`` and k alone), so resuming is exact."""

    def __init__(self, tokens: np.ndarray, *, length: int, batch_size: int, seed: int):
        if len(tokens) < length + 2:
            raise ValueError(f"{len(tokens)} training tokens cannot fill windows of {length + 1}")
        self.tokens, self.length, self.batch_size, self.seed = tokens, length, batch_size, seed
        self.step = 0

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.step])
        self.step += 1
        starts = rng.integers(0, len(self.tokens) - self.length - 1, self.batch_size)
        windows = np.stack([self.tokens[s : s + self.length + 1] for s in starts])
        return lm_batch(windows)

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


def lm_batch(windows: np.ndarray) -> dict[str, np.ndarray]:
    """Causal-LM batch: input/target tokens, weights, segment ids, positions.

    No ``prefix_mask``: these are pure causal LM rows, and a prefix mask (even all zeros) is
    a per-query mask that linear-family kernels reject. The trainer then calls the model
    with tokens, segment ids and positions only, exactly as ``position_losses`` does.
    """
    rows, width = windows.shape[0], windows.shape[1] - 1
    ones = np.ones((rows, width), np.int32)
    return {
        "input_tokens": windows[:, :-1].astype(np.int32),
        "target_tokens": windows[:, 1:].astype(np.int32),
        "loss_weights": ones,
        "segment_ids": ones.copy(),
        "positions": np.broadcast_to(np.arange(width, dtype=np.int32), (rows, width)).copy(),
    }


def eval_windows(tokens: np.ndarray, length: int, count: int) -> np.ndarray:
    """``count`` consecutive, non-overlapping held-out windows of ``length + 1`` tokens."""
    available = len(tokens) // (length + 1)
    if available < 1:
        raise ValueError(f"{len(tokens)} held-out tokens cannot fill one window of {length + 1}")
    count = min(count, available)
    return tokens[: count * (length + 1)].reshape(count, length + 1)


def eval_model_dict(cell: Cell, train_length: int, eval_length: int) -> dict[str, Any] | None:
    """The model config to evaluate ``cell`` at ``eval_length``; None when impossible."""
    model = dict(cell.model_overrides)
    if eval_length > train_length:
        if cell.position == "learned":
            return None
        if cell.position == "rope_interpolation":
            model["rope_scale"] = train_length / eval_length
    return model


def position_losses(model, variables, windows: np.ndarray, batch_size: int) -> np.ndarray:
    """Mean next-token cross entropy at each position over ``windows`` -> ``[length]``."""

    @jax.jit
    def per_token(batch):
        logits = model.apply(
            variables,
            batch["input_tokens"],
            segment_ids=batch["segment_ids"],
            positions=batch["positions"],
            deterministic=True,
        ).astype(jnp.float32)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(log_probs, batch["target_tokens"][..., None], axis=-1)
        return -picked[..., 0]

    totals = np.zeros(windows.shape[1] - 1)
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), 0)])
        losses = np.asarray(per_token(lm_batch(padded)))[: len(chunk)]
        totals += losses.sum(axis=0)
    return totals / len(windows)


def bucket_means(curve: np.ndarray, width: int) -> list[float]:
    return [float(np.mean(curve[i : i + width])) for i in range(0, len(curve), width)]


def _train(cell: Cell, config, workdir: str, tokens: np.ndarray) -> tuple[Any, dict]:
    from rope_jax.model_config import model_config_from_dict
    from rope_jax.models import build_model
    from rope_jax.training import trainer

    cfg = model_config_from_dict(cell.model_overrides)
    model = build_model(cfg)
    iterator = WindowIterator(
        tokens, length=config.train_length, batch_size=config.train.batch_size, seed=config.seed
    )
    devices = jax.devices()[:1] if config.single_device else None
    started = time.perf_counter()
    result = trainer.train_and_evaluate(
        config.train,
        os.path.join(workdir, "runs", cell.train_key),
        inputs=trainer.Inputs(train=iterator),
        model=model,
        # No FLOP/MFU accounting: grid cells are compared by loss, not speed.
        model_cfg=None,
        devices=devices,
    )
    seconds = time.perf_counter() - started
    variables = {"params": jax.device_get(result.state.params)}
    if result.state.random_features:
        variables["random_features"] = jax.device_get(result.state.random_features)
    last = result.history[max(result.history)] if result.history else {}
    info = {"train_seconds": seconds, "final_train_loss": last.get("loss", float("nan"))}
    return variables, info


def _write_json(results: dict[str, Any], workdir: str) -> None:
    path = os.path.join(workdir, "ablation.json")
    with open(f"{path}.tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(f"{path}.tmp", path)


def run_ablation(config, workdir: str) -> dict[str, Any]:
    """Trains and evaluates every grid cell; writes the table, JSON and plots."""
    from rope_jax.model_config import model_config_from_dict
    from rope_jax.models import build_model

    os.makedirs(workdir, exist_ok=True)
    train_tokens, eval_tokens, vocab_size = token_stream(config, workdir)
    if vocab_size > config.model.vocab_size:
        raise ValueError(
            f"tokenizer has {vocab_size} ids > model vocab_size {config.model.vocab_size}"
        )
    L = config.train_length
    max_multiplier = max(config.eval_multipliers)
    windows = eval_windows(eval_tokens, L * max_multiplier, config.eval_windows)
    bucket = max(L // config.buckets_per_train_length, 1)
    trained: dict[str, tuple[Any, dict]] = {}
    results: dict[str, Any] = {
        "train_length": L,
        "eval_multipliers": list(config.eval_multipliers),
        "bucket_width": bucket,
        "num_eval_windows": int(len(windows)),
        "num_train_steps": config.train.num_train_steps,
        "batch_size": config.train.batch_size,
        "tokenizer": config.tokenizer,
        "model": config.model.to_dict(),
        "runs": {},
    }
    for cell in grid(config):
        run: dict[str, Any] = {"kernel": cell.kernel, "position": cell.position}
        results["runs"][cell.name] = run
        if cell.skip_reason:
            run["skipped"] = cell.skip_reason
            logging.info("skip %s: %s", cell.name, cell.skip_reason)
            continue
        if cell.train_key not in trained:
            logging.info("training %s", cell.train_key)
            trained[cell.train_key] = _train(cell, config, workdir, train_tokens)
        variables, info = trained[cell.train_key]
        run.update(info, trained_as=cell.train_key)
        run["lengths"] = {}
        for multiplier in config.eval_multipliers:
            length = L * multiplier
            model_dict = eval_model_dict(cell, L, length)
            if model_dict is None:
                run["lengths"][str(length)] = {
                    "skipped": f"a learned table of {L} rows has no position beyond {L}"
                }
                continue
            model = build_model(model_config_from_dict(model_dict))
            curve = position_losses(
                model, variables, windows[:, : length + 1], config.eval_batch_size
            )
            run["lengths"][str(length)] = {
                "mean_loss": float(curve.mean()),
                "loss_beyond_train_length": float(curve[L:].mean()) if length > L else None,
                "bucket_losses": bucket_means(curve, bucket),
                "position_losses": [float(x) for x in curve],
            }
        ablation_report.plot_run(run, cell.name, L, os.path.join(workdir, "plots"))
        _write_json(results, workdir)  # after every run, so a long grid can be inspected
    _write_json(results, workdir)
    table = ablation_report.markdown(results)
    with open(os.path.join(workdir, "ablation.md"), "w") as f:
        f.write(table)
    print(table)
    return results
