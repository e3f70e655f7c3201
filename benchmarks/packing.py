"""Packed vs unpacked Performer pretraining: tokens of real text per second of train step.

    python benchmarks/packing.py            # 4 layers, 4 x 512 rows (minutes on 2 CPU cores)
    python benchmarks/packing.py --quick    # 2 layers, 4 x 128 rows

Per objective, one Performer model (the shipped config with ``attention=performer``,
``position=rope``, dropout 0, resized to d_model 256, 4 heads of 64, d_ff 1024, vocab 8192,
256 random features) and one jitted AdamW train step. For each corpus, two input pipelines
read the same documents in the same order (same seed): ``pack=True`` (T5-style packing,
segment ids 1, 2, ...) and ``pack=False`` (one example per row, padded). Batches have the
same shape, so the same compiled step runs both; packed rows take the per-segment kernels,
padded rows the plain ones (``kernelized.bidirectional`` picks them at run time).

Corpora, both from the embedded ``pydoc_data.topics`` text (no download):
``topics`` (one document per help topic, as ``make demo`` trains; most are longer than a
row, so chunking leaves padding only in each document's last row) and ``paragraphs``
(the same text, one document per blank-line block: short documents, as in corpora of
sentences or paragraphs, where padding dominates an unpacked row).

Steps alternate packed / unpacked (the order flips every pair) in one process, after two
untimed pairs. "real tok" counts the input-row positions holding text (segment id != 0:
the encoder row for span corruption, the only row otherwise); "real tok/s" is the median
over steps of real tokens / step time; the ratio is packed over unpacked. Objectives:
``mlm`` (RoFormer encoder, bidirectional attention), ``causal_lm`` (decoder, causal),
``span_corruption`` (mT5: bidirectional encoder, causal decoder, cross-attention between
the packed rows). Results: a printed table and ``benchmarks/results/packing.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import tempfile
import time

import numpy as np

# configs/ sits next to benchmarks/, not in the installed package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIG_FILES = {"mlm": "roformer", "causal_lm": "decoder", "span_corruption": "mt5"}
SIZE = dict(
    d_model=256,
    num_heads=4,
    head_dim=64,
    d_ff=1024,
    num_layers=4,
    vocab_size=8192,
    num_features=256,
    dropout_rate=0.0,
)
SHAPE = dict(inputs_length=512, batch_size=4)
QUICK = dict(num_layers=2, inputs_length=128, batch_size=4)


def input_segment_key(batch) -> str:
    return "encoder_segment_ids" if "encoder_segment_ids" in batch else "segment_ids"


def build(objective: str, quick: bool):
    """(config, model, model config) for ``objective`` with Performer attention."""
    from rope_jax.training import trainer

    module = importlib.import_module(f"configs.{CONFIG_FILES[objective]}")
    config = module.get_config("tiny,attention=performer,position=rope")
    config.model.update(**SIZE)
    config.data.update(objective=objective, inputs_length=SHAPE["inputs_length"])
    config.batch_size = SHAPE["batch_size"]
    if quick:
        config.model.num_layers = QUICK["num_layers"]
        config.data.inputs_length = QUICK["inputs_length"]
        config.batch_size = QUICK["batch_size"]
    config.data.pack = True  # the model must accept packed rows
    model, model_cfg = trainer.build_model(config)
    return config, model, model_cfg


def corpora() -> dict:
    """The embedded text as documents (``topics``) and as paragraphs (``paragraphs``)."""
    from rope_jax.data.corpora import InMemoryDocuments
    from rope_jax.data.embedded import embedded_documents

    topics = embedded_documents()
    paragraphs = [block for text in topics for block in text.split("\n\n") if block.strip()]
    return {"topics": InMemoryDocuments(topics), "paragraphs": InMemoryDocuments(paragraphs)}


def run_objective(objective: str, quick: bool, steps: int, tokenizer, documents: dict) -> list:
    import jax

    from configs import common
    from rope_jax.data import pipeline
    from rope_jax.training import optim, sharding, step, trainer

    config, model, model_cfg = build(objective, quick)
    data = trainer.data_settings(config)
    opt_config = common.base_config().optimizer
    opt_config.update(name="adamw", learning_rate=1e-4, schedule="constant", warmup_steps=0)
    tx, schedule = optim.make_optimizer(opt_config, num_train_steps=1000)
    mesh = sharding.make_mesh(common.base_config().mesh, jax.devices()[:1])
    rules = sharding.rules_from_config(sharding.DEFAULT_LOGICAL_AXIS_RULES)
    key = jax.random.key(0)
    row_tokens = config.batch_size * config.data.inputs_length
    results = []
    with jax.set_mesh(mesh):
        jit_step, state, compile_seconds = None, None, 0.0
        for corpus, source in documents.items():
            iterators = {
                mode: pipeline.make_pipeline(
                    dataclasses.replace(data, pack=mode == "packed"), tokenizer, documents=source
                )
                for mode in ("packed", "unpacked")
            }
            if jit_step is None:
                first = next(iterators["packed"])
                state, state_shardings = step.create_sharded_state(
                    model, tx, first, key, mesh, rules
                )
                train_step = step.make_train_step(model, tx, schedule, grad_clip_norm=1.0)
                batch_sharding = sharding.batch_sharding(mesh, rules)
                jit_step = jax.jit(
                    train_step,
                    in_shardings=(state_shardings, {k: batch_sharding for k in first}, None),
                    out_shardings=(state_shardings, None),
                    donate_argnums=(0,),
                )
                start = time.perf_counter()
                state, metrics = jit_step(state, first, jax.random.fold_in(key, 0))
                jax.block_until_ready(metrics)
                compile_seconds = time.perf_counter() - start
            records = {"packed": [], "unpacked": []}
            for index in range(steps + 2):
                order = ("packed", "unpacked") if index % 2 == 0 else ("unpacked", "packed")
                for mode in order:
                    batch = next(iterators[mode])
                    real = int(np.sum(batch[input_segment_key(batch)] != 0))
                    start = time.perf_counter()
                    state, metrics = jit_step(state, batch, jax.random.fold_in(key, index))
                    jax.block_until_ready(metrics)
                    if index >= 2:  # two untimed pairs: every program and branch is warm
                        records[mode].append((time.perf_counter() - start, real))
            result = {
                "objective": objective,
                "corpus": corpus,
                "config": f"configs/{CONFIG_FILES[objective]}.py",
                "num_layers": model_cfg.num_layers,
                "batch": config.batch_size,
                "inputs_length": config.data.inputs_length,
                "compile_and_first_step_s": compile_seconds,
            }
            for mode, rows in records.items():
                seconds = np.array([r[0] for r in rows])
                real = np.array([r[1] for r in rows])
                result[mode] = {
                    "seconds_per_step": float(np.median(seconds)),
                    "real_tokens_per_step": float(np.median(real)),
                    "real_fraction": float(real.sum() / (row_tokens * len(rows))),
                    "real_tokens_per_sec": float(np.median(real / seconds)),
                    "steps": len(rows),
                    "all_seconds": seconds.tolist(),
                    "all_real_tokens": real.tolist(),
                }
            result["speedup"] = (
                result["packed"]["real_tokens_per_sec"] / result["unpacked"]["real_tokens_per_sec"]
            )
            results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 layers, 4 x 128 rows")
    parser.add_argument("--steps", type=int, default=0, help="timed pairs (default 5 / 3)")
    parser.add_argument("--objectives", default=",".join(CONFIG_FILES))
    parser.add_argument("--output", default="benchmarks/results/packing.json")
    args = parser.parse_args()
    steps = args.steps or (3 if args.quick else 5)

    import jax

    from rope_jax.data import embedded

    jax.config.update("jax_default_prng_impl", "rbg")
    with tempfile.TemporaryDirectory() as workdir:
        tokenizer = embedded.load_or_train_tokenizer(
            workdir, vocab_size=SIZE["vocab_size"], num_extra_ids=100
        )
    documents = corpora()
    rows = []
    for name in args.objectives.split(","):
        rows += run_objective(name, args.quick, steps, tokenizer, documents)
        for row in rows[-len(documents) :]:
            print(f"{name} / {row['corpus']}: packed/unpacked {row['speedup']:.2f}x", flush=True)

    print(
        f"{'objective':<17}{'corpus':<12}{'layers':>7}{'B x L':>10}{'mode':>10}{'s/step':>9}"
        f"{'real tok':>10}{'real %':>8}{'real tok/s':>12}{'packed/unpacked':>17}"
    )
    for row in rows:
        for mode in ("packed", "unpacked"):
            stats = row[mode]
            ratio = f"{row['speedup']:.2f}x" if mode == "packed" else ""
            print(
                f"{row['objective']:<17}{row['corpus']:<12}{row['num_layers']:>7}"
                f"{row['batch']:>4} x {row['inputs_length']:<4}{mode:>10}"
                f"{stats['seconds_per_step']:>9.3f}{stats['real_tokens_per_step']:>10.0f}"
                f"{100 * stats['real_fraction']:>7.1f}%{stats['real_tokens_per_sec']:>12.0f}"
                f"{ratio:>17}"
            )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, args.output)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"quick": args.quick, "steps": steps, "rows": rows}, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
