"""SuperGLUE evaluators as plug-ins (big_vision style).

Each evaluator is a small class built from config values: it owns one task's split,
asks a ``predict_fn(params, records) -> predictions`` (supplied by whoever knows the model:
the fine-tuning loop casts records for an encoder or an encoder-decoder) for canonical
predictions, and ``run(params)`` yields ``(name, value)`` pairs. Labelled splits yield the
task's official metrics; every split writes its prediction file in the leaderboard's
conventions when a ``workdir`` is given. The trainer knows nothing about SuperGLUE.

Families: ``label`` (one label per record: BoolQ, CB, COPA, RTE, WiC, WSC, AX-b, AX-g),
``multirc`` (a True/False per answer option, scored per question) and ``record`` (free text
answers scored against the gold set).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from rope_jax.evaluation import metrics, readers, submission

PredictFn = Callable[[Any, Sequence[dict]], Sequence[Any]]


class SuperGlueEvaluator:
    """Base: predicts ``split`` of ``task`` and yields metrics; subclasses pick the tasks."""

    tasks: tuple[str, ...] = ()

    def __init__(
        self,
        predict_fn: PredictFn,
        *,
        task: str,
        data_dir: str | None = None,
        split: str = "val",
        records: Sequence[dict] | None = None,
        workdir: str | None = None,
    ):
        if task not in self.tasks:
            raise ValueError(f"{type(self).__name__} evaluates {self.tasks}, not {task!r}")
        if records is None:
            if data_dir is None:
                raise ValueError("give either data_dir or records")
            records = readers.read_split(data_dir, task, split)
        self.task, self.split, self.records = task, split, list(records)
        self.predict_fn, self.workdir = predict_fn, workdir
        self.predictions: list[Any] = []

    def labelled(self) -> bool:
        if self.task == "ReCoRD":
            return all(r["answers"] for r in self.records)
        return all(r["label"] is not None for r in self.records)

    def run(self, params: Any) -> Iterator[tuple[str, float]]:
        self.predictions = list(self.predict_fn(params, self.records))
        if len(self.predictions) != len(self.records):
            raise ValueError(
                f"predict_fn gave {len(self.predictions)} predictions for "
                f"{len(self.records)} {self.task} records"
            )
        if self.workdir is not None:
            submission.write_predictions(
                self.workdir, self.task, self.split, self.records, self.predictions
            )
        yield "num_examples", float(len(self.records))
        invalid = sum(p is None for p in self.predictions)
        yield "invalid_fraction", invalid / max(len(self.predictions), 1)
        if self.labelled():
            yield from self.metrics().items()

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
