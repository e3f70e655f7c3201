"""Position encoding x attention kernel ablation: length extrapolation of short pretraining runs.

The grid runs once per track (``config.tracks``): ``causal_lm``, a decoder-only causal LM
evaluated by next-token loss, and ``mlm``, a bidirectional encoder with BERT's MLM head and
masking (``objectives.mlm``, 80/10/10 on ``config.mlm.mask_rate`` of the tokens) evaluated
by masked-token loss, the track where Nystrom attention (no causal form) takes part. The two
tracks measure different tasks: their losses are not comparable with each other.

Every cell of a track trains the same small model (``config.model`` in the track's family)
with the trainer of ``rope_jax.training`` on the same token stream, steps and batch size,
then measures the loss at the training length ``L`` and at ``k x L`` for each ``k`` in
``config.eval_multipliers`` on the same held-out windows: the mean loss over the targets
(every next token; the masked tokens, chosen once with ``config.mlm.eval_mask_seed`` on the
longest windows, whose prefixes are the shorter ones, so every cell sees the same masks and
positions < L keep theirs at every length) at each position, per bucket of
``L / buckets_per_train_length`` positions (buckets line up across lengths) and per range of
``L`` positions. Extrapolation shows up as the loss of the positions beyond ``L``.

Positions (``config.positions``, or ``config.<track>.positions`` for one track; likewise
kernels): ``none`` (no position information, but causality in the causal track),
``sinusoidal``, ``learned`` (a table of L rows; nothing beyond L), ``learned_hierarchical``
(the same trained table extended to L^2 positions by hierarchical decomposition at
evaluation), ``rope`` (interleaved pairs, RoFormer), ``rope_half`` (half-split pairs,
GPT-NeoX), ``rope_interpolation`` (the rope model evaluated with positions scaled by
L / L_eval, position interpolation of Chen et al. 2023 without fine-tuning), ``t5_bias``
(causal or bidirectional buckets) and ``alibi`` (causal or symmetric). Variants that only
change evaluation share the training run they derive from. Pairs the model rejects (its
config validation: Nystrom has no causal form; linear-family kernels take no additive bias)
are listed as skipped with the model's reason.

Outputs in ``workdir``: ``ablation.md`` (a section per track), ``ablation.json`` (every
number under its track, per-position curves included), ``plots/<track>_<kernel>_<position>
.png`` (loss vs position at each length), and ``runs/<track>/<kernel>_<training key>/`` (the
trainer's checkpoints and metrics; a rerun resumes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from rope_jax import families, objectives
from rope_jax.evaluation import ablation_report
from rope_jax.training import evaluators

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
# Track name -> (model family, what its numbers are, what is trained).
TRACKS: dict[str, tuple[str, str, str]] = {
    "causal_lm": ("decoder", "next-token loss", "Decoder-only causal LM"),
    "mlm": ("encoder", "masked-token loss", "Bidirectional encoder, BERT masked LM"),
}


@dataclasses.dataclass(frozen=True)
class Track:
    """One objective of the ablation: its model family and how token windows become batches.

    ``mask_id``, ``random_token_range`` and ``mask_rate`` are BERT masking's
    (``objectives.mlm``); the causal track does not use them.
    """

    name: str = "causal_lm"
    mask_id: int = -1
    random_token_range: tuple[int, int] = (0, 0)
    mask_rate: float = 0.15

    @property
    def family(self) -> str:
        return TRACKS[self.name][0]

    @property
    def loss_name(self) -> str:
        return TRACKS[self.name][1]

    def window_width(self, length: int) -> int:
        """Tokens a window of ``length`` positions needs (a causal LM's targets are shifted)."""
        return length + 1 if self.name == "causal_lm" else length

    def batch(self, windows: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        if self.name == "causal_lm":
            return lm_batch(windows)
        masking = dataclasses.asdict(self)
        del masking["name"]
        return mlm_batch(windows, rng=rng, **masking)


CAUSAL_LM = Track("causal_lm")


@dataclasses.dataclass
class Cell:
    kernel: str
    position: str
    train_key: str
    model_overrides: dict[str, Any]
    skip_reason: str = ""
    track: str = "causal_lm"

    @property
    def name(self) -> str:
        return f"{self.kernel}_{self.position}"


def _model_dict(config, track: str, kernel: str, position: str) -> dict[str, Any]:
    model = dict(config.model.to_dict())
    model.update(POSITION_VARIANTS[position])
    model["attention"] = kernel
    model["family"] = TRACKS[track][0]
    # A learned table has exactly L rows: training never sees more, and learned_hierarchical
    # extends this same table at evaluation time.
    model["max_length"] = config.train_length
    return model


def grid(config, track: str = "causal_lm") -> list[Cell]:
    """All (kernel, position) cells of ``track``, with the model's own reason for the
    meaningless ones."""
    from rope_jax.model_config import model_config_from_dict

    if track not in TRACKS:
        raise ValueError(f"unknown track {track!r}; known: {sorted(TRACKS)}")
    shortest = min(config.train_length * m for m in (1, *config.eval_multipliers))
    # A track's own kernels/positions, when given, replace the shared ones.
    kernels = config[track].kernels or config.kernels
    positions = config[track].positions or config.positions
    cells = []
    for kernel in kernels:
        for position in positions:
            if position not in POSITION_VARIANTS:
                raise ValueError(
                    f"unknown position {position!r}; known: {sorted(POSITION_VARIANTS)}"
                )
            overrides = _model_dict(config, track, kernel, position)
            train_key = f"{kernel}_{TRAINED_AS.get(position, position)}"
            cell = Cell(kernel, position, train_key, overrides, track=track)
            try:
                model_config_from_dict(overrides)
            except ValueError as err:
                cell.skip_reason = str(err)
            landmarks = config.model.num_landmarks
            if kernel == "nystrom" and not cell.skip_reason and landmarks > shortest:
                raise ValueError(
                    f"model.num_landmarks={landmarks} exceeds the shortest length trained or "
                    f"evaluated ({shortest}), so some Nystrom landmarks would average no token; "
                    f"choose num_landmarks <= {shortest} (a divisor of it gives equal segments)."
                )
            cells.append(cell)
    return cells


@dataclasses.dataclass
class TokenStream:
    """Training and held-out tokens (documents joined with EOS) and the ids MLM needs."""

    train: np.ndarray
    heldout: np.ndarray
    # Ids the model must embed, the mask id included.
    vocab_size: int
    mask_id: int
    random_token_range: tuple[int, int]


def token_stream(config, workdir: str) -> TokenStream:
    """The training and held-out token streams of ``config``.

    ``config.corpus`` empty = the embedded default corpus (``rope_jax.data``); else a glob of
    text files. Every ``heldout_every``-th document is held out. ``config.tokenizer``:
    ``"bytes"`` (UTF-8 bytes + 3, past pad/EOS/unk, and [MASK] = 259: no tokenizer to train)
    or ``"spm"`` (SentencePiece trained on the training documents, cached in ``workdir``,
    with its reserved [MASK] extra id).
    """
    from rope_jax import data

    if config.corpus:
        documents = list(data.iter_documents(config.corpus))
    else:
        documents = data.embedded_documents()
    train_docs = [d for i, d in enumerate(documents) if i % config.heldout_every]
    eval_docs = [d for i, d in enumerate(documents) if i % config.heldout_every == 0]
    if config.tokenizer == "bytes":
        mask_id, random_token_range = 259, (3, 259)

        def encode(text):
            return np.frombuffer(text.encode(), np.uint8).astype(np.int32) + 3

    elif config.tokenizer == "spm":
        tokenizer = data.load_or_train_tokenizer(
            workdir,
            vocab_size=config.model.vocab_size,
            documents=train_docs,
            corpus_name=f"ablation:{config.corpus or 'embedded'}",
        )
        mask_id, random_token_range = tokenizer.mask_id, tokenizer.random_token_range
        encode = tokenizer.encode
    else:
        raise ValueError(f"tokenizer={config.tokenizer!r}; choose 'bytes' or 'spm'")

    def join(docs):
        parts = []
        for d in docs:
            parts += [encode(d), np.ones(1, np.int32)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)

    vocab_size = mask_id + 1 if config.tokenizer == "bytes" else tokenizer.vocab_size
    return TokenStream(join(train_docs), join(eval_docs), vocab_size, mask_id, random_token_range)


class WindowIterator:
    """Batches of ``track`` from random windows of the token stream; the state is the step
    count (batch k, its windows and its masks, are drawn from ``seed`` and k alone), so
    resuming is exact."""

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        length: int,
        batch_size: int,
        seed: int,
        track: Track = CAUSAL_LM,
    ):
        self.width = track.window_width(length)
        if len(tokens) < self.width + 1:
            raise ValueError(f"{len(tokens)} training tokens cannot fill windows of {self.width}")
        self.tokens, self.batch_size, self.seed, self.track = tokens, batch_size, seed, track
        self.step = 0

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.step])
        self.step += 1
        starts = rng.integers(0, len(self.tokens) - self.width, self.batch_size)
        windows = np.stack([self.tokens[s : s + self.width] for s in starts])
        return self.track.batch(windows, rng)

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


def _rows(inputs: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    rows, width = inputs.shape
    ones = np.ones((rows, width), np.int32)
    return {
        "input_tokens": inputs.astype(np.int32),
        "target_tokens": targets.astype(np.int32),
        "loss_weights": weights.astype(np.int32),
        "segment_ids": ones,
        "positions": np.broadcast_to(np.arange(width, dtype=np.int32), (rows, width)).copy(),
    }


def lm_batch(windows: np.ndarray) -> dict[str, np.ndarray]:
    """Causal-LM batch: input/target tokens, weights, segment ids, positions.

    No ``prefix_mask``: these are pure causal LM rows, and a prefix mask (even all zeros) is
    a per-query mask that linear-family kernels reject. The trainer then calls the model
    with tokens, segment ids and positions only, exactly as ``position_losses`` does.
    """
    inputs, targets = windows[:, :-1], windows[:, 1:]
    return _rows(inputs, targets, np.ones(inputs.shape, np.int32))


def mlm_batch(
    windows: np.ndarray,
    *,
    rng: np.random.Generator,
    mask_id: int,
    random_token_range: tuple[int, int],
    mask_rate: float,
) -> dict[str, np.ndarray]:
    """Masked-LM batch: each row masked by ``objectives.mlm`` (BERT's 80/10/10) with ``rng``;
    targets are the original tokens, loss weights 1 at the selected positions. The keys are
    the causal batch's, so the trainer makes the same model call."""
    masking = {"mask_id": mask_id, "random_token_range": random_token_range}
    examples = [objectives.mlm(row, rng=rng, mask_rate=mask_rate, **masking) for row in windows]
    inputs, targets, weights = (np.stack(parts) for parts in zip(*examples, strict=True))
    return _rows(inputs, targets, weights)


def eval_windows(tokens: np.ndarray, width: int, count: int) -> np.ndarray:
    """``count`` consecutive, non-overlapping held-out windows of ``width`` tokens."""
    available = len(tokens) // width
    if available < 1:
        raise ValueError(f"{len(tokens)} held-out tokens cannot fill one window of {width}")
    count = min(count, available)
    return tokens[: count * width].reshape(count, width)


def eval_batches(
    track: Track, windows: np.ndarray, lengths: list[int], *, seed: int
) -> dict[int, dict[str, np.ndarray]]:
    """Held-out batch per length: ``windows`` made into one batch (masked once with ``seed``
    for MLM) at the longest length, and its prefixes for the shorter ones, so every cell sees
    the same targets and a position keeps its mask at every length that includes it."""
    rng = np.random.default_rng(seed)
    longest = track.batch(windows[:, : track.window_width(max(lengths))], rng)
    return {n: {key: value[:, :n] for key, value in longest.items()} for n in lengths}


def eval_model_dict(cell: Cell, train_length: int, eval_length: int) -> dict[str, Any] | None:
    """The model config to evaluate ``cell`` at ``eval_length``; None when impossible."""
    model = dict(cell.model_overrides)
    if eval_length > train_length:
        if cell.position == "learned":
            return None
        if cell.position == "rope_interpolation":
            model["rope_scale"] = train_length / eval_length
    return model


def position_losses(
    model, variables, batch: dict[str, np.ndarray], batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cross entropy summed over the rows of ``batch`` at each position, weighted by its
    ``loss_weights``, and the weight at each position -> ``([length], [length])``."""

    per_token = jax.jit(families.as_task(model).token_losses)

    rows = len(batch["input_tokens"])
    loss_sums = np.zeros(batch["input_tokens"].shape[1])
    for start in range(0, rows, batch_size):
        # The last chunk is padded with copies of its last row (same shape, one compile).
        index = np.minimum(np.arange(start, start + batch_size), rows - 1)
        chunk = {key: value[index] for key, value in batch.items()}
        losses = np.asarray(per_token(variables, chunk), np.float64)[: rows - start]
        loss_sums += (losses * chunk["loss_weights"][: rows - start]).sum(axis=0)
    return loss_sums, batch["loss_weights"].sum(axis=0).astype(np.float64)


# Mean loss per bucket of positions: the same measure as the loop's loss-by-position evaluator.
bucket_losses = evaluators.bucket_means


def length_summary(
    loss_sums: np.ndarray, weights: np.ndarray, train_length: int, bucket_width: int
) -> dict[str, Any]:
    """The numbers reported for one evaluated length (JSON-ready)."""
    length = len(loss_sums)
    (mean,) = bucket_losses(loss_sums, weights, length)
    beyond = bucket_losses(loss_sums[train_length:], weights[train_length:], length)
    return {
        "mean_loss": mean,
        "loss_beyond_train_length": beyond[0] if beyond else None,
        "num_targets": int(weights.sum()),
        "range_losses": bucket_losses(loss_sums, weights, train_length),
        "bucket_losses": bucket_losses(loss_sums, weights, bucket_width),
        "position_losses": bucket_losses(loss_sums, weights, 1),
    }


def _train(cell: Cell, config, workdir: str, track: Track, tokens: np.ndarray):
    from rope_jax.model_config import model_config_from_dict
    from rope_jax.models import build_model
    from rope_jax.training import trainer

    cfg = model_config_from_dict(cell.model_overrides)
    model = build_model(cfg)
    iterator = WindowIterator(
        tokens,
        length=config.train_length,
        batch_size=config.train.batch_size,
        seed=config.seed,
        track=track,
    )
    devices = jax.devices()[:1] if config.single_device else None
    started = time.perf_counter()
    result = trainer.train_and_evaluate(
        config.train,
        os.path.join(workdir, "runs", cell.track, cell.train_key),
        inputs=trainer.Inputs(train=iterator),
        model=model,
        # No FLOP/MFU accounting: grid cells are compared by loss, not speed.
        model_cfg=None,
        devices=devices,
    )
    seconds = time.perf_counter() - started
    if result.stop_signal is not None:
        # Ctrl-C or SIGTERM: the cell's checkpoint is saved; stop the grid (a re-run resumes).
        from rope_jax.training import interrupts

        raise interrupts.StoppedBySignal(result.stop_signal)
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


def _run_track(track, config, workdir, stream, windows, results) -> None:
    """Trains and evaluates every cell of ``track`` into ``results["tracks"][track.name]``."""
    from rope_jax.model_config import model_config_from_dict
    from rope_jax.models import build_model

    L = config.train_length
    bucket = results["bucket_width"]
    section: dict[str, Any] = {
        "track": track.name,
        "model_family": track.family,
        "loss": track.loss_name,
        "description": TRACKS[track.name][2],
        "runs": {},
    }
    if track.name == "mlm":
        section.update(mask_rate=track.mask_rate, eval_mask_seed=config.mlm.eval_mask_seed)
    results["tracks"][track.name] = section
    lengths = [L * multiplier for multiplier in config.eval_multipliers]
    batches = eval_batches(track, windows, lengths, seed=config.mlm.eval_mask_seed)
    trained: dict[str, tuple[Any, dict]] = {}
    for cell in grid(config, track.name):
        run: dict[str, Any] = {"track": track.name, "kernel": cell.kernel}
        run["position"] = cell.position
        section["runs"][cell.name] = run
        if cell.skip_reason:
            run["skipped"] = cell.skip_reason
            logging.info("skip %s %s: %s", track.name, cell.name, cell.skip_reason)
            continue
        if cell.train_key not in trained:
            logging.info("training %s %s", track.name, cell.train_key)
            trained[cell.train_key] = _train(cell, config, workdir, track, stream.train)
        variables, info = trained[cell.train_key]
        run.update(info, trained_as=cell.train_key)
        run["lengths"] = {}
        for length, batch in batches.items():
            model_dict = eval_model_dict(cell, L, length)
            if model_dict is None:
                run["lengths"][str(length)] = {
                    "skipped": f"a learned table of {L} rows has no position beyond {L}"
                }
                continue
            model = build_model(model_config_from_dict(model_dict))
            sums, weights = position_losses(model, variables, batch, config.eval_batch_size)
            run["lengths"][str(length)] = length_summary(sums, weights, L, bucket)
        plot_name, ylabel = f"{track.name}_{cell.name}", f"{track.loss_name} (nats)"
        ablation_report.plot_run(run, plot_name, L, os.path.join(workdir, "plots"), ylabel=ylabel)
        _write_json(results, workdir)  # after every run, so a long grid can be inspected


def run_ablation(config, workdir: str) -> dict[str, Any]:
    """Trains and evaluates every grid cell of every track; writes the tables, JSON, plots."""
    tracks = list(config.tracks)
    unknown = [t for t in tracks if t not in TRACKS]
    if unknown or not tracks:
        raise ValueError(f"config.tracks={tracks}: choose one or more of {sorted(TRACKS)}")
    os.makedirs(workdir, exist_ok=True)
    stream = token_stream(config, workdir)
    if stream.vocab_size > config.model.vocab_size:
        raise ValueError(
            f"tokenizer has {stream.vocab_size} ids (the mask id included) > model vocab_size "
            f"{config.model.vocab_size}"
        )
    L = config.train_length
    max_multiplier = max(config.eval_multipliers)
    # Wide enough for the causal track's shifted targets; MLM uses the same windows.
    windows = eval_windows(stream.heldout, L * max_multiplier + 1, config.eval_windows)
    results: dict[str, Any] = {
        "train_length": L,
        "eval_multipliers": list(config.eval_multipliers),
        "bucket_width": max(L // config.buckets_per_train_length, 1),
        "num_eval_windows": int(len(windows)),
        "num_train_steps": config.train.num_train_steps,
        "batch_size": config.train.batch_size,
        "tokenizer": config.tokenizer,
        "model": config.model.to_dict(),
        "tracks": {},
    }
    for name in tracks:
        masking = {"mask_id": stream.mask_id, "random_token_range": stream.random_token_range}
        track = Track(name, mask_rate=config.mlm.mask_rate, **masking)
        _run_track(track, config, workdir, stream, windows, results)
    _write_json(results, workdir)
    table = ablation_report.markdown(results)
    with open(os.path.join(workdir, "ablation.md"), "w") as f:
        f.write(table)
    print(table)
    return results
