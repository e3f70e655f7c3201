"""Figures that compare the cells of the ablation (matplotlib, Agg backend: no display).

* ``<track>_<kernel>.png``: every position encoding's loss by position (bucket means at
  the longest length it was evaluated at) on the same axes, the band between the lowest and
  highest seed shaded, the training length marked by a vertical line.
* ``<track>_heatmap.png``: kernel x position encoding, mean loss at 1x and at the largest
  multiple of the training length; cells without a value (a pair the model rejects, a
  learned table beyond its rows) are hatched.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _values(items) -> np.ndarray:
    return np.array([math.nan if x is None else x for x in items], np.float64)


def _grid_axes(section: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Kernels and positions of the track's grid, in grid order."""
    runs = section["runs"].values()
    kernels = list(dict.fromkeys(run["kernel"] for run in runs))
    positions = list(dict.fromkeys(run["position"] for run in runs))
    return kernels, positions


def _longest_entry(run: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
    evaluated = [(int(n), e) for n, e in run.get("lengths", {}).items() if "bucket_losses" in e]
    return max(evaluated, key=lambda item: item[0]) if evaluated else None


def plot_kernel(results: dict[str, Any], section: dict[str, Any], kernel: str, directory: str):
    """One kernel of one track: a curve per position encoding; returns the PNG path, or
    None when every pair with this kernel was skipped."""
    plt = _pyplot()
    L = results["train_length"]
    runs = [r for r in section["runs"].values() if r["kernel"] == kernel and "skipped" not in r]
    if not runs:
        return None
    figure, axes = plt.subplots(figsize=(7, 4))
    for run in runs:
        found = _longest_entry(run)
        if found is None:
            continue
        length, entry = found
        means = _values(entry["bucket_losses"])
        width = length / len(means)
        centres = width * (np.arange(len(means)) + 0.5)
        (line,) = axes.plot(centres, means, marker="o", markersize=3, label=run["position"])
        if run["num_seeds"] > 1:
            low, high = _values(entry["bucket_losses_min"]), _values(entry["bucket_losses_max"])
            axes.fill_between(centres, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    axes.axvline(L, color="gray", linestyle="--", linewidth=1, label=f"train length {L}")
    seeds = len(results["seeds"])
    band = f"; band: min..max over {seeds} seeds" if seeds > 1 else ""
    axes.set_title(f"{section['track']}: {kernel} attention (bucket means{band})", fontsize=9)
    axes.set_xlabel("position")
    axes.set_ylabel(f"{section['loss']} (nats)")
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{section['track']}_{kernel}.png")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def heatmap_values(
    section: dict[str, Any], kernels: list[str], positions: list[str], length: int
) -> np.ndarray:
    """``[kernel, position]`` mean loss at ``length`` from the JSON; NaN where none."""
    values = np.full((len(kernels), len(positions)), np.nan)
    for run in section["runs"].values():
        entry = run.get("lengths", {}).get(str(length), {})
        if entry.get("mean_loss") is not None:
            values[kernels.index(run["kernel"]), positions.index(run["position"])] = entry[
                "mean_loss"
            ]
    return values


def plot_heatmap(
    results: dict[str, Any], section: dict[str, Any], directory: str
) -> tuple[str, dict[int, np.ndarray]]:
    """The grid as heat maps at 1x and the largest multiple of L. Returns the PNG path and,
    per multiple, the array the image shows (read back from it, NaN = hatched)."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    L = results["train_length"]
    multiples = sorted({1, max(results["eval_multipliers"])})
    kernels, positions = _grid_axes(section)
    figure, panels = plt.subplots(
        1,
        len(multiples),
        figsize=(1.0 + 0.9 * len(positions) * len(multiples), 1.4 + 0.5 * len(kernels)),
        squeeze=False,
    )
    drawn = {}
    for axes, multiple in zip(panels[0], multiples, strict=True):
        values = heatmap_values(section, kernels, positions, L * multiple)
        # Masked cells are transparent and show the hatched rectangle behind the image.
        axes.add_patch(
            Rectangle(
                (-0.5, -0.5),
                len(positions),
                len(kernels),
                fill=False,
                hatch="///",
                edgecolor="0.7",
                zorder=0,
            )
        )
        image = axes.imshow(np.ma.masked_invalid(values), cmap="viridis_r", zorder=1)
        drawn[multiple] = np.ma.filled(np.ma.asarray(image.get_array(), np.float64), np.nan)
        for (i, j), value in np.ndenumerate(values):
            if np.isfinite(value):
                axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w")
        axes.set_xticks(range(len(positions)), positions, rotation=45, ha="right", fontsize=7)
        axes.set_yticks(range(len(kernels)), kernels, fontsize=7)
        axes.set_title(f"length {L * multiple} ({multiple}x L)", fontsize=9)
        figure.colorbar(image, ax=axes, shrink=0.8)
    figure.suptitle(f"{section['track']}: mean {section['loss']} (nats; hatched = not run)")
    figure.tight_layout()
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{section['track']}_heatmap.png")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path, drawn


def plot_all(results: dict[str, Any], directory: str) -> list[str]:
    """Every figure of every track; returns the paths written."""
    paths = []
    for section in results["tracks"].values():
        kernels, _ = _grid_axes(section)
        paths += [p for k in kernels if (p := plot_kernel(results, section, k, directory))]
        paths.append(plot_heatmap(results, section, directory)[0])
    return paths
