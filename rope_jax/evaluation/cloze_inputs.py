"""Token arrays of clozes (``pvp.Cloze``) for every model family.

A cloze becomes model rows with *slots*: the positions whose output scores one token of a
candidate answer. Per family (the same pattern, the mask expressed as the family learned it):

* encoder (MLM): the pattern with one mask token per candidate token (PET ``PVP.encode``:
  ``[CLS] a [SEP] b [SEP]`` for a Hugging Face codec, ``a EOS b EOS`` for a SentencePiece
  one); a slot is scored and filled at its mask position.
* decoder (causal LM): the pattern *up to the mask* followed by the candidate's tokens
  (teacher forcing); slot ``j`` at position ``p + j`` is scored at ``p + j - 1``, the
  next-token probability at the pattern's end ("GPT Understands, Too" scores GPT this way).
  Text after the mask is not seen: choose a pattern that ends at the mask (e.g. RTE/CB
  ``pattern_id=4``, BoolQ, COPA, WSC, MultiRC 0-2, WiC 1).
* encoder-decoder (T5): the pattern with the mask as the sentinel ``<extra_id_0>``, EOS; the
  decoder reads ``[start, <extra_id_0>, c_0, c_1, ...]`` and slot ``j`` (token ``c_j``) is
  scored at decoder position ``1 + j``, as a span-corruption target.

Rows: one shared row when every candidate of the set is a single token (the label tasks
with one-token verbalizers: PET's single mask, one forward pass scores every label), else one
row per candidate with exactly its number of masks (PET ``MultiMaskTaskHelper.eval_step`` trims the
masks to each candidate's length; PET trains COPA on one row with the longer choice's count
of masks, here training uses the same rows as evaluation). WSC rows have ``extra_masks``
more slots, whose targets are padding (PET ``WscTaskHelper``) for an encoder and EOS for the
generating families.

Arrays: the family's model keys with a row axis ``[N, R, L]`` plus ``prompt_mask [N, R, L]``
(input positions filled by continuous prompts), ``slot_positions`` / ``fill_positions`` /
``slot_weights [N, R, M]``, ``candidate_tokens [N, K, M]``, ``candidate_row``,
``choice_mask [N, K]`` and multi-hot ``labels [N, K]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from rope_jax.evaluation.pvp import Cloze, Part

FAMILIES = ("encoder", "decoder", "encoder_decoder")


def _lookup(codec, name: str):
    """``codec.<name>``, else its tokenizer's (SentencePiece) or HF tokenizer's attribute."""
    if hasattr(codec, name):
        return getattr(codec, name)
    tokenizer = getattr(codec, "tokenizer", None)
    hf_names = {"mask_id": "mask_token_id", "pad_id": "pad_token_id"}
    for attr in (name, hf_names.get(name, name)):
        if tokenizer is not None and getattr(tokenizer, attr, None) is not None:
            return getattr(tokenizer, attr)
    return None


@dataclasses.dataclass(frozen=True)
class Specials:
    """The ids a cloze needs from a codec."""

    mask: int | None
    sentinel: int | None
    sep: int
    cls: int | None
    bos: int | None
    eos: int
    pad: int
    decoder_start: int
    prompt: int

    @classmethod
    def of(cls, codec) -> Specials:
        sentinel = _lookup(codec, "sentinel_id")
        if callable(sentinel):
            sentinel = sentinel(0) if (_lookup(codec, "num_sentinels") or 0) > 0 else None
        eos = _lookup(codec, "eos_id")
        # P-tuning writes "the" at its prompt positions (PT-Fewshot task_pvps.py); the word's
        # embedding is replaced, but the id must not be padding (padding is masked out).
        the = codec.encode("the")
        return cls(
            mask=_lookup(codec, "mask_id"),
            sentinel=sentinel,
            sep=_lookup(codec, "sep_id") or eos,
            cls=_lookup(codec, "cls_id"),
            bos=_lookup(codec, "bos_id"),
            eos=eos,
            pad=_lookup(codec, "pad_id") or 0,
            decoder_start=_lookup(codec, "decoder_start_id") or 0,
            prompt=the[0] if the and the[0] != 0 else eos,
        )


def _encode_parts(parts: Sequence[Part], codec, specials: Specials, num_masks: int, mask_id):
    """``[(ids, shortenable, flags), ...]`` per part; flags 1 = prompt position, 2 = slot."""
    out = []
    for part in parts:
        if part.kind == "mask":
            out.append(([mask_id] * num_masks, False, [2] * num_masks))
        elif part.kind == "prompt":
            out.append(([specials.prompt], False, [1]))
        elif part.kind == "sep":
            out.append(([specials.sep], False, [0]))
        elif part.text:
            ids = codec.encode(part.text)
            out.append((ids, part.shortenable, [0] * len(ids)))
    return out


def _length(parts, shortenable_only=False) -> int:
    return sum(len(ids) for ids, short, _ in parts if short or not shortenable_only)


def _truncate(parts_a: list, parts_b: list, budget: int) -> None:
    """PET ``PVP.truncate``: drop the last token of the last non-empty shortenable part of
    the half with more shortenable tokens, one token at a time, until the pair fits."""
    for _ in range(_length(parts_a) + _length(parts_b) - budget):
        side = parts_a if _length(parts_a, True) > _length(parts_b, True) else parts_b
        candidates = [i for i, (ids, short, _) in enumerate(side) if short and ids]
        if not candidates:
            raise ValueError(
                f"the pattern needs {_length(parts_a) + _length(parts_b)} tokens but only "
                f"{budget} fit and nothing left is shortenable; raise max_input_length"
            )
        i = candidates[-1]
        ids, short, flags = side[i]
        side[i] = (ids[:-1], short, flags[:-1])


def _flat(parts) -> tuple[list[int], list[int]]:
    return [t for ids, _, _ in parts for t in ids], [f for _, _, fl in parts for f in fl]


def _encoder_row(cloze: Cloze, codec, sp: Specials, num_masks: int, max_length: int):
    if sp.mask is None:
        raise ValueError("the tokenizer has no mask token; PET on an encoder needs one")
    a = _encode_parts(cloze.parts_a, codec, sp, num_masks, sp.mask)
    b = _encode_parts(cloze.parts_b, codec, sp, num_masks, sp.mask)
    has_b = bool(cloze.parts_b)
    head = [t for t in (sp.cls, sp.bos) if t is not None][:1]
    specials = len(head) + 1 + (1 if has_b else 0)
    _truncate(a, b, max_length - specials)
    tokens_a, flags_a = _flat(a)
    tokens_b, flags_b = _flat(b)
    tokens = head + tokens_a + [sp.sep]
    flags = [0] * len(head) + flags_a + [0]
    types = [0] * len(tokens)
    if has_b:
        tokens += tokens_b + [sp.sep]
        flags += flags_b + [0]
        types += [1] * (len(tokens_b) + 1)
    slots = [i for i, f in enumerate(flags) if f == 2]
    return tokens, types, flags, slots, slots


def _prefix(cloze: Cloze, codec, sp: Specials, *, through_mask: bool, mask_id):
    parts = list(cloze.parts_a) + list(cloze.parts_b)
    if not through_mask:
        parts = parts[: next(i for i, p in enumerate(parts) if p.kind == "mask")]
    return _encode_parts(parts, codec, sp, 1, mask_id)


def _decoder_row(cloze: Cloze, codec, sp: Specials, targets: list[int], max_length: int):
    prefix = _prefix(cloze, codec, sp, through_mask=False, mask_id=None)
    head = [] if sp.bos is None else [sp.bos]
    _truncate(prefix, [], max_length - len(head) - len(targets))
    tokens, flags = _flat(prefix)
    tokens, flags = head + tokens, [0] * len(head) + flags
    if not tokens:
        raise ValueError("the pattern has no text before its mask; a decoder cannot score it")
    start = len(tokens)
    fill = [start + j for j in range(len(targets))]
    return tokens + targets, [0] * (start + len(targets)), flags + [0] * len(targets), fill


def _seq2seq_row(cloze: Cloze, codec, sp: Specials, max_length: int):
    if sp.sentinel is None:
        raise ValueError("the tokenizer has no sentinel <extra_id_0>; T5-style cloze needs one")
    parts = _prefix(cloze, codec, sp, through_mask=True, mask_id=sp.sentinel)
    head = [] if sp.bos is None else [sp.bos]
    _truncate(parts, [], max_length - len(head) - 1)
    tokens, flags = _flat(parts)
    flags = [1 if f == 1 else 0 for f in flags]
    return head + tokens + [sp.eos], [0] * len(head) + flags + [0]


def candidate_ids(cloze: Cloze, codec) -> list[list[int]]:
    """Token ids of each candidate (PET ``get_verbalization_ids``: the word on its own)."""
    ids = [list(codec.encode(c)) for c in cloze.candidates]
    for text, tokens in zip(cloze.candidates, ids, strict=True):
        if not tokens:
            raise ValueError(f"candidate {text!r} has no tokens")
    return ids


def cloze_arrays(
    clozes: Sequence[Cloze],
    codec,
    *,
    family: str,
    max_length: int,
    num_candidates: int | None = None,
) -> dict[str, np.ndarray]:
    """Arrays of ``clozes`` for ``family`` (see the module docstring)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {FAMILIES}")
    sp = Specials.of(codec)
    filler = sp.pad if family == "encoder" else sp.eos
    all_targets = [
        [t + [filler] * cloze.extra_masks for t in candidate_ids(cloze, codec)] for cloze in clozes
    ]
    # One layout for the whole set, so a row index means the same thing in every example.
    shared = all(len(t) == 1 for targets in all_targets for t in targets)
    built = []
    for cloze, targets in zip(clozes, all_targets, strict=True):
        rows = []
        for slot_targets in targets[:1] if shared else targets:
            m = len(slot_targets)
            if family == "encoder":
                tokens, types, flags, score, fill = _encoder_row(cloze, codec, sp, m, max_length)
                rows.append(dict(tokens=tokens, types=types, flags=flags, score=score, fill=fill))
            elif family == "decoder":
                tokens, types, flags, fill = _decoder_row(
                    cloze, codec, sp, slot_targets, max_length
                )
                score = [f - 1 for f in fill]
                rows.append(dict(tokens=tokens, types=types, flags=flags, score=score, fill=fill))
            else:
                tokens, flags = _seq2seq_row(cloze, codec, sp, max_length)
                decoder = [sp.decoder_start, sp.sentinel] + slot_targets
                rows.append(
                    dict(
                        tokens=tokens,
                        types=[0] * len(tokens),
                        flags=flags,
                        decoder=decoder,
                        score=[1 + j for j in range(m)],
                        fill=[2 + j for j in range(m)],
                    )
                )
        built.append((cloze, targets, shared, rows))

    n = len(built)
    k_max = num_candidates or max(len(c.candidates) for c, *_ in built)
    r_max = max(len(rows) for *_, rows in built)
    m_max = max(len(t) for _, targets, _, _ in built for t in targets)
    length = max_length
    out = {
        "tokens": np.zeros((n, r_max, length), np.int32),
        "types": np.zeros((n, r_max, length), np.int32),
        "prompt_mask": np.zeros((n, r_max, length), np.int32),
        "segment_ids": np.zeros((n, r_max, length), np.int32),
        "positions": np.zeros((n, r_max, length), np.int32),
        "slot_positions": np.zeros((n, r_max, m_max), np.int32),
        "fill_positions": np.zeros((n, r_max, m_max), np.int32),
        "slot_weights": np.zeros((n, r_max, m_max), np.int32),
        "candidate_tokens": np.zeros((n, k_max, m_max), np.int32),
        "candidate_row": np.zeros((n, k_max), np.int32),
        "choice_mask": np.zeros((n, k_max), np.int32),
        "labels": np.zeros((n, k_max), np.float32),
    }
    if family == "encoder_decoder":
        width = m_max + 2
        out["decoder_tokens"] = np.zeros((n, r_max, width), np.int32)
        out["decoder_segment_ids"] = np.zeros((n, r_max, width), np.int32)
        out["decoder_positions"] = np.zeros((n, r_max, width), np.int32)
    for i, (cloze, targets, shared, rows) in enumerate(built):
        if len(targets) > k_max:
            raise ValueError(f"{len(targets)} candidates exceed num_candidates={k_max}")
        for r, row in enumerate(rows):
            size = len(row["tokens"])
            out["tokens"][i, r, :size] = row["tokens"]
            out["types"][i, r, :size] = row["types"]
            out["prompt_mask"][i, r, :size] = [1 if f == 1 else 0 for f in row["flags"]]
            out["segment_ids"][i, r, :size] = 1
            out["positions"][i, r, :size] = np.arange(size)
            m = len(row["score"])
            out["slot_positions"][i, r, :m] = row["score"]
            out["fill_positions"][i, r, :m] = row["fill"]
            out["slot_weights"][i, r, :m] = 1
            if "decoder" in row:
                width = len(row["decoder"])
                out["decoder_tokens"][i, r, :width] = row["decoder"]
                out["decoder_segment_ids"][i, r, :width] = 1
                out["decoder_positions"][i, r, :width] = np.arange(width)
        for k, slot_targets in enumerate(targets):
            out["candidate_tokens"][i, k, : len(slot_targets)] = slot_targets
            out["candidate_row"][i, k] = 0 if shared else k
            out["choice_mask"][i, k] = 1
        if cloze.label is not None:
            out["labels"][i, list(cloze.label)] = 1.0
    return out
