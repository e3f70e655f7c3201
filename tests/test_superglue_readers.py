"""Readers, both casts and leaderboard files on small fixtures in the official layout."""

import json

import pytest

from rope_jax.evaluation import formats, readers, submission

PASSAGE = "Paris won.\n@highlight\nLyon lost\n@highlight\nParis is in France"
FIXTURES = {
    "BoolQ": [{"question": "is it", "passage": "It is.", "idx": 0, "label": True}],
    "CB": [{"premise": "P.", "hypothesis": "H", "label": "neutral", "idx": 3}],
    "COPA": [
        {
            "premise": "It rained.",
            "choice1": "Wet.",
            "choice2": "Dry.",
            "question": "effect",
            "label": 0,
            "idx": 7,
        }
    ],
    "RTE": [{"premise": "P.", "hypothesis": "H.", "label": "not_entailment", "idx": 1}],
    "WiC": [
        {
            "word": "feel",
            "sentence1": "I feel it.",
            "sentence2": "She felt.",
            "idx": 2,
            "label": False,
            "start1": 2,
            "end1": 6,
            "start2": 4,
            "end2": 8,
        }
    ],
    "WSC": [
        # span1 in lower case in the text, span2 followed by punctuation (both in the real data).
        {
            "text": "The dog chased the cat because it was hungry.",
            "target": {
                "span1_index": 3,
                "span1_text": "The cat",
                "span2_index": 6,
                "span2_text": "it",
            },
            "idx": 4,
            "label": False,
        },
        {
            "text": "Good for him, he said.",
            "target": {"span1_index": 3, "span1_text": "he", "span2_index": 2, "span2_text": "him"},
            "idx": 5,
            "label": True,
        },
    ],
    "MultiRC": [
        {
            "idx": 9,
            "version": 1.1,
            "passage": {
                "text": "Line one.<br><b>Sent 2:</b> Two.",
                "questions": [
                    {
                        "question": "Q1?",
                        "idx": 0,
                        "answers": [
                            {"text": "yes", "idx": 0, "label": 1},
                            {"text": "no", "idx": 1, "label": 0},
                        ],
                    },
                    {
                        "question": "Q2?",
                        "idx": 1,
                        "answers": [{"text": "maybe", "idx": 2, "label": 0}],
                    },
                ],
            },
        }
    ],
    "ReCoRD": [
        {
            "source": "x",
            "idx": 11,
            "passage": {
                "text": PASSAGE,
                "entities": [
                    {"start": 0, "end": 4},
                    {"start": 22, "end": 25},
                    {"start": 43, "end": 47},
                ],
            },
            "qas": [
                {
                    "query": "@placeholder is a city",
                    "idx": 12,
                    "answers": [
                        {"start": 0, "end": 4, "text": "Paris"},
                        {"start": 43, "end": 47, "text": "Paris"},
                    ],
                }
            ],
        }
    ],
    "AX-b": [
        {"sentence1": "A.", "sentence2": "B.", "idx": 0, "label": "entailment", "logic": "Negation"}
    ],
    "AX-g": [{"premise": "P.", "hypothesis": "H.", "idx": 0, "pair_id": 5, "label": "entailment"}],
}


@pytest.fixture
def data_dir(tmp_path):
    for task, rows in FIXTURES.items():
        folder = tmp_path / task
        folder.mkdir()
        name = f"{task}.jsonl" if task in readers.DIAGNOSTIC_TASKS else "val.jsonl"
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_every_task_reads(data_dir):
    assert readers.available_tasks(str(data_dir)) == list(readers.TASKS)
    for task in readers.TASKS:
        assert readers.read_split(str(data_dir), task, "val")


def test_multirc_answers_flattened_with_nested_idx_and_regrouped(data_dir):
    records = readers.read_split(str(data_dir), "MultiRC", "val")
    assert [r["idx"] for r in records] == [
        {"paragraph": 9, "question": 0, "answer": 0},
        {"paragraph": 9, "question": 0, "answer": 1},
        {"paragraph": 9, "question": 1, "answer": 2},
    ]
    assert [r["label"] for r in records] == [True, False, False]
    assert formats.text_input("MultiRC", records[0]) == (
        "multirc question: Q1? answer: yes paragraph: Line one. Sent 2: Two."
    )
    lines = submission.prediction_lines("MultiRC", records, [True, True, None])
    assert lines == [
        {
            "idx": 9,
            "passage": {
                "questions": [
                    {"idx": 0, "answers": [{"idx": 0, "label": 1}, {"idx": 1, "label": 1}]},
                    {"idx": 1, "answers": [{"idx": 2, "label": 0}]},
                ]
            },
        }
    ]


def test_record_entities_from_inclusive_spans(data_dir):
    (record,) = readers.read_split(str(data_dir), "ReCoRD", "val")
    assert [s[2] for s in record["entity_spans"]] == ["Paris", "Lyon", "Paris"]
    assert record["entities"] == ["Lyon", "Paris"]  # sorted set
    assert record["answers"] == ["Paris"] and record["idx"] == 12
    assert formats.text_input("ReCoRD", record) == (
        "record query: @placeholder is a city entities: Lyon, Paris "
        "passage: Paris won. Lyon lost. Paris is in France"
    )
    train = formats.text_examples("ReCoRD", [record], training=True)
    assert [e.targets for e in train] == ["Paris"]
    enc = formats.encoder_example("ReCoRD", record, 0)
    assert [p[1] for p in enc.pairs] == ["Lyon is a city", "Paris is a city"] and enc.label == (1,)
    assert formats.encoder_prediction("ReCoRD", record, [0.1, 0.7]) == "Paris"
    assert submission.prediction_lines("ReCoRD", [record], ["Paris"]) == [
        {"idx": 12, "label": "Paris"}
    ]


def test_wsc_spans_marked_and_referent_matching(data_dir):
    first, second = readers.read_split(str(data_dir), "WSC", "val")
    # TFDS wsc.fixed gives the span text the text's case ("The cat" -> "the cat").
    assert first["span1_text"] == "the cat"
    assert first["text"][first["span1_start"] : first["span1_end"]] == "the cat"
    assert second["text"][second["span2_start"] : second["span2_end"]] == "him"
    assert (
        formats.text_input("WSC", first) == "wsc: The dog chased the cat because *it* was hungry."
    )
    # Punctuation attached to the pronoun is split off, as T5 does by hand for 'him,"'.
    assert formats.text_input("WSC", second) == "wsc: Good for *him* , he said."
    assert formats.encoder_example("WSC", first, 0).pairs[0][0] == (
        "The dog chased * the cat * because # it # was hungry."
    )
    # Only the right referent is trained on; every record is evaluated.
    assert [e.targets for e in formats.text_examples("WSC", [first, second], training=True)] == [
        "he"
    ]
    assert len(formats.text_examples("WSC", [first, second], training=False)) == 2
    assert formats.parse_text_prediction("WSC", "the cat", first) is True
    assert formats.parse_text_prediction("WSC", "the dog", first) is False
    assert formats.parse_text_prediction("WSC", "the cat's", first) is False
    # An empty answer is invalid (wrong whatever the label), not a "False" that scores on
    # every negative record.
    assert formats.parse_text_prediction("WSC", " ", first) is None
    assert formats.parse_text_prediction("WSC", "the", first) is None


def test_t5_formats_and_label_words(data_dir):
    def one(task):
        return readers.read_split(str(data_dir), task, "val")[0]

    cases = {
        "BoolQ": ("boolq passage: It is. question: is it", "True"),
        "CB": ("cb hypothesis: H premise: P.", "neutral"),
        "COPA": (
            "copa choice1: Wet. choice2: Dry. premise: It rained. question: effect",
            "choice1",
        ),
        "RTE": ("rte hypothesis: H. premise: P.", "not_entailment"),
        "WiC": ("wic sentence1: I feel it. sentence2: She felt. word: feel", "False"),
        # T5 renames AX-b's sentence1/sentence2 to premise/hypothesis, as RTE is trained.
        "AX-b": ("rte hypothesis: B. premise: A.", "entailment"),
        "AX-g": ("rte hypothesis: H. premise: P.", "entailment"),
    }
    for task, (inputs, target) in cases.items():
        (example,) = formats.text_examples(task, [one(task)], training=True)
        assert (example.inputs, example.targets) == (inputs, target), task
        assert formats.parse_text_prediction(task, f" {target} ", one(task)) == one(task)["label"]
        assert formats.parse_text_prediction(task, "banana", one(task)) is None
    assert formats.encoder_example("WiC", one("WiC"), 0).pairs == (("I *feel* it.", "She *felt*."),)
    copa = formats.encoder_example("COPA", one("COPA"), 0)
    assert copa.pairs[1] == ("It rained.", "What happened as a result? Dry.") and copa.label == (0,)
    assert formats.encoder_prediction("COPA", one("COPA"), [0.0, 2.0]) == 1
    assert formats.encoder_example("CB", one("CB"), 0).label == 2


def test_axb_is_cast_as_the_rte_model_is_trained(data_dir):
    """T5 renames AX-b's fields (premise <- sentence1, hypothesis <- sentence2) and casts it
    with the RTE template: the RTE cast of the same pair, string for string."""
    (axb,) = readers.read_split(str(data_dir), "AX-b", "test")
    as_rte = {"premise": axb["sentence1"], "hypothesis": axb["sentence2"], "label": axb["label"]}
    assert formats.text_input("AX-b", axb) == formats.text_input("RTE", as_rte)
    assert formats.text_input("AX-b", axb) == "rte hypothesis: B. premise: A."
    assert (
        formats.encoder_example("AX-b", axb, 0).pairs
        == formats.encoder_example("RTE", as_rte, 0).pairs
    )


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_split_is_an_error_naming_the_file(tmp_path, content):
    path = tmp_path / "CB" / "val.jsonl"
    path.parent.mkdir()
    path.write_text(content)
    with pytest.raises(readers.SuperGlueFormatError, match="CB val split is empty") as error:
        readers.load_split(str(tmp_path), "CB", "val")
    assert str(error.value).startswith(f"{path}: ")


def test_a_byte_order_mark_does_not_break_the_first_record(tmp_path):
    records = [
        {"premise": "It rained.", "hypothesis": "It was wet.", "label": "entailment", "idx": 0},
        {"premise": "It was dry.", "hypothesis": "It rained.", "label": "contradiction", "idx": 1},
    ]
    path = tmp_path / "CB" / "val.jsonl"
    path.parent.mkdir()
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in records).encode())
    split = readers.load_split(str(tmp_path), "CB", "val")
    assert [r["idx"] for r in split.records] == [0, 1]
    assert split.records[0]["premise"] == "It rained."


def test_leaderboard_label_conventions(data_dir):
    def line(task, prediction):
        records = readers.read_split(str(data_dir), task, "val")[:1]
        return submission.prediction_lines(task, records, [prediction])[0]

    assert line("BoolQ", True) == {"idx": 0, "label": "true"}
    assert line("WiC", None) == {"idx": 2, "label": "false"}  # unparsable -> first label
    assert line("WSC", True) == {"idx": 4, "label": "True"}  # WSC alone is capitalised
    assert line("WSC", None) == {"idx": 4, "label": "False"}
    assert line("COPA", 1) == {"idx": 7, "label": 1}
    assert line("CB", "contradiction") == {"idx": 3, "label": "contradiction"}
    assert line("AX-b", "not_entailment")["label"] == "not_entailment"
    with pytest.raises(ValueError, match="not a RTE label"):
        line("RTE", "neutral")
    records = readers.read_split(str(data_dir), "CB", "val")
    path = submission.write_predictions(str(data_dir / "wd"), "CB", "test", records, ["neutral"])
    assert path.endswith("submission/CB.jsonl")
    assert json.loads(open(path).read()) == {"idx": 3, "label": "neutral"}
    path = submission.write_predictions(str(data_dir / "wd"), "CB", "val", records, ["neutral"])
    assert path == submission.validation_path(str(data_dir / "wd"), "CB")


@pytest.mark.parametrize(
    "task,bad_line,message",
    [
        ("RTE", "{not json", "invalid JSON"),
        ("RTE", '{"premise": "p", "idx": 1, "label": "entailment"}', "missing field 'hypothesis'"),
        ("CB", '{"premise": "p", "hypothesis": "h", "idx": 1, "label": "maybe"}', "label 'maybe'"),
        (
            "COPA",
            '{"premise": "p", "choice1": "a", "choice2": "b", "question": "why", "idx": 1}',
            "cause",
        ),
        (
            "MultiRC",
            json.dumps(
                {
                    "idx": 1,
                    "passage": {
                        "text": "t",
                        "questions": [{"question": "q", "idx": 0, "answers": [{"idx": 0}]}],
                    },
                }
            ),
            "missing field 'text' in passage.questions[0].answers[0]",
        ),
        (
            "ReCoRD",
            json.dumps(
                {
                    "idx": 1,
                    "passage": {"text": "abc", "entities": [{"start": 1, "end": 3}]},
                    "qas": [],
                }
            ),
            "outside the passage",
        ),
        (
            "WSC",
            json.dumps(
                {
                    "idx": 1,
                    "text": "a b c",
                    "label": True,
                    "target": {
                        "span1_index": "0",
                        "span1_text": "a",
                        "span2_index": 2,
                        "span2_text": "c",
                    },
                }
            ),
            "field 'span1_index' in target must be int",
        ),
        ("BoolQ", '{"question": "q", "passage": "p", "idx": "7"}', "field 'idx' must be int"),
    ],
)
def test_malformed_record_names_file_and_line(tmp_path, task, bad_line, message):
    good = json.dumps(FIXTURES[task][0])
    path = tmp_path / "val.jsonl"
    path.write_text(f"{good}\n\n{bad_line}\n")
    with pytest.raises(readers.SuperGlueFormatError) as error:
        readers.read_jsonl(task, str(path))
    assert str(error.value).startswith(f"{path}:3: ")
    assert message in str(error.value)
