"""Prediction files in the SuperGLUE leaderboard's conventions.

One JSON object per line, ``{"idx": ..., "label": ...}`` in the order of the input file,
with the label spelled as the leaderboard expects (the conventions of the benchmark's
reference toolkit, jiant, used to produce the sample submissions):

* BoolQ, WiC: ``"true"`` / ``"false"``; WSC: ``"True"`` / ``"False"`` (capitalised, as
  both jiant and T5's ``prepare_submission`` write it);
* CB: ``"entailment"`` / ``"contradiction"`` / ``"neutral"``; RTE, AX-b, AX-g:
  ``"entailment"`` / ``"not_entailment"``;
* COPA: the chosen alternative as an int, 0 or 1;
* MultiRC: one line per paragraph, ``{"idx": p, "passage": {"questions": [{"idx": q,
  "answers": [{"idx": a, "label": 0|1}, ...]}, ...]}}``;
* ReCoRD: ``{"idx": <query idx>, "label": <answer text>}``.

Two kinds of file, for two readers:

* the prediction file of a scored split, ``predictions/<Task>_<split>.jsonl``, holds what the
  metrics scored: an output that is not a valid answer (None) is ``"label": null`` with the
  model's text beside it (``"decoded"``), so the official metrics recomputed from the file
  (null = wrong, see :mod:`.metrics`) equal ``metrics.json``;
* the leaderboard file of a test split, ``submission/<Task>.jsonl`` (named after the
  leaderboard task: ``CB.jsonl``, ``AX-b.jsonl``, ...), needs a label on every line: an
  invalid output is written as the task's first label, and the evaluator reports how many
  were filled (``filled_labels`` in ``metrics.json``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from rope_jax.evaluation.readers import LABEL_NAMES

_TRUE_FALSE_TASKS = ("BoolQ", "WiC")


def leaderboard_label(task: str, prediction: Any, *, fill_invalid: bool = True) -> Any:
    """``prediction`` spelled as the leaderboard expects; None (not a valid answer) becomes
    the task's first label, or stays None when ``fill_invalid`` is False."""
    if prediction is None and not fill_invalid:
        return None
    if task == "ReCoRD":
        return "" if prediction is None else str(prediction)
    if prediction is None:
        prediction = LABEL_NAMES[task][0]
    if prediction not in LABEL_NAMES[task] or isinstance(prediction, bool) != isinstance(
        LABEL_NAMES[task][0], bool
    ):
        raise ValueError(f"{prediction!r} is not a {task} label {list(LABEL_NAMES[task])}")
    if task in _TRUE_FALSE_TASKS:
        return "true" if prediction else "false"
    if task == "WSC":
        return "True" if prediction else "False"
    if task == "MultiRC":
        return int(prediction)
    if task == "COPA":
        return int(prediction)
    return prediction


def prediction_lines(
    task: str,
    records: Sequence[dict],
    predictions: Sequence,
    *,
    fill_invalid: bool = True,
    texts: Sequence[str] | None = None,
) -> list[dict]:
    """The JSON objects of a prediction file, in record order.

    ``fill_invalid`` False: a None prediction is ``"label": null`` plus ``"decoded"`` (its
    entry of ``texts``, the model's decoded outputs, when given).
    """
    if len(records) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} {task} records")
    if texts is not None and len(texts) != len(predictions):
        raise ValueError(f"{len(texts)} decoded texts for {len(predictions)} {task} predictions")

    def entry(idx, i: int) -> dict:
        label = leaderboard_label(task, predictions[i], fill_invalid=fill_invalid)
        line = {"idx": idx, "label": label}
        if label is None and texts is not None:
            line["decoded"] = texts[i]
        return line

    if task != "MultiRC":
        return [entry(r["idx"], i) for i, r in enumerate(records)]
    # Regroup the flattened answer options: paragraph -> question -> answers, keeping order.
    paragraphs: dict[int, dict[int, list[dict]]] = {}
    for i, r in enumerate(records):
        idx = r["idx"]
        questions = paragraphs.setdefault(idx["paragraph"], {})
        questions.setdefault(idx["question"], []).append(entry(idx["answer"], i))
    return [
        {
            "idx": paragraph,
            "passage": {
                "questions": [{"idx": q, "answers": answers} for q, answers in questions.items()]
            },
        }
        for paragraph, questions in paragraphs.items()
    ]


def write_jsonl(path: str, lines: Sequence[dict]) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return path


def validation_path(workdir: str, task: str, split: str = "val") -> str:
    return os.path.join(workdir, "predictions", f"{task}_{split}.jsonl")


def submission_path(workdir: str, task: str) -> str:
    return os.path.join(workdir, "submission", f"{task}.jsonl")


def write_scored(
    workdir: str,
    task: str,
    split: str,
    records: Sequence[dict],
    predictions: Sequence,
    *,
    texts: Sequence[str] | None = None,
) -> str:
    """``<workdir>/predictions/<Task>_<split>.jsonl``: invalid outputs null, with their
    decoded ``texts`` when given."""
    lines = prediction_lines(task, records, predictions, fill_invalid=False, texts=texts)
    return write_jsonl(validation_path(workdir, task, split), lines)


def write_submission(workdir: str, task: str, records: Sequence[dict], predictions: Sequence):
    """``<workdir>/submission/<Task>.jsonl`` with a label on every line; returns the path and
    the number of labels filled in for invalid outputs."""
    lines = prediction_lines(task, records, predictions)
    path = write_jsonl(submission_path(workdir, task), lines)
    return path, sum(p is None for p in predictions)


def write_predictions(
    workdir: str,
    task: str,
    split: str,
    records: Sequence[dict],
    predictions: Sequence,
    *,
    texts: Sequence[str] | None = None,
) -> str:
    """The leaderboard file for the test split, else the scored prediction file."""
    if split == "test":
        return write_submission(workdir, task, records, predictions)[0]
    return write_scored(workdir, task, split, records, predictions, texts=texts)
