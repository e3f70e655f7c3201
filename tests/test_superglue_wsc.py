"""WSC as T5 reads, casts and scores it, against T5's code re-stated here independently
(``t5/data/preprocessors.py`` wsc / wsc_simple, ``t5/data/postprocessors.py`` wsc_simple,
TFDS ``super_glue`` ``_fix_wst``) and against strings derived by hand from that code."""

import json
import logging

import pytest

from rope_jax.evaluation import evaluators, formats, readers, splits, submission, wsc

# --- T5, re-stated from its TensorFlow ops ---------------------------------------------

_RE2_SPACE = "\t\n\f\r "


def t5_mark_span(text, span_str, span_idx, mark):
    """``preprocessors.wsc._mark_span``: regex ``^((?:\\S+\\s){N})(W)`` -> ``\\1M \\2 M``,
    walked by hand: N times (a non-empty run of non-spaces, then one RE2 space), then W."""
    pos = 0
    for _ in range(span_idx):
        start = pos
        while pos < len(text) and text[pos] not in _RE2_SPACE:
            pos += 1
        if pos == start or pos == len(text):
            return text  # no match: regex_replace leaves the text as it is
        pos += 1
    if not text.startswith(span_str, pos):
        return text
    return f"{text[:pos]}{mark} {span_str} {mark}{text[pos + len(span_str) :]}"


def t5_wsc_text(text, span1_text, span1_index, span2_text, span2_index):
    text = t5_mark_span(text, span1_text, span1_index, "*")
    span2_index = span2_index + 2 * int(span1_index < span2_index)
    return t5_mark_span(text, span2_text, span2_index, "#")


def t5_wsc_simple_inputs(text, span2_text, span2_index):
    """``_wsc_inputs`` (generic path, its assertions kept) + ``wsc_simple``'s map_fn."""
    words = text.split(" ")
    assert 0 < span2_index < len(words) and words[span2_index] == span2_text
    joined = " ".join([" ".join(words[:span2_index]), "X", " ".join(words[span2_index + 1 :])])
    return " ".join(["wsc:", joined.replace(" X ", " *" + span2_text + "* ")])


T5_DETERMINERS = {
    "a", "an", "few", "her", "his", "each", "every", "many", "much", "my",
    "our", "some", "that", "the", "their", "these", "this", "those", "which",
    "whose", "your",
}  # fmt: skip


def t5_wsc_simple_postprocess(prediction, referent):
    """``postprocessors.wsc_simple`` with is_target=False: 1, 0 or -1."""

    def clean(s):
        s = s.strip().lower()
        return " ".join([w for w in s.split(" ") if w not in T5_DETERMINERS])

    prediction = clean(prediction)
    if not prediction:
        return -1
    referent = clean(referent)
    if ("'" in prediction) != ("'" in referent):
        return 0
    prediction_words, referent_words = set(prediction.split(" ")), set(referent.split(" "))
    return int(
        prediction_words.issubset(referent_words) or referent_words.issubset(prediction_words)
    )


def tfds_fix_span_text(text, span_text, index):
    """TFDS ``_fix_wst._fix_span_text`` for one span (the two Kamenev spans aside)."""
    if span_text in text:
        return span_text
    first_word = text.split()[index]
    span_text = (span_text[0].lower() if first_word[0].islower() else span_text[0].upper()) + (
        span_text[1:]
    )
    return span_text.rstrip(".").replace("\n", " ")


# --- fixtures: records re-stated with the defects of the official files -----------------

TEXT = "The vase fell off the shelf , so Tom put it back on the shelf ."
OFF_BY_ONE = {  # the pronoun index names the word before it ("put" for "it")
    "text": TEXT,
    "target": {"span1_index": 1, "span1_text": "vase", "span2_index": 9, "span2_text": "it"},
    "idx": 0,
    "label": True,
}
UNPLACEABLE = {  # the candidate is nowhere near its index
    "text": TEXT,
    "target": {"span1_index": 1, "span1_text": "lamp", "span2_index": 10, "span2_text": "it"},
    "idx": 1,
    "label": False,
}
OVERLAP = {  # the pronoun is the first word of the candidate span
    "text": "The kids ran off and their mothers looked for them all day .",
    "target": {
        "span1_index": 5,
        "span1_text": "their mothers",
        "span2_index": 5,
        "span2_text": "their",
    },
    "idx": 2,
    "label": False,
}
ATTACHED = {  # punctuation attached to the pronoun, and a capitalised candidate
    "text": 'The cat scratched the dog, so Ann shouted "Leave him," at it . ',
    "target": {"span1_index": 3, "span1_text": "The dog", "span2_index": 9, "span2_text": "him"},
    "idx": 3,
    "label": True,
}


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_off_by_one_span_is_found_near_its_index(tmp_path):
    path = _write(tmp_path / "WSC" / "val.jsonl", [OFF_BY_ONE])
    (record,) = readers.read_split(str(tmp_path), "WSC", "val")
    assert record["span2_index"] == 10 and record["span1_index"] == 1
    assert TEXT[record["span2_start"] : record["span2_end"]] == "it"
    # T5 resolves the official off-by-one record by hand to "use X ," -> "use *it* ,".
    expected = "wsc: The vase fell off the shelf , so Tom put *it* back on the shelf ."
    assert formats.text_input("WSC", record) == expected
    assert expected == t5_wsc_simple_inputs(TEXT, "it", 10)
    assert formats.encoder_example("WSC", record, 0).pairs[0][0] == (
        "The * vase * fell off the shelf , so Tom put # it # back on the shelf ."
    )
    assert readers.read_file("WSC", str(path), "val").skipped == ()


def test_unplaceable_record_skipped_in_validation_kept_in_test(tmp_path, caplog):
    rows = [OFF_BY_ONE, UNPLACEABLE, ATTACHED]
    val = _write(tmp_path / "WSC" / "val.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        data = readers.load_split(str(tmp_path), "WSC", "val")
    assert [r["idx"] for r in data.records] == [0, 3]
    (message,) = data.skipped
    assert message.startswith(f"{val}:2: span1_text 'lamp' is not within 3 words")
    assert f"{val}:2:" in caplog.text
    result = dict(
        evaluators.create_evaluator(lambda p, r: [True] * len(r), task="WSC", data=data).run(None)
    )
    assert result["skipped_records"] == 1 and result["num_examples"] == 2

    _write(
        tmp_path / "WSC" / "test.jsonl",
        [{k: v for k, v in r.items() if k != "label"} for r in rows],
    )
    test = readers.load_split(str(tmp_path), "WSC", "test")
    assert [r["idx"] for r in test.records] == [0, 1, 3] and test.skipped == ()
    kept = test.records[1]
    assert kept["span1_index"] is None and kept["span2_index"] == 10
    # The unplaced candidate is left unmarked; the pronoun still is.
    assert formats.encoder_example("WSC", kept, 1).pairs[0][0] == (
        "The vase fell off the shelf , so Tom put # it # back on the shelf ."
    )
    lines = submission.prediction_lines("WSC", test.records, [True, None, False])
    assert [line["idx"] for line in lines] == [0, 1, 3]


def test_a_file_whose_records_are_all_unplaceable_is_an_error(tmp_path):
    path = _write(tmp_path / "WSC" / "val.jsonl", [UNPLACEABLE])
    with pytest.raises(readers.SuperGlueFormatError, match="all 1 records were skipped") as e:
        readers.load_split(str(tmp_path), "WSC", "val")
    assert str(e.value).startswith(f"{path}: ")


def test_span_text_fixed_as_tfds_wsc_fixed(tmp_path):
    _write(tmp_path / "WSC" / "val.jsonl", [ATTACHED])
    (record,) = readers.read_split(str(tmp_path), "WSC", "val")
    assert record["span1_text"] == tfds_fix_span_text(ATTACHED["text"], "The dog", 3) == "the dog"
    for text, span, index in [
        ("I saw the cat.", "The cat.", 2),
        ("The cat sat.", "the cat", 0),
        ("Dogs bark at\nnight", "at\nnight", 2),  # newline in the span only
    ]:
        assert wsc.fixed_span_text(text, span, index) == tfds_fix_span_text(text, span, index)
    # A fix that does not give a substring keeps the text (TFDS's two Kamenev spans).
    assert wsc.fixed_span_text("Kamenev, Zinoviev and Stalin", "Kamenev and Zinoviev", 0) == (
        "Kamenev and Zinoviev"
    )


def test_wsc_simple_input_as_t5(tmp_path):
    _write(tmp_path / "WSC" / "val.jsonl", [OFF_BY_ONE, OVERLAP, ATTACHED])
    off_by_one, overlap, attached = readers.read_split(str(tmp_path), "WSC", "val")
    assert formats.text_input("WSC", overlap) == t5_wsc_simple_inputs(OVERLAP["text"], "their", 5)
    # T5's hand-written string for the official 'him,"' record splits the punctuation off
    # ("X ,\""); the same here.
    assert formats.text_input("WSC", attached) == (
        'wsc: The cat scratched the dog, so Ann shouted "Leave *him* ," at it . '
    )
    assert [
        e.targets for e in formats.text_examples("WSC", [off_by_one, attached], training=True)
    ] == [
        "vase",
        "the dog",  # T5's target is the TFDS-fixed span text
    ]
    # Generic records: the same string as T5 for every pronoun position of a sentence.
    words = TEXT.split(" ")
    for index in range(1, len(words) - 1):
        assert wsc.simple_input(TEXT, words[index], index) == t5_wsc_simple_inputs(
            TEXT, words[index], index
        )


def test_overlapping_spans_marked_as_t5(tmp_path):
    _write(tmp_path / "WSC" / "val.jsonl", [OVERLAP])
    (record,) = readers.read_split(str(tmp_path), "WSC", "val")
    # T5's regex finds "*" where the pronoun was (no +2: same index), so only the noun is
    # marked; the text is not garbled.
    assert formats.encoder_example("WSC", record, 0).pairs[0][0] == (
        "The kids ran off and * their mothers * looked for them all day ."
    )
    inside = "Ann met the friend of his brother ."
    probes = [
        (inside, "the friend of his brother", 2, "his", 5),  # pronoun inside the noun span
        (inside, "Ann", 0, "his", 5),
        (inside, "his brother", 5, "Ann", 0),  # pronoun before the noun
        (inside, "The friend", 2, "his", 5),  # case mismatch: T5 leaves it unmarked
        ("She gave her the book .", "She", 0, "he", 2),  # regex prefix: "he" in "her"
        ('Good for him," he said .', "he", 3, "him", 2),
        ("a b c", "a", 0, "c", 7),  # index past the end
        ("Mr. Smith met him .", "Mr. Smith", 0, "him", 2),
    ]
    for probe in probes:
        assert wsc.marked_text(*probe) == t5_wsc_text(*probe), probe
    assert wsc.marked_text(*probes[0]) == "Ann met * the friend of his brother * ."


# Decoded outputs against candidate referents: T5's own unit-test cases, then probes with
# punctuation, case, determiners and possessives.
POSTPROCESS_PROBES = [
    ("potato", "turnip"),
    ("turnip", "turnip"),
    ("the cat", "cat"),
    ("Bob's hat", "Bob"),
    ("Bob's hat", "Bob's hat"),
    ("potato", "Potato"),
    ("a potato", "my potato"),
    ("fuzzy bunny", "fuzzy hungry bunny"),
    ("", "cat"),
    ("a this", "cat"),
    ("cat.", "cat"),
    ("the cat,", "the cat"),
    ('"the cat"', "the cat"),
    ("The cat", "the cat"),
    ("the  cat", "the cat"),
    ("the.", "cat"),
    (" the tree ", "the tree"),
    ("tree's", "the tree's branch"),
    ("the dog's owner", "dog"),
    ("his brother", "the brother"),
    ("Sam and Amy", "Sam"),
    ("sam", "Sam and Amy"),
    ("the", "the table"),
    ("table!", "the table"),
]


def test_wsc_simple_postprocessing_as_t5():
    for prediction, referent in POSTPROCESS_PROBES:
        expected = {1: True, 0: False, -1: None}[t5_wsc_simple_postprocess(prediction, referent)]
        assert wsc.referent_prediction(prediction, referent) is expected, (prediction, referent)
        record = {"span1_text": referent}
        assert formats.parse_text_prediction("WSC", prediction, record) is expected


def test_read_task_splits_counts_skipped_training_records(tmp_path):
    from configs import superglue

    _write(tmp_path / "WSC" / "train.jsonl", [OFF_BY_ONE, UNPLACEABLE])
    _write(tmp_path / "WSC" / "val.jsonl", [OFF_BY_ONE, ATTACHED])
    config = superglue.get_config("tiny")
    config.data_dir, config.task = str(tmp_path), "WSC"
    (task_splits,) = splits.read_run_splits(config)
    assert len(task_splits.train.records) == 1 and len(task_splits.train.skipped) == 1
    assert [e.name for e in task_splits.evaluations] == ["WSC"]
