"""data.sampling=windows and the bytes tokenizer: exact resume, shifted targets, BERT masks,
process shards of one global batch, held-out batches, and the config checks."""

import numpy as np
import pytest

from rope_jax.data import windows
from rope_jax.data.byte_tokenizer import ByteTokenizer
from rope_jax.data.pipeline import DataConfig, data_config_from_dict


def _config(**values):
    defaults = {"objective": "causal_lm", "sampling": "windows", "pack": False}
    return DataConfig(**{**defaults, "inputs_length": 8, "batch_size": 4, "seed": 1, **values})


def test_bytes_tokenizer_ids_round_trip():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("aé")
    np.testing.assert_array_equal(ids, np.array([0x61, 0xC3, 0xA9]) + 3)
    assert tokenizer.decode([*ids, tokenizer.eos_id, tokenizer.mask_id]) == "aé"
    assert (tokenizer.vocab_size, tokenizer.mask_id, tokenizer.random_token_range) == (
        260,
        259,
        (3, 259),
    )
    # Whole-word masking over bytes keeps a character's continuation bytes with it.
    starts = tokenizer.word_start_table()[ids]
    np.testing.assert_array_equal(starts, [True, True, False])


def test_window_iterator_resumes_exactly_and_shifts_targets():
    tokens = np.arange(100, dtype=np.int32) + 3
    it = windows.WindowIterator(tokens, _config(), ByteTokenizer())
    next(it)
    state = it.get_state()
    second = next(it)
    it.set_state(state)
    np.testing.assert_array_equal(next(it)["input_tokens"], second["input_tokens"])
    np.testing.assert_array_equal(second["target_tokens"], second["input_tokens"] + 1)
    assert "prefix_mask" not in second  # a pure causal row (linear kernels reject the key)
    np.testing.assert_array_equal(second["positions"][0], np.arange(8))


def test_mlm_windows_mask_only_selected_positions():
    tokens = np.arange(100, dtype=np.int32) + 3
    config = _config(objective="mlm", mlm_rate=0.25)
    it = windows.WindowIterator(tokens, config, ByteTokenizer())
    next(it)
    state = it.get_state()
    second = next(it)
    it.set_state(state)
    again = next(it)
    for key in second:
        np.testing.assert_array_equal(again[key], second[key])
    assert second["input_tokens"].shape == (4, 8)
    np.testing.assert_array_equal(second["loss_weights"].sum(axis=1), [2, 2, 2, 2])
    np.testing.assert_array_equal(np.diff(second["target_tokens"], axis=1), 1)
    changed = second["input_tokens"] != second["target_tokens"]
    assert not (changed & (second["loss_weights"] == 0)).any()


def test_processes_take_their_rows_of_one_global_batch():
    tokens = np.arange(200, dtype=np.int32) + 3
    whole = next(windows.WindowIterator(tokens, _config(), ByteTokenizer()))
    parts = [
        next(
            windows.WindowIterator(
                tokens, _config(), ByteTokenizer(), process_index=p, process_count=2
            )
        )
        for p in range(2)
    ]
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_held_out_split_and_padded_eval_batches():
    documents = [f"doc {i} " * 2 for i in range(9)]
    tokenizer = ByteTokenizer()
    config = _config(eval_every=3, batch_size=2)
    train, eval_batches = windows.make_window_inputs(config, tokenizer, documents, eval_steps=3)
    held_out = windows.token_stream(documents, tokenizer, eval_every=3, held_out=True)

    def joined(indices):  # each document's bytes + 3, then EOS (1)
        return np.concatenate([np.append(tokenizer.encode(documents[i]), 1) for i in indices])

    # Document i is held out when i % 3 == 2 (the document pipeline's split).
    np.testing.assert_array_equal(held_out, joined([2, 5, 8]))
    np.testing.assert_array_equal(train.tokens, joined([0, 1, 3, 4, 6, 7]))
    batches = list(eval_batches())
    assert len(batches) == 3 and all(b["input_tokens"].shape == (2, 8) for b in batches)
    # 3 x 13 held-out tokens fill 4 windows of 9: the last batch is padding, no weight.
    assert batches[1]["loss_weights"].all() and batches[1]["segment_ids"].all()
    assert not batches[2]["loss_weights"].any() and not batches[2]["segment_ids"].any()
    np.testing.assert_array_equal(batches[0]["target_tokens"][0], held_out[1:9])


@pytest.mark.parametrize(
    "values, message",
    [
        ({"sampling": "random"}, "sampling='random'"),
        ({"objective": "span_corruption"}, "not objective='span_corruption'"),
        ({"pack": True}, "set pack=False"),
    ],
)
def test_windows_config_errors_name_the_key(values, message):
    with pytest.raises(ValueError, match=message):
        data_config_from_dict({**_config().__dict__, **values})
