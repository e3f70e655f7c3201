"""What the pipeline, the objectives and evaluation need from a tokenizer, and the kinds.

Three kinds satisfy :class:`TextTokenizer`:

* ``"sentencepiece"`` -- :class:`rope_jax.data.tokenizer.Tokenizer`, T5/mT5 ids: pad 0,
  EOS 1, unk 2, no BOS, decoder start = pad 0 (T5), masks and sentinels as extra ids after
  the pieces;
* ``"jieba_bert"`` -- :class:`rope_jax.data.bert_tokenizer.JiebaBertTokenizer`, the T5
  PEGASUS tokenizer: a BERT ``vocab.txt`` with jieba pre-segmentation; ``[PAD]`` (id 0)
  pads, ``[SEP]`` ends every sequence (T5's EOS), ``[CLS]`` starts decoder inputs and,
  as ``bos_id``, encoder inputs (bert4keras ``Tokenizer.encode`` gives ``[CLS] text
  [SEP]``, which is how T5 PEGASUS was pretrained and fine-tuned). It has no sentinels;
* ``"bytes"`` -- :class:`rope_jax.data.byte_tokenizer.ByteTokenizer`, UTF-8 bytes + 3 with
  T5's pad/EOS/unk and a ``[MASK]`` id (260 ids, nothing to train); no sentinels.

Special ids the rest of the code reads from the tokenizer, never as constants:

* ``pad_id``: padding; the models mask id 0, so both kinds require it to be 0;
* ``eos_id``: appended to encoder inputs and decoder targets; decoding stops on it;
* ``decoder_start_id``: the first decoder input (targets are shifted right behind it);
* ``bos_id``: ``None``, or an id put before encoder inputs;
* ``mask_id`` / ``mask1_id`` / ``mask2_id``: BERT ``[MASK]`` and PEGASUS MASK1/MASK2;
* ``sentinel_id(k)`` for ``k < num_sentinels``: T5 ``<extra_id_k>``, counting down from
  ``vocab_size - 1`` (the layout ``objectives.span_corruption`` writes).

All kinds pickle (grain worker processes receive them).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

KINDS = ("sentencepiece", "jieba_bert", "bytes")

__all__ = ["KINDS", "TextTokenizer", "check_kind"]


@runtime_checkable
class TextTokenizer(Protocol):
    """Text <-> int32 ids with the special ids described in the module docstring."""

    kind: str
    vocab_size: int  # ids the tokenizer can produce (a model may have more rows)
    piece_size: int  # ids of the underlying vocabulary, before any extra ids
    num_extra_ids: int
    pad_id: int
    eos_id: int
    unk_id: int
    decoder_start_id: int
    bos_id: int | None

    @property
    def mask_id(self) -> int: ...

    @property
    def mask1_id(self) -> int: ...

    @property
    def mask2_id(self) -> int: ...

    @property
    def num_sentinels(self) -> int: ...

    def sentinel_id(self, k: int) -> int: ...

    @property
    def random_token_range(self) -> tuple[int, int]: ...

    def encode(self, text: str) -> np.ndarray: ...

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...

    def decode(self, ids) -> str: ...

    def id_to_piece(self, token_id: int) -> str: ...

    def word_start_table(self) -> np.ndarray: ...


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {KINDS}")
    return kind
