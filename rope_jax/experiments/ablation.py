"""Position encoding x attention kernel ablation: length extrapolation of short pretraining runs.

The grid runs once per track (``config.tracks``): ``causal_lm``, a decoder-only causal LM
evaluated by next-token loss, and ``mlm``, a bidirectional encoder with BERT's MLM head and
masking evaluated by masked-token loss, the track where Nystrom attention (no causal form)
takes part. The two tracks measure different tasks: their losses are not comparable.

Every cell (``ablation_grid``) is a complete pretraining config that ``train.py`` runs as
it is: ``config.train`` (model, windowed data of ``data.inputs_length = L`` tokens, bytes or
SentencePiece tokenizer, optimizer, mesh) with the cell's kernel, position, family and
objective, trained ``num_seeds`` times with seeds ``train.seed, train.seed + 1, ...`` (data
order, masks and initialisation). Each run then is measured on the same held-out windows at
``k x L`` for ``k`` in ``eval_multipliers`` (``ablation_measure``), and the seeds are
summarised as mean, sample standard deviation, min and max.

Positions (``config.positions``, or ``config.<track>.positions`` for one track; likewise
kernels): ``none``, ``sinusoidal``, ``learned`` (a table of L rows; nothing beyond L),
``learned_hierarchical`` (the same trained table extended to L^2 positions by hierarchical
decomposition at evaluation), ``rope`` (interleaved pairs, RoFormer), ``rope_half``
(half-split pairs, GPT-NeoX), ``rope_interpolation`` (the rope model evaluated with
positions scaled by L / L_eval, Chen et al. 2023 without fine-tuning), ``t5_bias`` and
``alibi``.

Outputs in ``workdir``: ``ablation.md`` (a section per track), ``ablation.json`` (every
number, per seed and over seeds), ``plots/<track>_<kernel>.png`` (every position encoding's
loss by position, seed band, training length marked), ``plots/<track>_heatmap.png`` (kernel
x position at 1x and at the largest multiple of L), and ``runs/<track>/<kernel>_<training
key>/seed<seed>/`` (each run's workdir: config, checkpoints, metrics; a rerun resumes).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
from absl import logging

from rope_jax import families
from rope_jax.experiments import ablation_measure as measure
from rope_jax.experiments import ablation_plots, ablation_report
from rope_jax.experiments.ablation_grid import TRACKS, Cell, grid, seeded, seeds, train_length

RERUN = "python train.py --config=configs/recorded.py:{path} --workdir=<new workdir>"


def _check(config) -> list[str]:
    tracks = list(config.tracks)
    unknown = [t for t in tracks if t not in TRACKS]
    if unknown or not tracks:
        raise ValueError(f"config.tracks={tracks}: choose one or more of {sorted(TRACKS)}")
    seeds(config)
    if config.train.data.sampling != "windows":
        raise ValueError(
            f"train.data.sampling={config.train.data.sampling!r}: the ablation trains on "
            "windows of exactly L tokens; set --config.train.data.sampling=windows"
        )
    return tracks


def _shared_tokenizer(config, workdir: str):
    """The tokenizer every cell uses; a SentencePiece model trained here (once, cached in
    ``<workdir>/tokenizer``) is written into the cells' configs as ``tokenizer.path``."""
    from rope_jax.training import trainer

    documents = trainer.build_corpus(config.train)
    tokenizer = trainer.build_tokenizer(config.train, workdir, documents=documents)
    if config.train.tokenizer.kind == "sentencepiece" and not config.train.tokenizer.path:
        path = os.path.abspath(os.path.join(workdir, "tokenizer", "spm.model"))
        config.train.tokenizer.path = path
    return documents, tokenizer


def _train(run_config, run_dir: str, config):
    from rope_jax.training import interrupts, trainer

    devices = jax.devices()[:1] if config.single_device else None
    started = time.perf_counter()
    result = trainer.train_and_evaluate(run_config, run_dir, devices=devices)
    seconds = time.perf_counter() - started
    if result.stop_signal is not None:
        # Ctrl-C or SIGTERM: the run's checkpoint is saved; stop the grid (a re-run resumes).
        raise interrupts.StoppedBySignal(result.stop_signal)
    variables = families.variables_of(
        jax.device_get(result.state.params), jax.device_get(result.state.random_features)
    )
    last = result.history[max(result.history)] if result.history else {}
    info = {"train_seconds": seconds, "final_train_loss": last.get("loss", float("nan"))}
    return variables, info


def _write_json(results: dict[str, Any], workdir: str) -> None:
    path = os.path.join(workdir, "ablation.json")
    with open(f"{path}.tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(f"{path}.tmp", path)


def _evaluate(cell: Cell, variables, batches, config, bucket: int) -> dict[str, Any]:
    from rope_jax.experiments.ablation_grid import eval_model_dict
    from rope_jax.model_config import model_config_from_dict
    from rope_jax.models import build_model

    L = train_length(config)
    lengths: dict[str, Any] = {}
    for length, batch in batches.items():
        model_dict = eval_model_dict(cell, length)
        if model_dict is None:
            lengths[str(length)] = {
                "skipped": f"a learned table of {L} rows has no position beyond {L}"
            }
            continue
        model = build_model(model_config_from_dict(model_dict))
        sums, weights = measure.position_losses(model, variables, batch, config.eval_batch_size)
        lengths[str(length)] = measure.length_summary(sums, weights, L, bucket)
    return lengths


def _summarise(run: dict[str, Any]) -> None:
    """``run["lengths"]`` and the train loss over the seeds in ``run["seeds"]``."""
    per_seed = list(run["seeds"].values())
    train = measure.aggregate([s["final_train_loss"] for s in per_seed])
    run["final_train_loss"], run["final_train_loss_std"] = train["mean"], train["std"]
    run["train_seconds"] = sum(s["train_seconds"] for s in per_seed)
    run["num_seeds"] = len(per_seed)
    run["lengths"] = {}
    for length, entry in per_seed[0]["lengths"].items():
        if "skipped" in entry:
            run["lengths"][length] = entry
        else:
            summaries = [s["lengths"][length] for s in per_seed]
            run["lengths"][length] = measure.aggregate_lengths(summaries)


def _run_track(track: str, config, workdir, tokenizer, windows, results) -> None:
    """Trains and evaluates every cell of ``track`` into ``results["tracks"][track]``."""
    spec = TRACKS[track]
    L = train_length(config)
    section: dict[str, Any] = {
        "track": track,
        "model_family": spec.family,
        "loss": spec.loss_name,
        "description": spec.description,
        "runs": {},
    }
    if track == "mlm":
        section.update(
            mask_rate=config.train.data.mlm_rate, eval_mask_seed=config.mlm.eval_mask_seed
        )
    results["tracks"][track] = section
    lengths = [L * multiplier for multiplier in config.eval_multipliers]
    batches = measure.eval_batches(
        spec.objective,
        windows,
        lengths,
        seed=config.mlm.eval_mask_seed,
        tokenizer=tokenizer,
        mlm_rate=config.train.data.mlm_rate,
    )
    trained: dict[tuple[str, int], tuple[Any, dict]] = {}
    for cell in grid(config, track):
        run: dict[str, Any] = {"track": track, "kernel": cell.kernel, "position": cell.position}
        section["runs"][cell.name] = run
        if cell.skip_reason:
            run["skipped"] = cell.skip_reason
            logging.info("skip %s %s: %s", track, cell.name, cell.skip_reason)
            continue
        run.update(trained_as=cell.train_key, seeds={})
        for seed in seeds(config):
            run_dir = os.path.join(workdir, "runs", track, cell.train_key, f"seed{seed}")
            if (cell.train_key, seed) not in trained:
                logging.info("training %s %s seed %d", track, cell.train_key, seed)
                trained[cell.train_key, seed] = _train(seeded(cell, seed), run_dir, config)
            variables, info = trained[cell.train_key, seed]
            config_path = os.path.join(run_dir, "config.json")
            run["seeds"][str(seed)] = {
                **info,
                "config": config_path,
                "rerun": RERUN.format(path=config_path),
                "lengths": _evaluate(cell, variables, batches, config, results["bucket_width"]),
            }
        _summarise(run)
        _write_json(results, workdir)  # after every cell, so a long grid can be inspected


def run_ablation(config, workdir: str) -> dict[str, Any]:
    """Trains and evaluates every grid cell of every track and seed; writes the tables,
    JSON and figures."""
    from rope_jax.data import windows as windows_lib

    tracks = _check(config)
    os.makedirs(workdir, exist_ok=True)
    documents, tokenizer = _shared_tokenizer(config, workdir)
    L = train_length(config)
    held_out = windows_lib.token_stream(
        documents, tokenizer, eval_every=config.train.data.eval_every, held_out=True
    )
    # Wide enough for the causal track's shifted targets; MLM uses the same windows.
    width = L * max(config.eval_multipliers) + 1
    windows = windows_lib.eval_windows(held_out, width, config.eval_windows)
    results: dict[str, Any] = {
        "train_length": L,
        "eval_multipliers": list(config.eval_multipliers),
        "bucket_width": max(L // config.buckets_per_train_length, 1),
        "num_eval_windows": int(len(windows)),
        "num_train_steps": config.train.num_train_steps,
        "batch_size": config.train.batch_size,
        "tokenizer": config.train.tokenizer.kind,
        "seeds": seeds(config),
        "model": config.train.model.to_dict(),
        "tracks": {},
    }
    for track in tracks:
        _run_track(track, config, workdir, tokenizer, windows, results)
    _write_json(results, workdir)
    figures = ablation_plots.plot_all(results, os.path.join(workdir, "plots"))
    logging.info("figures: %s", ", ".join(figures))
    table = ablation_report.markdown(results)
    with open(os.path.join(workdir, "ablation.md"), "w") as f:
        f.write(table)
    print(table)
    return results
