"""Greedy decoding throughput with and without the key/value cache (or recurrent state).

    python benchmarks/decoding.py --quick          # tiny models, a few seconds per row
    python benchmarks/decoding.py --json out.json  # larger shapes (run on a quiet machine)
    python benchmarks/decoding.py --vs-hf [--quick]  # against HF's generate, same run

``--vs-hf`` compares cached greedy and beam search (4 beams) with Hugging Face's Flax
``generate`` (``FlaxT5ForConditionalGeneration``, transformers 4.x in ``.venv-hf``, see
``make hf-venv``) on T5 v1.1-small with random weights: 8 encoder rows of 512 tokens,
sequences of 64 (the start token and 63 generated), no EOS (both sides decode every slot),
both jitted and compiled once, timed alternately (ours, HF, ours, ...) through the workers
of ``benchmarks/peers.py``. Reported: generated tokens per second of each (batch x 63 /
median seconds, beam hypotheses not counted) and their ratio, plus CPU seconds per call, and
the encoder pass alone, timed the same way: the same work on both sides and part of every
call, so the rest of a call is the decoding loop.

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
import os
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


def run_vs_hf(quick: bool, repeats: int) -> list[dict]:
    """Cached greedy and beam decoding of rope_jax and HF's ``generate``, alternated."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import peer_shapes
    import peers

    shape = peer_shapes.DECODE_SHAPE
    if quick:
        shape = peer_shapes.quick_shape(shape)
    print(peers.machine_line(), flush=True)
    rows = []
    with peers.Worker("ours") as ours, peers.Worker("hf") as hf:
        workers = {"ours": ours, "hf": hf}
        compile_s = {
            side: w.request("build_decode", shape=shape)["compile_s"] for side, w in workers.items()
        }
        for method in ("greedy", "beam"):
            load = peers.load_average()
            wall, cpu = peers.alternate(workers, "generate", repeats, method=method)
            seconds = {side: peers.median(t) for side, t in wall.items()}
            tokens = shape["batch"] * (shape["max_length"] - 1)
            rows.append(
                {
                    "method": method,
                    "beam_size": shape["beam_size"] if method == "beam" else 1,
                    "batch": shape["batch"],
                    "inputs": shape["inputs"],
                    "max_length": shape["max_length"],
                    "num_layers": shape["model"]["num_layers"],
                    "seconds": seconds,
                    "times": wall,
                    "cpu_seconds": {side: peers.median(t) for side, t in cpu.items()},
                    "tokens_per_s": {side: tokens / s for side, s in seconds.items()},
                    "ours_over_hf": seconds["hf"] / seconds["ours"],
                    "compile_s": {side: c[method] for side, c in compile_s.items()},
                    "load_average": f"{load} -> {peers.load_average()}",
                }
            )
        # The encoder pass alone (8 x 512 tokens), the same work on both sides and part of
        # every generate call: what is left of a call is the decoding loop.
        wall, cpu = peers.alternate(workers, "generate", repeats, method="encode")
        encode_s = {side: peers.median(t) for side, t in wall.items()}
        for row in rows:
            row["encode_seconds"] = encode_s
            row["loop_seconds"] = {side: row["seconds"][side] - encode_s[side] for side in wall}
        peak = {side: w.request("info")["peak_rss_mb"] for side, w in workers.items()}
    print()
    print(peers.machine_line())
    print(
        "| T5 v1.1-small decoding | rope_jax tok/s | HF tok/s | ours / HF | CPU s ours / HF "
        "| compile ours / HF | load |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        name = "greedy" if row["method"] == "greedy" else f"beam {row['beam_size']}"
        print(
            f"| {name}, {row['num_layers']}L, {row['batch']} x {row['inputs']} -> "
            f"{row['max_length']} | {row['tokens_per_s']['ours']:.0f} "
            f"| {row['tokens_per_s']['hf']:.0f} | **{row['ours_over_hf']:.2f}x** "
            f"| {row['cpu_seconds']['ours']:.2f} / {row['cpu_seconds']['hf']:.2f} "
            f"| {row['compile_s']['ours']:.0f} / {row['compile_s']['hf']:.0f} s "
            f"| {row['load_average']} |"
        )
    print(f"peak RSS: rope_jax {peak['ours']:.0f} MB, HF {peak['hf']:.0f} MB")
    print(
        f"encoder pass alone: rope_jax {encode_s['ours']:.2f} s, HF {encode_s['hf']:.2f} s; "
        "the rest of each call (decoding loop): "
        + ", ".join(
            f"{row['method']} {row['loop_seconds']['ours']:.2f} / {row['loop_seconds']['hf']:.2f} s"
            for row in rows
        )
    )
    if not quick:
        greedy = rows[0]["ours_over_hf"]
        print(f"cached greedy: {greedy:.2f}x HF, {'meets' if greedy >= 1.5 else 'misses'} 1.5x")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CI, laptops)")
    parser.add_argument("--json", default="", help="write the rows to this file")
    parser.add_argument("--vs-hf", action="store_true", help="against HF's generate")
    parser.add_argument("--repeats", type=int, default=0, help="--vs-hf calls per side")
    args = parser.parse_args()
    if args.vs_hf:
        rows = run_vs_hf(args.quick, args.repeats or (2 if args.quick else 5))
        output = args.json or "benchmarks/results/decoding_vs_hf.json"
        os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
        with open(output, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"wrote {output}")
        return
    print(f"devices: {jax.devices()}")
    rows = run("quick" if args.quick else "full")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
