"""Attention kernels: time, memory and error against exact attention over sequence length.

    python benchmarks/attention.py            # lengths 512 .. 16384 (a quiet machine, ~1 h)
    python benchmarks/attention.py --quick    # lengths 256, 512, 1024, few repetitions

Batch 1, 8 heads, head_dim 64, float32, bidirectional, no mask. For each kernel and length:
median wall time of the jitted forward and forward+backward (gradient of ``sum(out)`` with
respect to q, k, v) after one warm-up call; memory as XLA's compiled memory analysis
``temp_size_in_bytes + output_size_in_bytes`` (the buffers the program allocates; the q, k, v
arguments are excluded, being the same for every kernel); relative error
``|out - exact| / |exact|`` (Frobenius) against this project's exact softmax kernel, or
``jax.nn.dot_product_attention`` where that one was skipped, with q and k drawn as
``N(0, scale^2)`` for each ``--error-scales`` value (default 0.5 and 1). With scale 1 and
d = 64, ``|q|^2 / sqrt(d)`` is about 8 and FAVOR+'s variance, which grows like
``exp(|q + k|^2 / sqrt(d))``, dominates: random inputs are the hard case for positive random
features. The row "uniform weights (mean of v)" is the error of ignoring q and k entirely,
the yardstick for every approximation on random inputs.

A kernel is dropped for the remaining lengths once it would not fit in memory (predicted by
the memory analysis against the machine's available memory, or an allocation failure) or
once one call takes longer than ``--time-limit`` seconds (default 60).
Prints a markdown table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rope_jax.attention import (  # noqa: E402
    linear_attention,
    nystrom_attention,
    performer_attention,
    performer_projection,
    softmax_attention,
)

BATCH, HEADS, HEAD_DIM = 1, 8, 64
NUM_FEATURES, NUM_LANDMARKS = 256, 64
EXACT_KERNELS = ("softmax", "jax.nn.dot_product_attention")


def kernels(projection_MD):
    return {
        "softmax": softmax_attention,
        "jax.nn.dot_product_attention": jax.nn.dot_product_attention,
        f"performer (m={NUM_FEATURES})": (
            lambda q, k, v: performer_attention(q, k, v, projection=projection_MD)
        ),
        f"nystrom ({NUM_LANDMARKS} landmarks)": (
            lambda q, k, v: nystrom_attention(q, k, v, num_landmarks=NUM_LANDMARKS)
        ),
        "linear": linear_attention,
    }


def available_memory_bytes():
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def compile_with_memory(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        return compiled, None
    return compiled, int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)


def median_seconds(compiled, args, repeats, time_limit):
    """Warm-up call, then the median of ``repeats`` timed calls; None past the time limit."""
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    if time.perf_counter() - start > time_limit:
        return None, out
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
        if times[-1] > time_limit:
            return None, out
    return statistics.median(times), out


def relative_error(approx, exact):
    approx, exact = np.asarray(approx, np.float64), np.asarray(exact, np.float64)
    return float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))


def run(lengths, repeats, time_limit, error_scales, seed=0):
    projection_MD = performer_projection(jax.random.PRNGKey(seed), NUM_FEATURES, HEAD_DIM)
    fns = kernels(projection_MD)
    stopped = {}
    rows = []
    for length in lengths:
        keys = jax.random.split(jax.random.PRNGKey(seed + length), 3)
        q, k, v = (
            jax.random.normal(key, (BATCH, length, HEADS, HEAD_DIM), jnp.float32) for key in keys
        )
        forwards = {}
        length_rows = []
        for name, fn in fns.items():
            row = {"kernel": name, "length": length}
            length_rows.append(row)
            if name in stopped:
                row["status"] = f"skipped ({stopped[name]})"
                continue
            row.update(measure(fn, q, k, v, repeats, time_limit))
            forward = row.pop("forward", None)
            if row["status"] != "ok":
                stopped[name] = row["status"]
                continue
            forwards[name] = forward
        baseline = {"kernel": "uniform weights (mean of v)", "length": length, "status": "ok"}
        add_errors(length_rows + [baseline], forwards, q, k, v, error_scales)
        for row in length_rows + [baseline]:
            print(format_row(row, error_scales), flush=True)
        rows.extend(length_rows + [baseline])
    return rows


def add_errors(rows, forwards, q, k, v, error_scales):
    """Relative errors with q and k multiplied by each scale (v unchanged)."""
    exact_name = next((name for name in EXACT_KERNELS if name in forwards), None)
    if exact_name is None:
        return
    for scale in error_scales:
        scaled_q, scaled_k = q * scale, k * scale
        exact = forwards[exact_name](scaled_q, scaled_k, v)
        for row in rows:
            if row["status"] != "ok" or row["kernel"] in EXACT_KERNELS:
                continue
            if row["kernel"] in forwards:
                approx = forwards[row["kernel"]](scaled_q, scaled_k, v)
            else:
                approx = jnp.broadcast_to(jnp.mean(v, axis=1, keepdims=True), v.shape)
            row.setdefault("relative_error", {})[str(scale)] = relative_error(approx, exact)


def measure(fn, q, k, v, repeats, time_limit):
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v))

    result = {}
    budget = available_memory_bytes()
    try:
        forward, result["forward_bytes"] = compile_with_memory(fn, q, k, v)
        backward, result["forward_backward_bytes"] = compile_with_memory(
            jax.grad(loss, argnums=(0, 1, 2)), q, k, v
        )
        needed = max(result["forward_bytes"] or 0, result["forward_backward_bytes"] or 0)
        if budget is not None and needed > 0.8 * budget:
            return {**result, "status": f"out of memory (needs {needed / 2**30:.1f} GiB)"}
        result["forward_ms"], _ = median_seconds(forward, (q, k, v), repeats, time_limit)
        if result["forward_ms"] is None:
            return {**result, "status": f"forward over {time_limit:.0f} s"}
        result["forward_backward_ms"], _ = median_seconds(backward, (q, k, v), repeats, time_limit)
        if result["forward_backward_ms"] is None:
            return {**result, "status": f"forward+backward over {time_limit:.0f} s"}
    except (MemoryError, jax.errors.JaxRuntimeError) as error:
        if isinstance(error, MemoryError) or "RESOURCE_EXHAUSTED" in str(error):
            return {**result, "status": "out of memory"}
        raise
    result["forward_ms"] *= 1e3
    result["forward_backward_ms"] *= 1e3
    return {**result, "status": "ok", "forward": forward}


def mebibytes(value):
    return "" if value is None else f"{value / 2**20:.1f}"


def format_row(row, error_scales):
    def milliseconds(key):
        return f"{row[key]:.1f}" if key in row else ""

    if row.get("status") != "ok":
        cells = [str(row.get("status"))] + [""] * (3 + len(error_scales))
    else:
        errors = row.get("relative_error", {})
        exact = row["kernel"] in EXACT_KERNELS
        cells = [
            milliseconds("forward_ms"),
            milliseconds("forward_backward_ms"),
            mebibytes(row.get("forward_bytes")),
            mebibytes(row.get("forward_backward_bytes")),
        ] + [
            "exact" if exact else (f"{errors[str(s)]:.3g}" if str(s) in errors else "")
            for s in error_scales
        ]
    return "| " + " | ".join([row["kernel"], str(row["length"])] + cells) + " |"


def table_header(error_scales):
    columns = ["kernel", "length", "fwd ms", "fwd+bwd ms", "fwd MiB", "fwd+bwd MiB"]
    columns += [f"rel. error (q, k x {scale})" for scale in error_scales]
    return "| " + " | ".join(columns) + " |\n| --- |" + " ---: |" * (len(columns) - 1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="lengths 256-1024, 3 repetitions")
    parser.add_argument("--lengths", type=int, nargs="*", help="override the lengths")
    parser.add_argument("--repeats", type=int, help="timed repetitions after warm-up")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per call")
    parser.add_argument(
        "--error-scales",
        type=float,
        nargs="*",
        default=[0.5, 1.0],
        help="q and k ~ N(0, scale^2) for the error columns (timing uses scale 1)",
    )
    parser.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parent / "results" / "attention.json"),
        help="where to write the JSON results",
    )
    args = parser.parse_args(argv)
    if args.lengths:
        lengths = args.lengths
    elif args.quick:
        lengths = [256, 512, 1024]
    else:
        lengths = [512 * 2**i for i in range(int(math.log2(16384 // 512)) + 1)]
    repeats = args.repeats or (3 if args.quick else 10)

    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({len(jax.devices())} device(s)); "
        f"batch {BATCH}, {HEADS} heads, head_dim {HEAD_DIM}, float32, median of {repeats} after "
        "warm-up; memory = XLA temp + output bytes of the compiled program"
    )
    print(table_header(args.error_scales), flush=True)
    rows = run(lengths, repeats, args.time_limit, args.error_scales)

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax_version": jax.__version__,
        "platform": jax.devices()[0].platform,
        "config": {
            "batch": BATCH,
            "heads": HEADS,
            "head_dim": HEAD_DIM,
            "dtype": "float32",
            "lengths": lengths,
            "repeats": repeats,
            "time_limit_s": args.time_limit,
            "performer_features": NUM_FEATURES,
            "nystrom_landmarks": NUM_LANDMARKS,
            "error_scales": args.error_scales,
        },
        "memory_measure": "compiled.memory_analysis(): temp_size_in_bytes + output_size_in_bytes",
        "results": rows,
    }
    out_path.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
