"""The input pipeline: documents -> objective -> packed rows -> fixed-shape numpy batches.

Built on grain's index datasets (the JAX ecosystem's checkpointable loader)::

  documents (DocumentIndex over files, or the embedded corpus; held-out split removed)
    -> MapDataset.source
    -> .shuffle(seed).repeat(num_epochs)   (training: index shuffle, reshuffled every epoch)
    -> .random_map(ExampleMaker)           (tokenize + objective; rng from (seed, position))
    = global position k -> examples        (a pure function of k, computed on demand)
    -> RowStream r of batch_size           (packs positions r, r + B, ...: row r of each batch)
    -> DataIterator                        (this process's streams; get_state / set_state)

The global batch at step t is the same for any number of processes: process p makes rows
``p B / P ... (p + 1) B / P - 1`` and reads only their documents (``row_streams.py``: the
order, what each process reads, why). Why this resumes exactly: up to the packer
everything is a function of the position, so a stream's state is its document number, how
many of that document's examples are packed, and the examples of its open row (lists of
ints, at most one row's worth). ``get_state()`` is a JSON-serialisable dict keyed by
global row; after ``set_state(s)`` the iterator yields exactly the batches it would have
yielded after the ``get_state()`` that produced ``s``, and a state merged from all
processes (``training.checkpoint``) resumes on any number of them. No shuffle buffer is
ever checkpointed.

Worker processes (``num_workers > 0``) or threads (``num_threads``) compute the examples
of the next positions ahead; packing stays in this process. As a position's examples do
not depend on where they are computed, batches and checkpoints are the same for every
``num_workers``.

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
from rope_jax.data import row_streams
from rope_jax.data.corpora import CorpusStats, DocumentIndex
from rope_jax.data.embedded import embedded_corpus
from rope_jax.data.examples import OBJECTIVES, ExampleMaker, model_kind
from rope_jax.data.packing import PackSpec
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
      batch_size: global batch size (rows, = row streams); each process makes
        ``batch_size // process_count`` of them.
      seed: shuffling and objective randomness.
      paths: comma-separated globs; empty = the embedded corpus (``data/embedded.py``).
      format / text_mode / text_field: see ``corpora.py``.
      pack: several examples per row (T5-style) or one example per row.
      sampling: ``"documents"`` (examples cut from each document by the objective, packed
        or padded into rows: this module) or ``"windows"`` (rows are windows of
        ``inputs_length`` tokens at uniformly random offsets of the training documents
        tokenized and joined with EOS, the usual set-up of length-extrapolation studies;
        ``causal_lm`` and ``mlm`` only, no packing: ``data/windows.py``).
      num_epochs: ``None`` repeats forever (training). A count ends ``train.py`` after
        the step where the data runs out, saved (a rerun then says the data is read);
        one process only, as the processes' rows run out at different steps.
      eval_every: document ``i`` with ``i % eval_every == eval_every - 1`` is held out for
        evaluation and never seen in training (``0`` disables the split; eval then reads all).
      num_threads: grain prefetch threads reading/transforming documents (0 = inline), in
        each worker process when ``num_workers > 0``. Threads share the interpreter lock,
        which tokenizing and the objectives (Python and numpy) mostly hold, so they add
        little; ``num_workers`` is what scales.
      num_workers: worker processes (started with ``spawn``) that read, tokenize and apply
        the objective to the next documents of this process's row streams; packing and
        batching stay in this process. ``0`` (the default) does everything in this process.
        The batches, their order and the ``get_state()`` format are the same for every
        value (a document's examples depend on its position only), so a checkpoint written
        with one value resumes exactly with another. Each worker imports the package and
        grain (about a second of start-up), and each eval pass starts its own workers.
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


class DataIterator:
    """This process's rows of every global batch, as numpy dicts; ``get_state()`` /
    ``set_state()`` for exact resume, on any number of processes (``row_streams.py``).

    Attributes: ``stats`` (``CorpusStats`` of the document scan), ``spec`` (``PackSpec``),
    ``batch_shapes`` (key -> shape), ``tokenizer``, ``streams`` (the global row numbers this
    process makes). Training (``pad=False``) ends when one of its streams runs out (a
    finite ``num_epochs``). With ``pad`` (eval), the rows of streams that ran out are
    all-zero (segment ids 0, loss weights 0) until every stream has, and with
    ``num_batches`` exactly that many batches are yielded, so every process runs the same
    number of eval steps.
    """

    def __init__(self, streams, source, *, stats, spec, tokenizer, pad=False, num_batches=None):
        self._streams, self._source = list(streams), source
        self.stats, self.spec, self.tokenizer = stats, spec, tokenizer
        self.batch_size, self.pad, self.num_batches = len(self._streams), pad, num_batches
        self.streams = [stream.index for stream in self._streams]
        self.batch_shapes = {}
        for key in spec.output_keys():
            stream = spec.features.get(key)
            if stream is None:
                stream = next(s for s, v in spec.streams.items() if key in v[1:])
            self.batch_shapes[key] = (self.batch_size, spec.streams[stream][0])
        self._count = 0

    @property
    def num_truncated(self) -> int:
        return sum(stream.num_truncated for stream in self._streams)

    def __iter__(self) -> DataIterator:
        return self

    def _empty_row(self) -> dict[str, np.ndarray]:
        return {key: np.zeros(shape[1:], np.int32) for key, shape in self.batch_shapes.items()}

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_batches is not None and self._count >= self.num_batches:
            raise StopIteration
        rows = [stream.next_row() for stream in self._streams]
        if any(row is None for row in rows):
            if not self.pad or (self.num_batches is None and all(r is None for r in rows)):
                raise StopIteration
            rows = [self._empty_row() if row is None else row for row in rows]
        self._count += 1
        return {key: np.stack([row[key] for row in rows]).astype(np.int32) for key in rows[0]}

    def get_state(self) -> dict[str, Any]:
        return {row_streams.STATE_KEY: row_streams.stream_states(self._streams)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from ``state``: this process's entry of a state saved before (one
        process's or the global merge of all of them, ``training.checkpoint``)."""
        saved = state.get(row_streams.STATE_KEY) if isinstance(state, dict) else None
        if saved is None:
            found = sorted(state) if isinstance(state, dict) else state
            raise ValueError(
                "this input state was not written by the row-stream pipeline (a checkpoint "
                f"of an earlier version?): {found!r}"
            )
        missing = row_streams.missing_streams(saved, self._streams)
        if missing:
            raise ValueError(
                f"the saved input state has {len(saved)} row streams, this batch needs rows "
                f"{missing[0]}..{missing[-1]}: it was saved with another batch_size"
            )
        for stream in self._streams:
            stream.set_state(saved[str(stream.index)])

    def close(self) -> None:
        """Stops the worker processes or threads (if any)."""
        self._source.close()


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


def _examples_dataset(config: DataConfig, tokenizer: TextTokenizer, split, *, train: bool):
    """Global position -> the examples of its document (module docstring): an index
    shuffle reshuffled every epoch (training), then the objective seeded by position."""
    ds = grain.MapDataset.source(split)
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
    return ds.random_map(maker, seed=config.seed)


def _build(config, tokenizer, documents, *, process_index, process_count, train, num_batches):
    if config.sampling != "documents":
        raise ValueError(
            f"sampling={config.sampling!r} rows come from rope_jax.data.windows "
            "(make_window_inputs), not this document pipeline"
        )
    mine = row_streams.streams_of_process(config.batch_size, process_index, process_count)
    _check_sentinels(config, tokenizer)
    documents = _documents(config) if documents is None else documents
    stats = getattr(documents, "stats", CorpusStats())
    split = HeldOutSplit(documents, config.eval_every, held_out=not train)
    if len(split) < 1:
        raise ValueError(f"no {'training' if train else 'held-out'} document ({stats.report()})")
    source = row_streams.ExampleSource(
        _examples_dataset(config, tokenizer, split, train=train),
        num_threads=config.num_threads,
        num_workers=config.num_workers,
    )
    spec = pack_spec(config)
    lookahead = row_streams.lookahead_per_stream(source.parallelism, len(mine))
    streams = [
        row_streams.RowStream(
            index,
            config.batch_size,
            source,
            spec,
            max_segments=None if config.pack else 1,
            lookahead=lookahead,
        )
        for index in mine
    ]
    return DataIterator(
        streams,
        source,
        stats=stats,
        spec=spec,
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
