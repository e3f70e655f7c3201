"""Greedy decoding throughput with and without the key/value cache (or recurrent state).

    python benchmarks/decoding.py --quick          # tiny models, a few seconds per row
    python benchmarks/decoding.py --json out.json  # larger shapes (run on a quiet machine)

For each model (a T5-style encoder-decoder, a RoPE decoder with softmax attention, and one
with causal linear attention, which decodes with its running-sum state) it times
``rope_jax.decoding.generate`` with ``use_cache=True`` (one token per step against the
cache) and ``use_cache=False`` (the decoder recomputed at every step over the whole
``[batch, max_length]`` token buffer, a fixed shape so that it compiles once: the cost of a
step does not shrink with the prefix), after a warm-up call that compiles. EOS is disabled
so every row decodes ``max_length`` tokens. Reported: generated tokens per second
(batch x new tokens / wall time).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from rope_jax import convert, decoding, model_config, models

SHAPES = {
    "quick": dict(
        d_model=64,
        num_heads=4,
        head_dim=16,
        d_ff=128,
        num_layers=2,
        vocab_size=256,
        batch=4,
        input_length=32,
        max_length=32,
        repeats=2,
    ),
    "full": dict(
        d_model=512,
        num_heads=8,
        head_dim=64,
        d_ff=1024,
        num_layers=6,
        vocab_size=32128,
        batch=8,
        input_length=256,
        max_length=128,
        repeats=3,
    ),
}

MODELS = {
    "encoder_decoder/softmax": dict(family="encoder_decoder"),
    "decoder/softmax+rope": dict(family="decoder", position="rope"),
    "decoder/linear+rope": dict(family="decoder", position="rope", attention="linear"),
}


def _random_params(model, seed=0):
    rng = np.random.default_rng(seed)
    flat = {
        path: jnp.asarray(rng.normal(size=shape.shape) / np.sqrt(shape.shape[0]), jnp.float32)
        for path, shape in convert.param_shapes(model).items()
    }
    return convert.unflatten_params(flat)


def run(mode: str) -> list[dict]:
    shape = dict(SHAPES[mode])
    batch = shape.pop("batch")
    input_length = shape.pop("input_length")
    max_length = shape.pop("max_length")
    repeats = shape.pop("repeats")
    rows = []
    for name, overrides in MODELS.items():
        cfg = model_config.model_config_from_dict({**shape, **overrides, "dropout_rate": 0.0})
        model = models.build_model(cfg)
        params = _random_params(model)
        rng = np.random.default_rng(1)
        if cfg.family == "encoder_decoder":
            inputs = rng.integers(2, cfg.vocab_size, size=(batch, input_length))
            new_tokens = max_length - 1
        else:
            # A prompt of 8 tokens, then max_length - 8 generated ones.
            inputs = rng.integers(2, cfg.vocab_size, size=(batch, 8))
            new_tokens = max_length - 8
        row = {"model": name, "batch": batch, "new_tokens": new_tokens}
        for use_cache in (True, False):
            kwargs = dict(max_length=max_length, eos_id=-1, use_cache=use_cache)
            # The first call compiles.
            jax.block_until_ready(decoding.generate(model, params, inputs, **kwargs).sequences)
            start = time.perf_counter()
            for _ in range(repeats):
                out = decoding.generate(model, params, inputs, **kwargs)
                jax.block_until_ready(out.sequences)
            seconds = (time.perf_counter() - start) / repeats
            key = "cached" if use_cache else "recompute"
            row[f"{key}_tokens_per_s"] = batch * new_tokens / seconds
        row["speedup"] = row["cached_tokens_per_s"] / row["recompute_tokens_per_s"]
        rows.append(row)
        print(
            f"{name:26s} batch {batch:3d} new {new_tokens:4d}  cached "
            f"{row['cached_tokens_per_s']:9.1f} tok/s  recompute "
            f"{row['recompute_tokens_per_s']:9.1f} tok/s  x{row['speedup']:.2f}",
            flush=True,
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CI, laptops)")
    parser.add_argument("--json", default="", help="write the rows to this file")
    args = parser.parse_args()
    print(f"devices: {jax.devices()}")
    rows = run("quick" if args.quick else "full")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
