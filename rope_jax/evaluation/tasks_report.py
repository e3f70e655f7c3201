"""Printed and markdown tables of SuperGLUE results."""

from __future__ import annotations

# Column order of the leaderboard: the metrics each task reports.
_METRIC_ORDER = ("score", "accuracy", "f1", "f1a", "em", "mcc", "gender_parity")


def _cells(metrics: dict[str, float]) -> str:
    shown = [f"{name} {100 * metrics[name]:.1f}" for name in _METRIC_ORDER if name in metrics]
    return ", ".join(shown) if shown else "(no labels: predictions only)"


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    """One row per evaluated split: task, examples, official metrics (x100), invalid outputs."""
    lines = ["| task | examples | metrics | invalid |", "|---|---:|---|---:|"]
    for name, metrics in results.items():
        examples = int(metrics.get("num_examples", 0))
        invalid = metrics.get("invalid_fraction")
        invalid_cell = "-" if invalid is None else f"{100 * invalid:.1f}%"
        lines.append(f"| {name} | {examples} | {_cells(metrics)} | {invalid_cell} |")
    return "\n".join(lines)


def average_score(results: dict[str, dict[str, float]]) -> float | None:
    """Mean leaderboard score over the validation results (diagnostics excluded)."""
    scores = [
        m["score"]
        for name, m in results.items()
        if "score" in m and "/" not in name and not name.startswith("AX-")
    ]
    return sum(scores) / len(scores) if scores else None


def summary_markdown(results: dict[str, dict[str, float]], config) -> str:
    average = average_score(results)
    header = [
        "# SuperGLUE results",
        "",
        f"- init_checkpoint: `{config.init_checkpoint or 'random init'}`",
        f"- train split: `{config.train_split}` from `{config.train_data_dir or config.data_dir}`",
        f"- eval split: `{config.eval_split}`; steps {config.num_train_steps}, "
        f"batch {config.batch_size}",
        f"- average score: {'-' if average is None else f'{100 * average:.1f}'}",
        "",
    ]
    return "\n".join(header) + "\n" + markdown_table(results) + "\n"
