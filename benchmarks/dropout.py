"""Dropout masks: rope_jax's hashed mask against masks drawn from jax's random bits.

    python benchmarks/dropout.py            # T5-small encoder attention weights [8, 6, 512, 512]
    python benchmarks/dropout.py --quick    # [2, 6, 128, 128], a few repetitions

The timed function is the attention dropout's use of a mask, ``where(keep, w / p, 0) @ v``
with ``v`` ``[B, H, S, 64]``, jitted, forward and value-and-gradient (with respect to ``w``
and ``v``). The masks, each built inside the same jitted function:

- ``hash``: ``rope_jax.dropout.keep_mask`` (pcg4d of the key and each position);
- ``bits16 rbg`` / ``bits16 threefry``: two 16-bit draws per 32-bit word of
  ``jax.random.bits`` (rope_jax's mask before the hash), with an ``rbg`` or ``threefry`` key;
- ``bernoulli threefry``: ``jax.random.bernoulli`` (what ``flax.linen.Dropout`` draws),
  jax's default PRNG.

Keys are typed keys of each implementation, so no global jax setting changes between
variants. The variants run in turn (one call each, round after round) so that a change in
the machine's load hits them alike; figures are medians, ratios are the variant's median
over ``hash``'s. Prints a markdown table and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rope_jax import dropout  # noqa: E402

RATE = 0.1


def _bits16_mask(key, shape):
    size = math.prod(shape)
    words = jax.random.bits(key, ((size + 1) // 2,), jnp.uint32)
    halves = lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:size]
    return halves.reshape(shape) >= jnp.uint16(round(RATE * 65536))


MASKS = {
    "hash": ("rbg", lambda key, shape: dropout.keep_mask(key, RATE, shape)),
    "bits16 rbg": ("rbg", _bits16_mask),
    "bits16 threefry": ("threefry2x32", _bits16_mask),
    "bernoulli threefry": (
        "threefry2x32",
        lambda key, shape: jax.random.bernoulli(key, 1.0 - RATE, shape),
    ),
}


def _functions(make_mask):
    def apply(w, v, key):
        keep = make_mask(key, w.shape)
        dropped = jnp.where(keep, w * (1.0 / (1.0 - RATE)), 0.0)
        return jnp.einsum("BHTS,BHSD->BHTD", dropped, v)

    def loss(w, v, key):
        return jnp.sum(apply(w, v, key) ** 2)

    return {
        "forward": jax.jit(apply),
        "value and gradient": jax.jit(jax.value_and_grad(loss, argnums=(0, 1))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=0, help="rounds (default 9 / 3)")
    parser.add_argument("--json", default="benchmarks/results/dropout.json")
    args = parser.parse_args()
    shape = (2, 6, 128, 128) if args.quick else (8, 6, 512, 512)
    repeats = args.repeats or (3 if args.quick else 9)
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.random(shape), jnp.float32)
    v = jnp.asarray(rng.normal(size=shape[:3] + (64,)), jnp.float32)
    variants = {}
    for name, (impl, make_mask) in MASKS.items():
        key = jax.random.key(0, impl=impl)
        keep = np.asarray(jax.jit(lambda k, m=make_mask: m(k, shape))(key))
        variants[name] = dict(key=key, functions=_functions(make_mask), kept=float(keep.mean()))
    times = {(name, op): [] for name in variants for op in ("forward", "value and gradient")}
    for op in ("forward", "value and gradient"):
        for variant in variants.values():  # compile outside the timed rounds
            jax.block_until_ready(variant["functions"][op](w, v, variant["key"]))
        for round_ in range(repeats):
            for name, variant in variants.items():
                key = jax.random.fold_in(variant["key"], round_)
                start = time.perf_counter()
                jax.block_until_ready(variant["functions"][op](w, v, key))
                times[name, op].append(time.perf_counter() - start)
    rows = []
    for name, variant in variants.items():
        row = {"mask": name, "kept_fraction": variant["kept"]}
        for op in ("forward", "value and gradient"):
            row[op + " ms"] = 1e3 * statistics.median(times[name, op])
            row[op + " times"] = times[name, op]
        rows.append(row)
    print(
        f"dropout at rate {RATE} of [{', '.join(map(str, shape))}] weights, then @ v; "
        f"medians of {repeats} rounds, jax {jax.__version__}, {jax.default_backend()}"
    )
    print("| mask | kept | forward ms | vs hash | value and gradient ms | vs hash |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    base = rows[0]
    for row in rows:
        fwd, grad = row["forward ms"], row["value and gradient ms"]
        print(
            f"| {row['mask']} | {row['kept_fraction']:.4f} | {fwd:.1f} "
            f"| {fwd / base['forward ms']:.2f}x | {grad:.1f} "
            f"| {grad / base['value and gradient ms']:.2f}x |"
        )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"shape": shape, "rate": RATE, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
