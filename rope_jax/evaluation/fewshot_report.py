"""The few-shot table: mean ± standard deviation over seeds per task, plus the average.

Laid out as the FewGLUE table of "GPT Understands, Too" (Liu et al. 2021, Table 1): one row
per method, one column per task with its official metrics (BoolQ Acc., CB Acc./F1, WiC
Acc., RTE Acc., MultiRC EM/F1a, WSC Acc., COPA Acc., ReCoRD Acc./F1 as EM/F1), then the
average of the task scores (``superglue/score``: the mean of a task's metrics). Values are
x100; the spread is the sample standard deviation (``ddof=1``) over seeds, "-" for one seed.
``write`` saves ``fewshot.md`` (markdown) and ``fewshot.json`` (every value per seed).
"""

from __future__ import annotations

import json
import os

import numpy as np

# Column order and metrics of the paper's table.
COLUMNS = (
    ("BoolQ", ("accuracy",)),
    ("CB", ("accuracy", "f1")),
    ("WiC", ("accuracy",)),
    ("RTE", ("accuracy",)),
    ("MultiRC", ("em", "f1a")),
    ("WSC", ("accuracy",)),
    ("COPA", ("accuracy",)),
    ("ReCoRD", ("em", "f1")),
)
_NAMES = {"accuracy": "Acc.", "f1": "F1", "em": "EM", "f1a": "F1a"}


def mean_std(values) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), (float(values.std(ddof=1)) if len(values) > 1 else None)


def summarize(by_seed: dict[int, dict[str, dict[str, float]]]) -> dict:
    """``{task: {metric: {"mean", "std", "values"}}, "average": {...}}`` (x100)."""
    seeds = sorted(by_seed)
    out: dict = {}
    for task, metrics in COLUMNS:
        if not all(task in by_seed[s] for s in seeds):
            continue
        out[task] = {}
        for metric in (*metrics, "score"):
            values = [100 * by_seed[s][task][metric] for s in seeds if metric in by_seed[s][task]]
            if len(values) == len(seeds):
                mean, std = mean_std(values)
                out[task][metric] = {"mean": mean, "std": std, "values": values}
    scored = [t for t in out if "score" in out[t]]
    if scored:
        per_seed = [
            np.mean([out[t]["score"]["values"][i] for t in scored]) for i in range(len(seeds))
        ]
        mean, std = mean_std(per_seed)
        out["average"] = {"mean": mean, "std": std, "values": [float(v) for v in per_seed]}
    return out


def _cell(entry: dict) -> str:
    std = entry["std"]
    return f"{entry['mean']:.1f}" + ("" if std is None else f" ±{std:.1f}")


def markdown(summary: dict, method: str, num_seeds: int) -> str:
    tasks = [(t, m) for t, m in COLUMNS if t in summary]
    header = ["Method"] + [f"{t} ({'/'.join(_NAMES[x] for x in m)})" for t, m in tasks] + ["Avg"]
    row = [method]
    for task, metrics in tasks:
        row.append(" / ".join(_cell(summary[task][m]) for m in metrics if m in summary[task]))
    row.append(_cell(summary["average"]) if "average" in summary else "-")
    lines = [
        f"Mean ± std (ddof=1) over {num_seeds} seed(s), x100.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        "| " + " | ".join(row) + " |",
    ]
    return "\n".join(lines)


def write(workdir: str, by_seed: dict, config) -> str:
    """Writes ``fewshot.md`` and ``fewshot.json``; returns the markdown."""
    summary = summarize(by_seed)
    pattern = "default" if config.pattern_id is None else str(config.pattern_id)
    method = f"{config.method} (pattern {pattern}{', LM frozen' if config.freeze_lm else ''})"
    table = markdown(summary, method, len(by_seed))
    with open(os.path.join(workdir, "fewshot.md"), "w") as f:
        f.write(table + "\n")
    record = {"method": method, "seeds": sorted(by_seed), "summary": summary}
    with open(os.path.join(workdir, "fewshot.json"), "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
    return table
