"""Markdown tables and matplotlib plots of the position x attention ablation."""

from __future__ import annotations

import math
import os
from typing import Any


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(results: dict[str, Any]) -> str:
    """One section per track: a row per run with the mean loss at each evaluated length and
    the loss beyond L at the longest, the loss by range of L positions at the longest, and
    the skipped pairs and lengths with their reasons."""
    L = results["train_length"]
    tracks = results["tracks"]
    listed = ", ".join(f"`{name}` ({section['loss']})" for name, section in tracks.items())
    lines = [
        "# Position encoding x attention: loss by evaluation length",
        "",
        f"Every cell trains at L = {L} for {results['num_train_steps']} steps (batch "
        f"{results['batch_size']}, tokenizer {results['tokenizer']}) and is evaluated on "
        f"{results['num_eval_windows']} held-out windows, the same for every cell. Losses are "
        f"in nats. Tracks: {listed}"
        + (
            "; they measure different tasks and are not comparable across tracks."
            if len(tracks) > 1
            else "."
        ),
    ]
    for section in tracks.values():
        lines += ["", *_track_section(results, section)]
    return "\n".join(lines) + "\n"


def _track_header(results: dict[str, Any], section: dict[str, Any]) -> str:
    L = results["train_length"]
    longest = L * max(results["eval_multipliers"])
    if section["track"] == "mlm":
        what = (
            f"masked-token loss: {section['mask_rate']:.0%} of the tokens of each window of "
            f"{longest} selected once with the fixed seed {section['eval_mask_seed']} (BERT's "
            f"80/10/10 replacement), shorter lengths being its prefixes: the same masks for "
            f"every cell and, at positions < {L}, at every length; the loss is averaged over "
            f"the selected tokens. The encoder is bidirectional: at lengths > {L}, positions "
            f"< {L} also see the tokens beyond {L}"
        )
    else:
        what = "next-token loss over every position"
    return (
        f"{section['description']} ({section['model_family']} family); {what}. "
        f"'beyond L' = mean {section['loss']} of positions >= {L} at length {longest}."
    )


def _track_section(results: dict[str, Any], section: dict[str, Any]) -> list[str]:
    L = results["train_length"]
    lengths = [L * m for m in results["eval_multipliers"]]
    longest = max(lengths)
    lines = [
        f"## Track `{section['track']}`: {section['loss']}",
        "",
        _track_header(results, section),
        "",
        "| kernel | position | train loss | "
        + " | ".join(f"loss @{n}" for n in lengths)
        + f" | beyond L @{longest} | train s |",
        "|---|---|---:|" + "---:|" * len(lengths) + "---:|---:|",
    ]
    skipped: dict[str, list[str]] = {}  # reason -> what it applies to, listed once
    for name, run in section["runs"].items():
        if "skipped" in run:
            skipped.setdefault(run["skipped"], []).append(f"{run['kernel']} x {run['position']}")
            continue
        cells = []
        for n in lengths:
            entry = run["lengths"].get(str(n), {})
            if "skipped" in entry:
                cells.append("n/a")
                if n == longest:
                    skipped.setdefault(entry["skipped"], []).append(f"{name} beyond {L}")
            else:
                cells.append(_fmt(entry.get("mean_loss")))
        beyond = run["lengths"].get(str(longest), {}).get("loss_beyond_train_length")
        shared = "" if run["trained_as"] == name else f" (= {run['trained_as']})"
        lines.append(
            f"| {run['kernel']} | {run['position']}{shared} | {_fmt(run['final_train_loss'])} | "
            + " | ".join(cells)
            + f" | {_fmt(beyond)} | {run['train_seconds']:.0f} |"
        )
    lines += ["", *_range_table(section, L, longest)]
    if skipped:
        lines += ["", f"Not run in `{section['track']}`:"]
        lines += [f"- {', '.join(names)}: {reason}" for reason, names in skipped.items()]
    return lines


def _range_table(section: dict[str, Any], L: int, longest: int) -> list[str]:
    """Loss at the longest length per range of L positions: where extrapolation breaks."""
    ranges = [(start, min(start + L, longest)) for start in range(0, longest, L)]
    lines = [
        f"{section['loss'].capitalize()} at length {longest} by position range (positions "
        f">= {L} were never trained). A column holds the same targets for every cell, so a "
        f"difference down a column (e.g. from `none`) is the model's; along a row the targets "
        f"change too.",
        "",
        "| kernel | position | " + " | ".join(f"{a}-{b - 1}" for a, b in ranges) + " |",
        "|---|---|" + "---:|" * len(ranges),
    ]
    for run in section["runs"].values():
        means = run.get("lengths", {}).get(str(longest), {}).get("range_losses")
        if means is None:
            continue
        lines.append(
            f"| {run['kernel']} | {run['position']} | " + " | ".join(_fmt(m) for m in means) + " |"
        )
    return lines


def plot_run(
    run: dict[str, Any],
    name: str,
    train_length: int,
    directory: str,
    *,
    ylabel: str = "next-token loss (nats)",
) -> str:
    """PNG ``<directory>/<name>.png`` of loss against position: per-position loss at the
    longest length (light) and bucket means at every evaluated length (lines with markers),
    training length marked.

    In a causal model the loss at a position does not depend on how many tokens follow, so
    the lengths coincide where they overlap unless the encoding depends on the evaluation
    length (position interpolation); in a bidirectional encoder every position sees the
    whole window, and the masked positions differ by length. The markers keep each length
    visible. Positions or buckets without a target (no masked token) are gaps.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def values(losses):
        return [math.nan if x is None else x for x in losses]

    os.makedirs(directory, exist_ok=True)
    figure, axes = plt.subplots(figsize=(6, 3.5))
    evaluated = sorted(
        ((int(n), e) for n, e in run["lengths"].items() if "position_losses" in e),
        key=lambda item: item[0],
    )
    if evaluated:
        longest, entry = evaluated[-1]
        axes.plot(
            values(entry["position_losses"]), color="0.8", linewidth=0.8, label="per position"
        )
    markers = "osd^v"
    for i, (length, entry) in enumerate(evaluated):
        buckets = values(entry["bucket_losses"])
        width = length / len(buckets)
        centres = [width * (k + 0.5) for k in range(len(buckets))]
        axes.plot(
            centres,
            buckets,
            marker=markers[i % len(markers)],
            markersize=4,
            linewidth=1.2,
            label=f"length {length} (bucket means)",
        )
    axes.axvline(train_length, color="gray", linestyle="--", linewidth=1, label="train length")
    axes.set_xlabel("position")
    axes.set_ylabel(ylabel)
    axes.set_title(name)
    axes.legend(fontsize=7)
    figure.tight_layout()
    path = os.path.join(directory, f"{name}.png")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
