"""Input-pipeline throughput: each objective alone, the whole pipeline, its worker scaling.

  python benchmarks/data.py --quick            # a few seconds
  python benchmarks/data.py --json out.json    # full run, also writes the table as JSON

Corpus: the embedded ``pydoc_data.topics`` (no download), tokenizer trained on it.

* objective rows: tokens/s of the objective function alone on pre-tokenized text (tokens
  consumed, i.e. the document tokens fed in; text-level objectives include sentence splitting
  and scoring, their tokenization is excluded);
* pipeline rows: the whole ``make_pipeline`` (read each document from a JSONL file,
  tokenize, objective, pack, batch) with ``num_threads=0`` (everything inline, one core).
  "input tok/s" counts batch x inputs_length per second, the unit of
  ``benchmarks/train_step.py``; "all tok/s" adds the decoder slots of encoder-decoder
  objectives; "real tok/s" counts only the non-padding ones (both streams).
* worker scaling: the same pipeline with grain prefetch threads (``--threads``) and with
  worker processes (``--workers``, ``DataConfig.num_workers``), for ``span_corruption`` and
  ``pseudo_summary``; "x 0" is input tok/s over the pipeline with no threads and no workers
  (everything in one process); "cores" is CPU seconds (this process and its worker
  processes, read from ``/proc``) per wall second, i.e. how many cores the pipeline kept
  busy. Worker start-up (spawn, imports) happens before the timed window. Each setting
  runs at least 1 s, also with ``--quick``.

The training step at the T5-small shape consumes about 400 input tokens/s on 2 CPU cores;
the target is at least 10x that (4000 input tok/s on one core).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from rope_jax import objectives  # noqa: E402
from rope_jax.data import DataConfig, DocumentIndex, make_pipeline  # noqa: E402
from rope_jax.data.embedded import embedded_documents  # noqa: E402
from rope_jax.data.tokenizer import train_tokenizer  # noqa: E402

TARGET_TOK_S = 4000  # 10x the ~400 input tok/s of a T5-small train step on 2 CPU cores
PIPELINE_OBJECTIVES = (
    "span_corruption",
    "mlm",
    "causal_lm",
    "prefix_lm",
    "gap_sentences",
    "pseudo_summary",
)


def _timed(fn, min_seconds: float):
    """Run ``fn`` (returns tokens processed) until ``min_seconds`` pass; tokens/s."""
    tokens, start = 0, time.perf_counter()
    while True:
        tokens += fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return tokens / elapsed


def bench_objectives(tokenizer, documents, min_seconds):
    rng = np.random.default_rng(0)
    token_docs = [tokenizer.encode(d) for d in documents]
    stream = np.concatenate(token_docs)
    chunks568 = [stream[i : i + 568] for i in range(0, stream.size - 568, 568)]
    chunks512 = [stream[i : i + 512] for i in range(0, stream.size - 512, 512)]
    word_starts = tokenizer.word_start_table()
    # Sentence groups of about 512 tokens for the text-level objectives.
    groups, current, used = [], [], 0
    for document in documents:
        for sentence in objectives.split_sentences(document):
            tokens = tokenizer.encode(sentence)[:511]
            if current and used + tokens.size > 511:
                groups.append(current)
                current, used = [], 0
            current.append((sentence, tokens))
            used += tokens.size
    state = {"i": 0}

    def take(items):
        item = items[state["i"] % len(items)]
        state["i"] += 1
        return item

    def span():
        chunk = take(chunks568)
        objectives.span_corruption(chunk, rng=rng, vocab_size=tokenizer.vocab_size)
        return chunk.size

    def mlm(whole_word):
        def run():
            chunk = take(chunks512)
            objectives.mlm(
                chunk,
                rng=rng,
                mask_id=tokenizer.mask_id,
                random_token_range=tokenizer.random_token_range,
                word_starts=word_starts[chunk] if whole_word else None,
            )
            return chunk.size

        return run

    def gap():
        group = take(groups)
        objectives.gap_sentences(
            [t for _, t in group],
            rng=rng,
            mask1_id=tokenizer.mask1_id,
            sentence_units=[objectives.rouge_units(s) for s, _ in group],
        )
        return sum(t.size for _, t in group)

    def pseudo():
        group = take(groups)
        objectives.pseudo_summary_indices([s for s, _ in group])
        return sum(t.size for _, t in group)

    def causal():
        chunk = take(chunks512)
        objectives.causal_lm(chunk)
        return chunk.size

    def prefix():
        chunk = take(chunks512)
        objectives.prefix_lm(chunk, rng=rng)
        return chunk.size

    runs = {
        "span_corruption": span,
        "mlm": mlm(False),
        "mlm (whole word)": mlm(True),
        "gap_sentences": gap,
        "pseudo_summary": pseudo,
        "causal_lm": causal,
        "prefix_lm": prefix,
    }
    return {name: _timed(fn, min_seconds) for name, fn in runs.items()}


def _cpu_seconds() -> float:
    """CPU time of this process and its live child processes (worker CPU from /proc)."""
    total = time.process_time()
    ticks = os.sysconf("SC_CLK_TCK")
    for child in multiprocessing.active_children():
        try:
            with open(f"/proc/{child.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    return total


def bench_pipeline(
    tokenizer, documents, objective, min_seconds, batch_size, num_threads=0, num_workers=0
):
    config = DataConfig(
        objective=objective,
        inputs_length=512,
        batch_size=batch_size,
        num_threads=num_threads,
        num_workers=num_workers,
    )
    iterator = make_pipeline(config, tokenizer, documents=documents)
    next(iterator)  # first-touch costs (word-start table, file handles, thread/process start)
    input_key = next(k for k in iterator.spec.output_keys() if k.endswith("input_tokens"))
    counts = {"all": 0, "real": 0}

    def step():
        batch = next(iterator)
        segment_keys = [k for k in batch if k.endswith("segment_ids")]
        counts["real"] += sum(int((batch[k] > 0).sum()) for k in segment_keys)
        counts["all"] += sum(batch[k].size for k in segment_keys)
        return batch[input_key].size

    start, cpu_start = time.perf_counter(), _cpu_seconds()
    input_rate = _timed(step, min_seconds)
    elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    iterator.close()  # stop prefetch threads and worker processes before the next measurement
    return {
        "input_tok_s": input_rate,
        "all_tok_s": counts["all"] / elapsed,
        "real_tok_s": counts["real"] / elapsed,
        "cores": cpu / elapsed,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short timings (seconds)")
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--json", default="", help="write results here")
    parser.add_argument(
        "--threads", default="0,1,2", help="grain prefetch threads for the scaling table"
    )
    parser.add_argument(
        "--workers", default="0,1,2", help="worker processes (num_workers) for the scaling table"
    )
    args = parser.parse_args()
    min_seconds = 0.3 if args.quick else 3.0

    documents = embedded_documents()
    start = time.perf_counter()
    tokenizer = train_tokenizer(documents, vocab_size=args.vocab_size)
    train_s = time.perf_counter() - start
    chars = sum(map(len, documents))
    start = time.perf_counter()
    n_tokens = sum(tokenizer.encode(d).size for d in documents)
    encode_rate = n_tokens / (time.perf_counter() - start)
    print(
        f"corpus: {len(documents)} documents, {chars} chars, {n_tokens} tokens "
        f"(vocab {tokenizer.vocab_size}, {tokenizer.piece_size} pieces, trained in "
        f"{train_s:.1f} s); tokenize: {encode_rate:,.0f} tok/s"
    )

    objective_rates = bench_objectives(tokenizer, documents, min_seconds)
    print(f"\n{'objective alone':<22}{'tok/s':>14}")
    for name, rate in objective_rates.items():
        print(f"{name:<22}{rate:>14,.0f}")

    directory = tempfile.mkdtemp(prefix="rope_jax_data_bench_")
    path = os.path.join(directory, "corpus.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in documents)
    index = DocumentIndex(path, format="jsonl")
    pipeline_rates = {
        objective: bench_pipeline(tokenizer, index, objective, min_seconds, args.batch_size)
        for objective in PIPELINE_OBJECTIVES
    }
    print(
        f"\n{'pipeline (512 in)':<22}{'input tok/s':>13}{'all tok/s':>13}{'real tok/s':>13}"
        f"{'x 400':>8}  target {TARGET_TOK_S} input tok/s"
    )
    for name, rates in pipeline_rates.items():
        verdict = "meets" if rates["input_tok_s"] >= TARGET_TOK_S else "misses"
        print(
            f"{name:<22}{rates['input_tok_s']:>13,.0f}{rates['all_tok_s']:>13,.0f}"
            f"{rates['real_tok_s']:>13,.0f}{rates['input_tok_s'] / 400:>8.1f}  {verdict}"
        )

    settings = [("threads", int(t)) for t in args.threads.split(",") if t and int(t) > 0]
    settings += [("workers", int(w)) for w in args.workers.split(",") if w and int(w) > 0]
    scaling = {}
    print(f"\n{'scaling (512 in)':<22}{'objective':<18}{'input tok/s':>13}{'x 0':>8}{'cores':>7}")
    for objective in ("span_corruption", "pseudo_summary"):
        base = None
        for kind, count in [("base", 0), *settings]:
            rates = bench_pipeline(
                tokenizer,
                index,
                objective,
                max(min_seconds, 1.0),
                args.batch_size,
                num_threads=count if kind == "threads" else 0,
                num_workers=count if kind == "workers" else 0,
            )
            base = base or rates["input_tok_s"]
            rates["speedup"] = rates["input_tok_s"] / base
            name = "0 threads/workers" if kind == "base" else f"{count} {kind}"
            scaling[f"{objective}/{kind}/{count}"] = rates
            print(
                f"{name:<22}{objective:<18}{rates['input_tok_s']:>13,.0f}"
                f"{rates['speedup']:>8.2f}{rates['cores']:>7.2f}"
            )
    shutil.rmtree(directory)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "quick": args.quick,
                    "tokenize_tok_s": encode_rate,
                    "objective_tok_s": objective_rates,
                    "pipeline": pipeline_rates,
                    "worker_scaling": scaling,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
