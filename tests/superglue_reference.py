"""Official SuperGLUE metrics recomputed from a prediction file, written independently of
rope_jax.evaluation.metrics: the leaderboard spelling of the files, and T5's rules for an
output that is not a valid answer (``"label": null``): accuracy and exact match never count
it, CB's per-class F1 counts it as no class (T5's -1 class id, sklearn ``fbeta_score`` with
``labels=range(3)``), and binary F1 / MCC count it as the opposite of the gold label (T5
``f1_score_with_invalid``: ``predictions[invalid] = 1 - targets[invalid]``)."""

import json
import math

# Leaderboard spelling of gold labels (jiant / T5 prepare_submission conventions).
_SPELLING = {
    "BoolQ": {True: "true", False: "false"},
    "WiC": {True: "true", False: "false"},
    "WSC": {True: "True", False: "False"},
    "MultiRC": {True: 1, False: 0},
}


def spelled(task, label):
    return _SPELLING.get(task, {}).get(label, label) if isinstance(label, bool) else label


def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _binary_with_invalid(predicted, gold):
    """0/1 predictions with invalid (None) flipped to 1 - gold."""
    return [1 - g if p is None else p for p, g in zip(predicted, gold, strict=True)]


def _f1(predicted, gold):
    tp = sum(p == 1 and g == 1 for p, g in zip(predicted, gold, strict=True))
    fp = sum(p == 1 and g == 0 for p, g in zip(predicted, gold, strict=True))
    fn = sum(p == 0 and g == 1 for p, g in zip(predicted, gold, strict=True))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def _mcc(predicted, gold):
    n = len(gold)
    mean_p, mean_g = sum(predicted) / n, sum(gold) / n
    cov = sum((p - mean_p) * (g - mean_g) for p, g in zip(predicted, gold, strict=True))
    var_p = sum((p - mean_p) ** 2 for p in predicted)
    var_g = sum((g - mean_g) ** 2 for g in gold)
    return 0.0 if var_p == 0 or var_g == 0 else cov / math.sqrt(var_p * var_g)


def metrics_from_file(task, lines, gold_records):
    """The official metrics of a prediction file's lines against the gold records."""
    if task == "MultiRC":
        predicted, gold, question = [], [], []
        by_idx = {
            (r["idx"]["paragraph"], r["idx"]["question"], r["idx"]["answer"]): r["label"]
            for r in gold_records
        }
        for line in lines:
            for q in line["passage"]["questions"]:
                for a in q["answers"]:
                    predicted.append(a["label"])
                    gold.append(int(by_idx[(line["idx"], q["idx"], a["idx"])]))
                    question.append((line["idx"], q["idx"]))
        f1a = _f1(_binary_with_invalid(predicted, gold), gold)
        per_question = {}
        for p, g, q in zip(predicted, gold, question, strict=True):
            per_question[q] = per_question.get(q, True) and p == g
        em = sum(per_question.values()) / len(per_question)
        return {"f1a": f1a, "em": em, "score": (f1a + em) / 2}
    gold_by_idx = {r["idx"]: spelled(task, r["label"]) for r in gold_records}
    predicted = [line["label"] for line in lines]
    gold = [gold_by_idx[line["idx"]] for line in lines]
    accuracy = sum(p == g for p, g in zip(predicted, gold, strict=True)) / len(gold)
    result = {"accuracy": accuracy, "score": accuracy}
    if task == "CB":
        f1s = []
        for c in ("entailment", "contradiction", "neutral"):
            f1s.append(_f1([int(p == c) for p in predicted], [int(g == c) for g in gold]))
        result["f1"] = sum(f1s) / 3
        result["score"] = (result["f1"] + accuracy) / 2
    if task == "AX-b":
        gold01 = [int(g == "entailment") for g in gold]
        predicted01 = [None if p is None else int(p == "entailment") for p in predicted]
        result["mcc"] = result["score"] = _mcc(_binary_with_invalid(predicted01, gold01), gold01)
    return result
