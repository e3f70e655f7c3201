"""Shapes, batches and the worker protocol shared by rope_jax and its Hugging Face peer.

This module imports only the standard library and numpy: it is loaded both by the rope_jax
benchmark workers (the project's virtualenv) and by ``hf_worker.py``, which runs in the
separate Hugging Face virtualenv (``make hf-venv``; transformers 4.x, the last with Flax
models, on its own jax). Both sides build their batches here from the same seed, so they
train on the same tokens.

Protocol: the driver starts one worker process per side and writes one JSON request per line
to its stdin; the worker answers each with one JSON line on stdout (``{"ok": true, ...}`` or
``{"ok": false, "error": ...}``). Everything else a worker prints goes to stderr.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import traceback

import numpy as np

T5_SMALL = dict(
    family="encoder_decoder",
    vocab_size=32128,
    d_model=512,
    num_heads=6,
    head_dim=64,
    d_ff=1024,
    num_layers=8,
    mlp_activation="gated-gelu",
    norm="rms",
    norm_placement="pre",
    use_bias=False,
    tie_embeddings=False,
    scale_queries=False,
    position="t5_bias",
)

ROFORMER_SMALL = dict(
    family="encoder",
    vocab_size=32000,
    d_model=512,
    num_heads=8,
    head_dim=64,
    d_ff=2048,
    num_layers=4,
    mlp_activation="gelu",
    gelu_approximate=False,
    norm="layer",
    norm_placement="post",
    use_bias=True,
    tie_embeddings=True,
    scale_queries=True,
    position="rope",
    type_vocab_size=2,
    initializer_range=0.02,
)

# Train-step shapes: T5 v1.1-small on span-corruption lengths (512 inputs give 114 targets)
# with Adafactor, as T5 trained; a BERT-small-like RoFormer MLM with AdamW, as BERT trained.
TRAIN_SHAPES = {
    "t5_small": dict(model=T5_SMALL, batch=8, inputs=512, targets=114, optimizer="adafactor"),
    "roformer_small": dict(
        model=ROFORMER_SMALL, batch=8, inputs=512, targets=512, optimizer="adamw"
    ),
}

# Decoding: T5 v1.1-small, 8 encoder rows of 512 tokens, 64 decoder slots (start token + 63).
DECODE_SHAPE = dict(model=T5_SMALL, batch=8, inputs=512, max_length=64, beam_size=4)

MASK_RATE = 0.15
MASK_ID = 4


def quick_shape(shape: dict) -> dict:
    """Same widths and vocabulary, 2 layers, short sequences: an end-to-end smoke run."""
    shape = json.loads(json.dumps(shape))
    shape["model"]["num_layers"] = 2
    shape["inputs"] = 128
    if "targets" in shape:
        shape["targets"] = 32 if shape["model"]["family"] == "encoder_decoder" else 128
    if "max_length" in shape:
        shape["max_length"] = 16
    return shape


def num_masked(length: int, mask_rate: float = MASK_RATE) -> int:
    """Masked positions per row, as ``rope_jax.objectives.mlm`` and BERT choose them."""
    return max(1, int(round(length * mask_rate)))


def train_batch(shape: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens in the batch format of rope_jax (int32 numpy), the same on both sides.

    Encoder-decoder rows: span-corruption lengths, decoder inputs = targets shifted right
    after the start id 0. MLM rows: ``num_masked(inputs)`` positions per row replaced by
    ``MASK_ID`` (the count ``objectives.mlm`` masks), loss weight 1 there.
    """
    rng = np.random.default_rng(seed)
    batch, inputs, vocab = shape["batch"], shape["inputs"], shape["model"]["vocab_size"]

    def tokens(length):
        return rng.integers(5, vocab, (batch, length)).astype(np.int32)

    def ones(length):
        return np.ones((batch, length), np.int32)

    def positions(length):
        return np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy()

    if shape["model"]["family"] == "encoder_decoder":
        targets = shape["targets"]
        target_tokens = tokens(targets)
        decoder_inputs = np.concatenate([np.zeros((batch, 1), np.int32), target_tokens[:, :-1]], 1)
        return {
            "encoder_input_tokens": tokens(inputs),
            "encoder_segment_ids": ones(inputs),
            "encoder_positions": positions(inputs),
            "decoder_input_tokens": decoder_inputs,
            "decoder_target_tokens": target_tokens,
            "decoder_segment_ids": ones(targets),
            "decoder_positions": positions(targets),
            "decoder_loss_weights": ones(targets),
        }
    input_tokens = tokens(inputs)
    weights = np.zeros((batch, inputs), np.int32)
    for row in range(batch):
        weights[row, rng.choice(inputs, num_masked(inputs), replace=False)] = 1
    return {
        "input_tokens": np.where(weights == 1, MASK_ID, input_tokens).astype(np.int32),
        "target_tokens": input_tokens,
        "loss_weights": weights,
        "segment_ids": ones(inputs),
        "positions": positions(inputs),
    }


def decode_inputs(shape: dict, seed: int = 1) -> np.ndarray:
    """Encoder input tokens ``[batch, inputs]`` for the decoding comparison."""
    rng = np.random.default_rng(seed)
    return rng.integers(5, shape["model"]["vocab_size"], (shape["batch"], shape["inputs"])).astype(
        np.int32
    )


def peak_rss_mb() -> float:
    """Peak resident memory of this process (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads (XLA's included).

    On a machine shared with other jobs, wall time depends on everyone's load; CPU time
    mostly on the work done, so the driver reports both.
    """
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def median(values) -> float:
    values = sorted(values)
    if not values:
        return math.nan
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else 0.5 * (values[middle - 1] + values[middle])


def serve(handlers: dict) -> None:
    """Worker loop: one JSON request per stdin line -> one JSON answer per stdout line.

    ``handlers[request["op"]](request)`` returns a dict; ``{"op": "exit"}`` ends the loop.
    The real stdout is kept for answers and ``sys.stdout`` is pointed at stderr, so library
    output never corrupts the protocol.
    """
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if request.get("op") == "exit":
            answers.write(json.dumps({"ok": True}) + "\n")
            break
        try:
            reply = {"ok": True, **handlers[request["op"]](request)}
        except Exception as error:  # reported to the driver, which stops the run
            reply = {"ok": False, "error": f"{type(error).__name__}: {error}"}
            traceback.print_exc(file=sys.stderr)
        answers.write(json.dumps(reply) + "\n")
