"""Token arrays for SuperGLUE fine-tuning: text codecs and fixed-shape numpy batches.

Two codecs turn text into ids: :class:`SentencePieceCodec` (this project's tokenizers,
``rope_jax.data.tokenizers``: SentencePiece with T5/mT5 ids, pad 0, EOS 1, or jieba_bert with
EOS ``[SEP]``; a text pair is ``a EOS b EOS``, as T5 joins fields with separators) and
:class:`HFCodec` (the tokenizer files of an imported Hugging Face BERT/RoFormer folder, read
from disk only; a pair is ``[CLS] a [SEP] b [SEP]`` with token types 0/1, as BERT was
pretrained). Codecs used for encoder-decoders may also give ``bos_id`` (put before every
encoder input) and ``decoder_start_id``; without them, T5's none and 0. Truncation cuts the
longer text of a pair first, one token at a time (BERT's ``truncate_seq_pair``), so short
hypotheses survive long premises.

Arrays follow the batch format of ``contracts.md``: encoder-decoder examples give
``encoder_input_tokens`` ... ``decoder_loss_weights`` (one row per example, no packing, so
segment ids are 1 on tokens and 0 on padding, positions count from 0); encoder examples give
``input_tokens``, ``token_type_ids``, ``segment_ids``, ``positions`` with a leading choice
axis ``[N, K, L]`` (K = 1 for classification) plus ``choice_mask [N, K]`` and labels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from rope_jax.evaluation.formats import EncoderExample, TextExample


class SentencePieceCodec:
    """Text <-> ids with a ``rope_jax.data.tokenizers.TextTokenizer`` (SentencePiece or
    jieba_bert), whose pad, EOS, decoder start and BOS ids it uses."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_id
        self.pad_id = tokenizer.pad_id
        self.decoder_start_id = tokenizer.decoder_start_id
        self.bos_id = tokenizer.bos_id

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text)]

    def decode(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode([i for i in ids if i != self.pad_id])

    def pair(self, a: list[int], b: list[int] | None, max_length: int):
        """(tokens, token types) of ``a EOS [b EOS]`` cut to ``max_length``."""
        specials = 1 if b is None else 2
        a, b = _truncate_pair(a, b or [], max_length - specials)
        eos = self.eos_id
        tokens = a + [eos] + (b + [eos] if specials == 2 else [])
        types = [0] * (len(a) + 1) + [1] * (len(tokens) - len(a) - 1)
        return tokens, types


class HFCodec:
    """Text <-> ids with a Hugging Face tokenizer saved in a local model folder."""

    def __init__(self, folder: str):
        from transformers import AutoTokenizer  # only needed for imported BERT-style folders

        if not os.path.isdir(folder):
            raise FileNotFoundError(f"no tokenizer folder {folder}")
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.cls_id = self.tokenizer.cls_token_id
        self.sep_id = self.tokenizer.sep_token_id
        self.eos_id = self.sep_id

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def pair(self, a: list[int], b: list[int] | None, max_length: int):
        specials = 2 if b is None else 3
        a, b = _truncate_pair(a, b or [], max_length - specials)
        tokens = [self.cls_id] + a + [self.sep_id]
        types = [0] * len(tokens)
        if specials == 3:
            tokens += b + [self.sep_id]
            types += [1] * (len(b) + 1)
        return tokens, types


def _special_ids(codec) -> tuple[int | None, int]:
    """(BOS, decoder start) of a codec; a codec without them has T5's (none, 0)."""
    return getattr(codec, "bos_id", None), getattr(codec, "decoder_start_id", 0)


def _truncate_pair(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
    if budget < 1:
        raise ValueError(f"max length leaves no room for text ({budget} tokens)")
    a, b = list(a), list(b)
    while len(a) + len(b) > budget:
        (a if len(a) >= len(b) else b).pop()
    return a, b


def _positions_and_segments(lengths: np.ndarray, width: int):
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), lengths.shape + (width,))
    valid = positions < lengths[..., None]
    return np.where(valid, positions, 0).astype(np.int32), valid.astype(np.int32)


def seq2seq_arrays(
    examples: Sequence[TextExample], codec, *, max_input_length: int, max_target_length: int
) -> dict[str, np.ndarray]:
    """Encoder-decoder batch arrays of text-to-text examples (inputs and targets + EOS)."""
    n = len(examples)
    enc = np.zeros((n, max_input_length), np.int32)
    dec_targets = np.zeros((n, max_target_length), np.int32)
    enc_len, dec_len = np.zeros(n, np.int32), np.zeros(n, np.int32)
    # jieba_bert (T5 PEGASUS) starts encoder inputs with [CLS] (bert4keras encode).
    bos_id, start_id = _special_ids(codec)
    prefix = [] if bos_id is None else [bos_id]
    for row, example in enumerate(examples):
        budget = max_input_length - 1 - len(prefix)
        inputs = prefix + codec.encode(example.inputs)[:budget] + [codec.eos_id]
        targets = codec.encode(example.targets)[: max_target_length - 1] + [codec.eos_id]
        enc[row, : len(inputs)] = inputs
        dec_targets[row, : len(targets)] = targets
        enc_len[row], dec_len[row] = len(inputs), len(targets)
    # Decoder inputs: targets shifted right behind the start id (T5: 0; jieba_bert: [CLS]).
    dec_inputs = np.zeros_like(dec_targets)
    dec_inputs[:, 1:] = dec_targets[:, :-1]
    dec_inputs[:, 0] = start_id
    enc_pos, enc_seg = _positions_and_segments(enc_len, max_input_length)
    dec_pos, dec_seg = _positions_and_segments(dec_len, max_target_length)
    return {
        "encoder_input_tokens": enc,
        "encoder_segment_ids": enc_seg,
        "encoder_positions": enc_pos,
        "decoder_input_tokens": dec_inputs,
        "decoder_target_tokens": dec_targets,
        "decoder_segment_ids": dec_seg,
        "decoder_positions": dec_pos,
        "decoder_loss_weights": dec_seg.copy(),
    }


def encoder_arrays(
    examples: Sequence[EncoderExample], codec, *, max_length: int, num_choices: int | None = None
) -> dict[str, np.ndarray]:
    """Encoder arrays ``[N, K, L]`` of cast examples.

    ``labels`` is ``[N]`` int (class index; -1 unlabelled) for single-pair examples and a
    multi-hot ``[N, K]`` float for multiple choice (several ReCoRD entities can be right).
    ``num_choices`` fixes K (default: the largest in ``examples``).
    """
    n = len(examples)
    width = max(len(e.pairs) for e in examples) if num_choices is None else num_choices
    tokens = np.zeros((n, width, max_length), np.int32)
    types = np.zeros_like(tokens)
    lengths = np.zeros((n, width), np.int32)
    choice_mask = np.zeros((n, width), np.int32)
    multiple_choice = width > 1 or any(isinstance(e.label, tuple) for e in examples)
    labels = np.zeros((n, width), np.float32) if multiple_choice else np.full(n, -1, np.int32)
    for row, example in enumerate(examples):
        if len(example.pairs) > width:
            raise ValueError(f"{len(example.pairs)} candidates exceed num_choices={width}")
        for k, (a, b) in enumerate(example.pairs):
            ids, tids = codec.pair(codec.encode(a), codec.encode(b) if b else None, max_length)
            tokens[row, k, : len(ids)] = ids
            types[row, k, : len(ids)] = tids
            lengths[row, k] = len(ids)
            choice_mask[row, k] = 1
        if example.label is not None:
            if multiple_choice:
                labels[row, list(example.label)] = 1.0
            else:
                labels[row] = example.label
    positions, segments = _positions_and_segments(lengths, max_length)
    return {
        "input_tokens": tokens,
        "token_type_ids": types,
        "segment_ids": segments,
        "positions": positions,
        "choice_mask": choice_mask,
        "labels": labels,
    }


class EpochIterator:
    """Fine-tuning batches: rows of ``arrays`` in epochs of seeded permutations, endlessly.

    Batch ``i`` holds positions ``i*B ... i*B + B - 1`` of the concatenated permutations
    (epoch ``e`` is ``default_rng([seed, e]).permutation(n)``), so it depends only on
    ``(seed, i)``: the state is ``{"index": i}``, saved with each checkpoint, and a resumed
    run continues with exactly the batches of an uninterrupted one. A batch may straddle
    two epochs, and ``B`` may exceed ``n``. Each process takes its contiguous block of the
    global batch (``process_index`` of ``process_count``).
    """

    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        *,
        batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        sizes = {name: len(value) for name, value in arrays.items()}
        self.n = next(iter(sizes.values()), 0)
        if self.n == 0 or len(set(sizes.values())) != 1:
            raise ValueError(f"fine-tuning arrays must have equal, non-zero rows; got {sizes}")
        if batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} is not divisible by {process_count} hosts")
        self.arrays, self.batch_size, self.seed = arrays, batch_size, seed
        self.process_index, self.process_count = process_index, process_count
        self.index = 0
        self._epochs: dict[int, np.ndarray] = {}

    def _epoch(self, epoch: int) -> np.ndarray:
        if epoch not in self._epochs:
            if len(self._epochs) > 2:  # a batch spans at most a few epochs
                self._epochs.clear()
            self._epochs[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._epochs[epoch]

    def rows(self, index: int) -> np.ndarray:
        """Row numbers of global batch ``index``."""
        positions = np.arange(index * self.batch_size, (index + 1) * self.batch_size)
        return np.array([self._epoch(int(p) // self.n)[int(p) % self.n] for p in positions])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = self.rows(self.index)
        self.index += 1
        per_process = self.batch_size // self.process_count
        mine = rows[self.process_index * per_process : (self.process_index + 1) * per_process]
        return {name: value[mine] for name, value in self.arrays.items()}

    def get_state(self) -> dict[str, int]:
        return {"index": self.index}

    def set_state(self, state: dict[str, int]) -> None:
        self.index = int(state["index"])
