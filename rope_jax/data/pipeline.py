"""The input pipeline: documents -> objective -> packed rows -> fixed-shape numpy batches.

Built on grain (the JAX ecosystem's checkpointable loader)::

  documents (DocumentIndex over files, or the embedded corpus; held-out split removed)
    -> MapDataset.source -> [process_index::process_count]       (sharding by document)
    -> .shuffle(seed).repeat(num_epochs)   (grain index shuffle, reshuffled every epoch)
    -> .random_map(ExampleMaker)           (tokenize + objective; rng from (seed, index))
    -> .to_iter_dataset()
    -> [.mp_prefetch(num_workers)]         (optional: the above in worker processes)
    -> PackIterDataset                     (RowPacker: examples -> rows, below)
    -> .batch(batch_size // process_count)
    -> DataIterator                        (get_state / set_state; eval: pads the last batch)

Why this resumes exactly: everything up to ``to_iter_dataset`` is a pure function of the
element index (the shuffle is an index permutation, the objective's generator is seeded
from (seed, index)), so grain's state there is just the next index. The packing stage adds
a small state of its own: the parent state before the current document, how many of that
document's examples were already packed, and the examples of the open row (lists of ints,
at most one row's worth). ``get_state()`` is a JSON-serialisable dict; after
``set_state(s)`` the iterator yields exactly the batches it would have yielded after the
``get_state()`` that produced ``s``. No shuffle buffer is ever checkpointed.

Worker processes (``num_workers > 0``) run everything before packing: grain gives worker
``w`` of ``n`` the elements ``w, w + n, ...`` and reads the workers in turn, so the packer
sees the documents in the same order as without workers, and the state before packing is
still the next index (``_WorkerExamplesIterator`` maps it to and from grain's per-worker
state). Batches and checkpoints are therefore the same for every ``num_workers``.

Shapes are static: every batch has ``batch_size // process_count`` rows of
``inputs_length`` (and ``targets_length`` for the decoder side), int32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from rope_jax import config_fields, objectives
from rope_jax.data.corpora import CorpusStats, DocumentIndex
from rope_jax.data.embedded import embedded_corpus
from rope_jax.data.examples import OBJECTIVES, ExampleMaker, model_kind
from rope_jax.data.packing import PackSpec, RowPacker
from rope_jax.data.tokenizers import TextTokenizer

__all__ = [
    "OBJECTIVES",
    "DataConfig",
    "DataIterator",
    "HeldOutSplit",
    "data_config_from_dict",
    "make_eval_pipeline",
    "make_pipeline",
    "pack_spec",
]


SAMPLINGS = ("documents", "windows")
WINDOW_OBJECTIVES = ("causal_lm", "mlm")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What the pipeline needs; build it with ``data_config_from_dict(config.data)``.

    Attributes:
      objective: one of ``OBJECTIVES``.
      inputs_length: encoder row length (encoder-decoder), or the row length (mlm, LMs).
      targets_length: decoder row length for encoder-decoder objectives; ``None`` = T5's
        arithmetic for span corruption (512 -> 114), ``inputs_length // 2`` otherwise.
      batch_size: global batch size (rows); each process gets ``batch_size // process_count``.
      seed: shuffling and objective randomness.
      paths: comma-separated globs; empty = the embedded corpus (``data/embedded.py``).
      format / text_mode / text_field: see ``corpora.py``.
      pack: several examples per row (T5-style) or one example per row.
      sampling: ``"documents"`` (examples cut from each document by the objective, packed
        or padded into rows: this module) or ``"windows"`` (rows are windows of
        ``inputs_length`` tokens at uniformly random offsets of the training documents
        tokenized and joined with EOS, the usual set-up of length-extrapolation studies;
        ``causal_lm`` and ``mlm`` only, no packing: ``data/windows.py``).
      num_epochs: ``None`` repeats forever (training).
      eval_every: document ``i`` with ``i % eval_every == eval_every - 1`` is held out for
        evaluation and never seen in training (``0`` disables the split; eval then reads all).
      num_threads: grain prefetch threads reading/transforming documents (0 = inline), in
        each worker process when ``num_workers > 0``. Threads share the interpreter lock,
        which tokenizing and the objectives (Python and numpy) mostly hold, so they add
        little; ``num_workers`` is what scales.
      num_workers: worker processes (grain ``mp_prefetch``, started with ``spawn``) that
        read, tokenize and apply the objective; packing and batching stay in this process.
        ``0`` (the default) does everything in this process. The batches, their order and
        the ``get_state()`` format are the same for every value (documents are dealt to
        the workers in turn and read back in turn), so a checkpoint written with one value
        resumes exactly with another. Each worker imports the package and grain (about a
        second of start-up), and each eval pass starts its own workers.
    """

    objective: str = "span_corruption"
    inputs_length: int = 512
    targets_length: int | None = None
    batch_size: int = 8
    seed: int = 0
    paths: str = ""
    format: str = "auto"
    text_mode: str = "blocks"
    text_field: str = "text"
    pack: bool = True
    sampling: str = "documents"
    num_epochs: int | None = None
    eval_every: int = 20
    num_threads: int = 0
    num_workers: int = 0
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    mlm_rate: float = 0.15
    whole_word: bool = False
    gap_ratio: float = 0.3
    gsg_mlm_rate: float = 0.0
    summary_rate: float = 0.25
    summary_max_chars: int = 32

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; expected one of {OBJECTIVES}")
        if self.inputs_length < 4:
            raise ValueError(f"inputs_length must be >= 4, got {self.inputs_length}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling={self.sampling!r}; choose one of {SAMPLINGS}")
        if self.sampling == "windows":
            if self.objective not in WINDOW_OBJECTIVES:
                raise ValueError(
                    f"sampling='windows' makes {' or '.join(WINDOW_OBJECTIVES)} rows, not "
                    f"objective={self.objective!r}; set sampling='documents'"
                )
            if self.pack:
                raise ValueError(
                    "sampling='windows' cuts each row from one token stream, so there is "
                    "nothing to pack: set pack=False"
                )
        if self.num_threads < 0 or self.num_workers < 0:
            raise ValueError(
                f"num_threads and num_workers must be >= 0, got {self.num_threads} and "
                f"{self.num_workers}"
            )

    @property
    def kind(self) -> str:
        return model_kind(self.objective)

    def decoder_length(self) -> int:
        """Decoder row length actually used (encoder-decoder objectives)."""
        if self.targets_length is not None:
            return self.targets_length
        if self.objective == "span_corruption":
            return objectives.t5_span_corruption_lengths(
                self.inputs_length, self.noise_density, self.mean_noise_span_length
            )[1]
        return self.inputs_length // 2


def data_config_from_dict(mapping: Mapping[str, Any] | Any) -> DataConfig:
    """``DataConfig`` from a dict or ``ml_collections.ConfigDict``; an unknown key or a value
    of the wrong type is an error naming it (``config_fields.from_mapping``)."""
    return config_fields.from_mapping(DataConfig, mapping, "data")


def pack_spec(config: DataConfig) -> PackSpec:
    """Streams and features of the batch format for the config's objective."""
    if config.kind == "encoder_decoder":
        return PackSpec(
            streams={
                "encoder": (config.inputs_length, "encoder_segment_ids", "encoder_positions"),
                "decoder": (config.decoder_length(), "decoder_segment_ids", "decoder_positions"),
            },
            features={
                "encoder_input_tokens": "encoder",
                "decoder_input_tokens": "decoder",
                "decoder_target_tokens": "decoder",
                "decoder_loss_weights": "decoder",
            },
        )
    features = ["input_tokens", "target_tokens", "loss_weights"]
    if config.objective == "prefix_lm":
        features.append("prefix_mask")
    return PackSpec(
        streams={"tokens": (config.inputs_length, "segment_ids", "positions")},
        features=dict.fromkeys(features, "tokens"),
    )


class HeldOutSplit:
    """Index view of a document source: the training part or the held-out part (document
    ``i`` is held out when ``i % every == every - 1``; ``every <= 1``: no split)."""

    def __init__(self, source, every: int, held_out: bool):
        self.source, self.every, self.held_out = source, every, held_out
        n = len(source)
        if every <= 1:
            self.length = n
        elif held_out:
            self.length = n // every
        else:
            self.length = n - n // every

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> str:
        if self.every <= 1:
            return self.source[index]
        if self.held_out:
            return self.source[index * self.every + self.every - 1]
        return self.source[(index // (self.every - 1)) * self.every + index % (self.every - 1)]


class _PackIterator(grain.DatasetIterator):
    """Packs the example lists of its parent (one list per document) into rows."""

    def __init__(self, parent: grain.DatasetIterator, spec: PackSpec, max_segments: int | None):
        super().__init__(parent)
        self._packer = RowPacker(spec, max_segments=max_segments)
        self._doc_state = parent.get_state()  # parent state before the current document
        self._pending: list[dict[str, np.ndarray]] = []
        self._consumed = 0  # examples of the current document already packed
        self._skip = 0  # after set_state: examples to skip when the document is re-read

    @property
    def num_truncated(self) -> int:
        return self._packer.num_truncated

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            while self._consumed < len(self._pending):
                example = self._pending[self._consumed]
                self._consumed += 1
                rows = self._packer.add(example)
                if rows:
                    return rows[0]
            self._doc_state = self._parent.get_state()
            try:
                self._pending = next(self._parent)
            except StopIteration:
                self._pending, self._consumed = [], 0
                row = self._packer.flush()
                if row is None:
                    raise
                return row
            self._consumed, self._skip = self._skip, 0

    def get_state(self) -> dict[str, Any]:
        # Before the document is re-read after set_state, the count waits in ``_skip``.
        return {
            "parent": self._doc_state,
            "consumed": self._consumed + self._skip,
            "open": self._packer.get_state(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._doc_state = state["parent"]
        self._pending, self._consumed = [], 0
        self._skip = int(state["consumed"])
        self._packer.set_state(state["open"])


class _PackIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, spec: PackSpec, max_segments: int | None):
        super().__init__(parent)
        self._spec, self._max_segments = spec, max_segments

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._spec, self._max_segments)

    def __str__(self) -> str:
        return "PackIterDataset"


class DataIterator(grain.DatasetIterator):
    """Batches as numpy dicts; ``get_state()``/``set_state()`` for exact resume.

    Attributes: ``stats`` (``CorpusStats`` of the document scan), ``spec`` (``PackSpec``),
    ``batch_shapes`` (key -> shape), ``tokenizer``. With ``pad_to`` (eval), a short last
    batch is padded with all-zero rows (segment ids 0, loss weights 0), and with
    ``num_batches`` exactly that many batches are yielded (empty ones after the data runs
    out), so every process runs the same number of eval steps.
    """

    def __init__(self, parent, *, stats, spec, batch_size, tokenizer, pad=False, num_batches=None):
        super().__init__(parent)
        self.stats, self.spec, self.tokenizer = stats, spec, tokenizer
        self.batch_size, self.pad, self.num_batches = batch_size, pad, num_batches
        self.batch_shapes = {}
        for key in spec.output_keys():
            stream = spec.features.get(key)
            if stream is None:
                stream = next(s for s, v in spec.streams.items() if key in v[1:])
            self.batch_shapes[key] = (batch_size, spec.streams[stream][0])
        self._count = 0

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_batches is not None and self._count >= self.num_batches:
            raise StopIteration
        try:
            batch = next(self._parent)
        except StopIteration:
            if self.num_batches is None:
                raise
            batch = {k: np.zeros((0, *s[1:]), np.int32) for k, s in self.batch_shapes.items()}
        self._count += 1
        rows = next(iter(batch.values())).shape[0]
        if rows < self.batch_size:
            if not self.pad:
                raise RuntimeError(f"short batch of {rows} rows in a training pipeline")
            batch = {
                k: np.concatenate([v, np.zeros((self.batch_size - rows, *v.shape[1:]), v.dtype)])
                for k, v in batch.items()
            }
        return {k: np.asarray(v, np.int32) for k, v in batch.items()}

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "count": self._count}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._count = int(state["count"])


def _documents(config: DataConfig):
    if config.paths:
        return DocumentIndex(
            config.paths,
            format=config.format,
            text_mode=config.text_mode,
            text_field=config.text_field,
        )
    return embedded_corpus()


def _check_sentinels(config: DataConfig, tokenizer: TextTokenizer) -> None:
    if config.objective != "span_corruption":
        return
    if tokenizer.num_sentinels == 0:
        raise ValueError(
            f"objective=span_corruption needs T5 sentinel ids, and the {tokenizer.kind} "
            "tokenizer has none (a BERT vocabulary has words where T5 puts its sentinels); "
            "use objective=pseudo_summary, gap_sentences or mlm"
        )
    raw, _ = objectives.t5_span_corruption_lengths(
        config.inputs_length, config.noise_density, config.mean_noise_span_length
    )
    _, num_spans = objectives.random_spans_counts(
        raw, config.noise_density, config.mean_noise_span_length
    )
    if num_spans > tokenizer.num_sentinels:
        raise ValueError(
            f"span corruption of {raw} raw tokens needs {num_spans} sentinels, the tokenizer "
            f"has {tokenizer.num_sentinels}: raise num_extra_ids or vocab_size"
        )


_MIN_SHM_BYTES = 1 << 20  # example arrays below this size are pickled between processes
_WORKER_BUFFER = 8  # documents each worker process prepares ahead


class _WorkerExamplesIterator(grain.DatasetIterator):
    """Examples from grain's worker processes, with the state of the in-process stage.

    grain's ``mp_prefetch`` (0.2.18) hands worker ``w`` of ``n`` the elements ``w, w + n,
    w + 2n, ...`` of the stage before it and reads the workers in turn, starting at worker
    0. So the ``m``-th element out is element ``m`` of that stage, as with no workers, and
    the state is kept as ``{"next_index": m}``, the state of the in-process stage. It maps
    to grain's own state (worker ``w`` next reads its element ``ceil((m - w) / n)``), so a
    checkpoint resumes under any number of workers, including none.
    """

    def __init__(self, parent: grain.DatasetIterator, num_workers: int):
        super().__init__(parent)
        self._num_workers = num_workers
        self._next_index = 0
        fresh = parent.get_state()
        if fresh != self._grain_state(0):
            raise RuntimeError(
                "unexpected state of grain's multiprocessing prefetch (grain "
                f"{grain.__version__}): {fresh}; exact resume with num_workers > 0 relies on "
                "grain 0.2.18's format"
            )

    def _grain_state(self, next_index: int) -> dict[str, Any]:
        n = self._num_workers
        return {
            "next_index_in_cycle": next_index % n,
            "next_index_in_datasets": n,
            "iterators_in_use_indices": list(range(n)),
            "iterators_in_use_states": [
                {"next_index": -(-(next_index - w) // n)} for w in range(n)
            ],
            "exhausted": [0] * n,
            "future_states": {},
        }

    def __next__(self):
        element = next(self._parent)
        self._next_index += 1
        return element

    def get_state(self) -> dict[str, Any]:
        return {"next_index": self._next_index}

    def set_state(self, state: dict[str, Any]) -> None:
        self._next_index = int(state["next_index"])
        self._parent.set_state(self._grain_state(self._next_index))


class _WorkerExamples(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, num_workers: int):
        super().__init__(parent)
        self._num_workers = num_workers

    def __iter__(self) -> _WorkerExamplesIterator:
        return _WorkerExamplesIterator(self._parent.__iter__(), self._num_workers)

    def __str__(self) -> str:
        return f"WorkerExamples(num_workers={self._num_workers})"


def _allow_worker_processes() -> None:
    """Let grain start worker processes in a program that never parsed absl flags.

    grain 0.2.18 reads its ``--grain_enable_multiprocess_worker_profiling`` absl flag when
    it starts a worker process; in a program that did not parse absl flags (a plain script,
    pytest, a notebook; ``train.py`` parses them through ``absl.app``) that read raises
    ``UnparsedFlagAccessError``. Marking the flags parsed keeps every flag at its default,
    and a later ``absl.app.run`` still parses the command line.
    """
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _ignore_interrupts(worker_index: int, worker_count: int) -> None:
    """Worker processes ignore SIGINT: Ctrl-C in a terminal reaches the whole process group,
    and the main process, which owns the workers, decides how to stop (the trainer saves at
    the next step boundary, with batches still coming from the workers)."""
    del worker_index, worker_count
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _in_worker_processes(examples: grain.IterDataset, num_workers: int) -> grain.IterDataset:
    """``examples`` made in ``num_workers`` processes, in the same order and with the same state."""
    _allow_worker_processes()
    # grain's default (min_shm_size=0) puts every example array in its own shared-memory
    # block; pickling these few-kB arrays through the worker queues instead was about 5x
    # faster (causal_lm, 128 tokens, 2 workers).
    examples = grain.experimental.WithOptionsIterDataset(
        examples, grain.experimental.DatasetOptions(min_shm_size=_MIN_SHM_BYTES)
    )
    examples = examples.mp_prefetch(
        grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=_WORKER_BUFFER
        ),
        worker_init_fn=_ignore_interrupts,
    )
    return _WorkerExamples(examples, num_workers)


def _build(config, tokenizer, documents, *, process_index, process_count, train, num_batches):
    if config.sampling != "documents":
        raise ValueError(
            f"sampling={config.sampling!r} rows come from rope_jax.data.windows "
            "(make_window_inputs), not this document pipeline"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if config.batch_size % process_count:
        raise ValueError(
            f"batch_size {config.batch_size} is not divisible by process_count {process_count}"
        )
    _check_sentinels(config, tokenizer)
    documents = _documents(config) if documents is None else documents
    stats = getattr(documents, "stats", CorpusStats())
    split = HeldOutSplit(documents, config.eval_every, held_out=not train)
    if len(split) < process_count:
        raise ValueError(
            f"{len(split)} {'training' if train else 'held-out'} documents for {process_count} "
            f"processes ({stats.report()})"
        )
    ds = grain.MapDataset.source(split)[process_index::process_count]
    if train:
        ds = ds.shuffle(seed=config.seed).repeat(config.num_epochs)
    maker = ExampleMaker(
        config.objective,
        tokenizer,
        inputs_length=config.inputs_length,
        noise_density=config.noise_density,
        mean_noise_span_length=config.mean_noise_span_length,
        mlm_rate=config.mlm_rate,
        whole_word=config.whole_word,
        gap_ratio=config.gap_ratio,
        gsg_mlm_rate=config.gsg_mlm_rate,
        summary_rate=config.summary_rate,
        summary_max_chars=config.summary_max_chars,
    )
    ds = ds.random_map(maker, seed=config.seed)
    read = grain.ReadOptions(
        num_threads=config.num_threads, prefetch_buffer_size=4 * max(1, config.num_threads)
    )
    examples = ds.to_iter_dataset(read)
    if config.num_workers > 0:
        examples = _in_worker_processes(examples, config.num_workers)
    spec = pack_spec(config)
    it_ds = _PackIterDataset(examples, spec, None if config.pack else 1)
    per_process = config.batch_size // process_count
    it_ds = it_ds.batch(per_process, drop_remainder=train)
    return DataIterator(
        it_ds.__iter__(),
        stats=stats,
        spec=spec,
        batch_size=per_process,
        tokenizer=tokenizer,
        pad=not train,
        num_batches=num_batches,
    )


def make_pipeline(
    config: DataConfig | Mapping[str, Any],
    tokenizer: TextTokenizer,
    *,
    process_index: int = 0,
    process_count: int = 1,
    documents=None,
) -> DataIterator:
    """Training batches for this process (shuffled, repeated ``num_epochs`` times or forever).

    ``documents`` overrides the source named by ``config.paths`` (any object with
    ``__len__``/``__getitem__`` returning text, e.g. a prebuilt ``DocumentIndex``).
    """
    if not isinstance(config, DataConfig):
        config = data_config_from_dict(config)
    return _build(
        config,
        tokenizer,
        documents,
        process_index=process_index,
        process_count=process_count,
        train=True,
        num_batches=None,
    )


def make_eval_pipeline(
    config: DataConfig | Mapping[str, Any],
    tokenizer: TextTokenizer,
    *,
    process_index: int = 0,
    process_count: int = 1,
    num_batches: int | None = None,
    documents=None,
) -> DataIterator:
    """Held-out batches: one pass, in order, last batch zero-padded to full shape.

    Objective randomness is seeded from ``config.seed`` and the document index, so every
    call yields the same batches. Give ``num_batches`` on multi-process runs so all
    processes take the same number of eval steps.
    """
    if not isinstance(config, DataConfig):
        config = data_config_from_dict(config)
    return _build(
        config,
        tokenizer,
        documents,
        process_index=process_index,
        process_count=process_count,
        train=False,
        num_batches=num_batches,
    )
