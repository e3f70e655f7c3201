"""Two casts of every SuperGLUE task: text-to-text (encoder-decoders) and classification /
multiple choice (encoders).

Text-to-text follows T5 (Raffel et al., 2020, appendix D and the ``t5.data`` preprocessors):
the task name, then ``key: value`` for each input field in sorted key order, joined by
spaces, and the label's name as the target (TFDS ``super_glue`` label names: "False"/"True",
"entailment"/..., COPA "choice1"/"choice2"). Specific to tasks:

* MultiRC: fields in the order question, answer, paragraph; ``<br>`` becomes a space and
  ``<b>``/``</b>`` are removed (T5 ``preprocessors.glue`` for multirc).
* WiC: sentence1, sentence2, word (T5 ignores the character offsets).
* ReCoRD: ``record query: Q entities: E1, E2 passage: P`` with the ``@highlight`` markers
  turned into sentence breaks; one training example per gold answer, target = answer text
  (T5 ``preprocessors.record``).
* WSC: T5 ``preprocessors.wsc_simple`` (the setting of the T5 paper's SuperGLUE results):
  ``wsc: <text with the pronoun marked as *it*>``, target = the candidate referent (span1)
  text; only records whose candidate is the right referent are trained on, and decoded text
  becomes True/False by T5 ``postprocessors.wsc_simple`` (see :mod:`.wsc`).
* AX-b and AX-g are cast as RTE, the model that scores them: T5 renames AX-b's
  ``sentence1``/``sentence2`` to ``premise``/``hypothesis`` (``t5/data/tasks.py``), so both
  give ``rte hypothesis: ... premise: ...``.

The encoder cast (BERT/RoBERTa style fine-tuning, as in the SuperGLUE paper's baselines):
each record becomes one or more (text_a, text_b) pairs. Classification tasks have one pair
and a class index; COPA and ReCoRD are multiple choice, one pair per candidate, and the label
is the tuple of correct candidates (one for COPA, all matching entities for ReCoRD).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from rope_jax.evaluation import wsc
from rope_jax.evaluation.readers import LABEL_NAMES

TEXT_LABELS: dict[str, tuple[str, ...]] = {
    "BoolQ": ("False", "True"),
    "CB": ("entailment", "contradiction", "neutral"),
    "COPA": ("choice1", "choice2"),
    "MultiRC": ("False", "True"),
    "RTE": ("entailment", "not_entailment"),
    "WiC": ("False", "True"),
    "AX-b": ("entailment", "not_entailment"),
    "AX-g": ("entailment", "not_entailment"),
}
MULTIPLE_CHOICE_TASKS = ("COPA", "ReCoRD")


@dataclasses.dataclass(frozen=True)
class TextExample:
    """One text-to-text example; ``record`` is the index of its record in the split."""

    inputs: str
    targets: str
    record: int


@dataclasses.dataclass(frozen=True)
class EncoderExample:
    """One encoder example: candidate text pairs and the class index / correct candidates."""

    pairs: tuple[tuple[str, str], ...]
    label: int | tuple[int, ...] | None
    record: int


def _t5_fields(name: str, fields: list[tuple[str, str]]) -> str:
    return " ".join([name] + [f"{key}: {value}" for key, value in fields])


def record_passage(passage: str) -> str:
    """ReCoRD passage with ``@highlight`` markers as sentence breaks (T5 preprocessors.record)."""
    passage = re.sub(r"([.?!\"'])\n@highlight\n", r"\1 ", passage)
    return re.sub(r"\n@highlight\n", ". ", passage)


def _multirc_clean(text: str) -> str:
    return re.sub(r"</?b>", "", text.replace("<br>", " "))


def mark_span(text: str, start: int, end: int, left: str, right: str | None = None) -> str:
    """``text`` with characters [start, end) wrapped in ``left`` ... ``right``."""
    right = left if right is None else right
    return f"{text[:start]}{left}{text[start:end]}{right}{text[end:]}"


def text_input(task: str, record: dict) -> str:
    """The T5 input string of one record."""
    r = record
    if task in ("BoolQ",):
        return _t5_fields("boolq", [("passage", r["passage"]), ("question", r["question"])])
    if task in ("CB", "RTE", "AX-g"):
        name = "cb" if task == "CB" else "rte"
        return _t5_fields(name, [("hypothesis", r["hypothesis"]), ("premise", r["premise"])])
    if task == "AX-b":
        return _t5_fields("rte", [("hypothesis", r["sentence2"]), ("premise", r["sentence1"])])
    if task == "COPA":
        keys = ("choice1", "choice2", "premise", "question")
        return _t5_fields("copa", [(k, r[k]) for k in keys])
    if task == "MultiRC":
        keys = ("question", "answer", "paragraph")
        return _multirc_clean(_t5_fields("multirc", [(k, r[k]) for k in keys]))
    if task == "WiC":
        return _t5_fields("wic", [(k, r[k]) for k in ("sentence1", "sentence2", "word")])
    if task == "ReCoRD":
        return _t5_fields(
            "record",
            [
                ("query", r["query"]),
                ("entities", ", ".join(r["entities"])),
                ("passage", record_passage(r["passage"])),
            ],
        )
    if task == "WSC":
        return wsc.simple_input(r["text"], r["span2_text"], r["span2_index"])
    raise ValueError(f"unknown SuperGLUE task {task!r}")


def text_target(task: str, label: Any) -> str:
    """The T5 target word of a canonical label (ReCoRD/WSC targets come from the record)."""
    return TEXT_LABELS[task][LABEL_NAMES[task].index(label)]


def text_examples(task: str, records: list[dict], *, training: bool) -> list[TextExample]:
    """Text-to-text examples of a split.

    At training time ReCoRD yields one example per gold answer and WSC only the records
    whose candidate is the right referent; at evaluation every record yields exactly one
    example (targets of unlabelled records are empty).
    """
    examples = []
    for i, r in enumerate(records):
        inputs = text_input(task, r)
        if task == "ReCoRD":
            answers = r["answers"] or []
            if training:
                examples.extend(TextExample(inputs, a, i) for a in answers)
            else:
                examples.append(TextExample(inputs, answers[0] if answers else "", i))
        elif task == "WSC":
            if not training or r["label"]:
                examples.append(TextExample(inputs, r["span1_text"], i))
        elif r["label"] is None:
            if training:
                raise ValueError(f"{task} record {r['idx']} has no label to train on")
            examples.append(TextExample(inputs, "", i))
        else:
            examples.append(TextExample(inputs, text_target(task, r["label"]), i))
    return examples


def parse_text_prediction(task: str, prediction: str, record: dict) -> Any:
    """Canonical prediction from decoded text; None when the text is not a valid answer."""
    prediction = prediction.strip()
    if task == "ReCoRD":
        return prediction
    if task == "WSC":
        return wsc.referent_prediction(prediction, record["span1_text"])
    words = TEXT_LABELS[task]
    if prediction not in words:
        return None
    return LABEL_NAMES[task][words.index(prediction)]


def encoder_example(task: str, record: dict, index: int) -> EncoderExample:
    """The encoder cast of one record (see module docstring)."""
    r = record
    if task == "COPA":
        question = (
            "What was the cause?" if r["question"] == "cause" else "What happened as a result?"
        )
        pairs = tuple((r["premise"], f"{question} {r[c]}") for c in ("choice1", "choice2"))
        return EncoderExample(pairs, None if r["label"] is None else (r["label"],), index)
    if task == "ReCoRD":
        passage = record_passage(r["passage"])
        entities = r["entities"]
        pairs = tuple((passage, r["query"].replace("@placeholder", e)) for e in entities)
        label = None
        if r["answers"] is not None:
            label = tuple(i for i, e in enumerate(entities) if e in r["answers"])
        return EncoderExample(pairs, label, index)
    if task == "BoolQ":
        pair = (r["question"], r["passage"])
    elif task in ("CB", "RTE", "AX-g"):
        pair = (r["premise"], r["hypothesis"])
    elif task == "AX-b":
        pair = (r["sentence1"], r["sentence2"])
    elif task == "MultiRC":
        pair = (_multirc_clean(r["paragraph"]), f"{r['question']} {_multirc_clean(r['answer'])}")
    elif task == "WiC":
        pair = tuple(mark_span(r[f"sentence{k}"], r[f"start{k}"], r[f"end{k}"], "*") for k in "12")
    elif task == "WSC":
        # Candidate in * ... * and pronoun in # ... #, as T5 preprocessors.wsc marks them.
        spans = [(r[f"span{k}_text"], r[f"span{k}_index"]) for k in "12"]
        pair = (wsc.marked_text(r["text"], *spans[0], *spans[1]), "")
    else:
        raise ValueError(f"unknown SuperGLUE task {task!r}")
    label = None if r["label"] is None else LABEL_NAMES[task].index(r["label"])
    return EncoderExample((pair,), label, index)


def num_classes(task: str) -> int:
    """Classes of the encoder head (1 = a score per candidate, for multiple choice)."""
    return 1 if task in MULTIPLE_CHOICE_TASKS else len(LABEL_NAMES[task])


def encoder_prediction(task: str, record: dict, scores: list[float]) -> Any:
    """Canonical prediction from the head's outputs (class logits, or one score per pair)."""
    best = max(range(len(scores)), key=lambda i: scores[i])
    if task == "ReCoRD":
        return record["entities"][best] if record["entities"] else ""
    return LABEL_NAMES[task][best]
