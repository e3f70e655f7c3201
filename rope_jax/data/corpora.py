"""Corpus readers: plain text and JSONL, globs, streaming, bad records skipped and counted.

Two ways to read the same files, with identical documents and identical bad-record counts:

  * ``iter_documents`` -- a generator that streams documents (file order optionally shuffled
    by seed, documents dealt round-robin to ``process_count`` shards). Used to train a
    tokenizer or to scan a corpus once.
  * ``DocumentIndex`` -- a random-access source for the input pipeline. One streaming pass
    records ``(file, byte offset, byte length)`` of each valid document (24 bytes per
    document, never the text); ``index[i]`` seeks and reads one document. Random access is
    what lets the pipeline shuffle globally and checkpoint by position (grain's index
    shuffle), instead of keeping shuffle buffers in the checkpoint.

Formats: ``"text"`` with ``text_mode="blocks"`` (a document per blank-line-separated block)
or ``"lines"`` (a document per line), ``"jsonl"`` (one JSON object per line, text under
``text_field``), and ``"auto"`` (the default): JSONL for files named ``*.jsonl`` or
``*.ndjson``, text otherwise, decided per file, so a JSONL corpus is never tokenized as
plain text with its JSON syntax. A UTF-8 byte-order mark at the start of a file (written by
some Windows editors and exporters) is skipped; before, it made the first JSONL record
invalid JSON, and the first text document started with U+FEFF. Bad records -- invalid
JSON, invalid UTF-8, empty documents, missing or non-string field -- are skipped and counted
in a ``CorpusStats``; nothing raises halfway.
"""

from __future__ import annotations

import array
import dataclasses
import glob
import json
import logging
import os
from collections.abc import Iterator, Sequence

import numpy as np

__all__ = [
    "CorpusStats",
    "DocumentIndex",
    "InMemoryDocuments",
    "expand_paths",
    "file_format",
    "iter_documents",
]

FORMATS = ("auto", "text", "jsonl")
TEXT_MODES = ("blocks", "lines")
# With format="auto", files with these endings are JSONL and every other file is text.
JSONL_SUFFIXES = (".jsonl", ".ndjson")
UTF8_BOM = b"\xef\xbb\xbf"


@dataclasses.dataclass
class CorpusStats:
    """Counts of documents read and records skipped, by reason."""

    files: int = 0
    documents: int = 0
    invalid_json: int = 0
    invalid_utf8: int = 0
    empty: int = 0
    missing_field: int = 0

    @property
    def skipped(self) -> int:
        return self.invalid_json + self.invalid_utf8 + self.empty + self.missing_field

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "skipped": self.skipped}

    def report(self) -> str:
        return (
            f"{self.documents} documents from {self.files} files; skipped {self.skipped} "
            f"(invalid_json={self.invalid_json}, invalid_utf8={self.invalid_utf8}, "
            f"empty={self.empty}, missing_field={self.missing_field})"
        )

    def log(self, name: str = "corpus") -> None:
        level = logging.WARNING if self.skipped else logging.INFO
        logging.log(level, "%s: %s", name, self.report())


def expand_paths(patterns: str | Sequence[str]) -> list[str]:
    """Files matching one or more globs (comma-separated string or list), sorted, deduplicated."""
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p]
    paths: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise FileNotFoundError(f"no file matches {pattern!r}")
        paths.extend(m for m in matches if os.path.isfile(m))
    return sorted(set(paths))


def _check_format(format: str, text_mode: str) -> None:
    if format not in FORMATS:
        raise ValueError(
            f"unknown corpus format {format!r} (data.format); expected one of {FORMATS}"
        )
    if text_mode not in TEXT_MODES:
        raise ValueError(
            f"unknown text_mode {text_mode!r} (data.text_mode); expected one of {TEXT_MODES}"
        )


def file_format(path: str, format: str = "auto") -> str:
    """The format a file is read in: ``format`` itself unless it is ``"auto"``, which picks
    ``"jsonl"`` for ``JSONL_SUFFIXES`` (case-insensitive) and ``"text"`` for the rest."""
    if format != "auto":
        return format
    return "jsonl" if path.lower().endswith(JSONL_SUFFIXES) else "text"


def _parse_record(raw: bytes, format: str, text_field: str, stats: CorpusStats) -> str | None:
    """Document text of one raw record, or None (counted in ``stats``) if it is bad."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.invalid_utf8 += 1
        return None
    if format == "jsonl":
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            stats.invalid_json += 1
            return None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            stats.missing_field += 1
            return None
        text = record[text_field]
    text = text.strip()
    if not text:
        stats.empty += 1
        return None
    return text


def _scan_file(
    path: str, format: str, text_mode: str, text_field: str, stats: CorpusStats
) -> Iterator[tuple[int, int, str]]:
    """Stream ``(byte_offset, byte_length, text)`` of each valid document of one file.

    Holds at most one document (one line, or one blank-line block) in memory. A UTF-8 BOM
    at the start of the file is not part of the first record (its offset starts after it).
    """
    format = file_format(path, format)
    stats.files += 1
    blocks = format == "text" and text_mode == "blocks"
    offset = 0
    block: list[bytes] = []
    block_start = 0

    def emit(start: int, raw: bytes):
        text = _parse_record(raw, format, text_field, stats)
        if text is not None:
            stats.documents += 1
            yield start, len(raw), text

    with open(path, "rb") as f:
        if f.read(len(UTF8_BOM)) == UTF8_BOM:
            offset = len(UTF8_BOM)
        else:
            f.seek(0)
        for line in f:
            line_start, offset = offset, offset + len(line)
            is_blank = not line.strip()
            if blocks:
                if not is_blank:
                    block_start = line_start if not block else block_start
                    block.append(line)
                elif block:
                    yield from emit(block_start, b"".join(block))
                    block = []
            elif not (is_blank and format == "jsonl"):  # blank lines are not JSON records
                yield from emit(line_start, line)
    if block:
        yield from emit(block_start, b"".join(block))


def iter_documents(
    patterns: str | Sequence[str],
    *,
    format: str = "auto",
    text_mode: str = "blocks",
    text_field: str = "text",
    seed: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    stats: CorpusStats | None = None,
) -> Iterator[str]:
    """Stream documents from files matching ``patterns``.

    With ``seed`` the file order is shuffled (``numpy`` permutation); documents are dealt
    round-robin so that process ``i`` of ``n`` gets documents ``i, i + n, ...`` of the stream.
    Bad records are skipped and counted in ``stats`` (pass one to read the counts).
    """
    _check_format(format, text_mode)
    stats = CorpusStats() if stats is None else stats
    paths = expand_paths(patterns)
    if seed is not None:
        paths = [paths[i] for i in np.random.default_rng(seed).permutation(len(paths))]
    count = 0
    for path in paths:
        for _, _, text in _scan_file(path, format, text_mode, text_field, stats):
            if count % process_count == process_index:
                yield text
            count += 1


class DocumentIndex:
    """Random access to the valid documents of text/JSONL files, built by one streaming pass.

    ``len(index)`` documents; ``index[i]`` returns the text of document ``i`` (file order =
    sorted paths, then position in file). ``index.stats`` holds the counts of the scan.
    Picklable (grain worker processes reopen files lazily); safe to read from many threads.
    """

    def __init__(
        self,
        patterns: str | Sequence[str],
        *,
        format: str = "auto",
        text_mode: str = "blocks",
        text_field: str = "text",
    ):
        _check_format(format, text_mode)
        self.paths = expand_paths(patterns)
        self.format, self.text_mode, self.text_field = format, text_mode, text_field
        self.file_formats = [file_format(path, format) for path in self.paths]
        self.stats = CorpusStats()
        # Typed arrays, not lists of Python ints (~4x the memory while scanning 10^8 documents).
        file_ids, offsets, lengths = array.array("i"), array.array("q"), array.array("q")
        for file_id, path in enumerate(self.paths):
            for offset, length, _ in _scan_file(path, format, text_mode, text_field, self.stats):
                file_ids.append(file_id)
                offsets.append(offset)
                lengths.append(length)
        self._file_ids = np.frombuffer(file_ids, np.int32)
        self._offsets = np.frombuffer(offsets, np.int64)
        self._lengths = np.frombuffer(lengths, np.int64)
        self._handles: dict[int, object] = {}
        self.stats.log(f"corpus {','.join(self.paths)}")
        if not len(self._offsets):
            raise ValueError(f"no valid document in {self.paths}: {self.stats.report()}")

    def __len__(self) -> int:
        return int(self._offsets.size)

    def __getitem__(self, index: int) -> str:
        file_id = int(self._file_ids[index])
        handle = self._handles.get(file_id)
        if handle is None:
            handle = self._handles.setdefault(file_id, open(self.paths[file_id], "rb"))
        # Positional read: grain's prefetch threads share this index, and seek + read on a
        # shared handle would let one thread move another's file position.
        raw = os.pread(handle.fileno(), int(self._lengths[index]), int(self._offsets[index]))
        # The scan validated this record; a changed file is an error, not a skip.
        text = _parse_record(raw, self.file_formats[file_id], self.text_field, CorpusStats())
        if text is None:
            raise RuntimeError(f"{self.paths[file_id]} changed since it was indexed")
        return text

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


class InMemoryDocuments:
    """A list of document strings as a random-access source (embedded corpus, tests)."""

    def __init__(self, documents: Sequence[str]):
        self.stats = CorpusStats(files=0)
        self._documents = []
        for text in documents:
            text = text.strip()
            if text:
                self._documents.append(text)
            else:
                self.stats.empty += 1
        self.stats.documents = len(self._documents)

    def __len__(self) -> int:
        return len(self._documents)

    def __getitem__(self, index: int) -> str:
        return self._documents[index]
