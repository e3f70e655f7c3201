"""Summarization metrics of the T5 PEGASUS tables: character-level ROUGE-1/2/L F1 and BLEU.

The T5 PEGASUS fine-tuning script (ZhuiyiTechnology/t5-pegasus ``finetune.py``,
``Evaluator.evaluate``) scores a generated title against the reference like this::

    title = ' '.join(title).lower()
    pred_title = ' '.join(pred_title).lower()
    if pred_title.strip():
        scores = Rouge().get_scores(hyps=pred_title, refs=title)     # rouge==1.0.1
        rouge_1 += scores[0]['rouge-1']['f']   # and 'rouge-2', 'rouge-l'
        bleu += sentence_bleu(references=[title.split(' ')], hypothesis=pred_title.split(' '),
                              smoothing_function=SmoothingFunction().method1)   # nltk
    ... each sum / total

so an empty prediction scores 0 and still counts in the average. This module restates both
packages in pure Python (the main install needs neither; tests compare with both):

* ``rouge`` 1.0.1 cuts each text into "sentences" at every ``.`` (dropping empty pieces and
  collapsing whitespace), then splits sentences at single spaces into words. ROUGE-N counts
  *distinct* n-grams (sets) over the words of all sentences in a row; ROUGE-L is the
  summary-level union LCS (Lin 2004, sec. 3.2) where the union is a *set of words* taken
  from one LCS per (reference sentence, hypothesis sentence) pair, traced back as the
  package does (on a tie, drop the hypothesis word), and ``m``/``n`` count distinct words.
  Every F is ``2 P R / (P + R + 1e-8)``; a zero count gives precision or recall 0.
* ``nltk.translate.bleu_score.sentence_bleu``: uniform weights over 1-4-grams, clipped
  n-gram precisions with denominators ``max(1, count)``, 0 when no unigram matches,
  smoothing method 1 (Chen & Cherry 2014: a zero numerator becomes 0.1), brevity penalty
  ``exp(1 - r / c)`` for ``c <= r`` (``c = 0`` gives 0).

Deliberate difference: for a prediction that is only ``"."`` ``rouge`` raises ("Hypothesis
is empty.") and the reference script stops; here its ROUGE scores are 0 (BLEU as nltk).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Sequence

METRICS = ("rouge-1", "rouge-2", "rouge-l", "bleu")
_SMOOTHING_EPSILON = 0.1  # nltk SmoothingFunction(epsilon=0.1).method1

__all__ = [
    "METRICS",
    "char_text",
    "rouge_l_f1",
    "rouge_n_f1",
    "rouge_scores",
    "sentence_bleu",
    "summarization_metrics",
]


def char_text(text: str) -> str:
    """``' '.join(text).lower()``: the characters of ``text`` as space-separated tokens."""
    return " ".join(text).lower()


def _sentences(text: str) -> list[str]:
    return [" ".join(part.split()) for part in text.split(".") if len(part) > 0]


def _words(sentences: Sequence[str]) -> list[str]:
    return list(itertools.chain.from_iterable(s.split(" ") for s in sentences))


def _f1(overlap: int, hypothesis_count: int, reference_count: int) -> float:
    precision = overlap / hypothesis_count if hypothesis_count else 0.0
    recall = overlap / reference_count if reference_count else 0.0
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))


def rouge_n_f1(hypothesis: Sequence[str], reference: Sequence[str], n: int) -> float:
    """ROUGE-N F of sentence lists as ``rouge`` 1.0.1 computes it (distinct n-grams)."""

    def grams(sentences):
        words = _words(sentences)
        return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}

    hyp, ref = grams(hypothesis), grams(reference)
    return _f1(len(hyp & ref), len(hyp), len(ref))


def _lcs_words(reference: list[str], hypothesis: list[str]) -> set[str]:
    """Words of the LCS that ``rouge``'s ``_recon_lcs`` traces back (iteratively here)."""
    rows, cols = len(reference), len(hypothesis)
    table = [[0] * (cols + 1) for _ in range(rows + 1)]
    for i in range(1, rows + 1):
        for j in range(1, cols + 1):
            if reference[i - 1] == hypothesis[j - 1]:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    words, i, j = set(), rows, cols
    while i > 0 and j > 0:
        if reference[i - 1] == hypothesis[j - 1]:
            words.add(reference[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_l_f1(hypothesis: Sequence[str], reference: Sequence[str]) -> float:
    """Summary-level ROUGE-L F of sentence lists as ``rouge`` 1.0.1 computes it."""
    reference_words = len(set(_words(reference)))
    hypothesis_words = len(set(_words(hypothesis)))
    union: set[str] = set()
    for reference_sentence in reference:
        reference_tokens = reference_sentence.split(" ")
        for hypothesis_sentence in hypothesis:
            union |= _lcs_words(reference_tokens, hypothesis_sentence.split(" "))
    # The package adds, per reference sentence, the words new to the union: their sum is
    # the size of the final union.
    return _f1(len(union), hypothesis_words, reference_words)


def rouge_scores(hypothesis: str, reference: str) -> dict[str, float]:
    """``{"rouge-1", "rouge-2", "rouge-l"}`` F of two texts, as ``Rouge().get_scores``."""
    hyp, ref = _sentences(hypothesis), _sentences(reference)
    if not ref:
        raise ValueError(f"reference {reference!r} has no words (rouge: 'Reference is empty.')")
    if not hyp:
        return {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    return {
        "rouge-1": rouge_n_f1(hyp, ref, 1),
        "rouge-2": rouge_n_f1(hyp, ref, 2),
        "rouge-l": rouge_l_f1(hyp, ref),
    }


def sentence_bleu(reference: Sequence[str], hypothesis: Sequence[str]) -> float:
    """nltk ``sentence_bleu([reference], hypothesis, smoothing_function=method1)``."""

    def grams(tokens, n):  # nltk.util.ngrams
        return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))

    logs = []
    for n in range(1, 5):
        hyp, ref = grams(hypothesis, n), grams(reference, n)
        matches = sum(min(count, ref.get(gram, 0)) for gram, count in hyp.items())
        total = max(1, sum(hyp.values()))
        if n == 1 and matches == 0:
            return 0.0
        logs.append(0.25 * math.log(matches / total if matches else _SMOOTHING_EPSILON / total))
    c, r = len(hypothesis), len(reference)
    brevity = 1.0 if c > r else (0.0 if c == 0 else math.exp(1 - r / c))
    return brevity * math.exp(math.fsum(logs))


def summarization_metrics(pairs: Iterable[tuple[str, str]]) -> dict[str, float]:
    """Mean character-level ROUGE-1/2/L F and BLEU over ``(reference, prediction)`` pairs,
    an empty (or all-whitespace) prediction scoring 0, as the T5 PEGASUS script averages."""
    sums = dict.fromkeys(METRICS, 0.0)
    total = 0
    for reference, prediction in pairs:
        total += 1
        title, predicted = char_text(reference), char_text(prediction)
        if not predicted.strip():
            continue
        try:
            scores = rouge_scores(predicted, title)
        except ValueError as err:
            raise ValueError(f"pair {total - 1}: {err}") from err
        scores["bleu"] = sentence_bleu(title.split(" "), predicted.split(" "))
        for name in METRICS:
            sums[name] += scores[name]
    if not total:
        raise ValueError("no (reference, prediction) pairs to score")
    return {name: value / total for name, value in sums.items()}
