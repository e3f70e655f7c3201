"""How corpus files are read (format by file name, byte-order marks) and the tokenizer cache
of a work directory (never trained again or overwritten)."""

import hashlib
import json
import os

import pytest

from rope_jax.data import corpora, embedded

BOM = b"\xef\xbb\xbf"


def _write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def _both_readers(pattern, **kwargs):
    """Documents as the streaming reader and the random-access index see them (equal)."""
    streamed = list(corpora.iter_documents(pattern, **kwargs))
    index = corpora.DocumentIndex(pattern, **kwargs)
    assert [index[i] for i in range(len(index))] == streamed
    return streamed, index.stats


@pytest.mark.parametrize("text_mode", ["blocks", "lines"])
def test_jsonl_with_byte_order_mark_keeps_its_first_record(tmp_path, text_mode):
    path = _write(
        tmp_path / "bom.jsonl", BOM + b'{"text": "first record"}\n{"text": "second record"}\n'
    )
    documents, stats = _both_readers(path, format="jsonl", text_mode=text_mode)
    assert documents == ["first record", "second record"]
    assert stats.skipped == 0


@pytest.mark.parametrize("text_mode", ["blocks", "lines"])
def test_text_with_byte_order_mark_has_no_feff_in_the_first_document(tmp_path, text_mode):
    path = _write(tmp_path / "bom.txt", BOM + "Première ligne\n\nseconde\n".encode())
    documents, _ = _both_readers(path, format="text", text_mode=text_mode)
    assert documents[0] == "Première ligne"
    assert not any("\ufeff" in d for d in documents)


def test_a_bom_only_file_and_a_bom_later_in_a_file(tmp_path):
    only = _write(tmp_path / "only.jsonl", BOM)
    with pytest.raises(ValueError, match="no valid document"):
        corpora.DocumentIndex(only)
    # Only the file's first bytes are a byte-order mark; inside a record it is content.
    inner = _write(tmp_path / "inner.txt", b"a\n\n" + BOM + b"b\n")
    documents, _ = _both_readers(inner, text_mode="blocks")
    assert documents == ["a", "\ufeffb"]


def test_format_follows_the_file_name_unless_given(tmp_path):
    records = b'{"text": "alpha beta"}\n{"text": "gamma"}\n'
    _write(tmp_path / "a.jsonl", records)
    _write(tmp_path / "b.NDJSON", b'{"text": "delta"}\n')
    _write(tmp_path / "c.txt", b"plain text here\n\nsecond block\n")
    documents, stats = _both_readers(str(tmp_path / "*"))
    assert documents == ["alpha beta", "gamma", "delta", "plain text here", "second block"]
    assert stats.skipped == 0
    assert corpora.file_format("x.JSONL") == "jsonl" and corpora.file_format("x.txt") == "text"
    # An explicit format wins: the JSONL file read as text keeps its JSON syntax.
    as_text, _ = _both_readers(str(tmp_path / "a.jsonl"), format="text", text_mode="lines")
    assert as_text == ['{"text": "alpha beta"}', '{"text": "gamma"}']
    # The pipeline's default is "auto".
    from rope_jax.data import DataConfig

    assert DataConfig().format == "auto"
    with pytest.raises(ValueError, match="data.format"):
        corpora.DocumentIndex(str(tmp_path / "a.jsonl"), format="json")


# ---------------------------------------------------------------------- tokenizer cache


def _tree_digest(root) -> str:
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def cached_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cached")
    docs = embedded.embedded_documents()[:6]
    embedded.load_or_train_tokenizer(workdir, vocab_size=600, documents=docs, corpus_name="a")
    return workdir, docs


def test_cached_tokenizer_is_never_retrained_for_another_corpus(cached_workdir):
    workdir, docs = cached_workdir
    before = _tree_digest(workdir)
    with pytest.raises(embedded.TokenizerCacheError, match=r"corpus: cached 'a', asked 'b'"):
        embedded.load_or_train_tokenizer(
            workdir, vocab_size=600, documents=docs[:2], corpus_name="b"
        )
    with pytest.raises(embedded.TokenizerCacheError, match="vocab_size: cached 600, asked 700"):
        embedded.load_or_train_tokenizer(workdir, vocab_size=700, documents=docs, corpus_name="a")
    # Asked for: the cached tokenizer serves the new corpus, still unchanged on disk.
    reused = embedded.load_or_train_tokenizer(
        workdir, vocab_size=600, corpus_name="b", reuse_for_other_corpus=True
    )
    same = embedded.load_or_train_tokenizer(workdir, vocab_size=600, corpus_name="a")
    assert reused.encode(docs[0]).tolist() == same.encode(docs[0]).tolist()
    assert _tree_digest(workdir) == before
    assert json.loads((workdir / "tokenizer" / "spm.json").read_text())["corpus"] == "a"


def test_a_foreign_tokenizer_directory_is_left_alone(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "spm.model").write_bytes(b"not mine")
    with pytest.raises(embedded.TokenizerCacheError, match="lacks spm.model or spm.json"):
        embedded.load_or_train_tokenizer(tmp_path, vocab_size=600)
    assert (tmp_path / "tokenizer" / "spm.model").read_bytes() == b"not mine"
    assert os.listdir(tmp_path) == ["tokenizer"]  # no staging directory left behind
