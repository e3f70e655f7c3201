"""``data.sampling="windows"``: rows are windows of one token stream at random offsets.

Length-extrapolation studies train every row at exactly the training length with no
document boundary inside the row's positions mattering to the model (Press et al. 2022,
ALiBi, train on random windows of WikiText-103's token stream; so do the RoPE/position
interpolation studies of Chen et al. 2023). The training documents (the pipeline's
held-out split removed, ``pipeline.HeldOutSplit``) are tokenized and joined with EOS into
one stream; batch ``k`` is ``batch_size`` windows at offsets drawn from ``(seed, k)``
alone, so the iterator's state is the step count and resuming is exact.

Objectives (``DataConfig.objective``):

* ``causal_lm``: a window of ``inputs_length + 1`` tokens; inputs its first
  ``inputs_length``, targets the next tokens, every position weighted. No ``prefix_mask``
  key: a pure causal row, and a prefix mask (even all zeros) is a per-query mask that
  linear-family kernels cannot take.
* ``mlm``: a window of ``inputs_length`` tokens masked by ``objectives.mlm`` (BERT's
  80/10/10 on ``mlm_rate`` of the tokens) with the batch's generator; targets are the
  window, weights 1 at the selected positions.

Rows carry segment id 1 and positions ``0..inputs_length-1``. Held-out batches are
consecutive windows of the held-out stream (masked with ``seed``), zero-padded at the end.
"""

from __future__ import annotations

import numpy as np

from rope_jax import objectives
from rope_jax.data.pipeline import DataConfig, HeldOutSplit
from rope_jax.data.tokenizers import TextTokenizer

__all__ = [
    "WindowIterator",
    "eval_windows",
    "make_window_inputs",
    "token_stream",
    "window_batch",
    "window_width",
]


def window_width(objective: str, length: int) -> int:
    """Tokens a row of ``length`` positions needs (a causal LM's targets are shifted)."""
    return length + 1 if objective == "causal_lm" else length


def token_stream(documents, tokenizer: TextTokenizer, *, eval_every: int, held_out: bool):
    """The training (or held-out) documents tokenized and joined, each followed by EOS."""
    split = HeldOutSplit(documents, eval_every, held_out=held_out)
    eos = np.array([tokenizer.eos_id], np.int32)
    parts = []
    for index in range(len(split)):
        parts += [np.asarray(tokenizer.encode(split[index]), np.int32), eos]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def _rows(inputs: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    rows, width = inputs.shape
    return {
        "input_tokens": inputs.astype(np.int32),
        "target_tokens": targets.astype(np.int32),
        "loss_weights": weights.astype(np.int32),
        "segment_ids": np.ones((rows, width), np.int32),
        "positions": np.broadcast_to(np.arange(width, dtype=np.int32), (rows, width)).copy(),
    }


def window_batch(
    windows: np.ndarray,
    objective: str,
    *,
    rng: np.random.Generator | None = None,
    tokenizer: TextTokenizer | None = None,
    mlm_rate: float = 0.15,
) -> dict[str, np.ndarray]:
    """A batch of ``objective`` rows from token windows (``window_width`` tokens each)."""
    if objective == "causal_lm":
        inputs, targets = windows[:, :-1], windows[:, 1:]
        return _rows(inputs, targets, np.ones(inputs.shape, np.int32))
    if objective != "mlm":
        raise ValueError(f"windows make causal_lm or mlm rows, not {objective!r}")
    masking = {"mask_id": tokenizer.mask_id, "random_token_range": tokenizer.random_token_range}
    examples = [objectives.mlm(row, rng=rng, mask_rate=mlm_rate, **masking) for row in windows]
    inputs, targets, weights = (np.stack(parts) for parts in zip(*examples, strict=True))
    return _rows(inputs, targets, weights)


class WindowIterator:
    """Training batches (this process's rows of each global batch) of random windows; the
    state is the step count (batch k, its offsets and its masks, come from ``seed`` and k
    alone)."""

    def __init__(
        self,
        tokens: np.ndarray,
        config: DataConfig,
        tokenizer: TextTokenizer,
        *,
        process_index: int = 0,
        process_count: int = 1,
    ):
        self.width = window_width(config.objective, config.inputs_length)
        if len(tokens) < self.width + 1:
            raise ValueError(
                f"the training documents give {len(tokens)} tokens, too few for windows of "
                f"{self.width}: add documents or lower data.inputs_length"
            )
        if config.batch_size % process_count:
            raise ValueError(
                f"batch_size {config.batch_size} is not divisible by process_count {process_count}"
            )
        self.tokens, self.config, self.tokenizer = tokens, config, tokenizer
        rows = config.batch_size // process_count
        self.rows = slice(process_index * rows, (process_index + 1) * rows)
        self.step = 0

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.config.seed, self.step])
        self.step += 1
        starts = rng.integers(0, len(self.tokens) - self.width, self.config.batch_size)
        windows = np.stack([self.tokens[s : s + self.width] for s in starts])
        batch = window_batch(
            windows,
            self.config.objective,
            rng=rng,
            tokenizer=self.tokenizer,
            mlm_rate=self.config.mlm_rate,
        )
        return {key: value[self.rows] for key, value in batch.items()}

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


def eval_windows(tokens: np.ndarray, width: int, count: int) -> np.ndarray:
    """Up to ``count`` consecutive, non-overlapping held-out windows of ``width`` tokens."""
    available = len(tokens) // width
    if available < 1:
        raise ValueError(f"{len(tokens)} held-out tokens cannot fill one window of {width}")
    count = min(count, available)
    return tokens[: count * width].reshape(count, width)


def _held_out_batches(tokens, config, tokenizer, *, num_batches, process_index, process_count):
    """``num_batches`` batches of consecutive held-out windows; rows past the end are zero
    (segment id 0, weight 0), so every process runs the same number of steps."""
    width = window_width(config.objective, config.inputs_length)
    windows = eval_windows(tokens, width, num_batches * config.batch_size)
    batch = window_batch(
        windows,
        config.objective,
        rng=np.random.default_rng(config.seed),
        tokenizer=tokenizer,
        mlm_rate=config.mlm_rate,
    )
    total = num_batches * config.batch_size
    padded = {
        key: np.concatenate([value, np.zeros((total - len(value), *value.shape[1:]), np.int32)])
        for key, value in batch.items()
    }
    rows = config.batch_size // process_count
    for k in range(num_batches):
        start = k * config.batch_size + process_index * rows
        yield {key: value[start : start + rows] for key, value in padded.items()}


def make_window_inputs(
    config: DataConfig,
    tokenizer: TextTokenizer,
    documents,
    *,
    eval_steps: int,
    process_index: int = 0,
    process_count: int = 1,
):
    """``(training iterator, held-out batches callable or None)`` for ``sampling="windows"``."""
    shard = {"process_index": process_index, "process_count": process_count}
    train_tokens = token_stream(documents, tokenizer, eval_every=config.eval_every, held_out=False)
    train = WindowIterator(train_tokens, config, tokenizer, **shard)
    if eval_steps <= 0:
        return train, None
    held_out = token_stream(documents, tokenizer, eval_every=config.eval_every, held_out=True)
    eval_windows(held_out, window_width(config.objective, config.inputs_length), 1)

    def eval_batches():
        return _held_out_batches(held_out, config, tokenizer, num_batches=eval_steps, **shard)

    return train, eval_batches
