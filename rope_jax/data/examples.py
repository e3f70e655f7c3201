"""From one document to training examples: tokenize, chunk, apply the objective.

``ExampleMaker(objective, tokenizer, ...)(text, rng)`` returns a list of example dicts of
1-D int32 arrays, with the feature names of the batch format (before packing):

  * encoder-decoder (``span_corruption``, ``gap_sentences``, ``pseudo_summary``):
    ``encoder_input_tokens, decoder_input_tokens, decoder_target_tokens, decoder_loss_weights``;
  * encoder (``mlm``): ``input_tokens, target_tokens, loss_weights``;
  * decoder-only causal LM (``causal_lm``): ``input_tokens, target_tokens, loss_weights``
    (no prefix mask: a row with no prefix is plain causal, as T5X's causal-LM feature
    converter emits no ``decoder_causal_attention``);
  * decoder-only prefix LM (``prefix_lm``): as causal LM plus ``prefix_mask``.

Chunking (so that packing never has to cut a token-level example):
  * span corruption: the document's tokens in chunks of T5's raw length
    (``t5_span_corruption_lengths``: 568 for 512 inputs), each corrupted, as T5 does;
  * mlm: chunks of ``inputs_length`` tokens;
  * causal_lm: the document plus EOS, teacher-forced, cut in windows of ``inputs_length``
    (a window after the first starts with the true previous token instead of the start id);
  * prefix_lm: chunks of ``inputs_length - 1`` tokens, each split at a random point;
  * gap_sentences / pseudo_summary: consecutive sentences grouped greedily while their
    tokens fit ``inputs_length - 1``; one example per group (a sentence longer than that
    is cut). A group of one sentence gives no pseudo summary and is dropped. For
    pseudo_summary the "sentences" are T5 PEGASUS's short pieces
    (``split_sentences(text, max_chars=summary_max_chars)``, 32 characters as the
    reference; 0 cuts at every sentence end instead). For gap_sentences they are
    ``split_sentences(text)``: PEGASUS's ``SentenceSegment`` cuts only after runs of
    ``.!?`` followed by whitespace; here newlines and 。！？ cut too.

Deliberate differences in grouping: PEGASUS selects gap sentences over the whole document
and then cuts inputs and targets to their lengths; T5 PEGASUS groups at least 3 pieces
while they fit 768 characters and cuts the source to 384 and the summary to 128 tokens.
Grouping by the encoder's token budget instead means selection only sees text the model
will see, and nothing is cut away but the tail of a single sentence longer than the row.

Special ids come from the tokenizer (``data/tokenizers.py``): its ``eos_id`` ends inputs
and targets, its ``decoder_start_id`` starts the shifted decoder inputs (T5: 0; jieba_bert:
``[CLS]``), and for the sentence-level objectives its ``bos_id``, when it has one, starts
the encoder input (jieba_bert: ``[CLS] source [SEP]``, as T5 PEGASUS' pretraining script
encodes it; the budget is then ``inputs_length - 2``). The decoder-only objectives keep
``objectives.causal_lm``'s start id 0.
"""

from __future__ import annotations

import numpy as np

from rope_jax import objectives
from rope_jax.data.tokenizers import TextTokenizer

ENCODER_DECODER = ("span_corruption", "gap_sentences", "pseudo_summary")
ENCODER = ("mlm",)
DECODER = ("causal_lm", "prefix_lm")
OBJECTIVES = ENCODER_DECODER + ENCODER + DECODER

__all__ = ["DECODER", "ENCODER", "ENCODER_DECODER", "OBJECTIVES", "ExampleMaker", "model_kind"]


def model_kind(objective: str) -> str:
    """``"encoder_decoder"``, ``"encoder"`` or ``"decoder"`` for an objective name."""
    if objective in ENCODER_DECODER:
        return "encoder_decoder"
    if objective in ENCODER:
        return "encoder"
    if objective in DECODER:
        return "decoder"
    raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")


def _chunks(tokens: np.ndarray, size: int) -> list[np.ndarray]:
    return [tokens[i : i + size] for i in range(0, tokens.size, size)]


def _encoder_decoder(
    inputs: np.ndarray, targets: np.ndarray, start_id: int
) -> dict[str, np.ndarray]:
    return {
        "encoder_input_tokens": inputs,
        "decoder_input_tokens": objectives.shift_right(targets, start_id=start_id),
        "decoder_target_tokens": targets,
        "decoder_loss_weights": np.ones(targets.size, np.int32),
    }


class ExampleMaker:
    """Picklable callable ``(document_text, rng) -> list[example]`` for one objective."""

    def __init__(
        self,
        objective: str,
        tokenizer: TextTokenizer,
        *,
        inputs_length: int,
        noise_density: float = 0.15,
        mean_noise_span_length: float = 3.0,
        mlm_rate: float = 0.15,
        whole_word: bool = False,
        gap_ratio: float = 0.3,
        gsg_mlm_rate: float = 0.0,
        summary_rate: float = 0.25,
        summary_max_chars: int = 32,
    ):
        model_kind(objective)
        self.objective = objective
        self.tokenizer = tokenizer
        self.inputs_length = inputs_length
        self.noise_density = noise_density
        self.mean_noise_span_length = mean_noise_span_length
        self.mlm_rate = mlm_rate
        self.gap_ratio = gap_ratio
        self.gsg_mlm_rate = gsg_mlm_rate
        self.summary_rate = summary_rate
        if summary_max_chars < 0:
            raise ValueError(
                f"summary_max_chars must be >= 0 (0 = no merging), got {summary_max_chars}"
            )
        self.summary_max_chars = summary_max_chars
        self.raw_length, _ = objectives.t5_span_corruption_lengths(
            inputs_length, noise_density, mean_noise_span_length
        )
        self.word_starts = tokenizer.word_start_table() if whole_word else None

    def __call__(self, text: str, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
        if self.objective in ("gap_sentences", "pseudo_summary"):
            return self._sentence_level(text, rng)
        tokens = self.tokenizer.encode(text)
        if tokens.size == 0:
            return []
        return getattr(self, f"_{self.objective}")(tokens, rng)

    def _span_corruption(self, tokens, rng):
        out = []
        for chunk in _chunks(tokens, self.raw_length):
            inputs, targets = objectives.span_corruption(
                chunk,
                rng=rng,
                vocab_size=self.tokenizer.vocab_size,
                noise_density=self.noise_density,
                mean_noise_span_length=self.mean_noise_span_length,
                eos_id=self.tokenizer.eos_id,
            )
            out.append(_encoder_decoder(inputs, targets, self.tokenizer.decoder_start_id))
        return out

    def _mlm(self, tokens, rng):
        out = []
        for chunk in _chunks(tokens, self.inputs_length):
            inputs, targets, weights = objectives.mlm(
                chunk,
                rng=rng,
                mask_id=self.tokenizer.mask_id,
                random_token_range=self.tokenizer.random_token_range,
                mask_rate=self.mlm_rate,
                word_starts=None if self.word_starts is None else self.word_starts[chunk],
            )
            out.append({"input_tokens": inputs, "target_tokens": targets, "loss_weights": weights})
        return out

    def _causal_lm(self, tokens, rng):
        inputs, targets, weights = objectives.causal_lm(tokens, eos_id=self.tokenizer.eos_id)
        size = self.inputs_length
        return [
            {
                "input_tokens": inputs[i : i + size],
                "target_tokens": targets[i : i + size],
                "loss_weights": weights[i : i + size],
            }
            for i in range(0, targets.size, size)
        ]

    def _prefix_lm(self, tokens, rng):
        out = []
        for chunk in _chunks(tokens, self.inputs_length - 1):
            inputs, targets, weights, prefix = objectives.prefix_lm(
                chunk, rng=rng, eos_id=self.tokenizer.eos_id
            )
            out.append(
                {
                    "input_tokens": inputs,
                    "target_tokens": targets,
                    "loss_weights": weights,
                    "prefix_mask": prefix,
                }
            )
        return out

    def _sentence_level(self, text, rng):
        max_chars = self.summary_max_chars if self.objective == "pseudo_summary" else 0
        sentences = objectives.split_sentences(text, max_chars=max_chars or None)
        if not sentences:
            return []
        bos = self.tokenizer.bos_id
        prefix = np.array([] if bos is None else [bos], np.int32)
        eos = np.array([self.tokenizer.eos_id], np.int32)
        budget = self.inputs_length - 1 - prefix.size
        token_lists = [t[:budget] for t in self.tokenizer.encode_batch(sentences)]
        groups: list[list[int]] = [[]]
        used = 0
        for i, tokens in enumerate(token_lists):
            if groups[-1] and used + tokens.size > budget:
                groups.append([])
                used = 0
            groups[-1].append(i)
            used += tokens.size
        out = []
        for group in groups:
            group = [i for i in group if token_lists[i].size]
            if not group:
                continue
            if self.objective == "gap_sentences":
                inputs, targets = objectives.gap_sentences(
                    [token_lists[i] for i in group],
                    rng=rng,
                    mask1_id=self.tokenizer.mask1_id,
                    sentence_units=[objectives.rouge_units(sentences[i]) for i in group],
                    gap_ratio=self.gap_ratio,
                    mask2_id=self.tokenizer.mask2_id,
                    mlm_rate=self.gsg_mlm_rate,
                    random_token_range=self.tokenizer.random_token_range,
                    eos_id=self.tokenizer.eos_id,
                )
            else:
                source, target = objectives.pseudo_summary_indices(
                    [sentences[i] for i in group], summary_rate=self.summary_rate
                )
                if not target:
                    continue
                inputs = np.concatenate([token_lists[group[j]] for j in source] + [eos])
                targets = np.concatenate([token_lists[group[j]] for j in target] + [eos])
            inputs = np.concatenate([prefix, inputs])
            out.append(_encoder_decoder(inputs, targets, self.tokenizer.decoder_start_id))
        return out
