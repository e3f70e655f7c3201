"""The input pipeline: tokenizer, corpora, packing and checkpointable batch iterators.

Entry points the trainer uses::

  from rope_jax.data import DataConfig, data_config_from_dict, make_pipeline, make_eval_pipeline
  from rope_jax.data import Tokenizer, load_or_train_tokenizer
  from rope_jax.data import JiebaBertTokenizer, TextTokenizer  # T5 PEGASUS; the protocol

Objectives themselves are pure functions in ``rope_jax.objectives``.
"""

from rope_jax.data.bert_tokenizer import JiebaBertTokenizer
from rope_jax.data.corpora import CorpusStats, DocumentIndex, InMemoryDocuments, iter_documents
from rope_jax.data.embedded import (
    TokenizerCacheError,
    embedded_corpus,
    embedded_documents,
    load_or_train_tokenizer,
)
from rope_jax.data.packing import PackSpec, RowPacker, pack_examples
from rope_jax.data.pipeline import (
    OBJECTIVES,
    DataConfig,
    DataIterator,
    data_config_from_dict,
    make_eval_pipeline,
    make_pipeline,
    pack_spec,
)
from rope_jax.data.tokenizer import Tokenizer, train_tokenizer
from rope_jax.data.tokenizers import TextTokenizer

__all__ = [
    "OBJECTIVES",
    "CorpusStats",
    "DataConfig",
    "DataIterator",
    "DocumentIndex",
    "InMemoryDocuments",
    "JiebaBertTokenizer",
    "PackSpec",
    "RowPacker",
    "TextTokenizer",
    "Tokenizer",
    "TokenizerCacheError",
    "data_config_from_dict",
    "embedded_corpus",
    "embedded_documents",
    "iter_documents",
    "load_or_train_tokenizer",
    "make_eval_pipeline",
    "make_pipeline",
    "pack_examples",
    "pack_spec",
    "train_tokenizer",
]
