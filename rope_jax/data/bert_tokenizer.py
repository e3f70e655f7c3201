"""The T5 PEGASUS tokenizer (kind ``"jieba_bert"``): jieba words over a BERT ``vocab.txt``.

T5 PEGASUS (Su 2021, ZhuiyiTechnology/t5-pegasus) replaced mT5's SentencePiece model by a
BERT vocabulary of about 50k Chinese characters and words. Its fine-tuning script builds
bert4keras' ``Tokenizer(vocab.txt, do_lower_case=True, pre_tokenize=lambda s:
jieba.cut(s, HMM=False))``; this module restates that tokenizer (bert4keras 0.10,
``tokenizers.py``):

1. Normalise the text: lower-case, Unicode NFD, drop combining marks (category ``Mn``)
   (bert4keras ``lowercase_and_normalize``; BERT's ``do_lower_case`` + strip accents).
2. Cut it with ``jieba.cut(text, HMM=False)`` (jieba's default dictionary).
3. A segment found in the vocabulary is one token.
4. Any other segment takes BERT's basic + WordPiece path: every punctuation character
   (ASCII symbols and Unicode ``P*``) and every CJK ideograph becomes a word of its own,
   whitespace separates words, NUL, U+FFFD and control characters (``Cc``, ``Cf``) vanish;
   each word is split greedily longest-match-first into pieces, later pieces prefixed
   ``##``. A word that cannot be covered, or is longer than 200 characters, is ``[UNK]``.

Where Hugging Face's ``BertTokenizer`` differs (it never pre-segments): it also drops the
other ``C*`` categories (unassigned, private use, surrogates) and gives up on words of more
than 100 characters. On text whose jieba segments are not in the vocabulary as words, both
give the same ids (tests/test_bert_tokenizer.py checks it).

Ids: the ``vocab.txt`` line order (a line's first whitespace-separated field is the token,
as bert4keras ``load_vocab`` reads it). ``[PAD]`` must be id 0 (the models mask id 0);
``[SEP]`` is the EOS, ``[CLS]`` the decoder start and the encoder's first token
(``bos_id``), as bert4keras ``encode`` returns ``[CLS] text [SEP]`` for both sides.
``[MASK]`` is the MLM mask, ``[unused1]``/``[unused2]`` (which BERT vocabularies reserve for
new tokens) PEGASUS' MASK1/MASK2. There are no sentinels: span corruption writes sentinels
counting down from the vocabulary's end, where a BERT vocabulary has real words, so the
pipeline rejects ``span_corruption`` with this tokenizer (T5 PEGASUS pretrains with
``pseudo_summary``).

Decoding follows bert4keras ``Tokenizer.decode``: special tokens (``[...]``) vanish, ``##``
pieces glue to the previous token, CJK characters join without spaces, other tokens are
separated by a space, and no space follows CJK punctuation or ``+-/={(<[``.
"""

from __future__ import annotations

import logging
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
MASK1, MASK2 = "[unused1]", "[unused2]"
WORD_MAX_CHARS = 200  # bert4keras Tokenizer(word_maxlen=200)
_MEMO_SIZE = 200_000  # segments whose tokens are remembered (jieba words repeat a lot)

__all__ = [
    "JiebaBertTokenizer",
    "basic_words",
    "decode_tokens",
    "is_cjk",
    "is_punctuation",
    "jieba_cut",
    "normalize",
    "read_vocab",
    "word_piece",
]

# CJK punctuation that bert4keras' decode glues to the following token.
_CJK_PUNCTUATION = (
    "\uff02\uff03\uff04\uff05\uff06\uff07\uff08\uff09\uff0a\uff0b\uff0c\uff0d\uff0f\uff1a"
    "\uff1b\uff1c\uff1d\uff1e\uff20\uff3b\uff3c\uff3d\uff3e\uff3f\uff40\uff5b\uff5c\uff5d"
    "\uff5e\uff5f\uff60\uff62\uff63\uff64\u3000\u3001\u3003\u3008\u3009\u300a\u300b\u300c"
    "\u300d\u300e\u300f\u3010\u3011\u3014\u3015\u3016\u3017\u3018\u3019\u301a\u301b\u301c"
    "\u301d\u301e\u301f\u3030\u303e\u303f\u2013\u2014\u2018\u2019\u201b\u201c\u201d\u201e"
    "\u201f\u2026\u2027\ufe4f\ufe51\ufe54\u00b7\uff01\uff1f\uff61\u3002"
)
_NO_SPACE_AFTER = re.compile(
    "(" + "|".join(re.escape(c) for c in _CJK_PUNCTUATION + "+-/={(<[") + ") "
)
_SPECIAL = re.compile(r"\[[^\[\]]+\]|<[^<>]+>")


# ----------------------------------------------------------------------------- rules


def is_cjk(ch: str) -> bool:
    """CJK Unified Ideographs and their extensions/compatibility blocks (BERT's list)."""
    code = ord(ch)
    return (
        0x4E00 <= code <= 0x9FFF
        or 0x3400 <= code <= 0x4DBF
        or 0x20000 <= code <= 0x2A6DF
        or 0x2A700 <= code <= 0x2B73F
        or 0x2B740 <= code <= 0x2B81F
        or 0x2B820 <= code <= 0x2CEAF
        or 0xF900 <= code <= 0xFAFF
        or 0x2F800 <= code <= 0x2FA1F
    )


def is_punctuation(ch: str) -> bool:
    """ASCII non-alphanumeric symbols and every Unicode ``P*`` character (BERT's rule)."""
    code = ord(ch)
    return (
        33 <= code <= 47
        or 58 <= code <= 64
        or 91 <= code <= 96
        or 123 <= code <= 126
        or unicodedata.category(ch).startswith("P")
    )


def _is_space(ch: str) -> bool:
    return ch in " \n\r\t" or unicodedata.category(ch) == "Zs"


def _is_dropped(ch: str) -> bool:
    return ch in ("\x00", "\ufffd") or unicodedata.category(ch) in ("Cc", "Cf")


def normalize(text: str) -> str:
    """Lower-case, NFD, without combining marks (bert4keras ``lowercase_and_normalize``)."""
    text = unicodedata.normalize("NFD", text.lower())
    return "".join(ch for ch in text if unicodedata.category(ch) != "Mn")


def basic_words(text: str) -> list[str]:
    """BERT's basic split of normalised text: punctuation and CJK alone, spaces separate."""
    spaced: list[str] = []
    for ch in text:
        if is_punctuation(ch) or is_cjk(ch):
            spaced.extend((" ", ch, " "))
        elif _is_space(ch):
            spaced.append(" ")
        elif not _is_dropped(ch):
            spaced.append(ch)
    return "".join(spaced).split()


def word_piece(word: str, vocab, *, unk: str = UNK, max_chars: int = WORD_MAX_CHARS) -> list[str]:
    """Greedy longest-match-first pieces of ``word`` (``##`` after the first); ``[unk]`` when
    some position has no piece or the word has more than ``max_chars`` characters."""
    if len(word) > max_chars:
        return [unk]
    pieces, start = [], 0
    while start < len(word):
        end = len(word)
        while end > start:
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            if piece in vocab:
                break
            end -= 1
        if end == start:
            return [unk]
        pieces.append(piece)
        start = end
    return pieces


_JIEBA = None


def jieba_cut(text: str) -> list[str]:
    """``jieba.cut(text, HMM=False)`` with jieba's default dictionary (the reference's call)."""
    global _JIEBA
    if _JIEBA is None:
        import jieba

        jieba.setLogLevel(logging.WARNING)  # it logs its dictionary load at INFO/DEBUG
        _JIEBA = jieba
    return list(_JIEBA.cut(text, HMM=False))


def decode_tokens(tokens: Sequence[str]) -> str:
    """Readable text of tokens as bert4keras ``Tokenizer.decode`` builds it.

    Deliberate difference: bert4keras reads the previous character of an empty text (and
    fails) when the first tokens are empty ``##`` pieces; here that case adds a space.
    """
    tokens = [t for t in tokens if not (t.startswith("[") and t.endswith("]"))]
    text = ""
    for i, token in enumerate(tokens):
        if token[:2] == "##":
            text += token[2:]
        elif len(token) == 1 and is_cjk(token):
            text += token
        elif len(token) == 1 and is_punctuation(token):
            text += token + " "
        elif i > 0 and text and is_cjk(text[-1]):
            text += token
        else:
            text += " " + token
    text = re.sub(" +", " ", text)
    text = re.sub("' (re|m|s|t|ve|d|ll) ", "'\\1 ", text)
    text = _NO_SPACE_AFTER.sub("\\1", text)
    text = re.sub(r"(\d\.) (\d)", "\\1\\2", text)
    return text.strip()


def read_vocab(path: str | os.PathLike) -> list[str]:
    """Tokens of a ``vocab.txt`` in id order; an empty line or a repeated token is an error
    naming the line (bert4keras would silently shift every later id)."""
    tokens: list[str] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                raise ValueError(f"{path}:{number}: empty line in the vocabulary")
            token = fields[0]
            if token in seen:
                raise ValueError(
                    f"{path}:{number}: token {token!r} repeats line {seen[token]}; every "
                    "token of a vocab.txt must be unique (its line number is its id)"
                )
            seen[token] = number
            tokens.append(token)
    return tokens


# ----------------------------------------------------------------------------- tokenizer


class JiebaBertTokenizer:
    """jieba + BERT WordPiece over a ``vocab.txt``; satisfies ``tokenizers.TextTokenizer``."""

    kind = "jieba_bert"
    num_extra_ids = 0  # nothing beyond the vocabulary file

    def __init__(self, tokens: Sequence[str], *, source: str = "vocab"):
        """Wrap the tokens of a vocabulary in id order (``read_vocab``); ``source`` names it
        in error messages."""
        self.tokens = list(tokens)
        self.source = source
        self.vocab = {token: i for i, token in enumerate(self.tokens)}
        if len(self.vocab) != len(self.tokens):
            raise ValueError(f"{source}: the vocabulary repeats tokens")
        missing = [t for t in (PAD, UNK, CLS, SEP) if t not in self.vocab]
        if missing:
            raise ValueError(
                f"{source}: a BERT vocabulary needs {PAD}, {UNK}, {CLS} and {SEP}; "
                f"missing {missing}"
            )
        if self.vocab[PAD] != 0:
            raise ValueError(
                f"{source}: {PAD} is id {self.vocab[PAD]}; the models pad (and mask) id 0, "
                f"so {PAD} must be the first line"
            )
        self.vocab_size = self.piece_size = len(self.tokens)
        self.pad_id = 0
        self.unk_id = self.vocab[UNK]
        self.eos_id = self.vocab[SEP]
        self.decoder_start_id = self.bos_id = self.vocab[CLS]
        self._memo: dict[str, list[int]] = {}

    @classmethod
    def load(cls, path: str | os.PathLike) -> JiebaBertTokenizer:
        """Read a ``vocab.txt`` (e.g. the released T5 PEGASUS vocabulary)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"BERT vocabulary not found: {path}")
        return cls(read_vocab(path), source=os.fspath(path))

    def save(self, path: str | os.PathLike) -> None:
        """Write ``vocab.txt`` (atomically: temp file then rename)."""
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(token + "\n" for token in self.tokens)
        os.replace(tmp, path)

    def __getstate__(self):
        return {"tokens": self.tokens, "source": self.source}

    def __setstate__(self, state):
        self.__init__(state["tokens"], source=state["source"])

    # -- special ids

    def _special(self, token: str, role: str) -> int:
        if token not in self.vocab:
            raise ValueError(f"{self.source} has no {token}, which this tokenizer uses as {role}")
        return self.vocab[token]

    @property
    def mask_id(self) -> int:
        return self._special(MASK, "the MLM mask")

    @property
    def mask1_id(self) -> int:
        return self._special(MASK1, "PEGASUS' sentence mask MASK1")

    @property
    def mask2_id(self) -> int:
        return self._special(MASK2, "PEGASUS' token mask MASK2")

    num_sentinels = 0

    def sentinel_id(self, k: int) -> int:
        raise ValueError(
            "a BERT vocabulary has no T5 sentinels (span corruption writes them at the "
            "vocabulary's end, where BERT has words); use objective=pseudo_summary, "
            "gap_sentences or mlm with tokenizer.kind=jieba_bert"
        )

    @property
    def random_token_range(self) -> tuple[int, int]:
        """MLM random replacements: every id after the leading special tokens
        (``[PAD]``, ``[unused*]``, ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]``, ``<S>``...)."""
        first = 0
        while first < len(self.tokens) and _SPECIAL.fullmatch(self.tokens[first]):
            first += 1
        return (first, self.vocab_size)

    # -- encoding

    def tokenize(self, text: str) -> list[str]:
        """Tokens of ``text`` (no ``[CLS]``/``[SEP]``), by the rules of the module docstring."""
        out: list[str] = []
        for segment in jieba_cut(normalize(text)):
            if segment in self.vocab:
                out.append(segment)
            else:
                for word in basic_words(segment):
                    out.extend(word_piece(word, self.vocab))
        return out

    def _segment_ids(self, segment: str) -> list[int]:
        ids = self._memo.get(segment)
        if ids is None:
            if segment in self.vocab:
                ids = [self.vocab[segment]]
            else:
                ids = [
                    self.vocab[piece]
                    for word in basic_words(segment)
                    for piece in word_piece(word, self.vocab)
                ]
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            self._memo[segment] = ids
        return ids

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as int32, without ``[CLS]``/``[SEP]``."""
        ids: list[int] = []
        for segment in jieba_cut(normalize(text)):
            ids.extend(self._segment_ids(segment))
        return np.asarray(ids, np.int32)

    def encode_batch(self, texts: Iterable[str]) -> list[np.ndarray]:
        return [self.encode(text) for text in texts]

    def id_to_piece(self, token_id: int) -> str:
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"id {token_id} outside vocabulary of {self.vocab_size}")
        return self.tokens[token_id]

    def decode(self, ids) -> str:
        """Text of ``ids`` (bert4keras' decode: specials vanish, Chinese joins without spaces)."""
        return decode_tokens([self.id_to_piece(i) for i in np.asarray(ids).reshape(-1).tolist()])

    def word_start_table(self) -> np.ndarray:
        """Bool per id: False for ``##`` continuation pieces (whole-word MLM), else True."""
        return np.array([not token.startswith("##") for token in self.tokens], bool)
