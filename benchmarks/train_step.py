"""Training-step throughput: tokens/s, MFU and peak memory at two published shapes.

    python benchmarks/train_step.py            # full shapes (minutes on 2 CPU cores)
    python benchmarks/train_step.py --quick    # same widths, 2 layers, short sequences

Shapes (dropout 0, float32, one device):

- ``t5_small``: T5 v1.1-small (d_model 512, d_ff 1024, 8+8 layers, 6 heads of 64, vocab
  32128), batch 8, 512 inputs and 114 targets, Adafactor;
- ``roformer_small``: BERT-small-like RoFormer encoder (hidden 512, 4 layers, 8 heads,
  intermediate 2048, vocab 32000), batch 8 x 512, AdamW.

tokens/s counts input tokens (batch x input length) per second of the jitted train step,
as Hugging Face's examples report it. MFU = model FLOPs per second (``rope_jax.flops``:
weights x tokens per part plus attention matmuls, x3 for forward + backward) divided by the
float32 GEMM rate measured in the same process just before (best of several 1024^3 products;
STYLE.md "Measuring"). Each shape runs in its own subprocess so the peak resident memory
(``ru_maxrss``; on CPU the arrays live in process memory) belongs to that shape alone.
Results are printed as a table and written to ``benchmarks/results/train_step.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SHAPES = {
    "t5_small": dict(
        model=dict(
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
            dropout_rate=0.0,
        ),
        batch=8,
        inputs=512,
        targets=114,
        optimizer="adafactor",
    ),
    "roformer_small": dict(
        model=dict(
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
            dropout_rate=0.0,
        ),
        batch=8,
        inputs=512,
        targets=512,
        optimizer="adamw",
    ),
}

# Hugging Face Flax on the same shapes, same 2-core machine (from the training issue).
REFERENCE_TOKENS_PER_SEC = {"t5_small": 400.0, "roformer_small": 400.0}
TARGET_SPEEDUP = {"t5_small": 1.25, "roformer_small": 1.15}


def make_batch(shape: dict, rng):
    import numpy as np

    batch, inputs, targets, vocab = (
        shape["batch"],
        shape["inputs"],
        shape["targets"],
        shape["model"]["vocab_size"],
    )

    def tokens(length):
        return rng.integers(3, vocab, (batch, length)).astype(np.int32)

    def ones(length):
        return np.ones((batch, length), np.int32)

    def positions(length):
        return np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy()

    if shape["model"]["family"] == "encoder_decoder":
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
    weights = (rng.random((batch, inputs)) < 0.15).astype(np.int32)
    return {
        "input_tokens": np.where(weights == 1, 4, input_tokens).astype(np.int32),
        "target_tokens": input_tokens,
        "loss_weights": weights,
        "segment_ids": ones(inputs),
        "positions": positions(inputs),
    }


def run_shape(name: str, quick: bool, steps: int) -> dict:
    """Measures one shape in this process (called in a subprocess by ``main``)."""
    import jax
    import numpy as np

    from configs import common
    from rope_jax.flops import flops_per_token
    from rope_jax.model_config import model_config_from_dict
    from rope_jax.models import build_model
    from rope_jax.training import metrics, optim, sharding, step

    jax.config.update("jax_default_prng_impl", "rbg")
    shape = json.loads(json.dumps(SHAPES[name]))
    if quick:
        shape["model"]["num_layers"] = 2
        shape["inputs"] = 128
        shape["targets"] = 32 if shape["model"]["family"] == "encoder_decoder" else 128
    cfg = model_config_from_dict(shape["model"])
    model = build_model(cfg)
    batch = make_batch(shape, np.random.default_rng(0))

    opt_config = common.base_config().optimizer
    if shape["optimizer"] == "adafactor":
        opt_config.update(
            name="adafactor", learning_rate=0.01, schedule="rsqrt", warmup_steps=0,
            rsqrt_timescale=10_000, weight_decay=0.0, grad_clip_norm=0.0,
        )  # fmt: skip
    else:
        opt_config.update(name="adamw", learning_rate=1e-4, schedule="constant", warmup_steps=0)
    tx, schedule = optim.make_optimizer(opt_config, num_train_steps=1000)
    mesh = sharding.make_mesh(common.base_config().mesh, jax.devices()[:1])
    rules = sharding.rules_from_config(sharding.DEFAULT_LOGICAL_AXIS_RULES)
    key = jax.random.key(0)
    with jax.set_mesh(mesh):
        state, state_shardings = step.create_sharded_state(model, tx, batch, key, mesh, rules)
        train_step = step.make_train_step(
            model, tx, schedule, grad_clip_norm=opt_config.grad_clip_norm
        )
        batch_sharding = sharding.batch_sharding(mesh, rules)
        jit_step = jax.jit(
            train_step,
            in_shardings=(state_shardings, {k: batch_sharding for k in batch}, None),
            out_shardings=(state_shardings, None),
            donate_argnums=(0,),
        )
        device_batch = {k: jax.device_put(v, batch_sharding) for k, v in batch.items()}
        start = time.perf_counter()
        state, step_metrics = jit_step(state, device_batch, key)
        jax.block_until_ready(step_metrics)
        compile_and_first = time.perf_counter() - start
        peak_flops = metrics.measure_matmul_peak()
        times = []
        for index in range(steps):
            start = time.perf_counter()
            state, step_metrics = jit_step(state, device_batch, jax.random.fold_in(key, index))
            jax.block_until_ready(step_metrics)
            times.append(time.perf_counter() - start)
        peak_flops = max(peak_flops, metrics.measure_matmul_peak())
    seconds = float(np.median(times))
    tokens = shape["batch"] * shape["inputs"]
    step_flops = flops_per_token(cfg, shape["inputs"], shape["targets"]) * tokens
    return {
        "shape": name,
        "quick": quick,
        "batch": shape["batch"],
        "inputs": shape["inputs"],
        "targets": shape["targets"],
        "num_layers": cfg.num_layers,
        "seconds_per_step": seconds,
        "tokens_per_sec": tokens / seconds,
        "model_gflop_per_step": step_flops / 1e9,
        "matmul_peak_gflops": peak_flops / 1e9,
        "mfu": step_flops / seconds / peak_flops,
        "peak_memory_mb": (metrics.peak_memory_bytes() or 0) / 2**20,
        "compile_and_first_step_s": compile_and_first,
        "loss": float(step_metrics["loss"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 layers, short sequences")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (default 3 / 5)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated shapes")
    parser.add_argument("--only", default="", help=argparse.SUPPRESS)  # subprocess mode
    parser.add_argument("--output", default="benchmarks/results/train_step.json")
    args = parser.parse_args()
    steps = args.steps or (3 if args.quick else 5)
    if args.only:
        print(json.dumps(run_shape(args.only, args.quick, steps)))
        return

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    rows = []
    for name in args.shapes.split(","):
        command = [sys.executable, os.path.abspath(__file__), "--only", name, "--steps", str(steps)]
        if args.quick:
            command.append("--quick")
        output = subprocess.run(
            command, env=env, cwd=root, check=True, capture_output=True, text=True
        ).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))

    header = (
        f"{'shape':<16}{'layers':>7}{'B x in/tgt':>14}{'s/step':>9}{'tok/s':>9}"
        f"{'vs HF':>8}{'MFU':>7}{'peak GF/s':>11}{'mem MB':>9}{'compile s':>11}"
    )
    print(header)
    for row in rows:
        ratio = row["tokens_per_sec"] / REFERENCE_TOKENS_PER_SEC[row["shape"]]
        print(
            f"{row['shape']:<16}{row['num_layers']:>7}"
            f"{row['batch']:>5} x {row['inputs']}/{row['targets']:<4}"
            f"{row['seconds_per_step']:>9.3f}{row['tokens_per_sec']:>9.0f}"
            f"{ratio if not row['quick'] else float('nan'):>8.2f}{100 * row['mfu']:>6.1f}%"
            f"{row['matmul_peak_gflops']:>11.1f}{row['peak_memory_mb']:>9.0f}"
            f"{row['compile_and_first_step_s']:>11.1f}"
        )
    if not args.quick:
        for row in rows:
            target = TARGET_SPEEDUP[row["shape"]] * REFERENCE_TOKENS_PER_SEC[row["shape"]]
            verdict = "meets" if row["tokens_per_sec"] >= target else "misses"
            print(f"{row['shape']}: {verdict} the target of {target:.0f} tokens/s")
    os.makedirs(os.path.dirname(os.path.join(root, args.output)), exist_ok=True)
    with open(os.path.join(root, args.output), "w") as f:
        json.dump({"rows": rows, "reference_tokens_per_sec": REFERENCE_TOKENS_PER_SEC}, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
