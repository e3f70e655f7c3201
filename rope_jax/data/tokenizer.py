"""SentencePiece tokenizer with T5-style extra ids (sentinels) and reserved mask tokens.

Id layout (T5/mT5 convention, ``V = vocab_size``, ``P = piece_size``):

  * ``0`` pad, ``1`` EOS, ``2`` unk (no BOS), then the SentencePiece pieces up to ``P - 1``
    (with ``byte_fallback`` the 256 byte pieces ``<0x00>..<0xFF>`` come first, so no input is
    ever unknown);
  * ``P .. V - 1`` are the ``num_extra_ids = V - P`` extra ids, which SentencePiece does not
    know. The top ones are the sentinels: ``sentinel_id(k) = V - 1 - k`` (``<extra_id_k>``),
    counting down as T5 does. The three lowest extra ids are reserved for masks:
    ``mask_id = P`` (BERT ``[MASK]``), ``mask1_id = P + 1`` (PEGASUS sentence mask MASK1),
    ``mask2_id = P + 2`` (PEGASUS token mask MASK2). Hence ``num_sentinels = V - P - 3``.

A loaded mT5 ``spiece.model`` (250000 pieces) with ``num_extra_ids=100`` gives mT5's layout:
``V = 250100`` and ``<extra_id_0> = 250099``; a model may pad its embedding beyond ``V``
(mT5 uses 250112), sentinels still count down from the tokenizer's ``V - 1``.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable, Iterator

import numpy as np
import sentencepiece as spm

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
NUM_RESERVED_MASKS = 3
WORD_START = "\u2581"  # SentencePiece's '▁' marks a piece that starts a word.

__all__ = ["Tokenizer", "train_tokenizer"]


class Tokenizer:
    """A SentencePiece model plus extra ids; picklable (it carries the serialized model)."""

    def __init__(
        self, model_proto: bytes, *, num_extra_ids: int = 100, vocab_size: int | None = None
    ):
        """Wrap a serialized SentencePiece model.

        Args:
          model_proto: the bytes of a ``.model`` file.
          num_extra_ids: extra ids after the pieces (T5: 100). Ignored if ``vocab_size`` given.
          vocab_size: total vocabulary; the extra ids then fill ``[piece_size, vocab_size)``.
        """
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.piece_size = self._sp.get_piece_size()
        if vocab_size is not None:
            num_extra_ids = vocab_size - self.piece_size
        if num_extra_ids < NUM_RESERVED_MASKS + 1:
            raise ValueError(
                f"need at least {NUM_RESERVED_MASKS + 1} extra ids after {self.piece_size} "
                f"pieces (3 masks + 1 sentinel), got {num_extra_ids} (vocab_size={vocab_size})"
            )
        self.num_extra_ids = num_extra_ids
        self.vocab_size = self.piece_size + num_extra_ids
        expected = {PAD_ID: "pad", EOS_ID: "eos", UNK_ID: "unk"}
        found = {self._sp.pad_id(): "pad", self._sp.eos_id(): "eos", self._sp.unk_id(): "unk"}
        if found != expected:
            raise ValueError(
                f"SentencePiece model must have pad=0, eos=1, unk=2 (T5 convention); got "
                f"pad={self._sp.pad_id()}, eos={self._sp.eos_id()}, unk={self._sp.unk_id()}"
            )

    # -- construction

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, num_extra_ids: int = 100, vocab_size: int | None = None
    ) -> Tokenizer:
        """Load a ``.model`` file (e.g. mT5's ``spiece.model``)."""
        with open(path, "rb") as f:
            return cls(f.read(), num_extra_ids=num_extra_ids, vocab_size=vocab_size)

    def save(self, path: str | os.PathLike) -> None:
        """Write the SentencePiece model (atomically: temp file then rename)."""
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(self._proto)
        os.replace(tmp, path)

    def __getstate__(self):
        return {"proto": self._proto, "vocab_size": self.vocab_size}

    def __setstate__(self, state):
        self.__init__(state["proto"], vocab_size=state["vocab_size"])

    # -- special ids

    kind = "sentencepiece"
    pad_id = PAD_ID
    eos_id = EOS_ID
    unk_id = UNK_ID
    decoder_start_id = PAD_ID  # T5 starts the decoder with the pad id
    bos_id = None  # T5 puts nothing before encoder inputs

    @property
    def mask_id(self) -> int:
        """BERT ``[MASK]``: the lowest extra id."""
        return self.piece_size

    @property
    def mask1_id(self) -> int:
        """PEGASUS MASK1 (masked sentence)."""
        return self.piece_size + 1

    @property
    def mask2_id(self) -> int:
        """PEGASUS MASK2 (masked token)."""
        return self.piece_size + 2

    @property
    def num_sentinels(self) -> int:
        return self.num_extra_ids - NUM_RESERVED_MASKS

    def sentinel_id(self, k: int) -> int:
        """``<extra_id_k>`` = ``vocab_size - 1 - k``."""
        if not 0 <= k < self.num_sentinels:
            raise ValueError(f"sentinel index {k} outside [0, {self.num_sentinels})")
        return self.vocab_size - 1 - k

    @property
    def random_token_range(self) -> tuple[int, int]:
        """Ids MLM may draw as random replacements: every piece after pad/eos/unk."""
        return (UNK_ID + 1, self.piece_size)

    # -- encoding

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as int32, no EOS."""
        return np.asarray(self._sp.encode(text), np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, np.int32) for ids in self._sp.encode(texts)]

    def id_to_piece(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id < self.piece_size:
            return self._sp.id_to_piece(token_id)
        if token_id >= self.vocab_size:
            raise ValueError(f"id {token_id} outside vocabulary of {self.vocab_size}")
        names = {self.mask_id: "[MASK]", self.mask1_id: "[MASK1]", self.mask2_id: "[MASK2]"}
        return names.get(token_id, f"<extra_id_{self.vocab_size - 1 - token_id}>")

    def decode(self, ids) -> str:
        """Text of ``ids``; pad/EOS vanish, extra ids appear as ``<extra_id_k>``/``[MASK*]``."""
        out: list[str] = []
        run: list[int] = []
        for token_id in np.asarray(ids).reshape(-1).tolist():
            if token_id < self.piece_size:
                run.append(token_id)
                continue
            if run:
                out.append(self._sp.decode(run))
                run = []
            out.append(self.id_to_piece(token_id))
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def word_start_table(self) -> np.ndarray:
        """Bool per id: True if the piece begins a word (for whole-word MLM).

        Ordinary pieces begin a word when they start with '▁'; control, unknown and extra ids
        are words of their own; byte pieces continue a word. For Chinese, where pieces rarely
        carry '▁', pass word starts from a word segmenter instead.
        """
        table = np.ones(self.vocab_size, bool)
        for token_id in range(self.piece_size):
            if self._sp.is_byte(token_id):
                table[token_id] = False
            elif not (self._sp.is_control(token_id) or self._sp.is_unknown(token_id)):
                table[token_id] = self._sp.id_to_piece(token_id).startswith(WORD_START)
        return table


def _training_lines(documents: Iterable[str], max_line_chars: int) -> Iterator[str]:
    """SentencePiece trains on lines (it drops lines over ``max_sentence_length`` bytes)."""
    for document in documents:
        for line in document.splitlines():
            line = line.strip()
            while line:
                yield line[:max_line_chars]
                line = line[max_line_chars:]


def train_tokenizer(
    documents: Iterable[str],
    *,
    vocab_size: int,
    num_extra_ids: int = 100,
    model_path: str | os.PathLike | None = None,
    character_coverage: float = 0.9995,
    max_sentences: int = 1_000_000,
    seed_sentencepiece_size: int = 1_000_000,
) -> Tokenizer:
    """Train a unigram SentencePiece model so that pieces + extra ids = ``vocab_size``.

    ``byte_fallback=True``, pad 0 / EOS 1 / unk 2, no BOS. Documents are fed as lines (at
    most ``max_sentences``, sampled by SentencePiece). On a small corpus SentencePiece may
    stop below the requested piece count (``hard_vocab_limit=False``); the extra ids then
    grow so that the total is still ``vocab_size``. Writes ``model_path`` if given.
    """
    num_pieces = vocab_size - num_extra_ids
    if num_pieces < 256 + 3 + 10:
        raise ValueError(
            f"vocab_size {vocab_size} - {num_extra_ids} extra ids leaves {num_pieces} pieces; "
            "byte fallback needs 259 of them plus room for real pieces"
        )
    proto = io.BytesIO()
    spm.set_random_generator_seed(0)  # sampling and shuffling of lines: same corpus, same model
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(documents, max_line_chars=2000),
        model_writer=proto,
        model_type="unigram",
        vocab_size=num_pieces,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=character_coverage,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        seed_sentencepiece_size=seed_sentencepiece_size,
        num_threads=1,
        minloglevel=2,
    )
    tokenizer = Tokenizer(proto.getvalue(), vocab_size=vocab_size)
    if tokenizer.piece_size != num_pieces:
        logging.info(
            "SentencePiece stopped at %d pieces (asked %d); %d extra ids fill vocab_size %d",
            tokenizer.piece_size,
            num_pieces,
            tokenizer.num_extra_ids,
            vocab_size,
        )
    if model_path is not None:
        tokenizer.save(model_path)
    return tokenizer
