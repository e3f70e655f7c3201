"""Objectives against published properties, hand computations and brute-force references."""

from collections import Counter

import numpy as np
import pytest

from rope_jax import objectives as obj
from rope_jax import pseudo_summaries

VOCAB = 1000


def _reconstruct(inputs, targets, vocab_size):
    """Replace each sentinel in ``inputs`` by the span that follows it in ``targets``."""
    inputs, targets = list(inputs[:-1]), list(targets[:-1])
    spans, current = {}, None
    for token in targets:
        if token >= vocab_size - 100:
            current = token
            spans[current] = []
        else:
            spans[current].append(token)
    out = []
    for token in inputs:
        out.extend(spans[token] if token in spans else [token])
    return out


def test_span_corruption_statistics_and_reconstruction():
    rng = np.random.default_rng(0)
    noise_total = token_total = span_total = 0
    for length in rng.integers(20, 600, size=400):
        tokens = rng.integers(3, VOCAB - 100, size=length)
        inputs, targets = obj.span_corruption(tokens, rng=rng, vocab_size=VOCAB)
        assert inputs[-1] == 1 and targets[-1] == 1
        assert _reconstruct(inputs, targets, VOCAB) == tokens.tolist()
        sentinels = targets[targets >= VOCAB - 100]
        # Sentinels count down from the vocabulary end, one per span, in order of appearance.
        np.testing.assert_array_equal(sentinels, VOCAB - 1 - np.arange(sentinels.size))
        np.testing.assert_array_equal(inputs[inputs >= VOCAB - 100], sentinels)
        # The mask starts with a non-noise span and ends with a noise span.
        assert inputs[0] == tokens[0] and inputs[-2] == sentinels[-1]
        noise_total += targets.size - 1 - sentinels.size
        token_total += length
        span_total += sentinels.size
    assert abs(noise_total / token_total - 0.15) < 0.01 * 0.15
    assert abs(noise_total / span_total - 3.0) < 0.05 * 3.0


def test_span_lengths_are_random_segmentations():
    rng = np.random.default_rng(1)
    mask = obj.random_spans_noise_mask(568, rng=rng)
    assert mask.sum() == 85 and not mask[0] and mask[-1]
    starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
    assert starts.size == 28
    # Different generator states give different masks; the same state the same mask.
    again = obj.random_spans_noise_mask(568, rng=np.random.default_rng(1))
    other = obj.random_spans_noise_mask(568, rng=np.random.default_rng(2))
    np.testing.assert_array_equal(mask, again)
    assert (mask != other).any()


def test_noise_counts_round_a_float32_product_as_t5():
    # T5: tf.round(tf.cast(length, tf.float32) * noise_density), half to even. 190 * 0.15 is
    # 28.5 in float64 (28 after rounding) but 28.500002 in float32 (29); likewise 350 and 390.
    # Spans: round(float32(noise) / 3): 29 / 3 -> 10, 53 / 3 -> 18, 59 / 3 -> 20.
    rng = np.random.default_rng(12)
    for length, noise, spans in [(190, 29, 10), (350, 53, 18), (390, 59, 20), (568, 85, 28)]:
        mask = obj.random_spans_noise_mask(length, rng=rng)
        span_starts = mask & ~np.concatenate([[False], mask[:-1]])
        assert (int(mask.sum()), int(span_starts.sum())) == (noise, spans)
        assert obj.random_spans_counts(length) == (noise, spans)
    # At least one noise and one non-noise token; short lengths are computed at length 2.
    assert obj.random_spans_counts(3, 0.01) == (1, 1)
    assert obj.random_spans_counts(4, 0.99) == (3, 1)
    assert obj.random_spans_counts(0) == obj.random_spans_counts(1) == (1, 1)


def test_noise_density_zero_corrupts_nothing():
    rng = np.random.default_rng(13)
    assert not obj.random_spans_noise_mask(10, rng=rng, noise_density=0.0).any()
    tokens = np.arange(3, 13)
    inputs, targets = obj.span_corruption(tokens, rng=rng, vocab_size=VOCAB, noise_density=0.0)
    # As T5: the inputs are the tokens; the targets one sentinel for the one non-noise span.
    np.testing.assert_array_equal(inputs, [*tokens, 1])
    np.testing.assert_array_equal(targets, [VOCAB - 1, 1])
    assert obj.random_spans_counts(10, 0.0) == (0, 0)


def test_all_masks_with_the_counts_are_equally_likely():
    # T5's docstring: "Subject to the above restrictions, all masks are equally likely."
    # Length 12 at density 0.5: 6 noise tokens in 2 spans, 6 non-noise tokens in 2 spans,
    # so 5 x 5 = 25 masks, each with probability 1/25.
    rng = np.random.default_rng(14)
    draws = 5000
    counts = Counter(
        obj.random_spans_noise_mask(12, rng=rng, noise_density=0.5).tobytes() for _ in range(draws)
    )
    assert len(counts) == 25
    expected = draws / 25  # binomial standard deviation ~14
    assert max(abs(c - expected) for c in counts.values()) < 60, counts.values()


def test_t5_length_arithmetic():
    assert obj.t5_span_corruption_lengths(512) == (568, 114)
    raw, target_length = obj.t5_span_corruption_lengths(512)
    rng = np.random.default_rng(2)
    for _ in range(200):
        tokens = rng.integers(3, 30000, size=raw)
        inputs, targets = obj.span_corruption(tokens, rng=rng, vocab_size=32100)
        assert (inputs.size, targets.size) == (512, target_length)
    # 126 raw: 19 noise, 6 spans -> 107 + 6 + 1 = 114 inputs, 19 + 6 + 1 = 26 targets;
    # 127 raw: 19 noise, 6 spans -> 115 inputs, too long.
    assert obj.t5_span_corruption_lengths(114) == (126, 26)


def test_span_corruption_short_inputs():
    rng = np.random.default_rng(3)
    for length in range(0, 6):
        tokens = np.arange(3, 3 + length)
        inputs, targets = obj.span_corruption(tokens, rng=rng, vocab_size=VOCAB)
        assert _reconstruct(inputs, targets, VOCAB) == tokens.tolist()


def test_mlm_rates():
    rng = np.random.default_rng(4)
    tokens = rng.integers(10, 500, size=(300, 200))
    counts = np.zeros(4)
    for row in tokens:
        inputs, targets, weights = obj.mlm(row, rng=rng, mask_id=5, random_token_range=(10, 500))
        np.testing.assert_array_equal(targets, row)
        assert weights.sum() == 30  # round(0.15 * 200)
        np.testing.assert_array_equal(inputs[weights == 0], row[weights == 0])
        sel = weights == 1
        counts += [
            sel.sum(),
            (inputs[sel] == 5).sum(),
            (inputs[sel] == row[sel]).sum(),
            ((inputs[sel] != 5) & (inputs[sel] != row[sel])).sum(),
        ]
    mask_frac, keep_frac, random_frac = counts[1:] / counts[0]
    assert abs(mask_frac - 0.8) < 0.02
    # "kept" includes random draws that hit the original token (1/490 of the 10%).
    assert abs(keep_frac - 0.1) < 0.015 and abs(random_frac - 0.1) < 0.015


def test_mlm_whole_word():
    rng = np.random.default_rng(5)
    word_starts = np.zeros(100, bool)
    word_starts[::4] = True  # 25 words of 4 pieces
    tokens = np.arange(100) + 10
    for _ in range(50):
        _, _, weights = obj.mlm(
            tokens, rng=rng, mask_id=5, random_token_range=(10, 200), word_starts=word_starts
        )
        per_word = weights.reshape(25, 4).sum(axis=1)
        assert set(per_word.tolist()) <= {0, 4}
        assert weights.sum() == 12  # 15 allowed -> three whole words of 4


def test_rouge1_and_gap_sentence_selection_hand_example():
    sentences = [
        "The cat sat on the mat.",  # the x2, cat, sat, on, mat (6 units)
        "The cat ran.",  # the, cat, ran (3)
        "A dog sat on a log.",  # a x2, dog, sat, on, log (6)
        "Birds sing.",  # birds, sing (2)
    ]
    # F1 = 2PR / (P + R), counts clipped with repeats:
    # s0: rest has the 1, cat 1, sat 1, on 1 -> overlap 4, P 4/6, R 4/11 -> 8/17
    # s1: rest has the 2, cat 1           -> overlap 2, P 2/3, R 2/14 -> 4/17
    # s2: rest has sat 1, on 1            -> overlap 2, P 2/6, R 2/11 -> 4/17
    # s3: nothing                          -> 0
    units = [obj.rouge_units(s) for s in sentences]
    selected, scores = obj.select_gap_sentences(units, gap_ratio=0.3)
    np.testing.assert_allclose(scores, [8 / 17, 4 / 17, 4 / 17, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(selected, [0])  # int(4 * 0.3) = 1
    selected, _ = obj.select_gap_sentences(units, gap_ratio=0.5)
    # s1 and s2 tie (the same float32 value): PEGASUS sorts (score, index) pairs in
    # descending order, so the later sentence wins.
    assert scores[1] == scores[2]
    np.testing.assert_array_equal(selected, [0, 2])
    assert obj.rouge1_f1(units[0], units[1] + units[2] + units[3]) == pytest.approx(8 / 17)


def test_rouge_units_are_pegasus_words_plus_non_ascii_characters():
    # PEGASUS: ASCII lower case, [^a-z0-9]+ separates. Non-ASCII characters (which PEGASUS
    # drops) are units of their own; the Kelvin sign is not lower-cased into an ASCII "k".
    assert obj.rouge_units("Hello, WORLD-2! café 猫吃鱼\u212a") == [
        *["hello", "world", "2", "caf", "é"],
        *["猫", "吃", "鱼", "\u212a"],
    ]


def test_number_of_gap_sentences_is_pegasus_floor_capped_at_n():
    # GetNumMaskedSentences: min(int(max(float32(n) * ratio, 1.0f)), n).
    cases = {(1, 0.3): 1, (3, 0.3): 1, (5, 0.3): 1, (9, 0.3): 2, (10, 0.3): 3, (3, 0.5): 1}
    cases.update({(2, 1.0): 2, (4, 0.9): 3, (7, 1.0): 7})
    # 50 * 0.58 is 28.999999999999996 in float64 but exactly 29 in float32.
    cases[(50, 0.58)] = 29
    for (n, ratio), expected in cases.items():
        units = [[f"w{i}"] for i in range(n)]
        assert obj.select_gap_sentences(units, gap_ratio=ratio)[0].size == expected, (n, ratio)
        assert obj.num_gap_sentences(n, ratio) == expected
    # Every sentence may go: the input is then MASK1 only.
    inputs, targets = obj.gap_sentences(
        [np.array([10, 11]), np.array([12])], rng=np.random.default_rng(0), mask1_id=7, gap_ratio=1
    )
    np.testing.assert_array_equal(inputs, [7, 7, 1])
    np.testing.assert_array_equal(targets, [10, 11, 12, 1])


def test_tied_scores_select_the_later_sentences_as_pegasus():
    # PEGASUS's own test document: every sentence scores the same (one shared word), so its
    # descending sort of (score, index) pairs takes the last int(10 * 0.3) = 3 sentences.
    text = " ".join(f"sentence {i}." for i in range(10))
    sentences = obj.split_sentences(text)
    assert len(sentences) == 10
    selected, scores = obj.select_gap_sentences([obj.rouge_units(s) for s in sentences])
    assert len(set(scores.tolist())) == 1
    np.testing.assert_array_equal(selected, [7, 8, 9])


def _pegasus_rouge_selection(sentence_units, ratio):
    """PEGASUS GetSentenceIndicesByRouge restated: float32 P, R, F from clipped counts,
    std::sort of (score, index) pairs with std::greater, the first n indices re-sorted."""
    f32 = np.float32
    document = {}
    for units in sentence_units:
        for unit in units:
            document[unit] = document.get(unit, 0) + 1
    pairs = []
    for i, units in enumerate(sentence_units):
        sentence = {}
        for unit in units:
            sentence[unit] = sentence.get(unit, 0) + 1
        rest = {u: c - sentence.get(u, 0) for u, c in document.items()}
        overlap = sum(min(c, sentence.get(u, 0)) for u, c in rest.items())
        recall = f32(overlap / max(1.0, float(sum(rest.values()))))
        precision = f32(overlap / max(1.0, float(len(units))))
        f1 = f32(0)
        if precision > 0 and recall > 0:
            f1 = (f32(2) * precision * recall) / (precision + recall)
        pairs.append((f1, i))
    pairs.sort(reverse=True)
    count = min(int(max(f32(len(sentence_units)) * f32(ratio), f32(1))), len(sentence_units))
    return sorted(i for _, i in pairs[:count])


def test_gap_sentence_selection_matches_the_pegasus_restatement():
    rng = np.random.default_rng(15)
    for _ in range(300):
        n = int(rng.integers(1, 12))
        vocabulary = [f"w{i}" for i in range(int(rng.integers(1, 6)))]
        units = [list(rng.choice(vocabulary, size=rng.integers(0, 6))) for _ in range(n)]
        ratio = float(rng.choice([0.15, 0.3, 0.45, 0.58, 1.0]))
        selected, _ = obj.select_gap_sentences(units, gap_ratio=ratio)
        assert selected.tolist() == _pegasus_rouge_selection(units, ratio)


def test_gap_sentences_tokens():
    rng = np.random.default_rng(6)
    sentences = [np.array([10, 11, 12]), np.array([10, 11, 13]), np.array([20, 21])]
    # token-id units: s0 vs rest {10,11,13,20,21}: overlap 2 -> F 1/2; s1 the same, and the
    # tie goes to the later sentence; s2 0. int(3 * 0.3) -> max(., 1) = 1 sentence.
    inputs, targets = obj.gap_sentences(sentences, rng=rng, mask1_id=7, gap_ratio=0.3)
    np.testing.assert_array_equal(inputs, [10, 11, 12, 7, 20, 21, 1])
    np.testing.assert_array_equal(targets, [10, 11, 13, 1])
    long = [rng.integers(10, 100, size=20) for _ in range(10)]
    inputs, targets = obj.gap_sentences(
        long, rng=rng, mask1_id=7, mask2_id=8, mlm_rate=0.15, random_token_range=(10, 100)
    )
    assert (inputs == 7).sum() == 3 and targets.size == 61
    assert (inputs == 8).sum() > 0 and inputs.size == 7 * 20 + 3 + 1


def test_gap_sentences_mlm_masks_fifteen_percent_of_the_unselected_tokens():
    rng = np.random.default_rng(11)
    # 10 sentences of 2 distinct tokens: 3 become MASK1, 14 tokens remain; round(0.15 * 14) = 2
    # of them are selected for MLM. Random replacements come from ids disjoint from the text,
    # so a selected token changes unless it is kept (10%).
    sentences = [np.array([10 + 2 * i, 11 + 2 * i]) for i in range(10)]
    unmasked, _ = obj.gap_sentences(sentences, rng=rng, mask1_id=7)
    changed = []
    for _ in range(400):
        inputs, _ = obj.gap_sentences(
            sentences, rng=rng, mask1_id=7, mask2_id=8, mlm_rate=0.15, random_token_range=(50, 60)
        )
        np.testing.assert_array_equal(inputs == 7, unmasked == 7)
        changed.append(int((inputs != unmasked).sum()))
    assert max(changed) == 2
    assert abs(np.mean(changed) - 0.9 * 2) < 0.1


def _lcs_dp(a, b):
    table = np.zeros((len(a) + 1, len(b) + 1), int)
    for i, ca in enumerate(a):
        for j, cb in enumerate(b):
            if ca == cb:
                table[i + 1, j + 1] = table[i, j] + 1
            else:
                table[i + 1, j + 1] = max(table[i, j + 1], table[i + 1, j])
    return table[-1, -1]


def test_lcs_matches_dynamic_programming():
    rng = np.random.default_rng(7)
    alphabet = list("猫狗吃鱼。ab")
    for _ in range(200):
        a = "".join(rng.choice(alphabet, size=rng.integers(0, 15)))
        b = "".join(rng.choice(alphabet, size=rng.integers(0, 15)))
        assert obj.lcs_length(a, b) == _lcs_dp(a, b)
    for _ in range(3):  # long strings take the numpy mask-building path
        a = "".join(rng.choice(alphabet, size=300))
        b = "".join(rng.choice(alphabet, size=40))
        assert obj.lcs_length(a, b) == _lcs_dp(a, b) == obj.lcs_length(b, a)


def test_pseudo_summary_chinese_hand_example():
    text = "猫吃鱼。狗吃肉。猫和狗都吃东西。今天下雨了。\n我们在家里看书。书很好看。"
    sentences = obj.split_sentences(text)
    assert sentences == [
        *["猫吃鱼。", "狗吃肉。", "猫和狗都吃东西。"],
        *["今天下雨了。", "我们在家里看书。", "书很好看。"],
    ]
    # Round 1, LCS(candidate, rest joined):
    #   猫吃鱼。         vs rest: 猫(S2) 吃(S2) 。        = 3
    #   狗吃肉。         vs rest: 狗(S2) 吃(S2) 。        = 3
    #   猫和狗都吃东西。 vs rest: 猫(S0) 狗(S1) 吃(S1) 。 = 4   <- maximum
    #   今天下雨了。     vs rest: 。                      = 1
    #   我们在家里看书。 vs rest: 书(S5) 。 (or 看 。)     = 2
    #   书很好看。       vs rest: 看(S4) 。 (or 书 。)     = 2
    # Target 猫和狗都吃东西。 has 8 chars, 8 / 27 > 0.25 -> stop.
    source, target = obj.pseudo_summary_indices(sentences)
    assert target == [2] and source == [0, 1, 3, 4, 5]
    source_text, target_text = obj.pseudo_summary(text, max_chars=None)
    assert target_text == "猫和狗都吃东西。"
    assert source_text == "猫吃鱼。狗吃肉。今天下雨了。我们在家里看书。书很好看。"


def test_pseudo_summary_never_returns_the_longer_side_as_the_summary():
    # Two sentences tie (LCS 3 either way), the earlier one moves, one is left: the reference
    # then swaps (`if len(source) < len(target): source, target = target, source`).
    sentences = ["甲乙丙丁戊己庚。", "甲乙。"]
    assert obj.pseudo_summary_indices(sentences) == ([0], [1])
    text = "甲乙丙丁戊己庚。甲乙。"
    assert obj.pseudo_summary(text, max_chars=None) == ("甲乙丙丁戊己庚。", "甲乙。")


def _text_segmentate(text, maxlen, seps="\n", strips=None):
    """bert4keras snippets.text_segmentate, restated (T5 PEGASUS calls it with 32, '\\n。')."""
    text = text.strip().strip(strips)
    if seps and len(text) > maxlen:
        pieces = text.split(seps[0])
        text, texts = "", []
        for i, p in enumerate(pieces):
            if text and p and len(text) + len(p) > maxlen - 1:
                texts.extend(_text_segmentate(text, maxlen, seps[1:], strips))
                text = ""
            text = text + p if i + 1 == len(pieces) else text + p + seps[0]
        if text:
            texts.extend(_text_segmentate(text, maxlen, seps[1:], strips))
        return texts
    return [text]


def _reference_pseudo_summary(texts, summary_rate=0.25):
    """T5 PEGASUS train.py pseudo_summary, restated with a dynamic-programming LCS."""
    source_idxs, target_idxs = list(range(len(texts))), []
    while True:
        sims = []
        for i in source_idxs:
            new_source = "".join(texts[j] for j in source_idxs if j != i)
            new_target = "".join(texts[j] for j in sorted([*target_idxs, i]))
            sims.append(_lcs_dp(new_source, new_target))
        new_idx = source_idxs[int(np.argmax(sims))]
        source_idxs.remove(new_idx)
        target_idxs = sorted([*target_idxs, new_idx])
        source = "".join(texts[i] for i in source_idxs)
        target = "".join(texts[i] for i in target_idxs)
        if len(source_idxs) == 1 or 1.0 * len(target) / len(source) > summary_rate:
            break
    if len(source) < len(target):
        source, target = target, source
    return source, target


def _random_chinese_text(rng, size):
    chars = list("天地人你我他山水火木金土日月星")
    weights = np.array([1.0] * len(chars) + [0.12, 0.05, 0.02])
    alphabet = [*chars, "。", "\n", " "]
    return "".join(rng.choice(alphabet, size=size, p=weights / weights.sum()))


def test_short_pieces_match_bert4keras_text_segmentate():
    rng = np.random.default_rng(16)
    for _ in range(300):
        text = _random_chinese_text(rng, int(rng.integers(0, 160)))
        max_chars = int(rng.choice([4, 8, 16, 32]))
        expected = [piece for piece in _text_segmentate(text, max_chars, "\n。") if piece]
        assert obj.split_sentences(text, max_chars=max_chars) == expected, (text, max_chars)
    # By hand: lines merge up to 32 characters, newlines kept inside a piece; a longer line
    # is cut at 。 and its sentences merged the same way.
    long_line = "甲" * 20 + "。" + "乙" * 20 + "。" + "丙" * 5 + "。"
    assert obj.split_sentences("第一行。\n第二行。\n" + long_line, max_chars=32) == [
        "第一行。\n第二行。",
        "甲" * 20 + "。",
        "乙" * 20 + "。" + "丙" * 5 + "。",
    ]


def test_pseudo_summary_of_text_matches_the_t5_pegasus_reference():
    rng = np.random.default_rng(17)
    compared = 0
    for _ in range(40):
        text = _random_chinese_text(rng, int(rng.integers(40, 200)))
        pieces = [piece for piece in _text_segmentate(text, 32, "\n。") if piece]
        if len(pieces) < 2:
            continue
        source, target = _reference_pseudo_summary(pieces)
        assert obj.pseudo_summary(text) == (source, target)
        compared += 1
        # The source is the longer side (the swap).
        assert len(source) >= len(target)
    assert compared >= 30


def _pseudo_summary_reference(sentences, rate=0.25):
    """The reference's selection rule on our joined strings, one DP LCS per candidate."""
    source, target = list(range(len(sentences))), []
    while True:
        values = []
        for i in source:
            rest = obj.join_sentences([sentences[j] for j in source if j != i])
            summary = obj.join_sentences([sentences[j] for j in sorted(target + [i])])
            values.append(_lcs_dp(rest, summary))
        best = source[int(np.argmax(values))]
        source.remove(best)
        target = sorted(target + [best])
        src = obj.join_sentences([sentences[j] for j in source])
        tgt = obj.join_sentences([sentences[j] for j in target])
        if len(source) == 1 or len(tgt) / len(src) > rate:
            break
    return (target, source) if len(src) < len(tgt) else (source, target)


def test_pseudo_summary_multi_round_against_reference():
    rng = np.random.default_rng(8)
    chars = list("天地人你我他山水火木金土")
    words = ["ab", "ba", "cab", "a", "bc", "ca"]
    for trial in range(16):
        if trial % 2:  # Latin: sentences joined by spaces
            sentences = [
                " ".join(rng.choice(words, size=rng.integers(1, 4))) + rng.choice([".", "!", ""])
                for _ in range(10)
            ]
        else:
            sentences = [
                "".join(rng.choice(chars, size=rng.integers(2, 7))) + "。" for _ in range(12)
            ]
        expected = _pseudo_summary_reference(sentences)
        assert obj.pseudo_summary_indices(sentences) == expected
        assert len(expected[1]) >= 2


def test_split_sentences_english():
    text = "Pi is 3.14 here. Really?\nYes! ok"
    assert obj.split_sentences(text) == ["Pi is 3.14 here.", "Really?", "Yes!", "ok"]
    assert obj.join_sentences(["a.", "b。", "c"]) == "a. b。c"


def test_causal_and_prefix_lm():
    tokens = np.array([5, 6, 7, 8])
    inputs, targets, weights = obj.causal_lm(tokens)
    np.testing.assert_array_equal(inputs, [0, 5, 6, 7, 8])
    np.testing.assert_array_equal(targets, [5, 6, 7, 8, 1])
    np.testing.assert_array_equal(weights, [1, 1, 1, 1, 1])
    rng = np.random.default_rng(9)
    splits = set()
    for _ in range(100):
        inputs, targets, weights, prefix = obj.prefix_lm(tokens, rng=rng)
        k = int(prefix.sum()) - 1
        splits.add(k)
        np.testing.assert_array_equal(weights, np.arange(5) >= k)
        np.testing.assert_array_equal(targets, [5, 6, 7, 8, 1])
    assert splits == {1, 2, 3}


def test_all_candidate_lcs_equals_one_lcs_per_candidate():
    rng = np.random.default_rng(10)
    words = ["a", "b", "ab", "ba"]
    for _ in range(40):
        n = int(rng.integers(2, 7))
        sentences = [" ".join(rng.choice(words, size=rng.integers(1, 3))) for _ in range(n)]
        sentences += ["猫。", "b"][: int(rng.integers(0, 3))]
        order = rng.permutation(len(sentences))
        split = int(rng.integers(0, len(sentences) - 1))
        target, source = sorted(order[:split].tolist()), sorted(order[split:].tolist())
        expected = [
            _lcs_dp(
                obj.join_sentences([sentences[j] for j in source if j != i]),
                obj.join_sentences([sentences[j] for j in sorted(target + [i])]),
            )
            for i in source
        ]
        assert pseudo_summaries._candidate_lcs(sentences, source, target) == expected
