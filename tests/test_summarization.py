"""Summarization metrics (hand-computed values, and the rouge 1.0.1 / nltk packages the T5
PEGASUS script uses) and the CSL TSV / JSONL reader with its prediction writer."""

import json
import math
import re

import numpy as np
import pytest

from rope_jax.evaluation import summarization
from rope_jax.evaluation.summary_metrics import (
    char_text,
    rouge_scores,
    sentence_bleu,
    summarization_metrics,
)


def _scores(reference, prediction):
    title, predicted = char_text(reference), char_text(prediction)
    scores = rouge_scores(predicted, title)
    scores["bleu"] = sentence_bleu(title.split(" "), predicted.split(" "))
    return scores


def _f(p, r):
    return 2 * p * r / (p + r + 1e-8)


def test_hand_computed_scores():
    # "abcd" vs "abxd": unigrams {a,b,c,d} / {a,b,x,d} share 3; bigrams {ab,bc,cd} /
    # {ab,bx,xd} share 1; the LCS is a b d; BLEU precisions 3/4, 1/3, (0+0.1)/2, (0+0.1)/1,
    # equal lengths so no brevity penalty.
    got = _scores("abcd", "abxd")
    assert got["rouge-1"] == pytest.approx(_f(3 / 4, 3 / 4), abs=1e-15)
    assert got["rouge-2"] == pytest.approx(_f(1 / 3, 1 / 3), abs=1e-15)
    assert got["rouge-l"] == pytest.approx(_f(3 / 4, 3 / 4), abs=1e-15)
    assert got["bleu"] == pytest.approx((3 / 4 * 1 / 3 * 0.05 * 0.1) ** 0.25, rel=1e-12)
    # Repeats count once in rouge 1.0.1 (sets): "aab" vs "aaab" is a perfect ROUGE; BLEU
    # clips counts (1, 2/2, 1/1, smoothed 0.1/1) and penalises the shorter prediction.
    got = _scores("AAAB", "aab")  # lower-cased like the reference script
    assert got["rouge-1"] == got["rouge-2"] == got["rouge-l"] == pytest.approx(_f(1, 1))
    assert got["bleu"] == pytest.approx(math.exp(1 - 4 / 3) * 0.1**0.25, rel=1e-12)
    # "." splits rouge's sentences and vanishes; n-grams still run across the cut, and the
    # union LCS collects one word from each reference sentence.
    got = _scores("a.b", "ab")
    assert got["rouge-1"] == got["rouge-2"] == got["rouge-l"] == pytest.approx(_f(1, 1))
    # Chinese: 研究模型 vs 模型研究 share 4 characters, bigrams {研究, 模型}, LCS length 2.
    got = _scores("研究模型", "模型研究")
    assert got["rouge-1"] == pytest.approx(_f(1, 1))
    assert got["rouge-2"] == pytest.approx(_f(2 / 3, 2 / 3))
    assert got["rouge-l"] == pytest.approx(_f(2 / 4, 2 / 4))
    # BLEU: unigrams 4/4, bigrams 2/3, trigrams (0+0.1)/2, 4-grams (0+0.1)/1.
    assert got["bleu"] == pytest.approx((2 / 3 * 0.05 * 0.1) ** 0.25, rel=1e-12)
    assert _scores("abc", "xyz")["bleu"] == 0.0  # no unigram match


def test_averages_count_empty_predictions_as_zero():
    perfect = summarization_metrics([("研究模型", "研究模型")])
    assert all(v == pytest.approx(1.0, abs=1e-7) for v in perfect.values())
    assert sorted(perfect) == ["bleu", "rouge-1", "rouge-2", "rouge-l"]
    half = summarization_metrics([("研究模型", "研究模型"), ("数据", " \t")])
    assert all(half[k] == pytest.approx(perfect[k] / 2) for k in perfect)
    # A prediction that is only "." stops the reference script (rouge raises); it scores 0.
    dot = summarization_metrics([("研究", ".")])
    assert dot["rouge-1"] == dot["rouge-l"] == 0.0
    with pytest.raises(ValueError, match="pair 1: reference '.' has no words"):
        summarization_metrics([("研究", "研究"), (".", "研究")])
    with pytest.raises(ValueError, match="no"):
        summarization_metrics([])


ALPHABET = list("研究模型数据方法结果提出的了在和。，、") + list("ab.AB 12")


def _random_text(rng, low):
    return "".join(rng.choice(ALPHABET, size=int(rng.integers(low, 24))))


def test_matches_the_rouge_and_nltk_packages_on_random_pairs():
    """The reference script's evaluate() with the packages it imports, on 300 random pairs
    of Chinese characters with ASCII letters, digits, spaces and '.' mixed in."""
    rouge = pytest.importorskip("rouge")
    bleu_score = pytest.importorskip("nltk.translate.bleu_score")
    scorer, smooth = rouge.Rouge(), bleu_score.SmoothingFunction().method1
    rng = np.random.default_rng(0)
    pairs = [(_random_text(rng, 1), _random_text(rng, 0)) for _ in range(300)]
    sums = dict.fromkeys(("rouge-1", "rouge-2", "rouge-l", "bleu"), 0.0)
    compared = 0
    for reference, prediction in pairs:
        title, predicted = " ".join(reference).lower(), " ".join(prediction).lower()
        if not title.replace(".", "").strip() or not predicted.strip():
            continue  # the packages raise on a reference without words; skipped below too
        if predicted == ".":
            continue  # rouge raises "Hypothesis is empty."
        want = scorer.get_scores(hyps=predicted, refs=title)[0]
        want = {k: want[k]["f"] for k in ("rouge-1", "rouge-2", "rouge-l")}
        want["bleu"] = bleu_score.sentence_bleu(
            references=[title.split(" ")],
            hypothesis=predicted.split(" "),
            smoothing_function=smooth,
        )
        got = _scores(reference, prediction)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-12), (reference, prediction, key)
            sums[key] += value
        compared += 1
    assert compared > 220
    kept = [
        (r, p)
        for r, p in pairs
        if " ".join(r).replace(".", "").strip() and p.strip() and " ".join(p).lower() != "."
    ]
    got = summarization_metrics(kept)
    for key, value in sums.items():
        assert got[key] == pytest.approx(value / len(kept), abs=1e-12)


# ----------------------------------------------------------------------------- reader


def test_reads_csl_tsv_and_jsonl(tmp_path):
    tsv = tmp_path / "train.tsv"
    tsv.write_text(
        "\ufeff基于数据的模型研究\t为了研究模型,引入了数据。\n\n一种新方法\t提出了一种方法。\n",
        encoding="utf-8",
    )
    examples = summarization.read_summaries(tsv)
    assert examples == [
        summarization.SummaryExample(1, "为了研究模型,引入了数据。", "基于数据的模型研究"),
        summarization.SummaryExample(3, "提出了一种方法。", "一种新方法"),
    ]
    jsonl = tmp_path / "dev.jsonl"
    rows = [
        {"id": "a7", "abstract": "正文一。", "summary": "标题一"},
        {"abstract": "正文二。", "summary": "标题二"},
    ]
    jsonl.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    examples = summarization.read_summaries(jsonl, source_field="abstract", target_field="summary")
    assert [(e.id, e.source, e.target) for e in examples] == [
        ("a7", "正文一。", "标题一"),
        (2, "正文二。", "标题二"),
    ]


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "a.tsv",
            "标题\t正文\n只有一列\n",
            "a.tsv:2: expected title<TAB>content (2 fields), found 1",
        ),
        ("b.tsv", "标题\t正文\t多余\n", "b.tsv:1: expected title<TAB>content (2 fields), found 3"),
        ("c.tsv", "标题\t正文\n \t正文\n", "c.tsv:2: expected title<TAB>content"),
        ("d.jsonl", '{"title": "t", "content": "c"}\n{"title": \n', "d.jsonl:2: invalid JSON"),
        ("e.jsonl", '{"title": "t"}\n', "e.jsonl:1: no field 'content'"),
        ("f.jsonl", '{"title": 3, "content": "c"}\n', "f.jsonl:1: field 'title' is a int"),
        ("g.jsonl", '{"title": " ", "content": "c"}\n', "g.jsonl:1: field 'title' is empty"),
        ("h.jsonl", "[1, 2]\n", "h.jsonl:1: expected a JSON object"),
        ("i.tsv", "\n\n", "i.tsv: no examples"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(summarization.SummaryFormatError, match=re.escape(message)):
        summarization.read_summaries(path)


def test_reader_errors_before_reading(tmp_path):
    bad = tmp_path / "x.tsv"
    bad.write_bytes("标题\t正文\n".encode() + b"\xff\xfe\t\n")
    with pytest.raises(summarization.SummaryFormatError, match="x.tsv:2: not UTF-8"):
        summarization.read_summaries(bad)
    (tmp_path / "data.csv").write_text("a\tb\n")
    with pytest.raises(ValueError, match="format='tsv'"):
        summarization.read_summaries(tmp_path / "data.csv")
    assert summarization.read_summaries(tmp_path / "data.csv", format="tsv")[0].target == "a"
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        summarization.read_summaries(tmp_path / "missing.tsv")


def test_evaluate_summaries_writes_predictions(tmp_path):
    results = [(1, "基于数据的模型研究", "模型研究"), ("b", "一种新方法", "")]
    metrics = summarization.evaluate_summaries(results, workdir=tmp_path, split="val")
    assert sorted(metrics) == ["bleu", "rouge-1", "rouge-2", "rouge-l"]
    assert metrics == summarization_metrics([(r, p) for _, r, p in results])
    assert 0 < metrics["rouge-1"] < 0.5  # the empty second prediction scores 0
    lines = (tmp_path / "predictions" / "val.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [
        {"id": 1, "reference": "基于数据的模型研究", "prediction": "模型研究"},
        {"id": "b", "reference": "一种新方法", "prediction": ""},
    ]
    assert "模型" in lines[0]  # written as UTF-8 text, not \\u escapes
