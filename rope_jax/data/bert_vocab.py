"""A BERT ``vocab.txt`` for the jieba_bert tokenizer, built from a corpus and cached.

T5 PEGASUS' vocabulary is BERT's layout filled with the characters and the frequent jieba
words of Chinese text (its README: "the characters and words of Chinese, 50k tokens"; the
pretraining script keeps BERT's 106 leading special tokens, then the characters and words
of the earlier Chinese PEGASUS vocabulary). ``build_vocab`` makes such a vocabulary from
a corpus when the user has none:

1. BERT's special tokens first: ``[PAD]`` (id 0), ``[unused1]`` .. ``[unused<num_unused>]``,
   ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]`` (with the default 99 unused tokens these get
   BERT's ids 0, 100, 101, 102, 103);
2. every character of the corpus, most frequent first: the characters that start a basic
   word as themselves, those inside a word (letters and digits of ``bert``, ``2021``) as
   ``##`` continuation pieces, so WordPiece can spell any word it saw;
3. the most frequent jieba words (segments of two or more characters) until ``vocab_size``.

Text is normalised and cut exactly as the tokenizer does (``bert_tokenizer.normalize``,
``jieba_cut``, ``basic_words``). Ties are broken by the token's text, so the same corpus
always gives the same file. If the characters alone exceed ``vocab_size``, the rarest ones
are left out (they become ``[UNK]``).

``load_or_build_tokenizer(workdir, ...)`` caches the vocabulary as
``<workdir>/tokenizer/vocab.txt`` with ``vocab.json`` recording how it was made (or, for a
vocabulary the user gave, a copy of it and its SHA-256, so the workdir is self-contained for
``eval.py``). A cached vocabulary is never rebuilt or overwritten: a run asking for a
different one stops at start with both settings in the message.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable

from rope_jax.data.bert_tokenizer import (
    CLS,
    MASK,
    PAD,
    SEP,
    UNK,
    JiebaBertTokenizer,
    basic_words,
    jieba_cut,
    normalize,
    read_vocab,
)

VOCAB_FILE, META_FILE = "vocab.txt", "vocab.json"
SENTENCEPIECE_FILE = "spm.model"  # data/embedded.py's cache in the same folder

__all__ = ["build_vocab", "count_units", "load_or_build_tokenizer", "special_tokens"]


def special_tokens(num_unused: int = 99) -> list[str]:
    """BERT's leading tokens: ``[PAD]``, ``[unused1..num_unused]``, ``[UNK] [CLS] [SEP] [MASK]``."""
    return [PAD] + [f"[unused{i}]" for i in range(1, num_unused + 1)] + [UNK, CLS, SEP, MASK]


def count_units(documents: Iterable[str], *, max_documents: int) -> tuple[Counter, Counter]:
    """(character units, jieba words) counted over at most ``max_documents`` documents."""
    characters: Counter = Counter()
    words: Counter = Counter()
    for document in itertools.islice(documents, max_documents):
        for segment in jieba_cut(normalize(document)):
            if len(segment) > 1 and segment.split() == [segment]:
                words[segment] += 1  # the tokenizer takes a segment found in the vocabulary whole
            for word in basic_words(segment):
                characters[word[0]] += 1
                characters.update("##" + ch for ch in word[1:])
    return characters, words


def build_vocab(
    documents: Iterable[str],
    *,
    vocab_size: int,
    num_unused: int = 99,
    max_documents: int = 200_000,
) -> list[str]:
    """Tokens of a ``vocab_size``-line BERT vocabulary for ``documents`` (module docstring).

    Fewer lines when the corpus has fewer distinct units than the size asks for.
    """
    specials = special_tokens(num_unused)
    if vocab_size <= len(specials):
        raise ValueError(
            f"vocab_size {vocab_size} leaves no room after BERT's {len(specials)} special "
            f"tokens ([PAD], {num_unused} [unused*], [UNK], [CLS], [SEP], [MASK])"
        )
    characters, words = count_units(documents, max_documents=max_documents)
    if not characters:
        raise ValueError("no text to build a vocabulary from (the corpus is empty)")
    tokens = list(specials)
    taken = set(tokens)
    by_count = lambda counter: sorted(counter.items(), key=lambda item: (-item[1], item[0]))
    for unit, _ in itertools.chain(by_count(characters), by_count(words)):
        if len(tokens) == vocab_size:
            break
        if unit not in taken:
            tokens.append(unit)
            taken.add(unit)
    left_out = sum(1 for c in characters if c not in taken)
    if left_out:
        logging.warning(
            "vocab_size %d keeps %d of %d characters; the rarest %d become [UNK]",
            vocab_size,
            len(characters) - left_out,
            len(characters),
            left_out,
        )
    return tokens


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _write_json(path: str, value: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def load_or_build_tokenizer(
    workdir: str | os.PathLike,
    *,
    vocab_size: int,
    vocab_path: str = "",
    documents: Iterable[str] | None = None,
    corpus_name: str = "",
    num_unused: int = 99,
    max_documents: int = 200_000,
) -> JiebaBertTokenizer:
    """The jieba_bert tokenizer of a run, cached in ``<workdir>/tokenizer/vocab.txt``.

    With ``vocab_path`` the given vocabulary is used (and copied into the cache); otherwise
    one of ``vocab_size`` tokens is built from ``documents`` (named ``corpus_name``). If the
    cache exists it is loaded when it was made the same way, and is an error otherwise
    (nothing is rebuilt or overwritten).
    """
    directory = os.path.join(os.fspath(workdir), "tokenizer")
    cached, meta_path = os.path.join(directory, VOCAB_FILE), os.path.join(directory, META_FILE)
    if os.path.exists(os.path.join(directory, SENTENCEPIECE_FILE)):
        raise ValueError(
            f"{directory} holds a SentencePiece tokenizer ({SENTENCEPIECE_FILE}); this workdir "
            "was started with tokenizer.kind=sentencepiece. Use another --workdir for "
            "tokenizer.kind=jieba_bert."
        )
    if vocab_path:
        if not os.path.isfile(vocab_path):
            raise FileNotFoundError(f"tokenizer.vocab_path {vocab_path} is not a file")
        wanted = {"kind": "jieba_bert", "vocab_sha256": _sha256(vocab_path)}
    else:
        wanted = {"kind": "jieba_bert", "vocab_size": vocab_size, "corpus": corpus_name}
    if os.path.exists(cached):
        recorded = {}
        if os.path.exists(meta_path):
            with open(meta_path, encoding="utf-8") as f:
                recorded = json.load(f)
        if any(recorded.get(key) != value for key, value in wanted.items()):
            raise ValueError(
                f"the cached tokenizer {cached} was made with {recorded or 'no record'}, this "
                f"run asks for {wanted}. A cached tokenizer is never rebuilt or overwritten: "
                f"use another --workdir, or delete {directory} to build it again."
            )
        logging.info("loading cached tokenizer %s", cached)
        return JiebaBertTokenizer.load(cached)
    os.makedirs(directory, exist_ok=True)
    if vocab_path:
        tokenizer = JiebaBertTokenizer.load(vocab_path)
        wanted["source"] = os.path.abspath(vocab_path)
    else:
        logging.info("building a %d-token jieba+BERT vocabulary on %s", vocab_size, corpus_name)
        if documents is None:
            raise ValueError("no vocab_path and no documents to build a vocabulary from")
        tokens = build_vocab(
            documents, vocab_size=vocab_size, num_unused=num_unused, max_documents=max_documents
        )
        tokenizer = JiebaBertTokenizer(tokens, source=cached)
    tokenizer.save(cached)
    _write_json(meta_path, wanted)
    return JiebaBertTokenizer(read_vocab(cached), source=cached)
