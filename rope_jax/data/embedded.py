"""The embedded default corpus: English help texts that ship inside CPython.

``pydoc_data.topics.topics`` is a dict of the ~80 help topics that ``help()`` shows
(language reference sections: "if", "class", "NUMBERS", ...), about 460 KB of English
prose and code in total, present in every CPython installation. Each topic text is one
document (sorted by topic name, so the order never depends on dict order). It is small --
a few epochs of a tiny model -- but it lets ``train.py`` run out of the box with no
download. Every 20th document (by default) is held out for evaluation by the pipeline
(3 of the 79 topics in Python 3.11).

The tokenizer trained on it is cached in the work directory as
``<workdir>/tokenizer/spm.model`` with ``spm.json`` describing how it was made; every later
run in that work directory loads it, and one asking for a tokenizer of another size or
corpus is an error (a cached tokenizer is never trained again or overwritten).
"""

from __future__ import annotations

import json
import logging
import os
import shutil

from rope_jax.data.corpora import InMemoryDocuments
from rope_jax.data.tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "TokenizerCacheError",
    "embedded_corpus",
    "embedded_documents",
    "load_or_train_tokenizer",
]

EMBEDDED_NAME = "pydoc_data.topics"


def embedded_documents() -> list[str]:
    """The topic texts of ``pydoc_data.topics``, sorted by topic name."""
    from pydoc_data import topics

    return [topics.topics[name] for name in sorted(topics.topics)]


def embedded_corpus() -> InMemoryDocuments:
    """The embedded corpus as a random-access document source."""
    return InMemoryDocuments(embedded_documents())


class TokenizerCacheError(ValueError):
    """The tokenizer cached in a work directory is not the one a run asks for."""


def load_or_train_tokenizer(
    workdir: str | os.PathLike,
    *,
    vocab_size: int,
    num_extra_ids: int = 100,
    documents=None,
    corpus_name: str = EMBEDDED_NAME,
    reuse_for_other_corpus: bool = False,
) -> Tokenizer:
    """Load ``<workdir>/tokenizer/spm.model`` or, when there is none, train it (on
    ``documents``, default the embedded corpus) and cache it there.

    A cached tokenizer is never trained again or overwritten: the ids of every checkpoint in
    the work directory refer to its pieces. ``spm.json`` records how it was made
    (``vocab_size``, ``num_extra_ids`` and ``corpus``); a request that differs raises
    ``TokenizerCacheError`` naming the difference. ``reuse_for_other_corpus=True`` loads it
    for another corpus (continued pretraining on new data with the same vocabulary); the
    sizes must still match. The model and its ``spm.json`` are written into a temporary
    directory that is renamed into place, so a run killed while training leaves no
    half-written cache.
    """
    directory = os.path.join(os.fspath(workdir), "tokenizer")
    model_path = os.path.join(directory, "spm.model")
    wanted = {"vocab_size": vocab_size, "num_extra_ids": num_extra_ids, "corpus": corpus_name}
    if os.path.exists(directory):
        return _load_cached(directory, wanted, reuse_for_other_corpus)
    logging.info("training a %d-id SentencePiece tokenizer on %s", vocab_size, corpus_name)
    documents = embedded_documents() if documents is None else documents
    staging = f"{directory}.tmp{os.getpid()}"
    os.makedirs(staging, exist_ok=True)
    tokenizer = train_tokenizer(
        documents,
        vocab_size=vocab_size,
        num_extra_ids=num_extra_ids,
        model_path=os.path.join(staging, "spm.model"),
    )
    with open(os.path.join(staging, "spm.json"), "w") as f:
        json.dump(wanted, f)
    try:
        os.rename(staging, directory)
    except OSError:
        # Another process (a second host on a shared file system) cached one first: use it.
        shutil.rmtree(staging, ignore_errors=True)
        return _load_cached(directory, wanted, reuse_for_other_corpus)
    logging.info("cached the tokenizer in %s", model_path)
    return tokenizer


def _load_cached(directory: str, wanted: dict, reuse_for_other_corpus: bool) -> Tokenizer:
    model_path = os.path.join(directory, "spm.model")
    meta_path = os.path.join(directory, "spm.json")
    if os.path.exists(os.path.join(directory, "vocab.txt")):
        raise TokenizerCacheError(
            f"{directory} holds a jieba_bert tokenizer (vocab.txt); this workdir was started "
            "with tokenizer.kind=jieba_bert. Use another --workdir for a SentencePiece one."
        )
    if not (os.path.exists(model_path) and os.path.exists(meta_path)):
        raise TokenizerCacheError(
            f"{directory} exists but lacks spm.model or spm.json, so it is not a tokenizer "
            "this package cached; it is left as it is. Move it away (or use a new workdir), "
            "or give a SentencePiece model with tokenizer.path."
        )
    with open(meta_path) as f:
        cached = json.load(f)
    sizes = ("vocab_size", "num_extra_ids")
    differ = [key for key in (*sizes, "corpus") if cached.get(key) != wanted[key]]
    if reuse_for_other_corpus and "corpus" in differ:
        differ.remove("corpus")
        logging.warning(
            "using the tokenizer cached in %s, trained on %s, for the corpus %s",
            directory,
            cached.get("corpus"),
            wanted["corpus"],
        )
    if differ:
        described = "; ".join(
            f"{key}: cached {cached.get(key)!r}, asked {wanted[key]!r}" for key in differ
        )
        fix = "use a new workdir for a tokenizer of another size"
        if differ == ["corpus"]:
            fix = (
                "use a new workdir to train one on the new corpus, or keep the cached one for "
                "it (train.py: --config.accept_changes=data.paths; load_or_train_tokenizer: "
                "reuse_for_other_corpus=True)"
            )
        raise TokenizerCacheError(
            f"the tokenizer cached in {directory} differs from the one asked for ({described}). "
            f"A cached tokenizer is never trained again or overwritten: {fix}."
        )
    logging.info("loading cached tokenizer %s", model_path)
    return Tokenizer.load(model_path, vocab_size=wanted["vocab_size"])
