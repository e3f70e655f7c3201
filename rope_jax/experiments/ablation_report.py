"""Markdown tables of the position x attention ablation: mean ± sample standard deviation
over seeds (``ablation_measure.aggregate``), with n."""

from __future__ import annotations

from typing import Any


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _fmt_spread(mean, std) -> str:
    """``mean ± std`` (std of one seed is undefined and left out)."""
    return _fmt(mean) if std is None or mean is None else f"{mean:.3f} ± {std:.3f}"


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
        f"in nats, mean ± sample standard deviation over n = {len(results['seeds'])} "
        f"seed(s) {results['seeds']} (data order, masks and initialisation; one seed shows "
        f"no spread). Tracks: {listed}"
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
        + f" | beyond L @{longest} | n | train s |",
        "|---|---|---:|" + "---:|" * len(lengths) + "---:|---:|---:|",
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
                cells.append(_fmt_spread(entry.get("mean_loss"), entry.get("mean_loss_std")))
        at_longest = run["lengths"].get(str(longest), {})
        beyond = _fmt_spread(
            at_longest.get("loss_beyond_train_length"),
            at_longest.get("loss_beyond_train_length_std"),
        )
        shared = "" if run["trained_as"] == name else f" (= {run['trained_as']})"
        train = _fmt_spread(run["final_train_loss"], run["final_train_loss_std"])
        lines.append(
            f"| {run['kernel']} | {run['position']}{shared} | {train} | "
            + " | ".join(cells)
            + f" | {beyond} | {run['num_seeds']} | {run['train_seconds']:.0f} |"
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
        entry = run.get("lengths", {}).get(str(longest), {})
        means = entry.get("range_losses")
        if means is None:
            continue
        stds = entry.get("range_losses_std") or [None] * len(means)
        cells = " | ".join(_fmt_spread(m, s) for m, s in zip(means, stds, strict=True))
        lines.append(f"| {run['kernel']} | {run['position']} | {cells} |")
    return lines
