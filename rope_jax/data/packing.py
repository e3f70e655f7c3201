"""Packing variable-length examples into fixed-length rows with segment ids and positions.

T5-style (seqio ``trim_and_pack``): an example is a dict of 1-D int arrays; each feature
belongs to a *stream* with one row length (encoder-decoder: ``encoder`` for
``encoder_input_tokens``, ``decoder`` for the three decoder features). Examples go into the
open row while every stream still fits, so inputs and targets are packed jointly; otherwise
the row is emitted (zero-padded) and a new one starts. Each stream gets its own segment ids
(1, 2, ... in order of packing, 0 = padding) and positions restarting at 0 per segment, so
a mask built from segment ids never lets a token see another example.

Truncation policy: a feature longer than its stream's row length is cut to the row length
(as seqio's trim; the cut example loses its EOS). The pipeline chunks token-level objectives
(span corruption, MLM, LMs) to fit, so only text-level objectives (gap sentences, pseudo
summaries) with an over-long sentence group can be cut. ``RowPacker.num_truncated`` counts
the cut examples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

__all__ = ["PackSpec", "RowPacker", "pack_examples"]


@dataclasses.dataclass(frozen=True)
class PackSpec:
    """Which feature belongs to which stream, the stream lengths, and the output key names.

    ``streams`` maps a stream name to ``(length, segment_ids_key, positions_key)``;
    ``features`` maps a feature name to its stream.
    """

    streams: Mapping[str, tuple[int, str, str]]
    features: Mapping[str, str]

    def __post_init__(self):
        for feature, stream in self.features.items():
            if stream not in self.streams:
                raise ValueError(f"feature {feature!r} names unknown stream {stream!r}")

    def lengths(self, example: Mapping[str, np.ndarray]) -> dict[str, int]:
        """Length of each stream in ``example`` (features of one stream must agree)."""
        out: dict[str, int] = {}
        for feature, stream in self.features.items():
            n = len(example[feature])
            if out.setdefault(stream, n) != n:
                raise ValueError(
                    f"features of stream {stream!r} differ in length: {feature!r} has {n}, "
                    f"expected {out[stream]}"
                )
        return out

    def output_keys(self) -> list[str]:
        keys = list(self.features)
        for _, segment_key, position_key in self.streams.values():
            keys += [segment_key, position_key]
        return keys


class RowPacker:
    """Greedy packer with one open row; its state is the list of examples in the open row.

    ``add(example)`` returns the rows completed by it (0 or 1); ``flush()`` the open row if
    any. With ``max_segments=1`` every example gets a row of its own (no packing).
    """

    def __init__(self, spec: PackSpec, *, max_segments: int | None = None):
        self.spec = spec
        self.max_segments = max_segments
        self.open: list[dict[str, np.ndarray]] = []
        self._used = dict.fromkeys(spec.streams, 0)
        self.num_truncated = 0

    def _trim(self, example: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        truncated = False
        for feature, stream in self.spec.features.items():
            limit = self.spec.streams[stream][0]
            values = np.asarray(example[feature], np.int32)
            truncated |= values.size > limit
            out[feature] = values[:limit]
        self.num_truncated += truncated
        return out

    def _fits(self, lengths: Mapping[str, int]) -> bool:
        if self.max_segments is not None and len(self.open) >= self.max_segments:
            return False
        return all(self._used[s] + n <= self.spec.streams[s][0] for s, n in lengths.items())

    def add(self, example: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        example = self._trim(example)
        lengths = self.spec.lengths(example)
        rows = []
        if self.open and not self._fits(lengths):
            rows.append(self._emit())
        self.open.append(example)
        for stream, n in lengths.items():
            self._used[stream] += n
        return rows

    def flush(self) -> dict[str, np.ndarray] | None:
        return self._emit() if self.open else None

    def _emit(self) -> dict[str, np.ndarray]:
        row = build_row(self.spec, self.open)
        self.open = []
        self._used = dict.fromkeys(self.spec.streams, 0)
        return row

    # JSON-friendly state (lists of ints), for the pipeline iterator's checkpoint.
    def get_state(self) -> list[dict[str, list[int]]]:
        return [{k: v.tolist() for k, v in example.items()} for example in self.open]

    def set_state(self, state: list[dict[str, list[int]]]) -> None:
        self.open = []
        self._used = dict.fromkeys(self.spec.streams, 0)
        for example in state:
            example = {k: np.asarray(v, np.int32) for k, v in example.items()}
            self.open.append(example)
            for stream, n in self.spec.lengths(example).items():
                self._used[stream] += n


def build_row(spec: PackSpec, examples: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate ``examples`` into one zero-padded row with segment ids and positions."""
    row = {}
    for feature, stream in spec.features.items():
        values = np.zeros(spec.streams[stream][0], np.int32)
        parts = [np.asarray(example[feature], np.int32) for example in examples]
        joined = np.concatenate(parts) if parts else values[:0]
        values[: joined.size] = joined
        row[feature] = values
    for stream, (length, segment_key, position_key) in spec.streams.items():
        first_feature = next(f for f, s in spec.features.items() if s == stream)
        sizes = [len(example[first_feature]) for example in examples]
        segment_ids = np.zeros(length, np.int32)
        positions = np.zeros(length, np.int32)
        segment_ids[: sum(sizes)] = np.repeat(np.arange(1, len(sizes) + 1), sizes)
        positions[: sum(sizes)] = np.concatenate([np.arange(n) for n in sizes] or [[]])
        row[segment_key] = segment_ids
        row[position_key] = positions
    return row


def pack_examples(
    examples, spec: PackSpec, *, max_segments: int | None = None
) -> list[dict[str, np.ndarray]]:
    """Pack a finite iterable of examples into rows (convenience for tests and tools)."""
    packer = RowPacker(spec, max_segments=max_segments)
    rows = []
    for example in examples:
        rows.extend(packer.add(example))
    last = packer.flush()
    return rows + ([last] if last is not None else [])
