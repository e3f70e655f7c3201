"""UTF-8 bytes as token ids: a tokenizer with nothing to train, for short controlled studies.

Ids follow the T5/ByT5 layout (Xue et al. 2022, "ByT5"): pad 0, EOS 1, unk 2, byte ``b`` is
``b + 3``; one extra id after the 259 byte pieces is BERT's ``[MASK]`` (259), so the
vocabulary is 260 ids. Random replacement tokens of BERT masking are bytes (3..258).
Deliberate difference from ByT5: no sentinel ids (ByT5 reuses the top byte ids as
sentinels; span corruption is not an objective this tokenizer serves).
"""

from __future__ import annotations

import numpy as np

BYTE_OFFSET = 3
NUM_BYTES = 256


class ByteTokenizer:
    """:class:`rope_jax.data.tokenizers.TextTokenizer` over UTF-8 bytes (``kind="bytes"``)."""

    kind = "bytes"
    pad_id = 0
    eos_id = 1
    unk_id = 2
    decoder_start_id = 0
    bos_id = None
    piece_size = BYTE_OFFSET + NUM_BYTES
    num_extra_ids = 1
    vocab_size = piece_size + num_extra_ids

    @property
    def mask_id(self) -> int:
        return self.piece_size

    @property
    def mask1_id(self) -> int:
        raise ValueError(
            "the bytes tokenizer has no PEGASUS MASK1/MASK2 ids; use tokenizer.kind="
            "sentencepiece for gap_sentences"
        )

    @property
    def mask2_id(self) -> int:
        return self.mask1_id

    @property
    def num_sentinels(self) -> int:
        return 0

    def sentinel_id(self, k: int) -> int:
        raise ValueError("the bytes tokenizer has no T5 sentinel ids")

    @property
    def random_token_range(self) -> tuple[int, int]:
        return (BYTE_OFFSET, BYTE_OFFSET + NUM_BYTES)

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + BYTE_OFFSET

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(text) for text in texts]

    def decode(self, ids) -> str:
        ids = np.asarray(ids, np.int64).reshape(-1)
        is_byte = (ids >= BYTE_OFFSET) & (ids < BYTE_OFFSET + NUM_BYTES)
        return bytes((ids[is_byte] - BYTE_OFFSET).astype(np.uint8)).decode("utf-8", "replace")

    def id_to_piece(self, token_id: int) -> str:
        names = {self.pad_id: "<pad>", self.eos_id: "</s>", self.unk_id: "<unk>"}
        if token_id == self.mask_id:
            return "[MASK]"
        if token_id in names:
            return names[token_id]
        return f"<0x{token_id - BYTE_OFFSET:02X}>"

    def word_start_table(self) -> np.ndarray:
        """Bool per id: every id starts a word except UTF-8 continuation bytes
        (0b10xxxxxx), so whole-word masking over bytes masks whole characters."""
        table = np.ones(self.vocab_size, bool)
        continuation = np.arange(NUM_BYTES) & 0xC0 == 0x80
        table[BYTE_OFFSET : BYTE_OFFSET + NUM_BYTES] = ~continuation
        return table
