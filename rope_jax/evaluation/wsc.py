"""WSC as T5 reads, casts and scores it.

T5's WSC tasks (``t5/data/tasks.py``: ``super_glue_wsc_v102_simple_train`` / ``_eval``) read
TFDS ``super_glue/wsc.fixed``, cast each record with ``preprocessors.wsc_simple`` and score
decoded text with ``postprocessors.wsc_simple``; the other WSC cast, ``preprocessors.wsc``
(both spans marked), is the one used here for encoders. This module restates those four
pieces on plain strings (T5 runs them as TensorFlow ops):

* :func:`fixed_span_text`: TFDS ``_fix_wst`` for a span text that is not a substring of the
  text: first letter cased like the word at the span's index, trailing "." stripped,
  newlines made spaces ("The demonstrators" -> "the demonstrators").
* :func:`locate_span`: the word index of a span, at or near the index the file gives. The
  official files have off-by-one indices (a validation record gives the word before its
  pronoun, "use" for "it"); T5 resolves that record by hand in ``_wsc_inputs`` and PET's
  WSC reader by looking one word either side. Here: the nearest word, up to
  :data:`MAX_SHIFT` words away, where the span text starts (case-insensitive, nothing but
  punctuation after it), the earlier of two equally near. ``None`` when there is none.
* :func:`simple_input`: ``wsc_simple``'s input, ``"wsc: "`` + the text with the pronoun word
  replaced by ``X`` and every ``" X "`` then replaced by ``" *<pronoun>* "``. T5 asserts that
  the word at the index IS the pronoun and special-cases the one official record where
  punctuation is attached (``him,"`` becomes ``X ,"``); the same split is applied to any such
  word here, which gives T5's hand-written string for that record except that T5's also
  drops the text's trailing space (SentencePiece drops it anyway: same token ids).
* :func:`marked_text`: ``preprocessors.wsc``'s marking: span1 wrapped in ``* ... *`` by the
  regex ``^((?:\\S+\\s){N})(W)`` (N = word index, W = span text), then span2 in ``# ... #`` at
  its index + 2 when span1 came first. Where the regex does not match (the pronoun inside
  the noun span, a case mismatch) T5 leaves that span unmarked, and so does this. One
  deliberate difference: the span text is escaped here (T5 splices it into the pattern, so
  "." in "Mr. Moncrieff" matches any character and a "(" would be a regex error).
* :func:`referent_prediction`: ``postprocessors.wsc_simple``: lower case, drop determiners
  (words split on single spaces, punctuation kept), empty -> invalid (``None``, T5's -1,
  wrong whatever the label), a possessive on one side only -> False, else True when one
  word set contains the other.

The casts take the index the reader resolved, so the off-by-one record is marked at its
pronoun (T5's ``wsc`` would leave it unmarked; its ``wsc_simple`` special case agrees).
"""

from __future__ import annotations

import re

# How far (in words) from the file's index a span is looked for.
MAX_SHIFT = 3

DETERMINERS = frozenset(
    "a an few her his each every many much my our some that the their these this those "
    "which whose your".split()
)

# RE2's Perl classes, which TensorFlow's regex ops use: \s is [\t\n\f\r ] (Python's \s would
# also take \v and Unicode spaces such as U+00A0).
_SPACE = r"[\t\n\f\r ]"
_NOT_SPACE = r"[^\t\n\f\r ]"


def fixed_span_text(text: str, span_text: str, index: int) -> str:
    """The span text as TFDS ``super_glue/wsc.fixed`` gives it (see module docstring).

    Unchanged when it is already a substring of ``text``, and when the fix would not make it
    one (TFDS returns two such spans unfixed by name, "Kamenev and Zinoviev" and "Kamenev,
    Zinoviev, and Stalin", and asserts on any other).
    """
    if not span_text or span_text in text:
        return span_text
    words = text.split()
    if not 0 <= index < len(words):
        return span_text
    first = span_text[0].lower() if words[index][0].islower() else span_text[0].upper()
    fixed = (first + span_text[1:]).rstrip(".").replace("\n", " ")
    return fixed if fixed in text else span_text


def _starts_at(words: list[str], index: int, span_text: str) -> bool:
    n = len(span_text.split(" "))
    if not 0 <= index <= len(words) - n:
        return False
    candidate = " ".join(words[index : index + n])
    if not candidate.lower().startswith(span_text.lower()):
        return False
    return not any(ch.isalnum() for ch in candidate[len(span_text) :])


def locate_span(text: str, index: int, span_text: str, *, max_shift: int = MAX_SHIFT):
    """Word index (of ``text.split(" ")``) of ``span_text`` nearest ``index``, or None."""
    words = text.split(" ")
    for shift in range(max_shift + 1):
        for candidate in (index - shift, index + shift) if shift else (index,):
            if _starts_at(words, candidate, span_text):
                return candidate
    return None


def char_offsets(text: str, index: int, span_text: str) -> tuple[int, int]:
    """Character offsets [start, end) of a span located at word ``index``."""
    start = sum(len(word) + 1 for word in text.split(" ")[:index])
    return start, start + len(span_text)


def simple_input(text: str, pronoun: str, index: int | None) -> str:
    """T5 ``preprocessors.wsc_simple`` input for the pronoun at word ``index``.

    ``index`` None (a test record whose pronoun could not be placed) gives the unmarked text.
    """
    if index is None:
        return "wsc: " + text
    words = text.split(" ")
    n = len(pronoun.split(" "))
    found = " ".join(words[index : index + n])
    rest = found[len(pronoun) :]
    middle = "X" + (" " + rest if rest else "")
    # T5 joins the three parts with single spaces, so the text before and after may be empty.
    joined = " ".join([" ".join(words[:index]), middle, " ".join(words[index + n :])])
    return "wsc: " + joined.replace(" X ", f" *{pronoun}* ")


def _mark(text: str, span_text: str, index: int, mark: str) -> str:
    pattern = rf"^((?:{_NOT_SPACE}+{_SPACE}){{{index}}})({re.escape(span_text)})"
    return re.sub(pattern, lambda m: f"{m.group(1)}{mark} {m.group(2)} {mark}", text, count=1)


def marked_text(
    text: str, span1_text: str, span1_index: int | None, span2_text: str, span2_index: int | None
) -> str:
    """T5 ``preprocessors.wsc`` text: ``* noun *`` and ``# pronoun #`` where the regex finds
    them (without T5's ``"wsc text: "`` prefix, which only a text-to-text model reads).

    An index None (a test record's span that could not be placed) leaves that span unmarked.
    """
    if span1_index is not None:
        text = _mark(text, span1_text, span1_index, "*")
    if span2_index is None:
        return text
    # T5 compensates for the two marks just added before the pronoun.
    shift = 2 if span1_index is not None and span1_index < span2_index else 0
    return _mark(text, span2_text, span2_index + shift, "#")


def _clean(text: str) -> str:
    return " ".join(w for w in text.strip().lower().split(" ") if w not in DETERMINERS)


def referent_prediction(prediction: str, referent: str) -> bool | None:
    """T5 ``postprocessors.wsc_simple``: does the decoded text name the candidate referent?

    None when nothing is left after dropping determiners (T5 returns -1 so that it cannot
    match a False label).
    """
    predicted = _clean(prediction)
    if not predicted:
        return None
    candidate = _clean(referent)
    if ("'" in predicted) != ("'" in candidate):
        return False  # "Bob" does not name "Bob's hat"
    predicted_words, candidate_words = set(predicted.split(" ")), set(candidate.split(" "))
    return predicted_words <= candidate_words or candidate_words <= predicted_words
