"""Exact attention on CPU: the batched ``[B, H, T, S]`` form against the loop over heads.

    python benchmarks/attention_loop.py            # T5-small's attention shapes, 9 rounds
    python benchmarks/attention_loop.py --quick    # smaller shapes, 3 rounds

``rope_jax.attention.softmax_attention`` computes one ``T x S`` score block at a time, in a
loop over batch rows and heads, when it is not differentiated, runs on a one-device CPU and
the block has at least ``_LOOP_MIN_SCORES`` entries (``loop_over_heads=None``); this script
times its jitted forward pass with ``loop_over_heads=False`` and ``True`` on the same
inputs, in turn (one call each, round after round, so a change in the machine's load hits
both alike), and reports medians, their ratio, XLA's compiled temporary memory of each, and
which form the default picks here. Gradients are the batched form's either way, so only the
forward pass is timed. Shapes: T5 v1.1-small's encoder self-attention (relative bias shared
across the batch, a padding mask), its cross-attention and decoder self-attention at the
train-step shapes (512 -> 114), and one long row of 8 heads. Prints a markdown table and
writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rope_jax.attention import softmax, softmax_attention  # noqa: E402

# name: batch, query length, key length, heads, causal, T5 bias
SHAPES = {
    "T5-small encoder self-attention": (8, 512, 512, 6, False, True),
    "T5-small cross-attention": (8, 114, 512, 6, False, False),
    "T5-small decoder self-attention": (8, 114, 114, 6, True, True),
    "one row, 8 heads, length 2048": (1, 2048, 2048, 8, False, False),
}
QUICK_SHAPES = {
    "encoder self-attention": (2, 256, 256, 6, False, True),
    "cross-attention": (2, 64, 256, 6, False, False),
    "decoder self-attention": (2, 64, 64, 6, True, True),
}
HEAD_DIM = 64


def _inputs(batch, q_len, kv_len, heads, with_bias, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(batch, q_len, heads, HEAD_DIM)) * 0.3, jnp.float32)
    k, v = (
        jnp.asarray(rng.normal(size=(batch, kv_len, heads, HEAD_DIM)) * 0.3, jnp.float32)
        for _ in range(2)
    )
    # Padding: the last quarter of every other row's keys.
    valid = np.ones((batch, kv_len), bool)
    valid[1::2, kv_len - kv_len // 4 :] = False
    mask = jnp.asarray(valid)[:, None, None, :]
    bias = None
    if with_bias:
        bias = jnp.asarray(rng.normal(size=(1, heads, q_len, kv_len)), jnp.float32)
    return q, k, v, mask, bias


def _forward(loop, causal):
    def attend(q, k, v, mask, bias):
        return softmax_attention(
            q, k, v, mask=mask, bias=bias, causal=causal, scale=1.0, loop_over_heads=loop
        )

    return jax.jit(attend)


def measure(shapes, repeats):
    rows = []
    for name, (batch, q_len, kv_len, heads, causal, with_bias) in shapes.items():
        args = _inputs(batch, q_len, kv_len, heads, with_bias)
        forms = {"batched": _forward(False, causal), "loop": _forward(True, causal)}
        outputs, memory = {}, {}
        for form, fn in forms.items():
            compiled = fn.lower(*args).compile()
            memory[form] = compiled.memory_analysis().temp_size_in_bytes
            outputs[form] = np.asarray(jax.block_until_ready(fn(*args)))
        times = {form: [] for form in forms}
        for _ in range(repeats):
            for form, fn in forms.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(*args))
                times[form].append(time.perf_counter() - start)
        batched, loop = (1e3 * statistics.median(times[f]) for f in ("batched", "loop"))
        rows.append(
            {
                "shape": name,
                "batch": batch,
                "q_len": q_len,
                "kv_len": kv_len,
                "heads": heads,
                "causal": causal,
                "bias": with_bias,
                "batched ms": batched,
                "loop ms": loop,
                "batched / loop": batched / loop,
                "batched temp MiB": memory["batched"] / 2**20,
                "loop temp MiB": memory["loop"] / 2**20,
                "max abs difference": float(np.abs(outputs["loop"] - outputs["batched"]).max()),
                "default": "loop"
                if softmax._loop_over_heads_by_default(args[0].shape, kv_len)
                else "batched",
                "times": {form: times[form] for form in forms},
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=0, help="rounds (default 9 / 3)")
    parser.add_argument("--json", default="benchmarks/results/attention_loop.json")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 9)
    rows = measure(QUICK_SHAPES if args.quick else SHAPES, repeats)
    print(
        f"softmax_attention forward, float32, head_dim {HEAD_DIM}; medians of {repeats} "
        f"rounds; jax {jax.__version__}, {jax.default_backend()}, "
        f"{jax.device_count()} device(s)"
    )
    print(
        "| shape | B x T x S x H | batched ms | loop ms | batched / loop "
        "| temp MiB batched / loop | default here |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        print(
            f"| {row['shape']} | {row['batch']} x {row['q_len']} x {row['kv_len']} x "
            f"{row['heads']} | {row['batched ms']:.1f} | {row['loop ms']:.1f} "
            f"| {row['batched / loop']:.2f}x | {row['batched temp MiB']:.0f} / "
            f"{row['loop temp MiB']:.0f} | {row['default']} |"
        )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"head_dim": HEAD_DIM, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
