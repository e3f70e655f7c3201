"""Train-step time against Hugging Face's Flax models, measured in the same run.

    make hf-venv                                  # once: .venv-hf with transformers 4.x
    python benchmarks/train_step.py               # full shapes, dropout 0 and 0.1 (~15 min)
    python benchmarks/train_step.py --quick       # 2 layers, short rows: an end-to-end check
    python benchmarks/train_step.py --shapes t5_small --dropouts 0.1 --repeats 9

Shapes (float32, one device, batch 8; ``benchmarks/peer_shapes.py``):

- ``t5_small``: T5 v1.1-small (d_model 512, d_ff 1024, 8+8 layers, 6 heads of 64, vocab
  32128), 512 inputs and 114 targets (span corruption's lengths), Adafactor on both sides;
- ``roformer_small``: a BERT-small-like RoFormer (hidden 512, 4 layers, 8 heads,
  intermediate 2048, vocab 32000), 512 tokens with 77 masked per row, AdamW on both sides.

For each shape and dropout rate the driver starts a fresh worker per side (rope_jax in this
virtualenv, ``FlaxT5ForConditionalGeneration`` / ``FlaxRoFormerForMaskedLM`` in
``.venv-hf``), each builds and compiles its jitted step once on the same batch, then the two
run steps alternately (ours, HF, ours, HF, ...). Reported per row: the median seconds per
step of each side, ``HF / ours`` (above 1: rope_jax is faster), tokens/s of rope_jax in both
units (input tokens only, as HF's examples count them, and input + target tokens; the same
for an MLM encoder, whose targets are its inputs), MFU (``rope_jax.flops`` model FLOPs per
second over the float32 GEMM rate measured in this run), the median CPU seconds of each
side's step and their ratio (on a machine shared with other jobs the CPU time varies less
than the wall time; the wall-time ratio is the figure), each worker's peak resident memory
and compile time, and the load average. Each side uses its stack's default PRNG for dropout
(rope_jax: ``rbg``, its ``config.prng_impl`` default; HF: jax's ``threefry``) unless
``--hf-prng`` says otherwise. rope_jax's MLM step uses the masked-position head
(``--no-masked-head`` runs the head at every position, as HF does). Results go to
``benchmarks/results/train_step.json``. No reference figure is a constant in this file:
every ratio divides two measurements of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peer_shapes  # noqa: E402
import peers  # noqa: E402

TARGET_RATIO = {"t5_small": 1.25, "roformer_small": 1.15}


def measure(name: str, shape: dict, dropout: float, args) -> dict:
    with peers.Worker("ours") as ours, peers.Worker("hf") as hf:
        built = {
            "ours": ours.request(
                "build_train",
                shape=shape,
                dropout=dropout,
                prng=args.prng,
                masked_head=not args.no_masked_head,
            ),
            "hf": hf.request("build_train", shape=shape, dropout=dropout, prng=args.hf_prng),
        }
        load_before = peers.load_average()
        times, cpu_times = peers.alternate({"ours": ours, "hf": hf}, "train_step", args.repeats)
        info = {"ours": ours.request("info"), "hf": hf.request("info")}
    seconds = {side: peers.median(t) for side, t in times.items()}
    cpu_seconds = {side: peers.median(t) for side, t in cpu_times.items()}
    inputs, targets = shape["batch"] * shape["inputs"], shape["batch"] * shape["targets"]
    seq2seq = shape["model"]["family"] == "encoder_decoder"
    return {
        "shape": name,
        "dropout": dropout,
        "num_layers": shape["model"]["num_layers"],
        "batch": shape["batch"],
        "inputs": shape["inputs"],
        "targets": shape["targets"],
        "optimizer": shape["optimizer"],
        "seconds": seconds,
        "times": times,
        "hf_over_ours": seconds["hf"] / seconds["ours"],
        "cpu_seconds": cpu_seconds,
        "cpu_times": cpu_times,
        "hf_over_ours_cpu": cpu_seconds["hf"] / cpu_seconds["ours"],
        "input_tokens_per_s": {side: inputs / s for side, s in seconds.items()},
        "input_target_tokens_per_s": {
            side: (inputs + targets if seq2seq else inputs) / s for side, s in seconds.items()
        },
        "model_gflop_per_step": built["ours"]["model_flops"] / 1e9,
        "max_predictions": built["ours"]["max_predictions"],
        "peak_rss_mb": {side: info[side]["peak_rss_mb"] for side in info},
        "compile_s": {side: built[side]["compile_s"] for side in built},
        "first_loss": {side: built[side]["loss"] for side in built},
        "prng": {side: info[side]["prng"] for side in info},
        "hf_versions": info["hf"]["versions"],
        "load_average": f"{load_before} -> {peers.load_average()}",
    }


def print_table(rows: list[dict], peak_flops: float) -> None:
    print(
        "| shape | dropout | rope_jax s/step | HF s/step | HF / ours | tok/s in (in+tgt) "
        "| CPU s ours / HF (ratio) | MFU | peak RSS ours / HF | compile ours / HF | load |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        ours, hf = row["seconds"]["ours"], row["seconds"]["hf"]
        mfu = row["model_gflop_per_step"] * 1e9 / ours / peak_flops
        print(
            f"| {row['shape']} ({row['num_layers']}L, {row['batch']}x{row['inputs']}"
            f"/{row['targets']}, {row['optimizer']}) | {row['dropout']:g} | {ours:.3f} "
            f"| {hf:.3f} | **{row['hf_over_ours']:.2f}x** "
            f"| {row['input_tokens_per_s']['ours']:.0f} "
            f"({row['input_target_tokens_per_s']['ours']:.0f}) "
            f"| {row['cpu_seconds']['ours']:.2f} / {row['cpu_seconds']['hf']:.2f} "
            f"({row['hf_over_ours_cpu']:.2f}x) | {100 * mfu:.1f}% "
            f"| {row['peak_rss_mb']['ours'] / 1024:.2f} / {row['peak_rss_mb']['hf'] / 1024:.2f} GB "
            f"| {row['compile_s']['ours']:.0f} / {row['compile_s']['hf']:.0f} s "
            f"| {row['load_average']} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 layers, short sequences")
    parser.add_argument("--repeats", type=int, default=0, help="steps per side (default 7 / 3)")
    parser.add_argument("--shapes", default=",".join(peer_shapes.TRAIN_SHAPES))
    parser.add_argument("--dropouts", default="0,0.1", help="comma-separated dropout rates")
    parser.add_argument("--prng", default="rbg", help="rope_jax's jax_default_prng_impl")
    parser.add_argument("--hf-prng", default="threefry2x32", help="HF's jax_default_prng_impl")
    parser.add_argument("--no-masked-head", action="store_true", help="MLM head everywhere")
    parser.add_argument("--output", default="benchmarks/results/train_step.json")
    args = parser.parse_args()
    args.repeats = args.repeats or (3 if args.quick else 7)

    from rope_jax.training import metrics

    print(peers.machine_line(), flush=True)
    peak_flops = metrics.measure_matmul_peak()
    rows = []
    for name in args.shapes.split(","):
        if name not in peer_shapes.TRAIN_SHAPES:
            parser.error(f"unknown shape {name!r}; choose from {list(peer_shapes.TRAIN_SHAPES)}")
        shape = peer_shapes.TRAIN_SHAPES[name]
        if args.quick:
            shape = peer_shapes.quick_shape(shape)
        for dropout in (float(d) for d in args.dropouts.split(",")):
            row = measure(name, shape, dropout, args)
            rows.append(row)
            print(
                f"{name} dropout {dropout:g}: ours {row['seconds']['ours']:.3f} s, "
                f"HF {row['seconds']['hf']:.3f} s, HF / ours {row['hf_over_ours']:.2f}x "
                f"(CPU time {row['hf_over_ours_cpu']:.2f}x) "
                f"(load {row['load_average']})",
                flush=True,
            )
    peak_flops = max(peak_flops, metrics.measure_matmul_peak())
    print()
    print(peers.machine_line())
    print(
        f"float32 GEMM peak measured in this run: {peak_flops / 1e9:.0f} GFLOP/s; "
        f"HF = transformers {rows[0]['hf_versions']['transformers']} Flax on jax "
        f"{rows[0]['hf_versions']['jax']}; PRNG ours {rows[0]['prng']['ours']}, "
        f"HF {rows[0]['prng']['hf']}"
    )
    print_table(rows, peak_flops)
    if not args.quick:
        for row in rows:
            target = TARGET_RATIO[row["shape"]]
            time_ok = row["hf_over_ours"] >= target
            memory_ok = row["peak_rss_mb"]["ours"] <= row["peak_rss_mb"]["hf"]
            print(
                f"{row['shape']} dropout {row['dropout']:g}: {row['hf_over_ours']:.2f}x "
                f"{'meets' if time_ok else 'misses'} the {target}x target; peak memory "
                f"{'<=' if memory_ok else '>'} HF's"
            )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    output = os.path.join(root, args.output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as f:
        json.dump(
            {"machine": peers.machine_line(), "matmul_peak_gflops": peak_flops / 1e9, "rows": rows},
            f,
            indent=2,
        )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
