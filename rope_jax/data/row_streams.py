"""Global input order: row ``r`` of every global batch comes from row stream ``r``.

The documents of a run form one global stream: position ``k`` holds document ``k % n`` of
epoch ``k // n`` of a seeded index shuffle (grain's ``MapDataset.shuffle(seed)
.repeat(num_epochs)``, reshuffled every epoch), with the objective's randomness seeded from
``(seed, k)`` (``random_map``). So the examples at position ``k`` are a pure function of
``k``, computed on demand by index, never by reading the positions before it.

A global batch of ``B`` rows has ``B`` row streams: stream ``r`` takes positions ``r, r + B,
r + 2B, ...`` and packs their examples into rows (``RowPacker``), and row ``r`` of batch
``t`` is the ``t``-th row of stream ``r``. Nothing of this depends on the number of
processes: process ``p`` of ``P`` runs streams ``p B / P ... (p + 1) B / P - 1``, the
contiguous block of rows it feeds into the global batch
(``jax.make_array_from_process_local_data``), and reads only their documents, ``1 / P`` of
the corpus. Hence 2 processes train on the batches of 1, and every position is read by
exactly one stream.

Each stream's state is the number of its current document, how many of that document's
examples are already packed, and the examples of its open row (lists of ints). The state
of a process is ``{"row_streams": {"<r>": state of stream r, ...}}`` for its streams;
``training.checkpoint`` merges the processes' states into one global state, and a run
resumed on any number of processes takes its streams from it.

Why not one stream per process (what grain's per-host sharding gives): then the rows of a
batch depend on how the documents are split between hosts, so a run on another number of
hosts sees other batches and cannot resume the input where it stopped. Why not one packer
for the global stream: row ``r`` of batch ``t`` would then depend on every document before
it, so every process would read (tokenize, apply the objective to) the whole corpus.

Deliberate cost: a stream packs only every ``B``-th document, so packing is as dense as
one stream's documents allow (the same density, as rows are filled greedily either way),
and streams end a finite pass at different batches (eval pads the ended streams' rows).
"""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
import signal
from collections.abc import Sequence
from typing import Any

import numpy as np

from rope_jax.data.packing import PackSpec, RowPacker

__all__ = ["ExampleSource", "RowStream", "streams_of_process"]

STATE_KEY = "row_streams"


def streams_of_process(num_streams: int, process_index: int, process_count: int) -> range:
    """The row streams process ``process_index`` runs: its contiguous block of the batch."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if num_streams % process_count:
        raise ValueError(
            f"batch_size {num_streams} is not divisible by process_count {process_count}"
        )
    per_process = num_streams // process_count
    return range(process_index * per_process, (process_index + 1) * per_process)


# Worker processes hold the dataset in a global, set once by the pool's initializer.
_WORKER_DATASET = None


def _worker_start(dataset) -> None:
    """Pool initializer: keep the dataset; ignore SIGINT (Ctrl-C in a terminal reaches the
    whole process group, and the main process, which owns the workers, decides how to stop)."""
    global _WORKER_DATASET
    _WORKER_DATASET = dataset
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_examples(position: int):
    return _WORKER_DATASET[position]


class ExampleSource:
    """The examples at a global position, computed here, in threads or in worker processes.

    ``dataset[k]`` (a grain ``MapDataset``: index -> list of example dicts) is a pure
    function of ``k``, so where it runs changes nothing but speed: ``num_workers``
    processes (started with ``spawn``) compute ahead, or ``num_threads`` threads (which
    share the interpreter lock with tokenizing), or, with neither, each position is computed
    when it is needed.
    """

    def __init__(self, dataset, *, num_threads: int = 0, num_workers: int = 0):
        self.dataset = dataset
        self.length = len(dataset)
        self._executor: concurrent.futures.Executor | None = None
        self.parallelism = num_workers or num_threads
        if num_workers > 0:
            self._executor = concurrent.futures.ProcessPoolExecutor(
                num_workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_start,
                initargs=(dataset,),
            )
        elif num_threads > 0:
            self._executor = concurrent.futures.ThreadPoolExecutor(num_threads)

    def submit(self, position: int) -> concurrent.futures.Future | None:
        """Starts computing ``position`` ahead (``None`` when everything runs inline)."""
        if self._executor is None:
            return None
        if isinstance(self._executor, concurrent.futures.ProcessPoolExecutor):
            return self._executor.submit(_worker_examples, position)
        return self._executor.submit(self.dataset.__getitem__, position)

    def get(self, position: int) -> list[dict[str, np.ndarray]]:
        return self.dataset[position]

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


class RowStream:
    """Row stream ``index`` of ``num_streams``: packs the examples of global positions
    ``index, index + num_streams, ...`` into rows (see the module docstring).

    ``next_row()`` returns the next row, or ``None`` once the positions run out (a finite
    pass) and the open row has been returned. ``lookahead`` positions are computed ahead
    when the source has workers or threads.
    """

    def __init__(
        self,
        index: int,
        num_streams: int,
        source: ExampleSource,
        spec: PackSpec,
        *,
        max_segments: int | None,
        lookahead: int = 0,
    ):
        self.index, self.num_streams, self.source = index, num_streams, source
        self._packer = RowPacker(spec, max_segments=max_segments)
        self._lookahead = lookahead
        self._ahead: collections.OrderedDict[int, concurrent.futures.Future] = (
            collections.OrderedDict()
        )
        self._document = 0  # this stream's document whose examples are being packed
        self._examples: list[dict[str, np.ndarray]] | None = None  # its examples, once read
        self._consumed = 0  # of its examples, already packed

    @property
    def num_truncated(self) -> int:
        return self._packer.num_truncated

    def position(self, document: int) -> int:
        """Global stream position of this stream's ``document``-th document."""
        return self.index + document * self.num_streams

    def _read(self, document: int) -> list[dict[str, np.ndarray]]:
        for ahead in range(document, document + self._lookahead + 1):
            if ahead not in self._ahead and self.position(ahead) < self.source.length:
                future = self.source.submit(self.position(ahead))
                if future is None:
                    break
                self._ahead[ahead] = future
        future = self._ahead.pop(document, None)
        return self.source.get(self.position(document)) if future is None else future.result()

    def next_row(self) -> dict[str, np.ndarray] | None:
        while True:
            if self._examples is None:
                if self.position(self._document) >= self.source.length:
                    return self._packer.flush()
                self._examples = self._read(self._document)
            while self._consumed < len(self._examples):
                example = self._examples[self._consumed]
                self._consumed += 1
                rows = self._packer.add(example)
                if rows:
                    return rows[0]
            self._document += 1
            self._examples, self._consumed = None, 0

    def get_state(self) -> dict[str, Any]:
        return {
            "document": self._document,
            "consumed": self._consumed,
            "open": self._packer.get_state(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        for future in self._ahead.values():
            future.cancel()
        self._ahead.clear()
        self._document = int(state["document"])
        # The document is read again when the next row needs it; its first ``consumed``
        # examples are already packed (in rows returned before, or in the open row).
        self._examples, self._consumed = None, int(state["consumed"])
        self._packer.set_state(state["open"])


def stream_states(streams: Sequence[RowStream]) -> dict[str, dict[str, Any]]:
    return {str(stream.index): stream.get_state() for stream in streams}


def missing_streams(saved: dict[str, Any], streams: Sequence[RowStream]) -> list[int]:
    return [stream.index for stream in streams if str(stream.index) not in saved]


def lookahead_per_stream(parallelism: int, num_streams: int) -> int:
    """Positions each stream computes ahead so the workers stay busy: about two per worker
    in all, at least one per stream."""
    if parallelism <= 0:
        return 0
    return max(1, -(-2 * parallelism // max(num_streams, 1)))


def merge_process_states(states: Sequence[Any]) -> Any | None:
    """One input state for every process from the processes' own states, or ``None`` when
    they do not merge. Equal states (an input whose state is its step, e.g. window
    sampling or fine-tuning epochs) merge to that state; row-stream states
    (``{"row_streams": {...}}``, disjoint rows) to the union of their streams, the state
    a single process running every stream would have had."""
    states = list(states)
    if all(state == states[0] for state in states):
        return states[0]
    if not all(isinstance(state, dict) and set(state) == {STATE_KEY} for state in states):
        return None
    merged: dict[str, Any] = {}
    for state in states:
        if merged.keys() & state[STATE_KEY].keys():
            return None
        merged.update(state[STATE_KEY])
    return {STATE_KEY: dict(sorted(merged.items(), key=lambda item: int(item[0])))}
