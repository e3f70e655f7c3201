"""T5 PEGASUS pseudo summaries (Su 2021; ZhuiyiTechnology/t5-pegasus ``train.py``).

The reference builds (source, summary) pairs from plain text in three steps, all restated
here:

  1. ``text_segmentate(text, 32, '\\n。')`` (bert4keras ``snippets.py``) cuts the text into
     short pieces: at newlines, then at 。, consecutive pieces merged while they fit 32
     characters. ``split_sentences(text, max_chars=32)`` does the same, with 。！？ and
     Latin ``.!?`` before whitespace as the second level (a superset of its 。).
  2. ``pseudo_summary(texts)`` grows the summary greedily by character LCS
     (``pseudo_summary_indices``), then swaps the two sides if the summary came out longer.
  3. ``text_process`` groups at least 3 pieces per example while they fit 768 characters,
     and the tokenizer cuts the source to 384 and the summary to 128 tokens. Deliberate
     difference: the pipeline (``data/examples.py``) groups pieces while their tokens fit the
     encoder row instead, so nothing is cut, and keeps groups of 2 pieces.

Joining: the reference concatenates pieces with nothing between them (Chinese text).
``join_sentences`` does the same after a piece ending in a non-ASCII character and puts a
space after any other, so English text keeps its word boundaries; lengths and LCS are
taken over the joined strings, separators included.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

__all__ = [
    "join_sentences",
    "lcs_length",
    "pseudo_summary",
    "pseudo_summary_indices",
    "split_sentences",
]

_SENTENCE_END_RE = re.compile(r"(?<=[。！？])|(?<=[.!?])(?=\s)|\n")
# Where a piece ends at the second level of ``split_sentences(max_chars=...)``: the
# character matched is the piece's separator, as 。 is bert4keras's.
_SENTENCE_END_AT_RE = re.compile(r"[。！？]|[.!?](?=\s)")
_CJK_END_RE = re.compile(r"[^\x00-\x7f]$")


def split_sentences(text: str, *, max_chars: int | None = None) -> list[str]:
    """Short sentences: cut at newlines and after 。！？, and after ``.!?`` before whitespace.

    Latin full stops cut only before whitespace so that "3.14" or "e.g.x" stay whole;
    punctuation stays with its sentence; pieces are stripped and empty ones dropped.

    ``max_chars``: merge as T5 PEGASUS does (bert4keras ``text_segmentate(text, max_chars,
    '\\n。')``): a stripped text of at most ``max_chars`` characters is one piece; a longer
    one is split at newlines, and consecutive lines are joined (newlines kept) while the
    accumulated text plus the next line's content stays within ``max_chars - 1``; each
    accumulated block is then treated the same way one level down, with the sentence ends
    above as separators; a block still longer after that stays whole. The reference can
    return empty pieces (from whitespace-only lines); they are dropped here.
    """
    if max_chars is None:
        pieces = (piece.strip() for piece in _SENTENCE_END_RE.split(text))
        return [piece for piece in pieces if piece]
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1 (or None for no merging), got {max_chars}")
    return [piece for piece in _segment(text, max_chars, level=0) if piece]


def _level_pieces(text: str, level: int) -> list[tuple[str, str]]:
    """``(content, separator)`` pairs that concatenate to ``text``; the last separator is ''."""
    if level == 0:
        lines = text.split("\n")
        return [(line, "\n") for line in lines[:-1]] + [(lines[-1], "")]
    pieces, start = [], 0
    for match in _SENTENCE_END_AT_RE.finditer(text):
        pieces.append((text[start : match.start()], match.group()))
        start = match.end()
    pieces.append((text[start:], ""))
    return pieces


def _segment(text: str, max_chars: int, level: int) -> list[str]:
    """bert4keras ``text_segmentate`` with the two levels of ``_level_pieces``."""
    text = text.strip()
    if level > 1 or len(text) <= max_chars:
        return [text]
    segments, block = [], ""
    for content, separator in _level_pieces(text, level):
        if block and content and len(block) + len(content) > max_chars - 1:
            segments.extend(_segment(block, max_chars, level + 1))
            block = ""
        block += content + separator
    if block:
        segments.extend(_segment(block, max_chars, level + 1))
    return segments


def join_sentences(sentences: Sequence[str]) -> str:
    """Join sentences: no separator after one ending in a non-ASCII character, else a space."""
    out: list[str] = []
    for i, sentence in enumerate(sentences):
        if i and not _CJK_END_RE.search(sentences[i - 1]):
            out.append(" ")
        out.append(sentence)
    return "".join(out)


def _char_masks(text: str) -> dict[str, int]:
    """For each character of ``text``, the integer whose bit i is set where text[i] is it."""
    if len(text) < 256:
        masks: dict[str, int] = {}
        for i, char in enumerate(text):
            masks[char] = masks.get(char, 0) | (1 << i)
        return masks
    # Long strings: building the masks bit by bit is quadratic in Python; numpy packs them.
    codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    unique, inverse = np.unique(codes, return_inverse=True)
    return {
        chr(code): int.from_bytes(np.packbits(inverse == k, bitorder="little").tobytes(), "little")
        for k, code in enumerate(unique.tolist())
    }


def lcs_length(a: str, b: str) -> int:
    """Length of the longest common subsequence of two strings (characters).

    Bit-parallel algorithm of Allison & Dix (1986) / Hyyrö (2004) on Python integers:
    O(len(b)) big-integer operations on len(a)-bit words.
    """
    if not a or not b:
        return 0
    match = _char_masks(a)
    all_ones = (1 << len(a)) - 1
    row = all_ones
    get = match.get
    for char in b:
        common = row & get(char, 0)
        # common is a subset of row, so row - common == row ^ common (no borrows). Carries
        # past bit len(a) never flow back down, so the mask is applied once at the end.
        row = (row + common) | (row ^ common)
    return len(a) - (row & all_ones).bit_count()


def _candidate_lcs(sentences: Sequence[str], source: list[int], target: list[int]) -> list[int]:
    """For every i in ``source``: LCS(joined(source without i), joined(sorted(target + [i]))).

    Same bit-parallel recurrence as ``lcs_length``, run for all candidates at once: candidate
    i's target string occupies its own bit lane (one always-clear guard bit above it stops
    carries), and one pass over the joined source updates every lane; at the characters
    that candidate i removes from the source, lane i's match bits are zero, which leaves the
    lane unchanged -- exactly as if those characters were absent.
    """
    parts = [sentences[j] for j in source]
    joined = join_sentences(parts)
    starts, position = [], 0
    for k, part in enumerate(parts):
        position += 1 if k and not _CJK_END_RE.search(parts[k - 1]) else 0
        starts.append(position)
        position += len(part)
    # Characters that vanish from the source with candidate k: the sentence and the separator
    # after it; for the last sentence, the separator before it.
    skip = []
    for k in range(len(parts)):
        if k + 1 < len(parts):
            skip.append((starts[k], starts[k + 1]))
        else:
            skip.append((starts[k - 1] + len(parts[k - 1]) if k else 0, len(joined)))
    lanes = [join_sentences([sentences[t] for t in sorted([*target, j])]) for j in source]
    offsets, offset = [], 0
    for lane in lanes:
        offsets.append(offset)
        offset += len(lane) + 1  # + guard bit
    masks = _char_masks("\0".join(lanes) + "\0")
    masks.pop("\0", None)
    lane_bits = [((1 << len(lane)) - 1) << off for lane, off in zip(lanes, offsets, strict=True)]
    all_lanes = 0
    for bits in lane_bits:
        all_lanes |= bits
    # Group source positions by the set of lanes that skip them.
    skippers: list[list[int]] = [[] for _ in joined]
    for k, (begin, stop) in enumerate(skip):
        for p in range(begin, stop):
            skippers[p].append(k)
    keep_by_key: dict[tuple[int, ...], int] = {}
    match_cache: dict[tuple[tuple[int, ...], str], int] = {}
    row = all_lanes
    for p, char in enumerate(joined):
        key = tuple(skippers[p])
        match = match_cache.get((key, char))
        if match is None:
            keep = keep_by_key.get(key)
            if keep is None:
                keep = all_lanes
                for k in key:
                    keep &= ~lane_bits[k]
                keep_by_key[key] = keep
            match = match_cache[(key, char)] = masks.get(char, 0) & keep
        if match:
            common = row & match
            row = ((row + common) | (row ^ common)) & all_lanes
    return [
        len(lane) - ((row >> off) & ((1 << len(lane)) - 1)).bit_count()
        for lane, off in zip(lanes, offsets, strict=True)
    ]


def pseudo_summary_indices(
    sentences: Sequence[str], *, summary_rate: float = 0.25
) -> tuple[list[int], list[int]]:
    """T5 PEGASUS selection: returns ``(source_indices, target_indices)``, both sorted.

    As the reference's ``pseudo_summary``: each round moves into the target the source
    sentence that maximises the character LCS between the joined remaining source and the
    joined target (target sentences kept in document order; ties go to the earlier
    sentence, as ``np.argmax``); it stops once ``len(target) / len(source) > summary_rate``
    (characters of the joined texts) or one source sentence is left. Then, as the reference
    ends (``if len(source) < len(target): source, target = target, source``), the side with
    the longer joined text is returned as the source. Fewer than two sentences give no
    summary: ``(all indices, [])`` (the reference needs at least two).
    """
    source = list(range(len(sentences)))
    target: list[int] = []
    if len(sentences) < 2:
        return source, target
    while True:
        values = _candidate_lcs(sentences, source, target)
        best_index = source[int(np.argmax(values))]
        source.remove(best_index)
        target = sorted([*target, best_index])
        source_chars = len(join_sentences([sentences[j] for j in source]))
        target_chars = len(join_sentences([sentences[j] for j in target]))
        if len(source) == 1 or source_chars == 0 or target_chars / source_chars > summary_rate:
            break
    if source_chars < target_chars:
        source, target = target, source
    return source, target


def pseudo_summary(
    text: str, *, summary_rate: float = 0.25, max_chars: int | None = 32
) -> tuple[str, str]:
    """T5 PEGASUS pseudo summary of ``text``: returns ``(source_text, target_text)``.

    Pieces from ``split_sentences(text, max_chars=max_chars)`` (32, the reference's
    ``text_segmentate`` length); selection by ``pseudo_summary_indices``, so the target is
    never the longer side. Tokenize both sides afterwards (the pipeline appends EOS to each).
    """
    sentences = split_sentences(text, max_chars=max_chars)
    source, target = pseudo_summary_indices(sentences, summary_rate=summary_rate)
    return (
        join_sentences([sentences[i] for i in source]),
        join_sentences([sentences[i] for i in target]),
    )
