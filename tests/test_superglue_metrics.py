"""Official SuperGLUE metrics against values computed by hand (in the comments)."""

import math

import pytest

from rope_jax.evaluation import metrics


def test_accuracy():
    assert metrics.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    with pytest.raises(ValueError, match="3 predictions for 2"):
        metrics.accuracy([1, 0, 1], [1, 0])


def test_cb_macro_f1_over_three_classes():
    labels = ["entailment", "entailment", "contradiction", "neutral", "neutral", "neutral"]
    preds = ["entailment", "contradiction", "contradiction", "neutral", "entailment", "neutral"]
    # entailment tp1 fp1 fn1 -> 1/2; contradiction tp1 fp1 fn0 -> 2/3; neutral tp2 fp0 fn1 -> 4/5
    expected = (1 / 2 + 2 / 3 + 4 / 5) / 3
    result = metrics.task_metrics("CB", [{"label": g} for g in labels], preds)
    assert result["f1"] == pytest.approx(expected)
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["score"] == pytest.approx((expected + 4 / 6) / 2)
    # A class absent from gold and predictions still counts (F1 0), as with all 3 labels given.
    assert metrics.macro_f1(
        ["neutral"] * 2, ["neutral"] * 2, ("entailment", "contradiction", "neutral")
    ) == pytest.approx(1 / 3)


def test_multirc_f1a_and_question_em():
    # paragraph 0: q0 [T F T] vs [T F F]; q1 [F T] vs [F T]; paragraph 1: q0 [T] vs [F]
    # (same question idx in another paragraph must be a separate question).
    gold = [True, False, True, False, True, True]
    pred = [True, False, False, False, True, False]
    ids = [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 3), (0, 1, 4), (1, 0, 5)]
    records = [
        {"idx": {"paragraph": p, "question": q, "answer": a}, "label": g}
        for (p, q, a), g in zip(ids, gold, strict=True)
    ]
    result = metrics.task_metrics("MultiRC", records, pred)
    # pooled tp 2, fp 0, fn 2 -> F1a = 4 / 6; EM: only (0, 1) all right -> 1 / 3
    assert result["f1a"] == pytest.approx(2 / 3)
    assert result["em"] == pytest.approx(1 / 3)
    # An unparsable prediction is wrong even when gold is False.
    none_pred = [True, None, True, False, True, True]
    assert metrics.task_metrics("MultiRC", records, none_pred)["em"] == pytest.approx(2 / 3)


def test_multirc_f1a_counts_invalid_as_wrong_as_t5():
    """T5 ``f1_score_with_invalid`` (its unit test: targets [0, 1, 1, 0], predictions
    [0, 1, 2, 2] -> F1 50): an invalid prediction is the opposite of the gold label, so on a
    gold-False option it is a false positive, not a true negative."""
    gold = [False, True, True, False]
    records = [
        {"idx": {"paragraph": 0, "question": q, "answer": q}, "label": g}
        for q, g in enumerate(gold)
    ]
    result = metrics.task_metrics("MultiRC", records, [False, True, None, None])
    assert result["f1a"] == pytest.approx(0.5)  # tp 1, fp 1 (None on False), fn 1
    # Alone on a gold-False option: tp 1, fp 1 -> 2/3 (counting it as a true negative
    # would give 1.0).
    result = metrics.task_metrics("MultiRC", records[:2], [None, True])
    assert result["f1a"] == pytest.approx(2 / 3)


def test_axb_mcc_counts_invalid_as_wrong():
    labels = ["entailment", "not_entailment", "not_entailment", "entailment"]
    # None on a gold not_entailment is a false positive: tp 1, fp 1, tn 1, fn 1 -> 0.
    preds = ["entailment", None, "not_entailment", "not_entailment"]
    assert metrics.matthews_corrcoef(preds, labels, "entailment") == pytest.approx(0.0)
    # The same prediction made validly would score (1*2 - 0*1) / sqrt(1*2*3*2).
    preds = ["entailment", "not_entailment", "not_entailment", "not_entailment"]
    assert metrics.matthews_corrcoef(preds, labels, "entailment") == pytest.approx(
        2 / math.sqrt(12)
    )


def test_an_empty_split_is_not_a_score_of_zero():
    with pytest.raises(ValueError, match="no records to score"):
        metrics.task_metrics("RTE", [], [])
    from rope_jax.evaluation import evaluators

    with pytest.raises(ValueError, match="the RTE val split has no records"):
        evaluators.create_evaluator(lambda p, r: [], task="RTE", records=[])


def test_squad_normalisation_and_record_max_over_answers():
    assert metrics.squad_normalize("  An apple, a DAY; the end!") == "apple day end"
    records = [{"answers": ["Eiffel Tower", "tower"]}, {"answers": ["Paris", "Lyon"]}]
    result = metrics.task_metrics("ReCoRD", records, ["The Eiffel Tower!", "Paris France"])
    # query 1: EM 1, F1 1; query 2 vs "Paris": precision 1/2, recall 1 -> F1 2/3, EM 0
    assert result["f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert result["em"] == pytest.approx(1 / 2)
    assert metrics.token_f1("x y y z", "y y w") == pytest.approx(
        2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3)
    )


def test_axb_matthews_correlation():
    labels = ["entailment"] * 4 + ["not_entailment"] * 3
    preds = ["entailment"] * 3 + ["not_entailment"] + ["entailment"] + ["not_entailment"] * 2
    # tp 3, fn 1, fp 1, tn 2 -> (6 - 1) / sqrt(4 * 4 * 3 * 3) = 5 / 12
    result = metrics.task_metrics("AX-b", [{"label": g} for g in labels], preds)
    assert result["mcc"] == pytest.approx(5 / 12)
    assert metrics.matthews_corrcoef(["entailment"] * 3, labels[:3], "entailment") == 0.0
    perfect = metrics.matthews_corrcoef(labels, labels, "entailment")
    assert perfect == pytest.approx(1.0) and not math.isnan(perfect)


def test_axg_gender_parity_and_accuracy():
    records = [
        {"pair_id": 1, "label": "entailment"},
        {"pair_id": 1, "label": "entailment"},
        {"pair_id": 2, "label": "not_entailment"},
        {"pair_id": 2, "label": "not_entailment"},
        {"pair_id": 3, "label": "entailment"},
        {"pair_id": 3, "label": "entailment"},
    ]
    preds = [
        "entailment",
        "entailment",
        "entailment",
        "not_entailment",
        "not_entailment",
        "not_entailment",
    ]
    result = metrics.task_metrics("AX-g", records, preds)
    assert result["gender_parity"] == pytest.approx(2 / 3)  # pairs 1 and 3 agree
    assert result["accuracy"] == pytest.approx(3 / 6)


def test_unlabelled_records_are_not_scored():
    with pytest.raises(ValueError, match="without labels"):
        metrics.task_metrics("RTE", [{"label": None}], ["entailment"])


def test_evaluator_plugins_yield_metrics_and_write_files(tmp_path):
    from rope_jax.evaluation import evaluators

    records = [
        {"idx": 0, "premise": "p", "hypothesis": "h", "label": "entailment"},
        {"idx": 1, "premise": "p", "hypothesis": "h", "label": "neutral"},
    ]

    def predict(params, recs):
        assert params == "params"
        return ["entailment", None]

    evaluator = evaluators.create_evaluator(
        predict, task="CB", records=records, workdir=str(tmp_path)
    )
    assert isinstance(evaluator, evaluators.LabelEvaluator)
    result = dict(evaluator.run("params"))
    assert result["accuracy"] == 0.5 and result["invalid_fraction"] == 0.5
    assert result["f1"] == pytest.approx(1 / 3)  # entailment F1 1, the others 0
    # The validation file holds what was scored: the invalid output is null, not a label.
    assert (tmp_path / "predictions" / "CB_val.jsonl").read_text().splitlines()[1] == (
        '{"idx": 1, "label": null}'
    )
    unlabelled = [dict(r, label=None) for r in records]
    test_eval = evaluators.create_evaluator(
        predict, task="CB", records=unlabelled, split="test", workdir=str(tmp_path)
    )
    assert dict(test_eval.run("params")) == {
        "num_examples": 2.0,
        "invalid_fraction": 0.5,
        "skipped_records": 0.0,
        "filled_labels": 1.0,
    }
    # The leaderboard file has a label on every line (the invalid one filled).
    assert (tmp_path / "submission" / "CB.jsonl").read_text().splitlines()[1] == (
        '{"idx": 1, "label": "entailment"}'
    )
    with pytest.raises(ValueError, match="not 'MultiRC'"):
        evaluators.LabelEvaluator(predict, task="MultiRC", records=[])


def _records(task, labels):
    if task == "MultiRC":
        return [
            {"idx": {"paragraph": i // 4, "question": i // 2, "answer": i}, "label": g}
            for i, g in enumerate(labels)
        ]
    return [{"idx": i, "label": g, "pair_id": i // 2} for i, g in enumerate(labels)]


@pytest.mark.parametrize(
    "task,split,labels,predictions",
    [
        ("BoolQ", "val", [True, False, True, False], [True, None, None, False]),
        (
            "CB",
            "val",
            ["entailment", "neutral", "contradiction", "neutral", "entailment"],
            ["entailment", None, "neutral", "neutral", None],
        ),
        ("WSC", "val", [True, False, False, True], [None, None, False, True]),
        (
            "MultiRC",
            "val",
            [True, False, False, True, True, False, False, False],
            [True, None, False, None, True, True, None, False],
        ),
        (
            "AX-b",
            "test",
            ["entailment", "not_entailment", "not_entailment", "entailment", "entailment"],
            ["entailment", None, "not_entailment", None, "not_entailment"],
        ),
    ],
)
def test_prediction_file_is_what_the_metrics_scored(tmp_path, task, split, labels, predictions):
    """Invalid outputs are null in the scored file (with the decoded text), and the official
    metrics recomputed from the file equal the reported ones; a test split's leaderboard
    file still has a label on every line, and the filled ones are counted."""
    import superglue_reference as reference

    from rope_jax.evaluation import evaluators, submission

    records = _records(task, labels)
    texts = ["banana" if p is None else str(p) for p in predictions]
    evaluator = evaluators.create_evaluator(
        lambda params, recs: evaluators.Predictions(predictions, texts),
        task=task,
        records=records,
        split=split,
        workdir=str(tmp_path),
    )
    result = dict(evaluator.run(None))
    lines = reference.read_lines(submission.validation_path(str(tmp_path), task, split))
    flat = (
        [a for line in lines for q in line["passage"]["questions"] for a in q["answers"]]
        if task == "MultiRC"
        else lines
    )
    assert [a["label"] is None for a in flat] == [p is None for p in predictions]
    assert all(a.get("decoded") == "banana" for a in flat if a["label"] is None)
    recomputed = reference.metrics_from_file(task, lines, records)
    assert recomputed == pytest.approx({k: result[k] for k in recomputed})
    if split == "test":
        leaderboard = reference.read_lines(submission.submission_path(str(tmp_path), task))
        assert all(line["label"] is not None for line in leaderboard)
        assert result["filled_labels"] == sum(p is None for p in predictions)
