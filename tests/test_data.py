"""Tokenizer, corpora, packing and the checkpointable pipeline on tiny fixtures."""

import collections
import concurrent.futures
import dataclasses
import json
import os
import pickle
import tracemalloc
import types

import numpy as np
import pytest

from rope_jax import objectives
from rope_jax.data import corpora, embedded, packing, pipeline, row_streams
from rope_jax.data.tokenizer import Tokenizer, train_tokenizer

ENGLISH = [
    f"Document {i}. The {w} sat on the mat near the {v}. It was a quiet day in the town of {v}.\n"
    f"Later the {w} walked home! Did it rain? Nobody knew why the {v} was {w}."
    for i, (w, v) in enumerate(
        [("cat", "river"), ("dog", "hill"), ("bird", "forest"), ("fox", "lake"), ("owl", "farm")]
        * 6
    )
]
CHINESE = ["猫吃鱼。狗吃肉。猫和狗都吃东西。今天下雨了。\n我们在家里看书。书很好看。"] * 3


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(ENGLISH + CHINESE, vocab_size=500)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_ids_and_round_trip(tokenizer, tmp_path):
    assert tokenizer.vocab_size == 500
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2)
    text = "The cat sat. 猫吃鱼。 ☃ unseen ü"
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32 and 2 not in ids  # byte fallback: nothing is unknown
    assert tokenizer.decode(ids) == text
    assert tokenizer.sentinel_id(0) == 499 and tokenizer.sentinel_id(1) == 498
    masks = {tokenizer.mask_id, tokenizer.mask1_id, tokenizer.mask2_id}
    sentinels = {tokenizer.sentinel_id(k) for k in range(tokenizer.num_sentinels)}
    assert len(masks) == 3 and not masks & sentinels
    assert min(masks | sentinels) == tokenizer.piece_size and max(sentinels) == 499
    assert tokenizer.decode([ids[0], 499, tokenizer.mask1_id, 1]).endswith("<extra_id_0>[MASK1]")
    path = tmp_path / "spm.model"
    tokenizer.save(path)
    loaded = Tokenizer.load(path, vocab_size=500)
    np.testing.assert_array_equal(loaded.encode(text), ids)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(tokenizer)).encode(text), ids)
    starts = tokenizer.word_start_table()
    pieces = [tokenizer.id_to_piece(i) for i in tokenizer.encode("walked home")]
    np.testing.assert_array_equal(
        starts[tokenizer.encode("walked home")], [p.startswith("\u2581") for p in pieces]
    )


def test_tokenizer_training_is_deterministic(tokenizer):
    again = train_tokenizer(ENGLISH + CHINESE, vocab_size=500)
    ids = [tokenizer.id_to_piece(i) for i in range(tokenizer.piece_size)]
    assert ids == [again.id_to_piece(i) for i in range(again.piece_size)]


def test_embedded_corpus_and_cached_tokenizer(tmp_path):
    documents = embedded.embedded_documents()
    assert len(documents) > 50 and sum(map(len, documents)) > 300_000
    small = documents[:5]
    first = embedded.load_or_train_tokenizer(tmp_path, vocab_size=512, documents=small)
    model_path = tmp_path / "tokenizer" / "spm.model"
    mtime = os.stat(model_path).st_mtime_ns
    second = embedded.load_or_train_tokenizer(tmp_path, vocab_size=512, documents=small)
    assert os.stat(model_path).st_mtime_ns == mtime  # loaded, not trained again
    np.testing.assert_array_equal(first.encode(small[0]), second.encode(small[0]))


# ------------------------------------------------------------------------------- corpora


def test_bad_records_are_skipped_and_counted(tmp_path):
    path = tmp_path / "bad.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "first good document"}\n')
        f.write(b'{"text": "broken json\n')
        f.write(b'{"text": "bad utf8 \xff\xfe here"}\n')
        f.write(b'{"text": ""}\n')
        f.write(b'{"text": "   "}\n')
        f.write(b'{"title": "no text field"}\n')
        f.write(b"\n")
        f.write(b'{"text": "second good document"}\n')
    index = corpora.DocumentIndex(str(path), format="jsonl")
    assert [index[i] for i in range(len(index))] == ["first good document", "second good document"]
    expected = {"files": 1, "documents": 2, "invalid_json": 1, "invalid_utf8": 1, "empty": 2}
    assert index.stats.as_dict() == {**expected, "missing_field": 1, "skipped": 5}
    stats = corpora.CorpusStats()
    streamed = list(corpora.iter_documents(str(path), format="jsonl", stats=stats))
    assert streamed == ["first good document", "second good document"]
    assert stats == index.stats


def test_text_blocks_lines_globs_and_sharding(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"one\ntwo\n\n\nthree \xff\n\nfour\n")
    (tmp_path / "b.txt").write_text("five\n\nsix\nseven\n")
    pattern = str(tmp_path / "*.txt")
    blocks = corpora.DocumentIndex(pattern)
    assert [blocks[i] for i in range(len(blocks))] == ["one\ntwo", "four", "five", "six\nseven"]
    assert blocks.stats.invalid_utf8 == 1
    lines = list(corpora.iter_documents(pattern, text_mode="lines"))
    assert lines == ["one", "two", "four", "five", "six", "seven"]
    shards = [
        list(corpora.iter_documents(pattern, text_mode="lines", process_index=i, process_count=2))
        for i in range(2)
    ]
    assert shards == [["one", "four", "six"], ["two", "five", "seven"]]
    orders = {tuple(corpora.iter_documents(pattern, seed=s)) for s in range(8)}
    assert len(orders) == 2  # two files: both file orders occur, each deterministic
    with pytest.raises(FileNotFoundError):
        corpora.expand_paths(str(tmp_path / "missing*.txt"))


def test_document_index_reads_from_many_threads(tmp_path):
    # grain's prefetch threads (num_threads > 0) read one shared index concurrently.
    path = tmp_path / "docs.jsonl"
    texts = [f"document {i} " + "word " * (i % 50) for i in range(400)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    index = corpora.DocumentIndex(str(path), format="jsonl")
    order = np.random.default_rng(0).integers(0, len(texts), size=20_000).tolist()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(index.__getitem__, order, chunksize=1))
    assert got == [texts[i].strip() for i in order]


def test_document_index_keeps_about_twenty_bytes_per_document(tmp_path):
    path = tmp_path / "many.jsonl"
    num_documents = 50_000
    path.write_text("".join(f'{{"text": "doc {i}"}}\n' for i in range(num_documents)))
    tracemalloc.start()
    try:
        index = corpora.DocumentIndex(str(path), format="jsonl")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(index) == num_documents
    # int32 file id + int64 offset + int64 length, also at the peak of the scan.
    assert peak / num_documents < 30


# ------------------------------------------------------------------------------- packing


def test_packing_segments_positions_and_content():
    rng = np.random.default_rng(0)
    spec = pipeline.pack_spec(pipeline.DataConfig(objective="span_corruption", inputs_length=32))
    examples = []
    for _ in range(40):
        n, m = rng.integers(1, 20), rng.integers(1, 8)
        targets = rng.integers(3, 99, size=m)
        examples.append(
            {
                "encoder_input_tokens": rng.integers(3, 99, size=n),
                "decoder_input_tokens": np.concatenate([[0], targets[:-1]]),
                "decoder_target_tokens": targets,
                "decoder_loss_weights": np.ones(m, np.int32),
            }
        )
    rows = packing.pack_examples(examples, spec)
    assert len(rows) < len(examples)  # several examples share a row
    recovered = []
    for row in rows:
        for side in ("encoder", "decoder"):
            seg, pos = row[f"{side}_segment_ids"], row[f"{side}_positions"]
            # Segment mask (True = may attend) never links two examples or padding.
            may_attend = (seg[:, None] == seg[None, :]) & (seg[:, None] > 0)
            for i in range(seg.size):
                for j in range(seg.size):
                    if may_attend[i, j]:
                        assert seg[i] == seg[j] != 0
            starts = np.flatnonzero(np.diff(np.concatenate([[0], seg])) != 0)
            assert (pos[starts] == 0).all() and (pos[seg == 0] == 0).all()
            valid = seg > 0
            np.testing.assert_array_equal(
                pos[valid],
                np.concatenate([np.arange((seg == s).sum()) for s in range(1, seg.max() + 1)]),
            )
        assert row["encoder_segment_ids"].max() == row["decoder_segment_ids"].max()
        for s in range(1, row["encoder_segment_ids"].max() + 1):
            recovered.append(
                (
                    row["encoder_input_tokens"][row["encoder_segment_ids"] == s].tolist(),
                    row["decoder_target_tokens"][row["decoder_segment_ids"] == s].tolist(),
                )
            )
    expected = [
        (e["encoder_input_tokens"].tolist(), e["decoder_target_tokens"].tolist()) for e in examples
    ]
    assert recovered == expected


def test_packing_truncation_and_no_packing():
    spec = pipeline.pack_spec(pipeline.DataConfig(objective="mlm", inputs_length=8))
    long = {k: np.arange(3, 15) for k in ("input_tokens", "target_tokens", "loss_weights")}
    short = {k: np.arange(3, 6) for k in ("input_tokens", "target_tokens", "loss_weights")}
    packer = packing.RowPacker(spec)
    assert packer.add(long) == [] and len(packer.add(short)) == 1
    assert packer.num_truncated == 1
    rows = packing.pack_examples([short, short], spec, max_segments=1)
    assert len(rows) == 2 and rows[0]["segment_ids"].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]


# ------------------------------------------------------------------------------ pipeline


@pytest.mark.parametrize("objective", pipeline.OBJECTIVES)
def test_pipeline_state_round_trip(tokenizer, objective):
    config = pipeline.DataConfig(objective=objective, inputs_length=48, batch_size=2, seed=3)
    documents = corpora.InMemoryDocuments(ENGLISH + CHINESE)
    iterator = pipeline.make_pipeline(config, tokenizer, documents=documents)
    for _ in range(5):
        batch = next(iterator)
    for key, shape in iterator.batch_shapes.items():
        assert batch[key].shape == shape and batch[key].dtype == np.int32
    state = json.loads(json.dumps(iterator.get_state()))  # what a checkpoint stores
    expected = [next(iterator) for _ in range(3)]
    restored = pipeline.make_pipeline(config, tokenizer, documents=documents)
    restored.set_state(state)
    assert restored.get_state() == state
    for want in expected:
        got = next(restored)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _assert_same_batches(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for key in w:
            np.testing.assert_array_equal(g[key], w[key], err_msg=key)


def test_pipeline_with_worker_processes(tokenizer):
    # Two spawned workers make the examples; packing stays in this process.
    config = pipeline.DataConfig(
        objective="pseudo_summary", inputs_length=48, batch_size=2, seed=3, num_workers=2
    )
    documents = corpora.InMemoryDocuments(ENGLISH + CHINESE)
    first = pipeline.make_pipeline(config, tokenizer, documents=documents)
    start = first.get_state()
    batches = [next(first) for _ in range(5)]
    state = json.loads(json.dumps(first.get_state()))  # what a checkpoint stores
    batches += [next(first) for _ in range(3)]
    first.close()
    for batch in batches:
        assert batch.keys() == first.batch_shapes.keys()
        for key, shape in first.batch_shapes.items():
            assert batch[key].shape == shape and batch[key].dtype == np.int32

    restored = pipeline.make_pipeline(config, tokenizer, documents=documents)
    restored.set_state(state)
    assert restored.get_state() == state
    _assert_same_batches([next(restored) for _ in range(3)], batches[5:])
    restored.set_state(start)  # on running workers, as the trainer does on restore
    _assert_same_batches([next(restored) for _ in range(8)], batches)
    restored.close()

    # Documents reach the packer in the same order as without workers, so the batches and
    # the checkpoint state are the same, and a state carries over between worker counts.
    inline = pipeline.make_pipeline(
        dataclasses.replace(config, num_workers=0), tokenizer, documents=documents
    )
    _assert_same_batches([next(inline) for _ in range(5)], batches[:5])
    assert json.loads(json.dumps(inline.get_state())) == state


def test_eval_pipeline_with_worker_processes(tokenizer):
    # A finite pass: workers run out one after the other; the padded batches do not change.
    config = pipeline.DataConfig(
        objective="span_corruption", inputs_length=32, batch_size=4, eval_every=2
    )
    documents = corpora.InMemoryDocuments(ENGLISH + CHINESE)
    want = list(pipeline.make_eval_pipeline(config, tokenizer, documents=documents))
    workers = dataclasses.replace(config, num_workers=2)
    got = list(pipeline.make_eval_pipeline(workers, tokenizer, documents=documents))
    _assert_same_batches(got, want)


def _epoch_texts(tokenizer, documents, *, process_index, process_count, train):
    config = pipeline.DataConfig(
        objective="causal_lm",
        inputs_length=200,
        batch_size=process_count,
        num_epochs=1,
        pack=False,
        eval_every=4,
    )
    make = pipeline.make_pipeline if train else pipeline.make_eval_pipeline
    iterator = make(
        config,
        tokenizer,
        documents=documents,
        process_index=process_index,
        process_count=process_count,
    )
    texts = []
    for batch in iterator:
        for row, seg in zip(batch["target_tokens"], batch["segment_ids"], strict=True):
            if seg.any():
                texts.append(tokenizer.decode(row[seg > 0]))
    return texts


def test_pipeline_sharding_and_held_out_split(tokenizer):
    docs = [f"doc{i} the cat" for i in range(17)]
    documents = corpora.InMemoryDocuments(docs)
    shards = [
        _epoch_texts(tokenizer, documents, process_index=i, process_count=2, train=True)
        for i in range(2)
    ]
    held_out = _epoch_texts(tokenizer, documents, process_index=0, process_count=1, train=False)
    assert held_out == [docs[3], docs[7], docs[11], docs[15]]
    assert not set(shards[0]) & set(shards[1])
    assert set(shards[0]) | set(shards[1]) == set(docs) - set(held_out)
    assert shards[0] != sorted(shards[0], key=docs.index)  # shuffled


def test_eval_pipeline_pads_to_static_shapes(tokenizer):
    config = pipeline.DataConfig(
        objective="span_corruption", inputs_length=32, batch_size=4, eval_every=2
    )
    documents = corpora.InMemoryDocuments(ENGLISH[:6])
    batches = list(pipeline.make_eval_pipeline(config, tokenizer, documents=documents))
    assert all(b["encoder_input_tokens"].shape == (4, 32) for b in batches)
    # Row r of every batch is row stream r: a stream that ran out gives all-zero rows, and
    # the pass ends with the last stream.
    used_TB = np.stack([b["encoder_segment_ids"].any(axis=1) for b in batches])
    assert used_TB[-1].any() and not used_TB[:, 3].any()  # 3 held-out documents, 4 streams
    assert (np.diff(used_TB.astype(int), axis=0) <= 0).all()  # no row after a stream ends
    padded = np.stack([b["decoder_loss_weights"] for b in batches])[~used_TB]
    assert not padded.any()
    fixed = list(
        pipeline.make_eval_pipeline(
            config, tokenizer, documents=documents, num_batches=len(batches) + 2
        )
    )
    assert len(fixed) == len(batches) + 2 and not fixed[-1]["encoder_segment_ids"].any()
    for a, b in zip(batches, fixed, strict=False):
        np.testing.assert_array_equal(a["encoder_input_tokens"], b["encoder_input_tokens"])


def test_config_from_dict_rejects_unknown_keys():
    assert pipeline.data_config_from_dict({"objective": "mlm"}).kind == "encoder"
    with pytest.raises(ValueError, match="data.batchsize is not a config key.*data.batch_size"):
        pipeline.data_config_from_dict({"objective": "mlm", "batchsize": 3})
    with pytest.raises(ValueError, match="data.targets_length must be int, got str"):
        pipeline.data_config_from_dict({"targets_length": "64"})
    assert pipeline.data_config_from_dict({"targets_length": None}).targets_length is None
    with pytest.raises(ValueError, match="unknown objective"):
        pipeline.DataConfig(objective="mass")
    assert pipeline.data_config_from_dict({"num_workers": 8}).num_workers == 8
    with pytest.raises(ValueError, match="num_workers"):
        pipeline.DataConfig(num_workers=-1)
    assert pipeline.DataConfig(inputs_length=512).decoder_length() == 114


def test_sentinel_check_counts_spans_as_the_noise_mask_does():
    # 172 inputs take 190 raw tokens; the mask's float32 count gives 29 noise tokens in 10
    # spans there (float64 would say 28 in 9), so 9 sentinels are one short.
    config = pipeline.DataConfig(objective="span_corruption", inputs_length=172)
    with pytest.raises(ValueError, match="needs 10 sentinels, the tokenizer has 9"):
        pipeline._check_sentinels(config, types.SimpleNamespace(num_sentinels=9))
    pipeline._check_sentinels(config, types.SimpleNamespace(num_sentinels=10))


@pytest.mark.parametrize("max_chars", [32, 0])
def test_pseudo_summary_examples_use_t5_pegasus_pieces(tokenizer, max_chars):
    # The reference's pieces: lines and sentences merged up to 32 characters (0: one piece
    # per sentence); the longer side is the encoder input, the other the target.
    from rope_jax.data.examples import ExampleMaker

    text = "Hi there.\nYes! OK.\nThe cat sat on the mat near the river. It was a quiet day."
    maker = ExampleMaker(
        "pseudo_summary", tokenizer, inputs_length=400, summary_max_chars=max_chars
    )
    (example,) = maker(text, np.random.default_rng(0))
    pieces = objectives.split_sentences(text, max_chars=max_chars or None)
    if max_chars:
        assert pieces == [
            "Hi there.\nYes! OK.",
            "The cat sat on the mat near the river.",
            "It was a quiet day.",
        ]
    else:
        assert len(pieces) == 5
    source, target = objectives.pseudo_summary_indices(pieces)
    tokens = tokenizer.encode_batch(pieces)
    np.testing.assert_array_equal(
        example["encoder_input_tokens"], np.concatenate([tokens[i] for i in source] + [[1]])
    )
    np.testing.assert_array_equal(
        example["decoder_target_tokens"], np.concatenate([tokens[i] for i in target] + [[1]])
    )
    with pytest.raises(ValueError, match="summary_max_chars must be >= 0"):
        ExampleMaker("pseudo_summary", tokenizer, inputs_length=400, summary_max_chars=-1)


# ----------------------------------------------------------- global order, any process count


def _process_pipelines(config, tokenizer, documents, process_count, state=None):
    iterators = [
        pipeline.make_pipeline(
            config,
            tokenizer,
            documents=documents,
            process_index=index,
            process_count=process_count,
        )
        for index in range(process_count)
    ]
    if state is not None:
        for iterator in iterators:
            iterator.set_state(json.loads(json.dumps(state)))  # what a checkpoint stores
    return iterators


def _global_batch(iterators):
    parts = [next(iterator) for iterator in iterators]
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


@pytest.mark.parametrize("objective", ["span_corruption", "causal_lm"])
def test_global_batches_are_the_same_for_any_process_count(tokenizer, objective):
    """The union of the processes' rows at step N is the 1-process batch, and the merged
    state of P processes resumes on any other number of processes exactly."""
    config = pipeline.DataConfig(objective=objective, inputs_length=32, batch_size=4, seed=5)
    documents = corpora.InMemoryDocuments(ENGLISH + CHINESE)
    single = _process_pipelines(config, tokenizer, documents, 1)
    want = [_global_batch(single) for _ in range(8)]
    two = _process_pipelines(config, tokenizer, documents, 2)
    assert [it.streams for it in two] == [[0, 1], [2, 3]]
    got = [_global_batch(two) for _ in range(4)]
    merged = row_streams.merge_process_states([it.get_state() for it in two])
    for process_count in (1, 2, 4):
        resumed = _process_pipelines(config, tokenizer, documents, process_count, merged)
        got_after = [_global_batch(resumed) for _ in range(4)]
        _assert_same_batches(got + got_after, want)
    # The merged state of two processes is the state one process has at the same step.
    replay = _process_pipelines(config, tokenizer, documents, 1)
    for _ in range(4):
        next(replay[0])
    assert merged == json.loads(json.dumps(replay[0].get_state()))
    key = "input_tokens" if objective == "causal_lm" else "encoder_input_tokens"
    assert len({want[0][key][r].tobytes() for r in range(4)}) == 4  # 4 streams, not copies


def test_every_document_of_an_epoch_is_read_once(tokenizer):
    """With one document per row, row r of batch t is global position r + t B; the first
    n positions (epoch 0) hold every training document exactly once, across processes."""
    docs = [f"doc{i} the cat" for i in range(18)]
    documents = corpora.InMemoryDocuments(docs)
    config = pipeline.DataConfig(
        objective="causal_lm", inputs_length=200, batch_size=4, pack=False, eval_every=4
    )
    training = [d for i, d in enumerate(docs) if i % 4 != 3]  # 14 documents
    iterators = _process_pipelines(config, tokenizer, documents, 2)
    read = collections.Counter()
    by_position = {}
    for step in range(5):
        for iterator in iterators:
            batch = next(iterator)
            for row, stream in enumerate(iterator.streams):
                weights = batch["segment_ids"][row] > 0
                text = tokenizer.decode(batch["target_tokens"][row][weights])
                by_position[stream + step * config.batch_size] = text
                read[text] += 1
    epoch = [by_position[k] for k in range(len(training))]
    assert sorted(epoch) == sorted(training)  # each training document once in epoch 0
    assert sum(read.values()) == 20 and set(read) == set(training)
    assert epoch != training  # shuffled
