# ruff: noqa: E501  (the published patterns are quoted whole, one per line)
"""PET / P-tuning patterns rendered on records in the official JSONL layout, against the
published patterns (timoschick/pet ``pet/pvp.py``, THUDM/P-tuning
``PT-Fewshot/data_utils/task_pvps.py``), re-stated here part for part."""

import json

import pytest

from rope_jax.evaluation import pvp, readers

RECORDS = {
    "RTE": {"premise": "Cats sleep a lot.", "hypothesis": "Cats are lazy.", "idx": 0,
            "label": "entailment"},
    "CB": {"premise": "It rained.", "hypothesis": "The ground is wet.", "idx": 0,
           "label": "neutral"},
    "BoolQ": {"passage": "The sky is blue", "question": "is the sky blue", "idx": 0,
              "label": True},
    "WiC": {"word": "bank", "sentence1": "The river bank.", "sentence2": "The bank account.",
            "start1": 10, "end1": 14, "start2": 4, "end2": 8, "idx": 0, "label": False},
    "COPA": {"premise": "The man fell.", "choice1": "He slipped on ice.",
             "choice2": "He won a prize.", "question": "cause", "idx": 0, "label": 0},
    "WSC": {"text": "Mark told Pete he was late .", "idx": 0, "label": True,
            "target": {"span1_text": "Pete", "span1_index": 2, "span2_text": "he",
                       "span2_index": 3}},
    "MultiRC": {"idx": 0, "passage": {"text": "Tom has a dog.", "questions": [
        {"question": "What does Tom have?", "idx": 0,
         "answers": [{"text": "A dog", "idx": 0, "label": 1}]}]}},
    "ReCoRD": {"idx": 0, "source": "x", "passage": {
        "text": "Anna met Bob.\n@highlight\nThey talked", "entities": [
            {"start": 0, "end": 3}, {"start": 9, "end": 11}]},
        "qas": [{"query": "@placeholder was happy.", "idx": 5,
                 "answers": [{"start": 0, "end": 3, "text": "Anna"}]}]},
}  # fmt: skip


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Each record written as a one-line JSONL file and read back by the project's reader."""
    root = tmp_path_factory.mktemp("fewglue")
    out = {}
    for task, record in RECORDS.items():
        path = root / f"{task}.jsonl"
        path.write_text(json.dumps(record) + "\n")
        out[task] = readers.read_file(task, str(path), "train").records[0]
    return out


def _render(task, record, method, pattern_id):
    get = pvp.pet_parts if method == "pet" else pvp.ptuning_parts
    a, b = get(task, record, pattern_id)
    return pvp.render(a), pvp.render(b)


PUBLISHED = [
    # PET RtePVP: ['"', text_b (final punctuation stripped), '" ?'], [mask, ', "', text_a, '"']
    ("RTE", "pet", 0, ('" Cats are lazy " ?', '[MASK] , " Cats sleep a lot. "')),
    ("RTE", "pet", 1, ("Cats are lazy ?", "[MASK] , Cats sleep a lot.")),
    ("RTE", "pet", 3, ("Cats are lazy ?", "[MASK] . Cats sleep a lot.")),
    ("RTE", "pet", 4, ("Cats sleep a lot.  question:  Cats are lazy.  True or False? answer: [MASK]", "")),
    ("CB", "pet", 4, ("It rained.  question:  The ground is wet.  true, false or neither? answer: [MASK]", "")),
    ("BoolQ", "pet", 0, ("The sky is blue . Question:  is the sky blue ? Answer:  [MASK] .", "")),
    ("BoolQ", "pet", 2, ("The sky is blue . Based on the previous passage,  is the sky blue ? [MASK] .", "")),
    ("BoolQ", "pet", 4, ("Based on the following passage,  is the sky blue ? [MASK] . The sky is blue", "")),
    ("WiC", "pet", 0, ('" The river bank. " / " The bank account. " Similar sense of "bank"? [MASK] .', "")),
    ("WiC", "pet", 1, ("The river bank. The bank account. Does bank have the same meaning in both sentences? [MASK]", "")),
    ("WiC", "pet", 2, ('bank  . Sense (1) (a) " The river bank. " ( [MASK] ) " The bank account. "', "")),
    # CopaPVP: choices lowercased first letter, final punctuation removed; premise too.
    ("COPA", "pet", 0, ('" he slipped on ice " or " he won a prize "? The man fell because [MASK] .', "")),
    ("COPA", "pet", 1, ("he slipped on ice or he won a prize ? The man fell because [MASK] .", "")),
    ("WSC", "pet", 0, ("Mark told Pete *he* was late . The pronoun '*he*' refers to [MASK] .", "")),
    ("WSC", "pet", 1, ("Mark told Pete *he* was late . In the previous sentence, the pronoun '*he*' refers to [MASK] .", "")),
    ("MultiRC", "pet", 0, ("Tom has a dog. . Question:  What does Tom have? ? Is it  A dog ? [MASK] .", "")),
    ("MultiRC", "pet", 3, ("Tom has a dog. What does Tom have? - [ [MASK] ] A dog", "")),
    # RecordPVP: "@highlight\n" -> "- " (RecordProcessor), the placeholder as the mask.
    ("ReCoRD", "pet", 0, ("Anna met Bob.\n- They talked [MASK]  was happy.", "")),
    # P-tuning few-shot patterns; [P] = a block_flag 1 position ("the").
    ("RTE", "ptuning", 1, ("Cats sleep a lot. Question: Cats are lazy ? [P] Answer: [MASK] .", "")),
    ("CB", "ptuning", 1, ("It rained. [SEP] The ground is wet. ? [P]  answer:  [MASK]", "")),
    ("BoolQ", "ptuning", 1, ("The sky is blue . [P]  Question:  is the sky blue ? Answer:  [MASK] .", "")),
    ("COPA", "ptuning", 1, ("he slipped on ice or he won a prize ? The man fell because [P] [MASK] .", "")),
    ("WSC", "ptuning", 2, ("[P] Mark told Pete *he* was late . [P] pronoun '* he *' refers to [MASK] .", "")),
    ("MultiRC", "ptuning", 1, ("Tom has a dog. . Question:  What does Tom have? ? Is it  A dog ? [P] [MASK] .", "")),
    ("WiC", "ptuning", 4, ("[P] The river bank. [SEP] The bank account. [P] *bank *? [P] [MASK] [P]", "")),
]  # fmt: skip


@pytest.mark.parametrize("task,method,pattern_id,expected", PUBLISHED)
def test_pattern_matches_the_published_one(records, task, method, pattern_id, expected):
    assert _render(task, records[task], method, pattern_id) == expected


def test_every_pattern_of_every_task_renders_with_one_mask(records):
    for method, tasks in pvp.PATTERN_IDS.items():
        for task, ids in tasks.items():
            record = records.get("RTE" if task in ("AX-b", "AX-g") else task)
            if task == "AX-b":
                record = {"sentence1": "a b.", "sentence2": "c.", "label": None, "idx": 0}
            for pattern_id in ids:
                a, b = (pvp.pet_parts if method == "pet" else pvp.ptuning_parts)(
                    task, record, pattern_id
                )
                assert sum(p.kind == "mask" for p in (*a, *b)) == 1, (task, method, pattern_id)
                prompts = sum(p.kind == "prompt" for p in (*a, *b))
                assert (prompts > 0) == (method == "ptuning"), (task, method, pattern_id)


def test_verbalizers_and_candidates(records):
    clozes = pvp.cloze_examples("CB", [records["CB"]], method="pet", pattern_id=0, training=True)
    assert clozes[0].candidates == ("Yes", "No", "Maybe") and clozes[0].label == (2,)
    pet4 = pvp.verbalizer("RTE", "pet", 4)
    assert pet4 == {"entailment": "true", "not_entailment": "false"}
    assert pvp.verbalizer("BoolQ", "pet", 1) == {False: "false", True: "true"}
    assert pvp.verbalizer("WiC", "pet", 2) == {False: "2", True: "b"}
    copa = pvp.cloze_examples("COPA", [records["COPA"]], method="pet", pattern_id=0, training=True)
    assert copa[0].candidates == ("he slipped on ice", "he won a prize") and copa[0].label == (0,)
    record = pvp.cloze_examples("ReCoRD", [records["ReCoRD"]], method="pet", pattern_id=0,
                                training=False)  # fmt: skip
    assert record[0].candidates == ("Anna", "Bob") and record[0].label == (0,)
    wsc = pvp.cloze_examples("WSC", [records["WSC"]], method="pet", pattern_id=0, training=True)
    assert wsc[0].generative and wsc[0].candidates == ("Pete",) and 0 <= wsc[0].extra_masks <= 3
    negative = dict(records["WSC"], label=False)
    assert not pvp.cloze_examples("WSC", [negative], method="pet", pattern_id=0, training=True)
    with pytest.raises(ValueError, match="no pet pattern_id 7"):
        pvp.cloze_examples("RTE", [records["RTE"]], method="pet", pattern_id=7, training=True)
