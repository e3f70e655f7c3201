"""Readers for SuperGLUE tasks in the official JSONL layout.

The layout is the one of the SuperGLUE distribution (https://super.gluebenchmark.com/tasks):
one folder per task with ``train.jsonl``, ``val.jsonl`` and ``test.jsonl`` (the diagnostics
have a single ``AX-b.jsonl`` / ``AX-g.jsonl``), one JSON object per line. Test records have no
``label``. Every reader returns plain, validated dicts ("records") with the same field names
as the files, flattened where the file nests:

* MultiRC: one record per answer option, ``idx = {"paragraph", "question", "answer"}``; the
  answers of one question stay adjacent, and metrics group them back by question.
* ReCoRD: one record per query (``qas`` entry), ``idx`` = the query idx; the candidate
  entities are read from ``passage.entities`` character offsets with an INCLUSIVE end, as in
  the official files; ``entities`` is the sorted set of their texts (as TFDS' ``super_glue``
  builder does), ``answers`` the sorted set of gold answer texts.
* WSC: span texts as TFDS ``super_glue/wsc.fixed`` gives them (T5's source: a span written
  "The demonstrators" for "the demonstrators" in the text gets the text's case), and span
  indices resolved to the word (of ``text.split(" ")``) where the span starts, at or near the
  file's index (the official validation file has a pronoun index one word early; see
  :mod:`rope_jax.evaluation.wsc`). ``span{1,2}_index`` is the resolved index,
  ``span{1,2}_start``/``_end`` its character offsets (exclusive end); trailing punctuation
  of the word is tolerated (the official data writes 'him,"' for "him").

A malformed record raises :class:`SuperGlueFormatError` whose message starts with
``<file>:<line>:``, with one exception: a WSC record whose span cannot be found near its
index is skipped with a warning naming file and line (and counted: :class:`Split`
``skipped``), except in a test split, where no record is ever dropped (a submission needs
every ``idx``): there it is kept with that span's index and offsets ``None`` and left
unmarked by the casts. A file with no records is an error naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

from absl import logging

from rope_jax.evaluation import wsc

TASKS = ("BoolQ", "CB", "COPA", "MultiRC", "ReCoRD", "RTE", "WiC", "WSC", "AX-b", "AX-g")
# The diagnostics ship as one file per task and are evaluated with a model trained on RTE.
DIAGNOSTIC_TASKS = ("AX-b", "AX-g")
SPLITS = ("train", "val", "test")

LABEL_NAMES: dict[str, tuple[Any, ...]] = {
    "BoolQ": (False, True),
    "CB": ("entailment", "contradiction", "neutral"),
    "COPA": (0, 1),
    "MultiRC": (False, True),
    "RTE": ("entailment", "not_entailment"),
    "WiC": (False, True),
    "WSC": (False, True),
    "AX-b": ("entailment", "not_entailment"),
    "AX-g": ("entailment", "not_entailment"),
}


class SuperGlueFormatError(ValueError):
    """A record that does not follow the official layout (message names file and line)."""


class _Where:
    """File + line of the record being read, for error messages."""

    def __init__(self, path: str, line: int):
        self.path, self.line = path, line

    def fail(self, message: str) -> SuperGlueFormatError:
        return SuperGlueFormatError(f"{self.path}:{self.line}: {message}")


def _get(obj: Any, key: str, kind: type | tuple[type, ...], where: _Where, *, ctx: str = ""):
    if not isinstance(obj, dict):
        raise where.fail(f"expected an object{ctx}, got {type(obj).__name__}")
    if key not in obj:
        raise where.fail(f"missing field {key!r}{ctx}")
    value = obj[key]
    # bool is an int in Python; an int field must not accept true/false and vice versa.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise where.fail(f"field {key!r}{ctx} must be {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise where.fail(f"field {key!r}{ctx} must be {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _label(obj: dict, task: str, where: _Where):
    """The label if present (train/val), else None (test); must be one of the task's labels."""
    if "label" not in obj:
        return None
    value = obj["label"]
    allowed = LABEL_NAMES[task]
    # Booleans are sometimes written as 0/1 (MultiRC answers); accept exactly those.
    if isinstance(allowed[0], bool) and value in (0, 1) and not isinstance(value, float):
        return bool(value)
    if isinstance(value, bool) != isinstance(allowed[0], bool) or value not in allowed:
        raise where.fail(f"label {value!r} is not one of {list(allowed)} for {task}")
    return value


def _text_pair(obj, where, fields):
    return {name: _get(obj, name, str, where) for name in fields}


def _read_simple(fields: tuple[str, ...], task: str):
    def read(obj: dict, where: _Where) -> list[dict]:
        record = {"idx": _get(obj, "idx", int, where), **_text_pair(obj, where, fields)}
        record["label"] = _label(obj, task, where)
        return [record]

    return read


def _read_wic(obj: dict, where: _Where) -> list[dict]:
    record = {"idx": _get(obj, "idx", int, where)}
    record.update(_text_pair(obj, where, ("word", "sentence1", "sentence2")))
    for k in ("1", "2"):
        start, end = _get(obj, "start" + k, int, where), _get(obj, "end" + k, int, where)
        if not 0 <= start < end <= len(record["sentence" + k]):
            raise where.fail(f"start{k}/end{k} = {start}/{end} outside sentence{k}")
        record["start" + k], record["end" + k] = start, end
    record["label"] = _label(obj, "WiC", where)
    return [record]


class _Unplaced(SuperGlueFormatError):
    """A record whose WSC span is not near its index; carries the record as far as read."""

    def __init__(self, message: str, record: dict):
        super().__init__(message)
        self.record = record


def _read_wsc(obj: dict, where: _Where) -> list[dict]:
    text = _get(obj, "text", str, where)
    target = _get(obj, "target", dict, where)
    record = {"idx": _get(obj, "idx", int, where), "text": text}
    problems = []
    for k in ("1", "2"):
        file_index = _get(target, f"span{k}_index", int, where, ctx=" in target")
        span = _get(target, f"span{k}_text", str, where, ctx=" in target")
        if not span.strip():
            raise where.fail(f"span{k}_text in target is empty")
        span = wsc.fixed_span_text(text, span, file_index)
        index = wsc.locate_span(text, file_index, span)
        record[f"span{k}_text"], record[f"span{k}_index"] = span, index
        record[f"span{k}_start"], record[f"span{k}_end"] = (
            (None, None) if index is None else wsc.char_offsets(text, index, span)
        )
        if index is None:
            problems.append(
                f"span{k}_text {span!r} is not within {wsc.MAX_SHIFT} words of "
                f"span{k}_index {file_index}"
            )
    record["label"] = _label(obj, "WSC", where)
    if problems:
        raise _Unplaced(f"{where.path}:{where.line}: " + "; ".join(problems), record)
    return [record]


def _read_multirc(obj: dict, where: _Where) -> list[dict]:
    paragraph_idx = _get(obj, "idx", int, where)
    passage = _get(obj, "passage", dict, where)
    paragraph = _get(passage, "text", str, where, ctx=" in passage")
    questions = _get(passage, "questions", list, where, ctx=" in passage")
    records = []
    for qi, question in enumerate(questions):
        ctx = f" in passage.questions[{qi}]"
        question_text = _get(question, "question", str, where, ctx=ctx)
        question_idx = _get(question, "idx", int, where, ctx=ctx)
        answers = _get(question, "answers", list, where, ctx=ctx)
        if not answers:
            raise where.fail(f"question {question_idx} has no answer options")
        for ai, answer in enumerate(answers):
            actx = f"{ctx}.answers[{ai}]"
            records.append(
                {
                    "idx": {
                        "paragraph": paragraph_idx,
                        "question": question_idx,
                        "answer": _get(answer, "idx", int, where, ctx=actx),
                    },
                    "paragraph": paragraph,
                    "question": question_text,
                    "answer": _get(answer, "text", str, where, ctx=actx),
                    "label": _label(answer, "MultiRC", where),
                }
            )
    return records


def _span_text(text: str, span: dict, where: _Where, ctx: str) -> str:
    start = _get(span, "start", int, where, ctx=ctx)
    end = _get(span, "end", int, where, ctx=ctx)
    if not 0 <= start <= end < len(text):
        raise where.fail(f"span start/end = {start}/{end}{ctx} outside the passage")
    return text[start : end + 1]  # the official end offset is inclusive


def _read_record(obj: dict, where: _Where) -> list[dict]:
    passage = _get(obj, "passage", dict, where)
    text = _get(passage, "text", str, where, ctx=" in passage")
    entity_spans = _get(passage, "entities", list, where, ctx=" in passage")
    spans = []
    for i, span in enumerate(entity_spans):
        ctx = f" in passage.entities[{i}]"
        span_text = _span_text(text, span, where, ctx)
        spans.append((span["start"], span["end"], span_text))
    records = []
    for qi, qa in enumerate(_get(obj, "qas", list, where)):
        ctx = f" in qas[{qi}]"
        query = _get(qa, "query", str, where, ctx=ctx)
        if "@placeholder" not in query:
            raise where.fail(f"query{ctx} has no @placeholder")
        answers = None
        if "answers" in qa:
            answers = set()
            for ai, answer in enumerate(_get(qa, "answers", list, where, ctx=ctx)):
                actx = f"{ctx}.answers[{ai}]"
                span_text = _span_text(text, answer, where, actx)
                answer_text = _get(answer, "text", str, where, ctx=actx)
                if span_text != answer_text:
                    raise where.fail(
                        f"answer text {answer_text!r}{actx} != passage span {span_text!r}"
                    )
                answers.add(answer_text)
        records.append(
            {
                "idx": _get(qa, "idx", int, where, ctx=ctx),
                "passage_idx": _get(obj, "idx", int, where),
                "passage": text,
                "query": query,
                "entity_spans": spans,
                "entities": sorted({s[2] for s in spans}),
                "answers": None if answers is None else sorted(answers),
            }
        )
    return records


def _read_copa(obj: dict, where: _Where) -> list[dict]:
    record = _read_simple(("premise", "choice1", "choice2", "question"), "COPA")(obj, where)[0]
    if record["question"] not in ("cause", "effect"):
        raise where.fail(f"COPA question must be 'cause' or 'effect', got {record['question']!r}")
    return [record]


def _read_axg(obj: dict, where: _Where) -> list[dict]:
    record = _read_simple(("premise", "hypothesis"), "AX-g")(obj, where)[0]
    record["pair_id"] = _get(obj, "pair_id", int, where)
    return [record]


_READERS: dict[str, Callable[[dict, _Where], list[dict]]] = {
    "BoolQ": _read_simple(("passage", "question"), "BoolQ"),
    "CB": _read_simple(("premise", "hypothesis"), "CB"),
    "COPA": _read_copa,
    "MultiRC": _read_multirc,
    "ReCoRD": _read_record,
    "RTE": _read_simple(("premise", "hypothesis"), "RTE"),
    "WiC": _read_wic,
    "WSC": _read_wsc,
    "AX-b": _read_simple(("sentence1", "sentence2"), "AX-b"),
    "AX-g": _read_axg,
}


@dataclasses.dataclass(frozen=True)
class Split:
    """The records of one split file, and the records that could not be used."""

    task: str
    split: str
    path: str
    records: list[dict]
    # "<file>:<line>: why" of each record skipped (WSC spans that could not be placed).
    skipped: tuple[str, ...] = ()


def read_file(task: str, path: str, split: str) -> Split:
    """All records of one task file, validated; errors name ``path:line``.

    ``split`` decides what happens to a record that cannot be placed (see module docstring):
    skipped with a warning, or kept when ``split == "test"``. An empty file is an error.
    """
    if task not in _READERS:
        raise ValueError(f"unknown SuperGLUE task {task!r}; known: {', '.join(TASKS)}")
    reader = _READERS[task]
    records: list[dict] = []
    skipped: list[str] = []
    with open(path, encoding="utf-8-sig") as f:  # a byte-order mark (Windows editors) is skipped
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = _Where(path, line_number)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise where.fail(f"invalid JSON ({e.msg} at column {e.colno})") from None
            try:
                records.extend(reader(obj, where))
            except _Unplaced as unplaced:
                if split == "test":
                    logging.warning("%s (kept unmarked: a test record is never dropped)", unplaced)
                    records.append(unplaced.record)
                else:
                    logging.warning("%s (record skipped)", unplaced)
                    skipped.append(str(unplaced))
    if not records:
        what = f"all {len(skipped)} records were skipped" if skipped else "it has no records"
        raise SuperGlueFormatError(
            f"{path}: the {task} {split} split is empty ({what}); point data_dir (or "
            "train_data_dir) at a folder with the official files"
        )
    return Split(task, split, path, records, tuple(skipped))


def read_jsonl(task: str, path: str, split: str = "val") -> list[dict]:
    """The records of :func:`read_file`."""
    return read_file(task, path, split).records


def task_file(data_dir: str, task: str, split: str) -> str:
    """Path of ``split`` of ``task`` under ``data_dir`` (official folder names).

    The diagnostics have a single file, ``AX-b/AX-b.jsonl``, which serves as their test split
    (it is also labelled, so it can be scored locally). Few-shot sets use other split names
    (FewGLUE: ``train``, ``dev32``); any name resolves to ``<data_dir>/<task>/<split>.jsonl``.
    """
    if task in DIAGNOSTIC_TASKS:
        return os.path.join(data_dir, task, f"{task}.jsonl")
    return os.path.join(data_dir, task, f"{split}.jsonl")


def load_split(data_dir: str, task: str, split: str) -> Split:
    """The :class:`Split` ``split`` of ``task`` under ``data_dir`` (see :func:`task_file`)."""
    path = task_file(data_dir, task, split)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{task} {split} split not found: {path} ({folder_contents(os.path.dirname(path))}; "
            "the folder needs one sub-folder per task, e.g. CB/train.jsonl and CB/val.jsonl; "
            "FewGLUE has train and dev32)"
        )
    return read_file(task, path, "test" if task in DIAGNOSTIC_TASKS else split)


def folder_contents(folder: str) -> str:
    """``"files there: a.jsonl, b.jsonl"`` (or that the folder is empty or missing)."""
    if not os.path.isdir(folder):
        return f"no folder {folder}"
    names = sorted(os.listdir(folder))
    return f"files there: {', '.join(names)}" if names else f"{folder} is empty"


def read_split(data_dir: str, task: str, split: str) -> list[dict]:
    return load_split(data_dir, task, split).records


def available_tasks(data_dir: str) -> list[str]:
    """Tasks with a folder under ``data_dir``, in leaderboard order."""
    return [t for t in TASKS if os.path.exists(os.path.dirname(task_file(data_dir, t, "val")))]
