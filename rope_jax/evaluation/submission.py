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

Test-split files are named after the leaderboard task (``CB.jsonl``, ``AX-b.jsonl``, ...).
A prediction that could not be parsed (None) is written as the task's first label so that
a submission is always complete; the metrics count it as wrong.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from rope_jax.evaluation.readers import LABEL_NAMES

_TRUE_FALSE_TASKS = ("BoolQ", "WiC")


def leaderboard_label(task: str, prediction: Any) -> Any:
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


def prediction_lines(task: str, records: Sequence[dict], predictions: Sequence) -> list[dict]:
    """The JSON objects of a prediction file, in record order."""
    if len(records) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} {task} records")
    if task != "MultiRC":
        return [
            {"idx": r["idx"], "label": leaderboard_label(task, p)}
            for r, p in zip(records, predictions, strict=True)
        ]
    # Regroup the flattened answer options: paragraph -> question -> answers, keeping order.
    paragraphs: dict[int, dict[int, list[dict]]] = {}
    for r, p in zip(records, predictions, strict=True):
        idx = r["idx"]
        questions = paragraphs.setdefault(idx["paragraph"], {})
        answers = questions.setdefault(idx["question"], [])
        answers.append({"idx": idx["answer"], "label": leaderboard_label(task, p)})
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


def validation_path(workdir: str, task: str) -> str:
    return os.path.join(workdir, "predictions", f"{task}_val.jsonl")


def submission_path(workdir: str, task: str) -> str:
    return os.path.join(workdir, "submission", f"{task}.jsonl")


def write_predictions(
    workdir: str, task: str, split: str, records: Sequence[dict], predictions: Sequence
) -> str:
    """Writes ``<workdir>/predictions/<Task>_val.jsonl`` for the validation split, or the
    leaderboard file ``<workdir>/submission/<Task>.jsonl`` for the test split."""
    if split == "test":
        path = submission_path(workdir, task)
    else:
        path = os.path.join(workdir, "predictions", f"{task}_{split}.jsonl")
    return write_jsonl(path, prediction_lines(task, records, predictions))
