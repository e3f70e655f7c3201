"""SuperGLUE evaluators as plug-ins (big_vision style).

Each evaluator is a small class built from config values: it owns one task's split,
asks a ``predict_fn(params, records)`` (supplied by whoever knows the model: the
fine-tuning loop casts records for an encoder or an encoder-decoder) for canonical
predictions, and ``run(params)`` yields ``(name, value)`` pairs. Labelled splits yield the
task's official metrics. Given a ``workdir``, every split but an unlabelled test split
writes ``predictions/<Task>_<split>.jsonl``, the file the metrics score (invalid outputs
null, with the decoded text); test splits write the leaderboard file
``submission/<Task>.jsonl`` (every line labelled) and yield how many labels were filled in
(``filled_labels``); with several processes (each holds every prediction) only process 0
writes them. Every split yields ``num_examples``, ``invalid_fraction`` and
``skipped_records`` (records the reader could not use). The trainer knows nothing about
SuperGLUE.

Families: ``label`` (one label per record: BoolQ, CB, COPA, RTE, WiC, WSC, AX-b, AX-g),
``multirc`` (a True/False per answer option, scored per question) and ``record`` (free text
answers scored against the gold set).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
from absl import logging

from rope_jax.evaluation import metrics, readers, submission


@dataclasses.dataclass(frozen=True)
class Predictions:
    """What a ``predict_fn`` may return instead of a plain list: canonical predictions (None
    = not a valid answer) and, for text-to-text models, the decoded text of each."""

    values: Sequence[Any]
    texts: Sequence[str] | None = None


PredictFn = Callable[[Any, Sequence[dict]], "Sequence[Any] | Predictions"]


class SuperGlueEvaluator:
    """Base: predicts ``split`` of ``task`` and yields metrics; subclasses pick the tasks.

    The split comes as ``data`` (a :class:`readers.Split`, as read before training), as
    ``records``, or is read from ``data_dir``.
    """

    tasks: tuple[str, ...] = ()

    def __init__(
        self,
        predict_fn: PredictFn,
        *,
        task: str,
        data_dir: str | None = None,
        split: str = "val",
        records: Sequence[dict] | None = None,
        data: readers.Split | None = None,
        workdir: str | None = None,
    ):
        if task not in self.tasks:
            raise ValueError(f"{type(self).__name__} evaluates {self.tasks}, not {task!r}")
        if data is None and records is not None:
            data = readers.Split(task, split, f"<{task} {split} records>", list(records))
        if data is None:
            if data_dir is None:
                raise ValueError("give data, records or data_dir")
            data = readers.load_split(data_dir, task, split)
        if not data.records:
            raise ValueError(f"{data.path}: the {task} {data.split} split has no records")
        self.task, self.split, self.data = task, data.split, data
        self.records = list(data.records)
        self.predict_fn, self.workdir = predict_fn, workdir
        self.predictions: list[Any] = []
        self.texts: list[str] | None = None

    def labelled(self) -> bool:
        if self.task == "ReCoRD":
            return all(r["answers"] for r in self.records)
        return all(r["label"] is not None for r in self.records)

    def run(self, params: Any) -> Iterator[tuple[str, float]]:
        output = self.predict_fn(params, self.records)
        if not isinstance(output, Predictions):
            output = Predictions(list(output))
        self.predictions = list(output.values)
        self.texts = None if output.texts is None else list(output.texts)
        for name, values in (("predictions", self.predictions), ("decoded texts", self.texts)):
            if values is not None and len(values) != len(self.records):
                raise ValueError(
                    f"predict_fn gave {len(values)} {name} for {len(self.records)} "
                    f"{self.task} records"
                )
        labelled = self.labelled()
        invalid = sum(p is None for p in self.predictions)
        yield "num_examples", float(len(self.records))
        yield "invalid_fraction", invalid / len(self.records)
        yield "skipped_records", float(len(self.data.skipped))
        if self.split == "test":
            yield "filled_labels", float(invalid)
        if self.workdir is not None and jax.process_index() == 0:
            self._write_files(invalid, labelled)
        if labelled:
            yield from self.metrics().items()

    def _write_files(self, invalid: int, labelled: bool) -> None:
        task, split, workdir = self.task, self.split, self.workdir
        if labelled or split != "test":
            submission.write_scored(
                workdir, task, split, self.records, self.predictions, texts=self.texts
            )
        if split == "test":
            path, filled = submission.write_submission(
                workdir, task, self.records, self.predictions
            )
            if filled:
                logging.warning(
                    "%s: %d of %d outputs were not a valid answer; filled with %r in %s",
                    task,
                    filled,
                    len(self.records),
                    submission.leaderboard_label(task, None),
                    path,
                )

    def metrics(self) -> dict[str, float]:
        return metrics.task_metrics(self.task, self.records, self.predictions)


class LabelEvaluator(SuperGlueEvaluator):
    """One label per record; accuracy plus CB macro-F1, AX-b MCC or AX-g gender parity."""

    tasks = ("BoolQ", "CB", "COPA", "RTE", "WiC", "WSC", "AX-b", "AX-g")


class MultiRCEvaluator(SuperGlueEvaluator):
    """A True/False per answer option; F1 over all options and exact match per question."""

    tasks = ("MultiRC",)


class ReCoRDEvaluator(SuperGlueEvaluator):
    """A free-text answer per query; max-over-gold token F1 and exact match."""

    tasks = ("ReCoRD",)

    def run(self, params: Any) -> Iterator[tuple[str, float]]:
        for name, value in super().run(params):
            if name != "invalid_fraction":  # every string is a valid ReCoRD answer
                yield name, value


EVALUATORS: dict[str, type[SuperGlueEvaluator]] = {
    "label": LabelEvaluator,
    "multirc": MultiRCEvaluator,
    "record": ReCoRDEvaluator,
}


def family_of(task: str) -> str:
    for name, cls in EVALUATORS.items():
        if task in cls.tasks:
            return name
    raise ValueError(f"unknown SuperGLUE task {task!r}; known: {', '.join(readers.TASKS)}")


def create_evaluator(predict_fn: PredictFn, *, task: str, family: str | None = None, **kwargs):
    """The evaluator of ``task`` (family from the task unless given, e.g. from a config)."""
    family = family or family_of(task)
    if family not in EVALUATORS:
        raise ValueError(f"unknown evaluator family {family!r}; known: {sorted(EVALUATORS)}")
    return EVALUATORS[family](predict_fn, task=task, **kwargs)
