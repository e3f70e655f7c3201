"""Pattern-verbalizer pairs (PVPs) of the SuperGLUE tasks: PET's and P-tuning's cloze forms.

PET (Schick & Schütze 2021, "It's Not Just Size That Matters"): a *pattern* rewrites a record
as text with a mask where the answer goes, a *verbalizer* names each label with a word; the
label whose word the masked LM finds likeliest wins. Patterns and verbalizers here are those
of ``timoschick/pet`` ``pet/pvp.py`` (``RtePVP``, ``CbPVP``, ``CopaPVP``, ``WscPVP``,
``BoolQPVP``, ``MultiRcPVP``, ``WicPVP``, ``RecordPVP``; ``get_parts`` and ``verbalize``),
part for part, chosen by ``pattern_id``. The P-tuning forms (Liu et al. 2021, "GPT
Understands, Too") are those of ``THUDM/P-tuning`` ``PT-Fewshot/data_utils/task_pvps.py``
(its few-shot ``string_list_a`` / ``block_flag_a``): parts flagged 1 there are prompt
positions (:data:`PROMPT`), filled by trainable continuous embeddings instead of the word
("the") written in their place.

A pattern is two lists of :class:`Part` (the text pair ``a``, ``b``), as PET's
``FilledPattern``; each part is tokenised on its own and the ids concatenated (PET's
``PVP.encode``), ``shortenable`` parts lose tokens from their end when the row is too long
(PET's ``truncate``). Where the references differ from this module, deliberately:

* The mask is one :data:`MASK` part whose number of mask tokens is set when tokenising (one
  per token of the candidate: PET writes ``self.mask * num_masks`` into the text).
* P-tuning writes the literal string ``"[SEP]"`` in CB and WiC patterns, which its BERT and
  ALBERT tokenisers turn into the separator token; it is the :data:`SEP` part here, the
  codec's separator (``[SEP]`` or EOS), whatever the tokenizer.
* A prompt part is one prompt position (P-tuning's flagged ``"the"`` is one token in its
  tokenisers).
* ReCoRD has no published P-tuning pattern; ``ptuning`` uses PET's with a prompt position
  before the query (ours).
* Every label task gets candidates from its verbalizer; a verbalizer word of several tokens
  is scored with one mask per token (PET requires one token and refuses otherwise).
"""

from __future__ import annotations

import dataclasses
import random
import string

from rope_jax.evaluation.readers import LABEL_NAMES

METHODS = ("pet", "ptuning")


@dataclasses.dataclass(frozen=True)
class Part:
    """A piece of a pattern: text, the mask, a prompt position or the separator."""

    text: str = ""
    shortenable: bool = False
    kind: str = "text"  # "text", "mask", "prompt", "sep"


MASK = Part(kind="mask")
PROMPT = Part(kind="prompt")
SEP = Part(kind="sep")


def _short(text: str) -> Part:
    return Part(text, shortenable=True)


def remove_final_punc(text: str) -> str:
    """PET ``PVP.remove_final_punc``: trailing punctuation stripped."""
    return text.rstrip(string.punctuation)


def lowercase_first(text: str) -> str:
    """PET ``PVP.lowercase_first``."""
    return text[0].lower() + text[1:]


def _parts(*items) -> tuple[Part, ...]:
    return tuple(item if isinstance(item, Part) else Part(item) for item in items)


@dataclasses.dataclass(frozen=True)
class Cloze:
    """A record as a cloze: the pattern's two texts, the candidate answers (verbalizer words
    in label order, COPA choices, ReCoRD entities, the WSC referent), the right ones, and
    whether the answer is generated (WSC: the masks are decoded and compared with
    ``candidates[0]``) rather than chosen. ``extra_masks``: WSC's masks beyond the referent's
    tokens (PET predicts padding there)."""

    parts_a: tuple[Part, ...]
    parts_b: tuple[Part, ...]
    candidates: tuple[str, ...]
    label: tuple[int, ...] | None
    record: int
    generative: bool = False
    extra_masks: int = 0


# ------------------------------------------------------------------ verbalizers

_YES_NO = {False: "No", True: "Yes"}
_ENTAIL = {"entailment": "Yes", "not_entailment": "No", "contradiction": "No", "neutral": "Maybe"}


def verbalizer(task: str, method: str, pattern_id: int) -> dict:
    """Label -> word (PET ``verbalize``; P-tuning's ``VERBALIZER`` of the same task)."""
    if task in ("RTE", "AX-b", "AX-g"):
        if method == "pet" and pattern_id == 4:
            return {"entailment": "true", "not_entailment": "false"}
        return {k: _ENTAIL[k] for k in LABEL_NAMES["RTE"]}
    if task == "CB":
        if method == "pet" and pattern_id == 4:
            return {"entailment": "true", "contradiction": "false", "neutral": "neither"}
        return {k: _ENTAIL[k] for k in LABEL_NAMES["CB"]}
    if task == "BoolQ":
        if method == "pet" and pattern_id in (1, 3, 5):
            return {False: "false", True: "true"}
        return dict(_YES_NO)
    if task == "MultiRC":
        if method == "pet" and pattern_id == 3:
            return {False: "False", True: "True"}
        return dict(_YES_NO)
    if task == "WiC":
        if method == "pet" and pattern_id == 2:
            return {False: "2", True: "b"}
        return dict(_YES_NO)
    raise ValueError(f"{task} has no verbalizer: its candidates come from the record")


# --------------------------------------------------------------------- patterns

PATTERN_IDS = {
    "pet": {
        "BoolQ": (0, 1, 2, 3, 4, 5),
        "CB": (0, 1, 2, 3, 4),
        "COPA": (0, 1),
        "MultiRC": (0, 1, 2, 3),
        "ReCoRD": (0,),
        "RTE": (0, 1, 2, 3, 4),
        "WiC": (0, 1, 2),
        "WSC": (0, 1, 2),
    },
    "ptuning": {
        "BoolQ": (1,),
        "CB": (1,),
        "COPA": (1,),
        "MultiRC": (1,),
        "ReCoRD": (1,),
        "RTE": (1,),
        "WiC": (1, 2, 3, 4),
        "WSC": (1, 2),
    },
}
for _method in METHODS:
    PATTERN_IDS[_method]["AX-b"] = PATTERN_IDS[_method]["AX-g"] = PATTERN_IDS[_method]["RTE"]


def default_pattern_id(task: str, method: str) -> int:
    return PATTERN_IDS[method][task][0]


def check_pattern(task: str, method: str, pattern_id: int) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r}; choose one of {METHODS}")
    if task not in PATTERN_IDS[method]:
        raise ValueError(f"no {method} pattern for task {task!r}")
    if pattern_id not in PATTERN_IDS[method][task]:
        raise ValueError(
            f"{task} has no {method} pattern_id {pattern_id}; choose one of "
            f"{PATTERN_IDS[method][task]} (or None for {default_pattern_id(task, method)})"
        )


def _rte_pet(premise: str, hypothesis: str, pattern_id: int, task: str):
    text_a, text_b = _short(premise), _short(hypothesis.rstrip(string.punctuation))
    if pattern_id == 0:
        return _parts('"', text_b, '" ?'), _parts(MASK, ', "', text_a, '"')
    if pattern_id == 1:
        return _parts(text_b, "?"), _parts(MASK, ",", text_a)
    if pattern_id == 2:
        return _parts('"', text_b, '" ?'), _parts(MASK, '. "', text_a, '"')
    if pattern_id == 3:
        return _parts(text_b, "?"), _parts(MASK, ".", text_a)
    question = " true, false or neither? answer:" if task == "CB" else " True or False? answer:"
    return _parts(text_a, " question: ", _short(hypothesis), question, MASK), ()


def _wsc_text(record: dict) -> str:
    """PET ``WscPVP``: the pronoun word wrapped in ``*`` (words of ``text.split()``)."""
    words = record["text"].split()
    index = record["span2_index"]
    if index is not None and 0 <= index < len(words):
        words[index] = "*" + words[index] + "*"
    return " ".join(words)


def pet_parts(task: str, r: dict, pattern_id: int):
    """PET ``<Task>PVP.get_parts`` of a record (see the module docstring)."""
    if task in ("RTE", "CB", "AX-g"):
        return _rte_pet(r["premise"], r["hypothesis"], pattern_id, task)
    if task == "AX-b":
        return _rte_pet(r["sentence1"], r["sentence2"], pattern_id, task)
    if task == "BoolQ":
        passage, question = _short(r["passage"]), _short(r["question"])
        if pattern_id < 2:
            return _parts(passage, ". Question: ", question, "? Answer: ", MASK, "."), ()
        if pattern_id < 4:
            return _parts(
                passage, ". Based on the previous passage, ", question, "?", MASK, "."
            ), ()
        return _parts("Based on the following passage, ", question, "?", MASK, ".", passage), ()
    if task == "MultiRC":
        passage, question, answer = _short(r["paragraph"]), r["question"], r["answer"]
        if pattern_id == 0:
            return _parts(passage, ". Question: ", question, "? Is it ", answer, "?", MASK, "."), ()
        if pattern_id == 1:
            return _parts(
                passage,
                ". Question: ",
                question,
                '? Is the correct answer "',
                answer,
                '"?',
                MASK,
                ".",
            ), ()
        if pattern_id == 2:
            return _parts(
                passage, ". Based on the previous passage, ", question, '? Is "', answer,
                '" a correct answer?', MASK, ".",
            ), ()  # fmt: skip
        return _parts(passage, question, "- [", MASK, "]", answer), ()
    if task == "WiC":
        text_a, text_b, word = _short(r["sentence1"]), _short(r["sentence2"]), r["word"]
        if pattern_id == 0:
            return _parts(
                '"', text_a, '" / "', text_b, '" Similar sense of "' + word + '"?', MASK, "."
            ), ()
        if pattern_id == 1:
            return _parts(
                text_a, text_b, "Does " + word + " have the same meaning in both sentences?", MASK
            ), ()
        return _parts(word, ' . Sense (1) (a) "', text_a, '" (', MASK, ') "', text_b, '"'), ()
    if task == "COPA":
        premise = Part(remove_final_punc(r["premise"]), shortenable=True)
        choice1, choice2 = copa_choices(r)
        joiner = "because" if r["question"] == "cause" else ", so"
        if pattern_id == 0:
            return _parts('"', choice1, '" or "', choice2, '"?', premise, joiner, MASK, "."), ()
        return _parts(choice1, "or", choice2, "?", premise, joiner, MASK, "."), ()
    if task == "WSC":
        text_a, pronoun = _short(_wsc_text(r)), r["span2_text"]
        if pattern_id == 0:
            return _parts(text_a, "The pronoun '*" + pronoun + "*' refers to", MASK, "."), ()
        if pattern_id == 1:
            return _parts(
                text_a,
                "In the previous sentence, the pronoun '*" + pronoun + "*' refers to",
                MASK,
                ".",
            ), ()
        return _parts(
            text_a,
            "Question: In the passage above, what does the pronoun '*"
            + pronoun
            + "*' refer to? Answer: ",
            MASK,
            ".",
        ), ()  # fmt: skip
    if task == "ReCoRD":
        return _record_parts(r, prompt=False)
    raise ValueError(f"unknown SuperGLUE task {task!r}")


def _record_parts(r: dict, *, prompt: bool):
    """PET ``RecordPVP``: the passage (``@highlight`` lines as "- ", PET's ``RecordProcessor``)
    and the query with its ``@placeholder`` as the mask."""
    passage = _short(r["passage"].replace("@highlight\n", "- "))
    before, _, after = r["query"].partition("@placeholder")
    query = _parts(before, MASK, after)
    return (passage, *((PROMPT,) if prompt else ()), *query), ()


def ptuning_parts(task: str, r: dict, pattern_id: int):
    """P-tuning ``PT-Fewshot`` ``<Task>PVP.get_parts`` (prompt positions as :data:`PROMPT`)."""
    if task in ("RTE", "AX-g", "AX-b"):
        premise, hypothesis = (
            (r["sentence1"], r["sentence2"]) if task == "AX-b" else (r["premise"], r["hypothesis"])
        )
        text_b = _short(hypothesis.rstrip(string.punctuation))
        return _parts(_short(premise), "Question:", text_b, "?", PROMPT, "Answer:", MASK, "."), ()
    if task == "CB":
        return _parts(
            _short(r["premise"]), SEP, r["hypothesis"], "?", PROMPT, " answer: ", MASK
        ), ()
    if task == "BoolQ":
        passage, question = _short(r["passage"]), _short(r["question"])
        return _parts(passage, ".", PROMPT, " Question: ", question, "? Answer: ", MASK, "."), ()
    if task == "MultiRC":
        passage = _short(r["paragraph"])
        return _parts(
            passage, ". Question: ", r["question"], "? Is it ", r["answer"], "?", PROMPT, MASK, "."
        ), ()
    if task == "WiC":
        text_a, text_b = _short(r["sentence1"]), _short(r["sentence2"])
        word = "*" + r["word"] + " *?"
        body = (text_a, SEP, text_b, PROMPT, word)
        if pattern_id == 1:
            return _parts(*body, MASK), ()
        if pattern_id == 2:
            return _parts(*body, PROMPT, MASK), ()
        if pattern_id == 3:
            return _parts(PROMPT, *body, PROMPT, MASK), ()
        return _parts(PROMPT, *body, PROMPT, MASK, PROMPT), ()
    if task == "COPA":
        premise = Part(remove_final_punc(r["premise"]), shortenable=True)
        choice1, choice2 = copa_choices(r)
        joiner = "because" if r["question"] == "cause" else "so"
        return _parts(choice1, "or", choice2, "?", premise, joiner, PROMPT, MASK, "."), ()
    if task == "WSC":
        text_a, pronoun = _short(_wsc_text(r)), r["span2_text"]
        tail = ("pronoun '*", pronoun, "*' refers to", MASK, ".")
        if pattern_id == 1:
            return _parts(text_a, PROMPT, *tail), ()
        return _parts(PROMPT, text_a, PROMPT, *tail), ()
    if task == "ReCoRD":
        return _record_parts(r, prompt=True)
    raise ValueError(f"unknown SuperGLUE task {task!r}")


def copa_choices(r: dict) -> tuple[str, str]:
    """PET ``CopaPVP``: choices with the first letter lowercased and final punctuation gone."""
    return tuple(remove_final_punc(lowercase_first(r[c])) for c in ("choice1", "choice2"))


# ------------------------------------------------------------------- records


def cloze_examples(
    task: str,
    records: list[dict],
    *,
    method: str,
    pattern_id: int,
    training: bool,
    seed: int = 42,
    max_train_candidates: int = 10,
) -> list[Cloze]:
    """The clozes of a split; ``training`` keeps what PET trains on.

    * WSC: at training only records whose candidate is the referent (PET
      ``WscProcessor._create_examples`` drops the others) with 0-3 extra masks drawn from
      ``random.Random(seed)`` (PET ``WscPVP``: ``rng.randint(0, 3)``), 1 at evaluation.
    * ReCoRD at training: one cloze per gold answer, its candidates the answer first and at
      most ``max_train_candidates - 1`` other entities, shuffled by ``random.Random(seed)``
      (PET ``RecordProcessor``); at evaluation every entity.
    * Everything else: one cloze per record; unlabelled records are dropped at training.
    """
    check_pattern(task, method, pattern_id)
    get_parts = pet_parts if method == "pet" else ptuning_parts
    rng = random.Random(seed)
    out = []
    for index, r in enumerate(records):
        parts_a, parts_b = get_parts(task, r, pattern_id)
        if task == "WSC":
            if training and not r["label"]:
                continue
            extra = rng.randint(0, 3) if training else 1
            # The referent is the right answer only when the record says so (no right
            # candidate otherwise: such clozes add nothing to a held-out loss).
            label = None if r["label"] is None else ((0,) if r["label"] else ())
            out.append(Cloze(parts_a, parts_b, (r["span1_text"],), label, index, True, extra))
        elif task == "ReCoRD":
            entities, answers = list(r["entities"]), r["answers"]
            if training:
                for answer in answers or []:
                    others = [e for e in entities if e not in answers]
                    if len(others) > max_train_candidates - 1:
                        rng.shuffle(others)
                        others = others[: max_train_candidates - 1]
                    out.append(Cloze(parts_a, parts_b, (answer, *others), (0,), index))
            else:
                label = (
                    None
                    if answers is None
                    else tuple(i for i, e in enumerate(entities) if e in answers)
                )
                out.append(Cloze(parts_a, parts_b, tuple(entities), label, index))
        elif task == "COPA":
            label = None if r["label"] is None else (r["label"],)
            if not (training and label is None):
                out.append(Cloze(parts_a, parts_b, copa_choices(r), label, index))
        else:
            words = verbalizer(task, method, pattern_id)
            names = LABEL_NAMES["RTE" if task in ("AX-b", "AX-g") else task]
            label = None if r["label"] is None else (names.index(r["label"]),)
            if not (training and label is None):
                candidates = tuple(words[name] for name in names)
                out.append(Cloze(parts_a, parts_b, candidates, label, index))
    return out


def render(parts: tuple[Part, ...], *, mask: str = "[MASK]", prompt: str = "[P]") -> str:
    """Human-readable text of a pattern half: parts joined by spaces (each part is a
    separate piece of the token sequence), the mask and prompt positions as markers."""
    shown = {"mask": mask, "prompt": prompt, "sep": "[SEP]"}
    return " ".join(shown.get(p.kind, p.text) for p in parts if p.kind != "text" or p.text)
