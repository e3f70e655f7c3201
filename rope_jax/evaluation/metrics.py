"""Official SuperGLUE metrics (Wang et al., 2019, "SuperGLUE", Table 1).

Pure Python/numpy on predictions and gold labels; each task's leaderboard score is the
mean of its metrics where it has two (CB: F1 and accuracy; MultiRC: F1a and EM; ReCoRD: F1
and EM). Undefined ratios (0/0) count as 0, as scikit-learn's ``zero_division`` default
does in the references the benchmark used.

A prediction of ``None`` is an output that is not a valid answer, and it is always wrong, as
in T5 (``t5/evaluation/metrics.py``): accuracy and exact match never count it; CB's
per-class F1 counts it as no class (T5's -1 class id); the binary metrics (MultiRC F1a,
AX-b MCC) count it as the opposite of the gold label, as T5's ``f1_score_with_invalid``
does. An empty split is an error, not a score of 0.
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Hashable, Sequence


def accuracy(predictions: Sequence, labels: Sequence) -> float:
    _check_lengths(predictions, labels)
    if not labels:
        return 0.0
    return sum(p == g for p, g in zip(predictions, labels, strict=True)) / len(labels)


def _f1(tp: int, fp: int, fn: int) -> float:
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


def f1_for_class(predictions: Sequence, labels: Sequence, positive: Hashable) -> float:
    """Binary F1 of one class against the rest."""
    _check_lengths(predictions, labels)
    tp = sum(p == positive and g == positive for p, g in zip(predictions, labels, strict=True))
    fp = sum(p == positive and g != positive for p, g in zip(predictions, labels, strict=True))
    fn = sum(p != positive and g == positive for p, g in zip(predictions, labels, strict=True))
    return _f1(tp, fp, fn)


def macro_f1(predictions: Sequence, labels: Sequence, classes: Sequence) -> float:
    """Unweighted mean of per-class F1 over ``classes`` (CB: the 3 classes, always all 3)."""
    return sum(f1_for_class(predictions, labels, c) for c in classes) / len(classes)


def _invalid_as_wrong(predictions: Sequence, labels: Sequence, positive: Hashable) -> list:
    """Binary predictions (is ``positive``) with None turned into the opposite of the gold
    label (T5 ``f1_score_with_invalid``: ``predictions[invalid] = 1 - targets[invalid]``)."""
    return [
        (g != positive) if p is None else (p == positive)
        for p, g in zip(predictions, labels, strict=True)
    ]


def matthews_corrcoef(predictions: Sequence, labels: Sequence, positive: Hashable) -> float:
    """Matthews correlation of a binary prediction (AX-b): (tp tn - fp fn) / sqrt(...).

    An invalid prediction (None) counts as the opposite of the gold label."""
    _check_lengths(predictions, labels)
    pairs = list(
        zip(
            _invalid_as_wrong(predictions, labels, positive),
            [g == positive for g in labels],
            strict=True,
        )
    )
    tp = sum(p and g for p, g in pairs)
    tn = sum(not p and not g for p, g in pairs)
    fp = sum(p and not g for p, g in pairs)
    fn = sum(not p and g for p, g in pairs)
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def multirc_metrics(
    predictions: Sequence[bool], labels: Sequence[bool], question_ids: Sequence[Hashable]
) -> dict[str, float]:
    """MultiRC (Khashabi et al., 2018) as SuperGLUE scores it.

    ``f1a``: binary F1 of the True class over ALL answer options pooled together, an
    invalid prediction (None) counted as the opposite of the gold label (T5
    ``multirc_f1_over_all_answers`` = ``f1_score_with_invalid``: on a False option it is a
    false positive, not a true negative);
    ``em``: fraction of questions whose answer options are ALL predicted correctly.
    ``question_ids`` identifies each option's question (e.g. (paragraph idx, question idx)).
    """
    _check_lengths(predictions, labels)
    _check_lengths(predictions, question_ids)
    correct_by_question: dict[Hashable, bool] = collections.defaultdict(lambda: True)
    for p, g, q in zip(predictions, labels, question_ids, strict=True):
        # An unparsable prediction (None) is wrong whatever the gold label.
        correct_by_question[q] &= p is not None and bool(p) == bool(g)
    em = sum(correct_by_question.values()) / max(len(correct_by_question), 1)
    gold = [bool(g) for g in labels]
    f1a = f1_for_class(_invalid_as_wrong(predictions, gold, True), gold, True)
    return {"f1a": f1a, "em": em}


def squad_normalize(text: str) -> str:
    """SQuAD v1.1 answer normalisation (Rajpurkar et al., 2016, official evaluate script):
    lower case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    """Bag-of-tokens F1 between normalised strings (SQuAD/ReCoRD)."""
    prediction_tokens = squad_normalize(prediction).split()
    gold_tokens = squad_normalize(gold).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    return float(squad_normalize(prediction) == squad_normalize(gold))


def record_metrics(
    predictions: Sequence[str], answers: Sequence[Sequence[str]]
) -> dict[str, float]:
    """ReCoRD (Zhang et al., 2018): per query the max over gold answers of token F1 and EM,
    averaged over queries."""
    _check_lengths(predictions, answers)
    if not predictions:
        return {"f1": 0.0, "em": 0.0}
    f1s, ems = [], []
    for prediction, golds in zip(predictions, answers, strict=True):
        if not golds:
            raise ValueError("a ReCoRD query without gold answers cannot be scored")
        f1s.append(max(token_f1(prediction, g) for g in golds))
        ems.append(max(exact_match(prediction, g) for g in golds))
    return {"f1": sum(f1s) / len(f1s), "em": sum(ems) / len(ems)}


def gender_parity(predictions: Sequence, pair_ids: Sequence[Hashable]) -> float:
    """AX-g (Winogender, Rudinger et al., 2018): the fraction of minimal pairs (records sharing
    ``pair_id``, differing only in the pronoun's gender) whose predictions are all equal."""
    _check_lengths(predictions, pair_ids)
    by_pair: dict[Hashable, set] = collections.defaultdict(set)
    for p, pair in zip(predictions, pair_ids, strict=True):
        by_pair[pair].add(p)
    if not by_pair:
        return 0.0
    return sum(len(v) == 1 for v in by_pair.values()) / len(by_pair)


def _check_lengths(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions for {len(b)} references")


def task_metrics(task: str, records: Sequence[dict], predictions: Sequence) -> dict[str, float]:
    """All official metrics of ``task`` plus its leaderboard ``score``.

    ``predictions`` are in the canonical form of :mod:`rope_jax.evaluation.readers` labels
    (bool, label string, COPA choice int, ReCoRD answer text; MultiRC one bool per option),
    None for an output that is not a valid answer.
    """
    if not records:
        raise ValueError(f"{task}: no records to score (an empty split)")
    if task == "ReCoRD":
        result = record_metrics(predictions, [r["answers"] for r in records])
        result["score"] = (result["f1"] + result["em"]) / 2
        return result
    labels = [r["label"] for r in records]
    if any(label is None for label in labels):
        raise ValueError(f"{task}: records without labels (a test split?) cannot be scored")
    if task == "MultiRC":
        question_ids = [(r["idx"]["paragraph"], r["idx"]["question"]) for r in records]
        result = multirc_metrics(predictions, labels, question_ids)
        result["score"] = (result["f1a"] + result["em"]) / 2
        return result
    result = {"accuracy": accuracy(predictions, labels)}
    if task == "CB":
        result["f1"] = macro_f1(predictions, labels, ("entailment", "contradiction", "neutral"))
        result["score"] = (result["f1"] + result["accuracy"]) / 2
    elif task == "AX-b":
        result["mcc"] = matthews_corrcoef(predictions, labels, positive="entailment")
        result["score"] = result["mcc"]
    elif task == "AX-g":
        result["gender_parity"] = gender_parity(predictions, [r["pair_id"] for r in records])
        result["score"] = result["gender_parity"]
    else:
        result["score"] = result["accuracy"]
    return result
