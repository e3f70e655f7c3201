"""Pretraining objectives as pure, seeded numpy functions on token arrays.

Every random choice comes from the ``numpy.random.Generator`` passed as ``rng``, so the same
generator state gives the same example; the input pipeline seeds one generator per example
from (seed, example index), which is what makes its iterator exactly resumable.

Token-id conventions (T5/mT5 SentencePiece): pad 0, EOS 1, unk 2, sentinels counting down
from ``vocab_size - 1``. Functions return 1-D ``int32`` arrays.

Objectives:
  * ``span_corruption`` -- T5/mT5 (Raffel et al. 2020), ``random_spans_noise_mask``.
  * ``t5_span_corruption_lengths`` -- T5's ``random_spans_helper`` length arithmetic.
  * ``mlm`` -- BERT masking (Devlin et al. 2019), 80/10/10, optional whole-word masking.
  * ``gap_sentences`` -- PEGASUS gap-sentence generation (Zhang et al. 2020), "Ind-Orig".
  * ``pseudo_summary`` -- T5 PEGASUS pseudo summaries (greedy character-LCS selection),
    defined in ``pseudo_summaries.py`` and re-exported here.
  * ``causal_lm`` / ``prefix_lm`` -- decoder-only language modelling.

The text-level objectives (``gap_sentences`` selection, ``pseudo_summary``) work on
sentences; ``split_sentences`` cuts text into them, and the pipeline tokenizes afterwards.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Hashable, Sequence

import numpy as np

from rope_jax.pseudo_summaries import (
    join_sentences,
    lcs_length,
    pseudo_summary,
    pseudo_summary_indices,
    split_sentences,
)

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2

__all__ = [
    "EOS_ID",
    "PAD_ID",
    "UNK_ID",
    "causal_lm",
    "gap_sentences",
    "join_sentences",
    "lcs_length",
    "mlm",
    "num_gap_sentences",
    "prefix_lm",
    "pseudo_summary",
    "pseudo_summary_indices",
    "random_spans_counts",
    "random_spans_noise_mask",
    "rouge1_f1",
    "rouge_units",
    "select_gap_sentences",
    "shift_right",
    "span_corruption",
    "split_sentences",
    "t5_span_corruption_lengths",
]


def _as_tokens(tokens) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"expected a 1-D token array, got shape {tokens.shape}")
    return tokens.astype(np.int32, copy=False)


def _append_eos(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    return np.concatenate([tokens, np.array([eos_id], np.int32)])


def shift_right(targets, *, start_id: int = PAD_ID) -> np.ndarray:
    """Teacher-forcing inputs: ``[start_id] + targets[:-1]`` (T5 decoder start id 0)."""
    targets = _as_tokens(targets)
    return np.concatenate([np.array([start_id], np.int32), targets[:-1]])


# ----------------------------------------------------------------------------- span corruption


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator):
    """Lengths of a uniformly random split of ``num_items`` into ``num_segments`` non-empty parts.

    T5's ``_random_segmentation``: shuffle ``num_segments - 1`` segment starts among the
    ``num_items - 1`` gaps between items.
    """
    first_in_segment = np.zeros(num_items, np.int64)
    first_in_segment[1:] = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
    segment_id = np.cumsum(first_in_segment)
    return np.bincount(segment_id, minlength=num_segments)


def random_spans_counts(
    length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
    """``(num_noise_tokens, num_noise_spans)`` of ``random_spans_noise_mask`` at ``length``.

    T5's arithmetic (t5/data/preprocessors.py): lengths below 2 count as 2;
    ``num_noise_tokens = round(float32(length) * noise_density)``, the product in float32 and
    half-to-even rounding as ``tf.round`` (190 * 0.15 is 28.5 in float64, so 28, but
    28.500002 in float32, so 29), clipped to [1, length - 1]; ``num_noise_spans =
    max(1, round(float32(num_noise_tokens) / mean_noise_span_length))``. Deliberate
    difference: the spans are capped at the non-noise tokens, where T5 fails (a
    segmentation into more non-empty parts than items; only at very high densities, e.g.
    0.9 of 10 tokens). ``noise_density == 0`` gives ``(0, 0)``: no noise at all.
    """
    if noise_density == 0.0:
        return 0, 0
    length = max(length, 2)
    num_noise_tokens = int(np.round(np.float32(length) * np.float32(noise_density)))
    num_noise_tokens = min(max(num_noise_tokens, 1), length - 1)
    num_noise_spans = int(
        np.round(np.float32(num_noise_tokens) / np.float32(mean_noise_span_length))
    )
    num_noise_spans = max(num_noise_spans, 1)
    return num_noise_tokens, min(num_noise_spans, length - num_noise_tokens)


def random_spans_noise_mask(
    length: int,
    *,
    rng: np.random.Generator,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
) -> np.ndarray:
    """Boolean noise mask following T5's ``random_spans_noise_mask``.

    Counts from ``random_spans_counts`` (``noise_density == 0`` corrupts nothing, as in T5);
    noise and non-noise span lengths are independent uniformly random segmentations
    (``_random_segmentation``), interleaved starting with a non-noise span and ending with a
    noise span, so that all masks with these counts are equally likely. Lengths below 2 are
    computed at length 2 and truncated, as T5 does.
    """
    if noise_density == 0.0:
        return np.zeros(length, bool)
    orig_length = length
    length = max(length, 2)
    num_noise_tokens, num_noise_spans = random_spans_counts(
        length, noise_density, mean_noise_span_length
    )
    noise_span_lengths = _random_segmentation(num_noise_tokens, num_noise_spans, rng)
    nonnoise_span_lengths = _random_segmentation(length - num_noise_tokens, num_noise_spans, rng)
    interleaved = np.stack([nonnoise_span_lengths, noise_span_lengths], axis=1).reshape(-1)
    span_index = np.repeat(np.arange(interleaved.size), interleaved)
    is_noise = span_index % 2 == 1
    return is_noise[:orig_length]


def span_corruption(
    tokens,
    *,
    rng: np.random.Generator,
    vocab_size: int,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    eos_id: int = EOS_ID,
) -> tuple[np.ndarray, np.ndarray]:
    """T5 span corruption: returns ``(inputs, targets)``, both ending with EOS.

    Each noise span is replaced in ``inputs`` by one sentinel; ``targets`` lists every noise
    span preceded by the same sentinel. The k-th span (k = 0, 1, ...) uses sentinel
    ``vocab_size - 1 - k`` (T5's ``noise_span_to_unique_sentinel``). ``tokens`` should not end
    with EOS (T5 corrupts the raw chunk, then appends EOS).
    """
    tokens = _as_tokens(tokens)
    noise = random_spans_noise_mask(
        tokens.size,
        rng=rng,
        noise_density=noise_density,
        mean_noise_span_length=mean_noise_span_length,
    )
    return _sentinelize(tokens, noise, vocab_size, eos_id), _sentinelize(
        tokens, ~noise, vocab_size, eos_id
    )


def _sentinelize(tokens: np.ndarray, drop: np.ndarray, vocab_size: int, eos_id: int):
    """Replace each run of ``drop`` by one sentinel, numbered by run order from the vocab end."""
    prev = np.concatenate([[False], drop[:-1]])
    run_start = drop & ~prev
    sentinel = vocab_size - np.cumsum(run_start)
    out = np.where(run_start, sentinel, tokens)
    out = out[~(drop & prev)]
    return _append_eos(out.astype(np.int32), eos_id)


def t5_span_corruption_lengths(
    inputs_length: int,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
) -> tuple[int, int]:
    """``(raw_tokens_length, targets_length)`` for an encoder length (T5 ``random_spans_helper``).

    The largest raw length whose corrupted inputs (non-noise tokens + one sentinel per span
    + EOS) still fit ``inputs_length``; 512 -> (568, 114) at density 0.15, mean span 3.
    Like T5's helper this counts in float64 (Python ``round``), while the mask counts in
    float32 (``random_spans_counts``); at the few lengths where the two round differently,
    T5's examples come out longer than the helper says, and so do these (172 inputs: 190 raw
    tokens, 29 noise tokens instead of 28, 40 targets instead of 38); the packer cuts them
    as T5 trims them. 512 at density 0.15 is not such a length.
    """

    def corrupted_lengths(raw_length: int) -> tuple[int, int]:
        num_noise = int(round(raw_length * noise_density))
        num_spans = int(round(num_noise / mean_noise_span_length))
        return raw_length - num_noise + num_spans + 1, num_noise + num_spans + 1

    raw_length = inputs_length - 1
    while corrupted_lengths(raw_length + 1)[0] <= inputs_length:
        raw_length += 1
    _, targets_length = corrupted_lengths(raw_length)
    # T5 trims one token at density 0.5 so that targets do not exceed inputs.
    if noise_density == 0.5 and targets_length > inputs_length:
        raw_length -= 1
        targets_length -= 1
    return raw_length, targets_length


# ----------------------------------------------------------------------------------------- MLM


def mlm(
    tokens,
    *,
    rng: np.random.Generator,
    mask_id: int,
    random_token_range: tuple[int, int],
    mask_rate: float = 0.15,
    mask_token_prob: float = 0.8,
    random_token_prob: float = 0.1,
    word_starts=None,
    maskable=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BERT masked LM: returns ``(inputs, targets, loss_weights)``.

    ``round(mask_rate * n)`` positions (at least one) are selected among ``maskable``; each is
    replaced by ``mask_id`` with probability 0.8, by a uniform token from
    ``random_token_range = (low, high)`` with 0.1, kept with 0.1 (Devlin et al. 2019).
    ``targets`` are the original tokens, ``loss_weights`` 1 at selected positions.

    Whole-word masking: pass ``word_starts`` (bool per token, True where a word begins, e.g.
    SentencePiece pieces starting with '▁'); words are taken in random order and added whole
    while the total stays within the budget, as BERT's ``create_masked_lm_predictions``.
    """
    tokens = _as_tokens(tokens)
    n = tokens.size
    maskable = np.ones(n, bool) if maskable is None else np.asarray(maskable, bool)
    candidates = np.flatnonzero(maskable)
    num_to_mask = min(max(1, int(round(n * mask_rate))), candidates.size) if n else 0
    if word_starts is None:
        selected = rng.choice(candidates, size=num_to_mask, replace=False)
    else:
        word_starts = np.asarray(word_starts, bool).copy()
        if n:
            word_starts[0] = True
        word_id = np.cumsum(word_starts) - 1
        chosen: list[int] = []
        for word in rng.permutation(int(word_id[-1]) + 1 if n else 0):
            positions = np.flatnonzero((word_id == word) & maskable)
            if positions.size == 0 or len(chosen) + positions.size > num_to_mask:
                continue
            chosen.extend(positions.tolist())
            if len(chosen) == num_to_mask:
                break
        selected = np.asarray(chosen, np.int64)
    inputs = tokens.copy()
    choice = rng.random(selected.size)
    to_mask = selected[choice < mask_token_prob]
    is_random = (choice >= mask_token_prob) & (choice < mask_token_prob + random_token_prob)
    to_random = selected[is_random]
    inputs[to_mask] = mask_id
    low, high = random_token_range
    inputs[to_random] = rng.integers(low, high, size=to_random.size)
    loss_weights = np.zeros(n, np.int32)
    loss_weights[selected] = 1
    return inputs, tokens.copy(), loss_weights


# ------------------------------------------------------------------------------ gap sentences

_WORD_RE = re.compile(r"[0-9a-z]+|[^\x00-\x7f\s]")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def rouge_units(text: str) -> list[str]:
    """Scoring units for ROUGE: ASCII-lower-cased alphanumeric words; each non-ASCII character.

    ASCII text gets PEGASUS's tokenisation (``RougeDistance::PrecomputeSentenceData``:
    ``AsciiStrToLower``, then ``[^a-z0-9]+`` as separators). Deliberate difference: PEGASUS
    drops every non-ASCII byte, so Chinese text would have no units at all; here each
    non-ASCII character is a unit of its own (as Chinese ROUGE is usually computed), which
    also splits accented words ("café" -> "caf", "é", where PEGASUS keeps "caf").
    PEGASUS-large's stopword list (``parser_rouge_stopwords_filename``) is not applied: the
    paper's Ind-Orig selection scores every word.
    """
    return _WORD_RE.findall(text.translate(_ASCII_LOWER))


def rouge1_f1(candidate: Sequence[Hashable], reference: Sequence[Hashable]) -> np.float32:
    """ROUGE-1 F1 as PEGASUS computes it (float32; unigrams counted with repeats, clipped)."""
    return _rouge1_f1_counts(Counter(candidate), Counter(reference))


def num_gap_sentences(num_sentences: int, gap_ratio: float) -> int:
    """PEGASUS ``GetNumMaskedSentences``: ``min(int(max(float32(n) * ratio, 1)), n)``.

    Truncation of a float32 product: 50 sentences at ratio 0.58 give 29 (the float64
    product, 28.999999999999996, would give 28); at least one sentence, at most all of them.
    """
    product = np.float32(num_sentences) * np.float32(gap_ratio)
    return min(int(max(product, np.float32(1.0))), num_sentences)


def select_gap_sentences(
    sentence_units: Sequence[Sequence[Hashable]], *, gap_ratio: float = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    """PEGASUS "Ind-Orig" selection: returns ``(selected_indices sorted, scores)``.

    As PEGASUS's ``GetSentenceIndicesByRouge`` (pegasus/ops/sentence_selection.cc, strategy
    "rouge"): each sentence is scored independently by ROUGE-1 F1 against the rest of the
    document (the document's unigram counts minus the sentence's), in float32 as its
    ``ComputeRougeFromCandidateCounts``; the ``(score, index)`` pairs are sorted in
    descending order, so equal scores go to the LATER sentence; the first
    ``num_gap_sentences(n, gap_ratio)`` indices are returned in document order. Not
    implemented: PEGASUS-large's "dynamic_rouge" (a randomly shrunk ratio and Gaussian noise
    on the scores).
    """
    n = len(sentence_units)
    total = Counter()
    for units in sentence_units:
        total.update(units)
    scores = np.zeros(n, np.float32)
    for i, units in enumerate(sentence_units):
        candidate = Counter(units)
        scores[i] = _rouge1_f1_counts(candidate, total - candidate)
    ranked = sorted(range(n), key=lambda i: (scores[i], i), reverse=True)
    return np.sort(np.asarray(ranked[: num_gap_sentences(n, gap_ratio)], np.int64)), scores


def _rouge1_f1_counts(candidate: Counter, reference: Counter) -> np.float32:
    """PEGASUS's float32 arithmetic: P and R are float32 of double ratios (denominators at
    least 1), ``F = 2 P R / (P + R)`` in float32, 0 unless both are positive."""
    overlap = sum((candidate & reference).values())
    recall = np.float32(overlap / max(1, sum(reference.values())))
    precision = np.float32(overlap / max(1, sum(candidate.values())))
    if precision > 0 and recall > 0:
        return np.float32(2) * precision * recall / (precision + recall)
    return np.float32(0.0)


def gap_sentences(
    sentences: Sequence,
    *,
    rng: np.random.Generator,
    mask1_id: int,
    sentence_units: Sequence[Sequence[Hashable]] | None = None,
    gap_ratio: float = 0.3,
    mask2_id: int | None = None,
    mlm_rate: float = 0.0,
    random_token_range: tuple[int, int] | None = None,
    eos_id: int = EOS_ID,
) -> tuple[np.ndarray, np.ndarray]:
    """PEGASUS gap-sentence generation (Zhang et al. 2020): returns ``(inputs, targets)``.

    ``sentences`` are token arrays, one per sentence. Selection (``select_gap_sentences``)
    scores ``sentence_units`` (default: the token ids themselves; the pipeline passes
    ``rouge_units`` of the sentence text, i.e. words as in the paper). In ``inputs`` each
    selected sentence becomes one ``mask1_id``; ``targets`` are the selected sentences in
    document order. Both outputs end with EOS. This is PEGASUS's ``GetInputAndTarget`` with
    ``mask_sentence_options_prob = [1, 0, 0, 0]`` (the paper's MASK1 always; the released
    PEGASUS-large config leaves 10 % of the selected sentences intact).

    With ``mlm_rate > 0``, ``round(mlm_rate * m)`` (at least one) of the ``m`` remaining
    tokens get BERT masking with ``mask2_id`` (80/10/10). Deliberate differences from
    PEGASUS's ``GetMLM``: it masks ``int(max(words * ratio, 1))`` whole words, and it also
    returns their ids as encoder-side MLM targets, which this function does not (only the
    corrupted input; the paper's final models use no MLM).
    """
    sentences = [_as_tokens(s) for s in sentences]
    if not sentences:
        raise ValueError("gap_sentences needs at least one sentence")
    units = [s.tolist() for s in sentences] if sentence_units is None else sentence_units
    if len(units) != len(sentences):
        raise ValueError(f"{len(units)} sentence_units for {len(sentences)} sentences")
    selected, _ = select_gap_sentences(units, gap_ratio=gap_ratio)
    is_selected = np.zeros(len(sentences), bool)
    is_selected[selected] = True
    mask1 = np.array([mask1_id], np.int32)
    pieces = [mask1 if is_selected[i] else s for i, s in enumerate(sentences)]
    inputs = np.concatenate(pieces)
    if mlm_rate > 0:
        if mask2_id is None or random_token_range is None:
            raise ValueError("mlm_rate > 0 needs mask2_id and random_token_range")
        # ``mlm_rate`` of the tokens left in the input (the MASK1 tokens are not candidates).
        maskable = inputs != mask1_id
        if maskable.any():
            inputs[maskable], _, _ = mlm(
                inputs[maskable],
                rng=rng,
                mask_id=mask2_id,
                random_token_range=random_token_range,
                mask_rate=mlm_rate,
            )
    targets = np.concatenate([sentences[i] for i in selected])
    return _append_eos(inputs, eos_id), _append_eos(targets, eos_id)


# ------------------------------------------------------------------------ decoder-only LMs


def causal_lm(tokens, *, eos_id: int = EOS_ID) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Next-token prediction: ``(input_tokens, target_tokens, loss_weights)``.

    ``target_tokens = tokens + [EOS]``, ``input_tokens`` its right shift with start id 0.
    """
    targets = _append_eos(_as_tokens(tokens), eos_id)
    return shift_right(targets), targets, np.ones(targets.size, np.int32)


def prefix_lm(
    tokens, *, rng: np.random.Generator, eos_id: int = EOS_ID
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Prefix LM: ``(input_tokens, target_tokens, loss_weights, prefix_mask)``.

    A split point k is drawn uniformly in [1, n - 1] (k = 0 when n < 2). The sequence is
    ``tokens + [EOS]`` as in ``causal_lm``; the loss covers targets from position k on, and
    ``prefix_mask`` is 1 on input positions 0..k (the start id and the k prefix tokens), the
    T5X decoder-only convention (``decoder_causal_attention``): those positions attend to
    each other bidirectionally.
    """
    tokens = _as_tokens(tokens)
    n = tokens.size
    split = int(rng.integers(1, n)) if n >= 2 else 0
    inputs, targets, _ = causal_lm(tokens, eos_id=eos_id)
    position = np.arange(targets.size)
    loss_weights = (position >= split).astype(np.int32)
    prefix_mask = ((position <= split) & (split > 0)).astype(np.int32)
    return inputs, targets, loss_weights, prefix_mask
