"""Summarization data and scoring: CSL-style TSV or JSONL pairs in, predictions and metrics out.

Formats (``read_summaries(path, format=...)``):

* ``"tsv"``: one ``title<TAB>content`` per line, the CSL layout the T5 PEGASUS fine-tuning
  script reads (``title, content = l.strip().split('\\t')``): the title is the summary
  (target), the content the source. The example id is the line number.
* ``"jsonl"``: one JSON object per line with the source under ``source_field`` (default
  ``"content"``) and the summary under ``target_field`` (default ``"title"``); the id is
  ``record[id_field]`` when present, else the line number.
* ``"auto"`` (default): ``.jsonl``/``.json`` files are JSONL, ``.tsv``/``.txt`` files TSV.

Blank lines are skipped; a UTF-8 byte-order mark is ignored. Any other malformed line (bad
UTF-8, a wrong number of tab-separated fields, invalid JSON, a missing, non-string or empty
field) raises :class:`SummaryFormatError` whose message starts with ``<file>:<line>:``.

``evaluate_summaries(results, workdir=..., split=...)`` takes ``(id, reference,
prediction)`` triples, writes ``<workdir>/predictions/<split>.jsonl`` (one
``{"id", "reference", "prediction"}`` object per line) and returns the metrics of
``summary_metrics.summarization_metrics``: ``rouge-1``, ``rouge-2``, ``rouge-l``, ``bleu``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from typing import Any

from rope_jax.evaluation.summary_metrics import summarization_metrics

FORMATS = ("auto", "tsv", "jsonl")

__all__ = [
    "FORMATS",
    "SummaryExample",
    "SummaryFormatError",
    "evaluate_summaries",
    "read_summaries",
]


class SummaryFormatError(ValueError):
    """A malformed line of a summarization file (the message names file and line)."""


@dataclasses.dataclass(frozen=True)
class SummaryExample:
    """One (source, summary) pair; ``id`` is the line number or the record's id field."""

    id: Any
    source: str
    target: str


def _format_of(path: str, format: str) -> str:
    if format not in FORMATS:
        raise ValueError(f"unknown summarization format {format!r}; choose one of {FORMATS}")
    if format != "auto":
        return format
    extension = os.path.splitext(path)[1].lower()
    if extension in (".jsonl", ".json"):
        return "jsonl"
    if extension in (".tsv", ".txt"):
        return "tsv"
    raise ValueError(
        f"cannot tell the format of {path} from its extension; give format='tsv' "
        "(title<TAB>content lines) or format='jsonl'"
    )


def _text(where: str, record: dict, field: str) -> str:
    if field not in record:
        raise SummaryFormatError(f"{where}: no field {field!r} (fields: {sorted(record)})")
    value = record[field]
    if not isinstance(value, str):
        raise SummaryFormatError(f"{where}: field {field!r} is a {type(value).__name__}, not text")
    if not value.strip():
        raise SummaryFormatError(f"{where}: field {field!r} is empty")
    return value


def read_summaries(
    path: str | os.PathLike,
    *,
    format: str = "auto",
    source_field: str = "content",
    target_field: str = "title",
    id_field: str = "id",
) -> list[SummaryExample]:
    """The (source, summary) pairs of a TSV or JSONL file (module docstring)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"summarization file not found: {path}")
    kind = _format_of(path, format)
    examples = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise SummaryFormatError(f"{where}: not UTF-8 ({err.reason})") from None
            if not line.strip():
                continue
            if kind == "tsv":
                fields = line.strip().split("\t")
                if len(fields) != 2:
                    raise SummaryFormatError(
                        f"{where}: expected title<TAB>content (2 fields), found {len(fields)}"
                    )
                title, content = fields
                for name, value in (("title", title), ("content", content)):
                    if not value.strip():
                        raise SummaryFormatError(f"{where}: the {name} is empty")
                examples.append(SummaryExample(number, content, title))
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise SummaryFormatError(f"{where}: invalid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise SummaryFormatError(f"{where}: expected a JSON object")
            source = _text(where, record, source_field)
            target = _text(where, record, target_field)
            examples.append(SummaryExample(record.get(id_field, number), source, target))
    if not examples:
        raise SummaryFormatError(f"{path}: no examples")
    return examples


def evaluate_summaries(
    results: Iterable[tuple[Any, str, str]], *, workdir: str | os.PathLike, split: str
) -> dict[str, float]:
    """Writes ``predictions/<split>.jsonl`` and returns ROUGE-1/2/L and BLEU (module doc)."""
    results = [(id_, str(reference), str(prediction)) for id_, reference, prediction in results]
    if not results:
        raise ValueError(f"no predictions to evaluate for split {split!r}")
    metrics = summarization_metrics((reference, prediction) for _, reference, prediction in results)
    directory = os.path.join(os.fspath(workdir), "predictions")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{split}.jsonl")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for id_, reference, prediction in results:
            row = {"id": id_, "reference": reference, "prediction": prediction}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return metrics
