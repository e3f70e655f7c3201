"""Start-up time (model init + train-step compile) and step time by depth, scanned or not.

    python benchmarks/startup.py            # 2, 8, 24 layers per stack, d_model 128
    python benchmarks/startup.py --quick    # 1 and 2 layers, checks the harness
    python benchmarks/startup.py --depths 8 --optimizer sgd   # the step without Adafactor
    python benchmarks/startup.py --widths narrow,small         # also at T5-small width
    python benchmarks/startup.py --widths base --depths 12     # the base presets' shape
    python benchmarks/startup.py --presets mt5:base,roformer:base,pegasus:base,decoder:base

A T5 v1.1 (RMSNorm, gated GELU, relative bias, vocabulary 32,128) of one of the ``WIDTHS``,
``narrow`` (d_model 128, 4 heads of 32, d_ff 512), ``small`` (T5 v1.1 small's d_model 512,
6 heads of 64, d_ff 1024) or ``base`` (T5 v1.1 / mT5 / T5 PEGASUS base, ``configs/mt5.py:base``
and ``configs/t5_pegasus.py:base``: d_model 768, 12 heads of 64, d_ff 2048), with ``L``
encoder and ``L`` decoder layers, trained as ``train.py`` trains it: Adafactor (T5's
settings), the jitted state init of ``training.step.plan_state`` and the train step of
``training.step.make_train_step`` on ``batch x inputs_length`` span-corruption shaped
batches (targets a quarter of the inputs).
Each width and depth runs in its own process (a cold jax, no persistent compilation cache)
which measures, for the layer loop and then for ``scan_layers=True``:

* ``init_s``: building the model, ``plan_state`` (shapes and shardings) and the jitted init
  (tracing, compiling and running it);
* ``compile_s``: lowering and compiling the train step;
* ``startup_s``: the two together, what a run waits for before its first step;

With ``--presets`` each row is instead the model of a shipped config (``configs/<name>.py:
<variant>``'s ``config.model``, its own family, width and depth; dropout off, the vocabulary
``--vocab`` unless it is 0, the preset's own), on a batch of that family's keys
(``batch x inputs_length`` tokens; an encoder-decoder's targets a quarter of that; an
encoder's loss on 15 % of the positions, its MLM head at those only as ``train.py`` runs it)
and the preset's own optimizer (``--optimizer=preset``, the default with ``--presets``).

Then it runs the two compiled steps alternately (loop, scan, loop, ...) ``--repeats`` times on
the same batch and reports each one's median step time. Prints a table and writes
``benchmarks/results/startup.json``. Timings on a shared machine are noise unless taken
alone on the machine: the load average is printed with the table and
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "startup.json")
# d_model, heads, head_dim, d_ff
WIDTHS = {
    "narrow": (128, 4, 32, 512),
    "small": (512, 6, 64, 1024),
    "base": (768, 12, 64, 2048),
}


def _preset(spec: str, vocab: int):
    """``(config.model as a dict, the vocabulary set to vocab (unless 0) and dropout off;
    the optimizer and its schedule)`` of ``configs/<name>.py:<variant>``."""
    import importlib

    from rope_jax import config_boundary
    from rope_jax.training import optim

    sys.path.insert(0, ROOT)
    name, _, variant = spec.partition(":")
    config = importlib.import_module(f"configs.{name}").get_config(variant or None)
    model = config.model.to_dict()
    model["dropout_rate"] = 0.0
    if vocab:
        model["vocab_size"] = vocab
    optimizer = optim.make_optimizer(
        config_boundary.optimizer_section(config), config.num_train_steps
    )
    return model, optimizer


def _family_batch(task, batch: int, length: int, vocab: int, rng) -> dict:
    """A batch of ``task``'s keys: random tokens, every row one segment, positions 0..L-1,
    loss on every target (an encoder's on 15 % of the positions, MLM-like)."""
    import numpy as np

    out = {}
    for key in task.example_batch():
        n = max(length // 4, 2) if key.startswith("decoder_") else length
        if key.endswith("tokens"):
            value = rng.integers(3, vocab, (batch, n))
        elif key.endswith("segment_ids"):
            value = np.ones((batch, n))
        elif key.endswith("positions"):
            value = np.tile(np.arange(n), (batch, 1))
        elif key.endswith("weights"):
            value = (
                rng.random((batch, n)) < 0.15 if task.family == "encoder" else np.ones((batch, n))
            )
        else:  # token types, prefix masks
            value = np.zeros((batch, n))
        out[key] = np.asarray(value, np.int32)
    return out


def _worker(args) -> dict:
    """One depth, both forms, in this (fresh) process; returns the row as a dict."""
    import flax.linen as nn
    import jax
    import numpy as np

    jax.config.update("jax_enable_compilation_cache", False)
    from rope_jax import families
    from rope_jax.model_config import model_config_from_dict
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
    mlm_max_predictions = 0
    if args.preset:
        preset, preset_optimizer = _preset(args.preset, args.vocab)
        if args.optimizer == "preset":
            tx, schedule = preset_optimizer
        probe = families.for_model(build_model(model_config_from_dict(preset)))
        batch = _family_batch(probe, args.batch, args.inputs_length, preset["vocab_size"], rng)
        if probe.family == "encoder":  # train.py's cap: 15 % of the inputs, rounded up
            mlm_max_predictions = -(-args.inputs_length * 15 // 100)
        row = {
            "width": args.preset,
            "family": probe.family,
            "d_model": preset["d_model"],
            "layers": preset["num_layers"],
            "decoder_layers": preset.get("num_decoder_layers") or preset["num_layers"],
            "vocab": preset["vocab_size"],
        }
    else:
        d_model, num_heads, head_dim, d_ff = WIDTHS[args.width]
        row = {"width": args.width, "d_model": d_model, "layers": args.layers}
    steps = {}
    for form, scan in (("loop", False), ("scan", True)):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            start = time.perf_counter()
            if args.preset:
                cfg = model_config_from_dict({**preset, "scan_layers": scan, "remat": args.remat})
            else:
                cfg = _width_config(args, scan)
            task = families.for_model(build_model(cfg))
            key = jax.random.key(0)
            _, _, init = step_lib.plan_state(task, tx, batch, key, mesh, rules)
            state = init(key)
            jax.block_until_ready(state)
            init_s = time.perf_counter() - start
            start = time.perf_counter()
            train_step = step_lib.make_train_step(
                task, tx, schedule, grad_clip_norm=1.0, mlm_max_predictions=mlm_max_predictions
            )
            compiled = (
                jax.jit(train_step, donate_argnums=0)
                .lower(state, batch, jax.random.key(1))
                .compile()
            )
            compile_s = time.perf_counter() - start
        row[form] = {"init_s": init_s, "compile_s": compile_s, "startup_s": init_s + compile_s}
        steps[form] = (compiled, state)
        print(
            f"  {row['width']} {row['layers']} layers {form}: init {init_s:.1f} s, "
            f"compile {compile_s:.1f} s",
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


def _width_config(args, scan: bool):
    from rope_jax.model_config import ModelConfig

    d_model, num_heads, head_dim, d_ff = WIDTHS[args.width]
    return ModelConfig(
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


def _label(row) -> str:
    """``"<model> <layers>"``: ``12+12`` for an encoder-decoder, ``12`` for one stack."""
    family = row.get("family", "encoder_decoder")
    layers = str(row["layers"])
    if family == "encoder_decoder":
        layers += f"+{row.get('decoder_layers', row['layers'])}"
    return f"{row['width']} {layers}"


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
        "--optimizer",
        default=None,
        choices=("adafactor", "sgd", "preset"),
        help="default adafactor, with --presets the preset's own (preset); sgd: diagnostic",
    )
    parser.add_argument(
        "--presets",
        default="",
        help="comma-separated configs/<name>.py:<variant> models (e.g. mt5:base), instead of "
        "--widths and --depths; --vocab 0 keeps each preset's vocabulary",
    )
    parser.add_argument("--json", default=RESULTS)
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--width", default="narrow", help=argparse.SUPPRESS)
    parser.add_argument("--preset", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.optimizer is None:
        args.optimizer = "preset" if args.presets or args.preset else "adafactor"
    if args.optimizer == "preset" and not (args.presets or args.preset):
        parser.error("--optimizer=preset needs --presets")
    if args.worker:
        args.layers = args.worker
        print(json.dumps(_worker(args)))
        return
    if args.quick:
        args.depths, args.batch, args.inputs_length, args.vocab, args.repeats = "1,2", 2, 32, 512, 2

    if args.presets:
        # One row per preset at its own depth (the worker reads it from the config).
        runs = [("narrow", preset, 1) for preset in args.presets.split(",")]
        for _, preset, _ in runs:
            name = preset.partition(":")[0]
            if not os.path.exists(os.path.join(ROOT, "configs", f"{name}.py")):
                parser.error(f"--presets: no configs/{name}.py")
    else:
        widths = args.widths.split(",")
        for width in widths:
            if width not in WIDTHS:
                parser.error(f"--widths: unknown width {width!r}; choose from {', '.join(WIDTHS)}")
        runs = [(width, "", int(depth)) for width in widths for depth in args.depths.split(",")]
    load_before = peers.load_average()
    rows = []
    for width, preset, depth in runs:
        command = [
            sys.executable,
            os.path.abspath(__file__),
            f"--worker={depth}",
            f"--width={width}",
            f"--preset={preset}",
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
        print(f"  done {_label(row)} (load {row['load']})", flush=True)
    load_after = peers.load_average()

    print(
        f"\n{'presets' if args.presets else 'T5 v1.1-shaped'}, batch {args.batch} x "
        f"{args.inputs_length} inputs / {max(args.inputs_length // 4, 2)} targets, vocab "
        f"{args.vocab or 'of each preset'}, {args.optimizer}, "
        f"remat={args.remat}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; load {load_before} -> {load_after}"
    )
    print(
        "| model | d_model | layers | startup loop s (init + compile)"
        " | startup scan s (init + compile) | scan / loop startup"
        " | startup vs the width's first row (loop, scan) | step loop s | step scan s"
        " | scan / loop step | load after |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        base = next(r for r in rows if r["width"] == row["width"])
        loop, scan = row["loop"], row["scan"]
        print(
            f"| {row['width']} | {row['d_model']} | {_label(row).split(' ', 1)[1]} "
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
