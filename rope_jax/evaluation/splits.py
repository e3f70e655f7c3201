"""Every SuperGLUE split a fine-tuning run will use, read, checked and cast before any model
work, so a missing, malformed or empty file fails in seconds rather than after training.

:func:`read_run_splits` resolves the tasks of ``config.task`` (one task, or ``"all"``: every
task folder in ``data_dir``) and reads, per task: the training split (``train_split`` from
``train_data_dir``, else ``data_dir``), the evaluation split (``eval_split``, required),
the test split (``test_split``, when present) and, for RTE, the diagnostics AX-b and AX-g
(when present; they are scored with the RTE model). Every record is cast both ways (T5
text-to-text and encoder pairs; the model family is not known before the model is loaded,
and casting is cheap), so an error in a cast names its file too. A training loop takes the
returned :class:`TaskSplits` and reads nothing itself.

``eval_split="auto"`` (the few-shot default) evaluates on every split present among
``dev32`` and ``val``: FewGLUE (Schick & Schuetze 2021) selects on its 32-example ``dev32``
and, like "GPT Understands, Too" (Liu et al. 2021, Table 1), reports the official
validation set. With both, ``val`` is reported under the task's name and ``dev32`` under
``<Task>/dev32``, and ``dev32`` selects (in-loop evaluation, best checkpoint); with one,
that one does both. A named ``eval_split`` that is missing is an error naming the folder
and the files in it.
"""

from __future__ import annotations

import dataclasses
import os

from absl import logging

from rope_jax.evaluation import formats, readers


@dataclasses.dataclass(frozen=True)
class EvalSplit:
    """A split to evaluate; ``name`` is its key in ``metrics.json`` ("CB", "CB/test", "AX-b")."""

    name: str
    data: readers.Split


@dataclasses.dataclass(frozen=True)
class TaskSplits:
    """The training split of one task and every split its model will be evaluated on;
    ``evaluations[selection]`` is the one the run selects on (in-loop, best checkpoint)."""

    task: str
    train: readers.Split
    evaluations: tuple[EvalSplit, ...]
    selection: int = 0

    @property
    def select(self) -> EvalSplit:
        return self.evaluations[self.selection]


AUTO = "auto"
AUTO_SPLITS = ("dev32", "val")  # selected on, reported


def eval_splits(task: str, config) -> list[str]:
    """The evaluation splits of ``task``: ``[eval_split]``, or with ``"auto"`` those of
    ``AUTO_SPLITS`` present (the reported one first); a missing one is an error naming the
    folder and its files."""
    folder = os.path.dirname(readers.task_file(config.data_dir, task, "val"))
    if config.eval_split != AUTO:
        path = readers.task_file(config.data_dir, task, config.eval_split)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{task} {config.eval_split} split not found: {path} ("
                f"{readers.folder_contents(folder)}); set eval_split to one of them or to "
                f"{AUTO!r} (every one of {', '.join(AUTO_SPLITS)} present)"
            )
        return [config.eval_split]
    present = [
        s for s in AUTO_SPLITS if os.path.exists(readers.task_file(config.data_dir, task, s))
    ]
    if not present:
        raise FileNotFoundError(
            f"{task}: eval_split={AUTO!r} found neither {' nor '.join(AUTO_SPLITS)} .jsonl in "
            f"{folder} ({readers.folder_contents(folder)}); add one or name the split with "
            "eval_split"
        )
    missing = [s for s in AUTO_SPLITS if s not in present]
    # One line: what was found, what selects, what is reported (a warning when val selects).
    log = logging.warning if present == ["val"] else logging.info
    log(
        "%s: eval_split=auto found %s in %s%s; selecting (best checkpoint) on %s, reporting %s",
        task,
        " and ".join(f"{s}.jsonl" for s in present),
        folder,
        "".join(f" (no {s}.jsonl)" for s in missing),
        present[0],
        present[-1],
    )
    return present[::-1]


def run_tasks(config) -> list[str]:
    """The tasks ``config.task`` asks for (diagnostics come with RTE, never on their own)."""
    trainable = [t for t in readers.TASKS if t not in readers.DIAGNOSTIC_TASKS]
    if config.task != "all":
        if config.task not in trainable:
            raise ValueError(
                f"task={config.task!r}; choose one of {trainable} or 'all' (AX-b and AX-g are "
                "scored with the RTE model)"
            )
        return [config.task]
    present = readers.available_tasks(config.data_dir)
    tasks = [t for t in present if t not in readers.DIAGNOSTIC_TASKS]
    if not tasks:
        raise FileNotFoundError(
            f"no SuperGLUE task folders under data_dir={config.data_dir!r} (expected "
            f"folders named {', '.join(trainable)})"
        )
    if "RTE" not in tasks and any(t in present for t in readers.DIAGNOSTIC_TASKS):
        logging.warning("AX-b/AX-g are scored with the RTE model; no RTE folder, skipping")
    return tasks


def _cast_error(data: readers.Split, error: Exception, fix: str) -> readers.SuperGlueFormatError:
    return readers.SuperGlueFormatError(f"{data.path}: {error}; {fix}")


def check_casts(data: readers.Split, *, training: bool) -> None:
    """Casts every record of ``data`` for both model families; errors name the file."""
    task, records = data.task, data.records
    fix = "use a labelled split for training" if training else "check the file's records"
    try:
        formats.text_examples(task, records, training=training)
        encoder = [formats.encoder_example(task, r, i) for i, r in enumerate(records)]
    except (ValueError, KeyError, TypeError) as error:
        raise _cast_error(data, error, fix) from error
    if training and not any(e.label is not None and e.label != () for e in encoder):
        raise readers.SuperGlueFormatError(
            f"{data.path}: no labelled {task} record to train on; {fix} (train_split="
            f"{data.split!r})"
        )


def read_task_splits(task: str, config) -> TaskSplits:
    """Reads, checks and casts the splits of ``task`` (see module docstring)."""
    train_dir = config.train_data_dir or config.data_dir
    train = readers.load_split(train_dir, task, config.train_split)
    check_casts(train, training=True)
    names = eval_splits(task, config)
    jobs = [(task, names[0], task, True)]
    jobs += [(task, split, f"{task}/{split}", True) for split in names[1:]]
    jobs.append((task, config.test_split, f"{task}/test", False))
    if task == "RTE":
        jobs += [(diagnostic, "test", diagnostic, False) for diagnostic in readers.DIAGNOSTIC_TASKS]
    evaluations = []
    for job_task, split, name, required in jobs:
        path = readers.task_file(config.data_dir, job_task, split)
        if not required and not os.path.exists(path):
            continue
        data = readers.load_split(config.data_dir, job_task, split)
        check_casts(data, training=False)
        evaluations.append(EvalSplit(name, data))
    return TaskSplits(task, train, tuple(evaluations), selection=len(names) - 1)


def read_run_splits(config) -> list[TaskSplits]:
    """:func:`read_task_splits` for every task of the run, in leaderboard order."""
    return [read_task_splits(task, config) for task in run_tasks(config)]
