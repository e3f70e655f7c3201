"""Start-up time (model init + train-step compile) and step time by depth, scanned or not.

    python benchmarks/startup.py            # 2, 8, 24 layers per stack, d_model 128
    python benchmarks/startup.py --quick    # 1 and 2 layers, checks the harness
    python benchmarks/startup.py --depths 8 --optimizer sgd   # the step without Adafactor
    python benchmarks/startup.py --widths narrow,small         # also at T5-small width

A T5 v1.1 (RMSNorm, gated GELU, relative bias, vocabulary 32,128) of one of the ``WIDTHS``,
``narrow`` (d_model 128, 4 heads of 32, d_ff 512) or ``small`` (T5 v1.1 small's d_model 512,
6 heads of 64, d_ff 1024), with ``L`` encoder and ``L`` decoder layers, trained as
``train.py`` trains it: Adafactor (T5's settings), the jitted state init of
``training.step.plan_state`` and the train step of ``training.step.make_train_step`` on
``batch x inputs_length`` span-corruption shaped batches (targets a quarter of the inputs).
Each width and depth runs in its own process (a cold jax, no persistent compilation cache)
which measures, for the layer loop and then for ``scan_layers=True``:

* ``init_s``: building the model, ``plan_state`` (shapes and shardings) and the jitted init
  (tracing, compiling and running it);
* ``compile_s``: lowering and compiling the train step;
* ``startup_s``: the two together, what a run waits for before its first step;

then runs the two compiled steps alternately (loop, scan, loop, ...) ``--repeats`` times on
the same batch and reports each one's median step time. Prints a table and writes
``benchmarks/results/startup.json``. Timings on a shared machine are noise unless taken
alone on the machine: the load average is printed with the table.and
after each row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peers  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "startup.json")
# d_model, heads, head_dim, d_ff
WIDTHS = {"narrow": (128, 4, 32, 512), "small": (512, 6, 64, 1024)}


def _worker(args) -> dict:
    """One depth, both forms, in this (fresh) process; returns the row as a dict."""
    import flax.linen as nn
    import jax
    import numpy as np

    jax.config.update("jax_enable_compilation_cache", False)
    from rope_jax import families
    from rope_jax.model_config import ModelConfig
    from rope_jax.models import build_model
    from rope_jax.training import optim, sharding
    from rope_jax.training import step as step_lib

    # One-time costs of a process's first jit (backend start-up), outside every timing.
    jax.jit(lambda x: x + 1)(np.zeros(2)).block_until_ready()
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    rules = sharding.DEFAULT_LOGICAL_AXIS_RULES
    targets = max(args.inputs_length // 4, 2)
    rng = np.random.default_rng(0)
    batch = {
        "encoder_input_tokens": rng.integers(3, args.vocab, (args.batch, args.inputs_length)),
        "decoder_input_tokens": rng.integers(3, args.vocab, (args.batch, targets)),
        "decoder_target_tokens": rng.integers(3, args.vocab, (args.batch, targets)),
        "decoder_loss_weights": np.ones((args.batch, targets)),
        "encoder_segment_ids": np.ones((args.batch, args.inputs_length)),
        "decoder_segment_ids": np.ones((args.batch, targets)),
        "encoder_positions": np.tile(np.arange(args.inputs_length), (args.batch, 1)),
        "decoder_positions": np.tile(np.arange(targets), (args.batch, 1)),
    }
    batch = {k: np.asarray(v, np.int32) for k, v in batch.items()}
    tx, schedule = optim.make_optimizer(
        optim.OptimizerConfig(name="adafactor", learning_rate=0.01, schedule="constant"), 100
    )
    if args.optimizer == "sgd":
        # Diagnostic: plain SGD, not the library's per-layer optimizer, so the step is the
        # model's forward and backward and little else.
        import optax

        tx = optax.sgd(0.01)
    d_model, num_heads, head_dim, d_ff = WIDTHS[args.width]
    row = {"width": args.width, "d_model": d_model, "layers": args.layers}
    steps = {}
    for form, scan in (("loop", False), ("scan", True)):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            start = time.perf_counter()
            cfg = ModelConfig(
                family="encoder_decoder",
                vocab_size=args.vocab,
                d_model=d_model,
                num_heads=num_heads,
                head_dim=head_dim,
                d_ff=d_ff,
                num_layers=args.layers,
                dropout_rate=0.0,
                scan_layers=scan,
                remat=args.remat,
            )
            task = families.for_model(build_model(cfg))
            key = jax.random.key(0)
            _, _, init = step_lib.plan_state(task, tx, batch, key, mesh, rules)
            state = init(key)
            jax.block_until_ready(state)
            init_s = time.perf_counter() - start
            start = time.perf_counter()
            train_step = step_lib.make_train_step(task, tx, schedule, grad_clip_norm=1.0)
            compiled = (
                jax.jit(train_step, donate_argnums=0)
                .lower(state, batch, jax.random.key(1))
                .compile()
            )
            compile_s = time.perf_counter() - start
        row[form] = {"init_s": init_s, "compile_s": compile_s, "startup_s": init_s + compile_s}
        steps[form] = (compiled, state)
        print(
            f"  {args.layers}+{args.layers} {form}: init {init_s:.1f} s, compile {compile_s:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    times = {form: [] for form in steps}
    key = jax.random.key(1)
    for _ in range(args.repeats + 1):  # the first round warms both up and is not counted
        for form, (compiled, state) in steps.items():
            start = time.perf_counter()
            state, metrics = compiled(state, batch, key)
            jax.block_until_ready(metrics)
            times[form].append(time.perf_counter() - start)
            steps[form] = (compiled, state)
    for form in steps:
        row[form]["step_s"] = float(np.median(times[form][1:]))
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 and 2 layers, few repeats")
    parser.add_argument("--depths", default="2,8,24", help="layers per stack")
    parser.add_argument(
        "--widths", default="narrow", help=f"comma-separated, of {', '.join(WIDTHS)}"
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--inputs_length", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--remat", default="none")
    parser.add_argument(
        "--optimizer", default="adafactor", choices=("adafactor", "sgd"), help="sgd: diagnostic"
    )
    parser.add_argument("--json", default=RESULTS)
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--width", default="narrow", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.layers = args.worker
        print(json.dumps(_worker(args)))
        return
    if args.quick:
        args.depths, args.batch, args.inputs_length, args.vocab, args.repeats = "1,2", 2, 32, 512, 2

    widths = args.widths.split(",")
    for width in widths:
        if width not in WIDTHS:
            parser.error(f"--widths: unknown width {width!r}; choose from {', '.join(WIDTHS)}")
    load_before = peers.load_average()
    rows = []
    for width in widths:
        for depth in (int(d) for d in args.depths.split(",")):
            command = [
                sys.executable,
                os.path.abspath(__file__),
                f"--worker={depth}",
                f"--width={width}",
                f"--batch={args.batch}",
                f"--inputs_length={args.inputs_length}",
                f"--vocab={args.vocab}",
                f"--repeats={args.repeats}",
                f"--remat={args.remat}",
                f"--optimizer={args.optimizer}",
            ]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            sys.stderr.write(done.stderr[-2000:] if "Traceback" in done.stderr else "")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["load"] = peers.load_average()
            rows.append(row)
            print(f"  done {width} {depth}+{depth} layers (load {row['load']})", flush=True)
    load_after = peers.load_average()

    print(
        f"\nT5 v1.1-shaped, batch {args.batch} x {args.inputs_length} inputs / "
        f"{max(args.inputs_length // 4, 2)} targets, vocab {args.vocab}, {args.optimizer}, "
        f"remat={args.remat}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; load {load_before} -> {load_after}"
    )
    print(
        "| d_model | layers (enc+dec) | startup loop s (init + compile)"
        " | startup scan s (init + compile) | scan / loop startup"
        " | startup vs the width's first row (loop, scan) | step loop s | step scan s"
        " | scan / loop step | load after |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        base = next(r for r in rows if r["width"] == row["width"])
        loop, scan = row["loop"], row["scan"]
        print(
            f"| {row['d_model']} | {row['layers']}+{row['layers']} "
            f"| {loop['startup_s']:.1f} ({loop['init_s']:.1f} + {loop['compile_s']:.1f}) "
            f"| {scan['startup_s']:.1f} ({scan['init_s']:.1f} + {scan['compile_s']:.1f}) "
            f"| {scan['startup_s'] / loop['startup_s']:.2f}x "
            f"| {loop['startup_s'] / base['loop']['startup_s']:.2f}x, "
            f"{scan['startup_s'] / base['scan']['startup_s']:.2f}x "
            f"| {loop['step_s']:.3f} | {scan['step_s']:.3f} "
            f"| {scan['step_s'] / loop['step_s']:.3f}x | {row['load']} |"
        )
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(
            dict(args=vars(args), load_before=load_before, load_after=load_after, rows=rows),
            f,
            indent=1,
        )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
