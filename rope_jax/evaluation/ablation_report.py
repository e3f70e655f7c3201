"""Markdown table and matplotlib plots of the position x attention ablation."""

from __future__ import annotations

import os
from typing import Any


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(results: dict[str, Any]) -> str:
    """One row per run: mean loss at each evaluated length and the loss beyond L at the
    longest; skipped pairs and lengths listed with their reasons below the table."""
    L = results["train_length"]
    lengths = [L * m for m in results["eval_multipliers"]]
    longest = max(lengths)
    lines = [
        "# Position encoding x attention: loss by evaluation length",
        "",
        f"Decoder-only causal LM trained at L = {L} for {results['num_train_steps']} steps "
        f"(batch {results['batch_size']}, tokenizer {results['tokenizer']}); next-token loss "
        f"(nats) on {results['num_eval_windows']} held-out windows. "
        f"'beyond L' = mean loss of positions >= {L} at length {longest}.",
        "",
        "| kernel | position | train loss | "
        + " | ".join(f"loss @{n}" for n in lengths)
        + f" | beyond L @{longest} | train s |",
        "|---|---|---:|" + "---:|" * len(lengths) + "---:|---:|",
    ]
    skipped: dict[str, list[str]] = {}  # reason -> what it applies to, listed once
    for name, run in results["runs"].items():
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
    lines += ["", *_range_table(results, longest)]
    if skipped:
        lines += ["", "Not run:"]
        lines += [f"- {', '.join(names)}: {reason}" for reason, names in skipped.items()]
    return "\n".join(lines) + "\n"


def _range_table(results: dict[str, Any], longest: int) -> list[str]:
    """Loss at the longest length per range of L positions: where extrapolation breaks."""
    L = results["train_length"]
    ranges = [(start, min(start + L, longest)) for start in range(0, longest, L)]
    lines = [
        f"Loss at length {longest} by position range (positions >= {L} were never trained):",
        "",
        "| kernel | position | " + " | ".join(f"{a}-{b - 1}" for a, b in ranges) + " |",
        "|---|---|" + "---:|" * len(ranges),
    ]
    for run in results["runs"].values():
        curve = run.get("lengths", {}).get(str(longest), {}).get("position_losses")
        if curve is None:
            continue
        means = [sum(curve[a:b]) / (b - a) for a, b in ranges]
        lines.append(
            f"| {run['kernel']} | {run['position']} | " + " | ".join(_fmt(m) for m in means) + " |"
        )
    return lines


def plot_run(run: dict[str, Any], name: str, train_length: int, directory: str) -> str:
    """PNG of loss against position: per-position loss at the longest length (light) and
    bucket means at every evaluated length (lines with markers), training length marked.

    In a causal model the loss at a position does not depend on how many tokens follow, so
    the lengths coincide where they overlap unless the encoding depends on the evaluation
    length (position interpolation); the markers keep each length visible.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    figure, axes = plt.subplots(figsize=(6, 3.5))
    evaluated = sorted(
        ((int(n), e) for n, e in run["lengths"].items() if "position_losses" in e),
        key=lambda item: item[0],
    )
    if evaluated:
        longest, entry = evaluated[-1]
        axes.plot(entry["position_losses"], color="0.8", linewidth=0.8, label="per position")
    markers = "osd^v"
    for i, (length, entry) in enumerate(evaluated):
        buckets = entry["bucket_losses"]
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
    axes.set_ylabel("next-token loss (nats)")
    axes.set_title(name)
    axes.legend(fontsize=7)
    figure.tight_layout()
    path = os.path.join(directory, f"{name}.png")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
