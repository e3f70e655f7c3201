"""The embedded default corpus: English help texts that ship inside CPython.

``pydoc_data.topics.topics`` is a dict of the ~80 help topics that ``help()`` shows
(language reference sections: "if", "class", "NUMBERS", ...), about 460 KB of English
prose and code in total, present in every CPython installation. Each topic text is one
document (sorted by topic name, so the order never depends on dict order). It is small --
a few epochs of a tiny model -- but it lets ``train.py`` run out of the box with no
download. Every 20th document (by default) is held out for evaluation by the pipeline
(3 of the 79 topics in Python 3.11).

The tokenizer trained on it is cached in the work directory as
``<workdir>/tokenizer/spm.model`` with ``spm.json`` describing how it was made; the next run
with the same settings loads it instead of training again.
"""

from __future__ import annotations

import json
import logging
import os

from rope_jax.data.corpora import InMemoryDocuments
from rope_jax.data.tokenizer import Tokenizer, train_tokenizer

__all__ = ["embedded_corpus", "embedded_documents", "load_or_train_tokenizer"]

EMBEDDED_NAME = "pydoc_data.topics"


def embedded_documents() -> list[str]:
    """The topic texts of ``pydoc_data.topics``, sorted by topic name."""
    from pydoc_data import topics

    return [topics.topics[name] for name in sorted(topics.topics)]


def embedded_corpus() -> InMemoryDocuments:
    """The embedded corpus as a random-access document source."""
    return InMemoryDocuments(embedded_documents())


def load_or_train_tokenizer(
    workdir: str | os.PathLike,
    *,
    vocab_size: int,
    num_extra_ids: int = 100,
    documents=None,
    corpus_name: str = EMBEDDED_NAME,
) -> Tokenizer:
    """Load ``<workdir>/tokenizer/spm.model`` or train it (on ``documents``, default embedded).

    The cache is reused only if ``spm.json`` records the same ``vocab_size``,
    ``num_extra_ids`` and ``corpus_name``; otherwise it is trained again and overwritten.
    """
    directory = os.path.join(os.fspath(workdir), "tokenizer")
    model_path = os.path.join(directory, "spm.model")
    meta_path = os.path.join(directory, "spm.json")
    wanted = {"vocab_size": vocab_size, "num_extra_ids": num_extra_ids, "corpus": corpus_name}
    if os.path.exists(model_path) and os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f) == wanted:
                logging.info("loading cached tokenizer %s", model_path)
                return Tokenizer.load(model_path, vocab_size=vocab_size)
    os.makedirs(directory, exist_ok=True)
    logging.info("training a %d-id SentencePiece tokenizer on %s", vocab_size, corpus_name)
    documents = embedded_documents() if documents is None else documents
    tokenizer = train_tokenizer(
        documents, vocab_size=vocab_size, num_extra_ids=num_extra_ids, model_path=model_path
    )
    tmp = f"{meta_path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(wanted, f)
    os.replace(tmp, meta_path)
    return tokenizer
