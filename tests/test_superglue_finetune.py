"""End-to-end fine-tune + evaluation on tiny fixtures: CB with an encoder (classification
head) and RTE with an encoder-decoder (text-to-text, greedy decoding), plus token arrays."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import superglue_reference as reference

from rope_jax.evaluation import formats, inputs, pretrained, readers


class ByteCodec:
    """UTF-8 bytes shifted past the T5 specials (pad 0, EOS 1, unk 2): a tokenizer that
    needs no training, with the SentencePieceCodec pairing rules."""

    eos_id = 1

    def encode(self, text):
        return [b + 3 for b in text.encode()]

    def decode(self, ids):
        ids = list(ids)
        ids = ids[: ids.index(1)] if 1 in ids else ids
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode(errors="replace")

    pair = inputs.SentencePieceCodec.pair


def test_token_arrays_follow_the_batch_contract():
    codec = ByteCodec()
    examples = [formats.TextExample("abcdef", "xy", 0), formats.TextExample("a", "", 1)]
    arrays = inputs.seq2seq_arrays(examples, codec, max_input_length=4, max_target_length=4)
    np.testing.assert_array_equal(
        arrays["encoder_input_tokens"], [[100, 101, 102, 1], [100, 1, 0, 0]]
    )
    np.testing.assert_array_equal(arrays["decoder_target_tokens"], [[123, 124, 1, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(arrays["decoder_input_tokens"], [[0, 123, 124, 1], [0, 1, 0, 0]])
    np.testing.assert_array_equal(arrays["decoder_loss_weights"], [[1, 1, 1, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(arrays["encoder_positions"], [[0, 1, 2, 3], [0, 1, 0, 0]])
    # Longest-first truncation keeps the short hypothesis of a pair.
    enc = [formats.EncoderExample((("aaaaaaaa", "bb"),), 2, 0)]
    arrays = inputs.encoder_arrays(enc, codec, max_length=8)
    np.testing.assert_array_equal(arrays["input_tokens"][0, 0], [100] * 4 + [1, 101, 101, 1])
    np.testing.assert_array_equal(arrays["token_type_ids"][0, 0], [0] * 5 + [1] * 3)
    np.testing.assert_array_equal(arrays["labels"], [2])
    enc = [
        formats.EncoderExample((("c", "d"),), (0,), 0),
        formats.EncoderExample((("c", "d"), ("e", "")), (1,), 1),
    ]
    arrays = inputs.encoder_arrays(enc, codec, max_length=8)
    np.testing.assert_array_equal(arrays["choice_mask"], [[1, 0], [1, 1]])
    np.testing.assert_array_equal(arrays["labels"], [[1, 0], [0, 1]])  # multiple choice: multi-hot


def _write_task(root, task, rows_by_split):
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in rows_by_split.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _fixture_data(root):
    words = ["red", "blue", "green", "dark"]
    cb, rte = [], []
    for i in range(12):
        label = ("entailment", "contradiction", "neutral")[i % 3]
        cb.append(
            {
                "premise": f"the sky is {words[i % 4]}.",
                "hypothesis": f"{label[:3]} {i}",
                "label": label,
                "idx": i,
            }
        )
        rte_label = ("entailment", "not_entailment")[i % 2]
        rte.append(
            {
                "premise": f"p {words[i % 4]}",
                "hypothesis": f"{rte_label[:2]}",
                "label": rte_label,
                "idx": i,
            }
        )
    _write_task(
        root, "CB", {"train": cb, "val": cb[:6], "test": [dict(r, label=None) for r in cb[:3]]}
    )
    _write_task(root, "RTE", {"train": rte, "val": rte[:4]})
    axb = root / "AX-b"
    axb.mkdir()
    (axb / "AX-b.jsonl").write_text(
        json.dumps({"sentence1": "a", "sentence2": "b", "idx": 0, "label": "entailment"}) + "\n"
    )
    # Test records have no label field at all.
    (root / "CB" / "test.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "label"}) + "\n" for r in cb[:3])
    )


def _config(root, family):
    from configs import superglue

    config = superglue.get_config("tiny")
    config.data_dir = str(root)
    config.num_train_steps = 6
    config.batch_size = 4
    config.eval_batch_size = 4
    config.max_input_length = 32
    config.max_target_length = 6
    config.model.vocab_size = 260
    config.model.family = family
    if family == "encoder":
        # RoFormer-like, pre-RMSNorm: position "rope", token types, classification head.
        config.model.update(
            {
                "position": "rope",
                "type_vocab_size": 2,
                "mlp_activation": "gelu",
                "scale_queries": True,
            }
        )
    return config


@pytest.mark.parametrize("family,task", [("encoder", "CB"), ("encoder_decoder", "all")])
def test_tiny_finetune_and_eval_end_to_end(tmp_path, family, task, monkeypatch, capsys):
    from rope_jax.evaluation import finetune

    data = tmp_path / "data"
    _fixture_data(data)
    if task == "all":  # "all" = every task folder present: RTE, then AX-b with its model
        shutil.rmtree(data / "CB")
    config = _config(data, family)
    config.task = task
    source = pretrained.Source(
        pretrained._model_config(config.model), None, None, ByteCodec(), "random init"
    )
    monkeypatch.setattr(pretrained, "load_source", lambda config: source)
    workdir = str(tmp_path / "run")
    results = finetune.finetune_and_evaluate(config, workdir, devices=jax.devices()[:1])
    with open(os.path.join(workdir, "metrics.json")) as f:
        assert json.load(f) == results
    trained = "CB" if task == "CB" else "RTE"
    val = results[trained]
    assert val["num_examples"] == (6 if trained == "CB" else 4)
    assert 0.0 <= val["accuracy"] <= 1.0 and np.isfinite(val["final_train_loss"])
    assert f"| {trained} | {int(val['num_examples'])} | score" in capsys.readouterr().out
    # The prediction file is what the metrics scored: recomputed from it by the official
    # rules (invalid = null = wrong), they equal metrics.json.
    lines = reference.read_lines(os.path.join(workdir, "predictions", f"{trained}_val.jsonl"))
    assert [x["idx"] for x in lines] == list(range(int(val["num_examples"])))
    assert all(x["label"] in (*readers.LABEL_NAMES[trained], None) for x in lines)
    assert all(("decoded" in x) == (x["label"] is None) for x in lines)
    gold = readers.read_split(str(data), trained, "val")
    recomputed = reference.metrics_from_file(trained, lines, gold)
    assert recomputed == pytest.approx({k: val[k] for k in recomputed})
    assert val["invalid_fraction"] == pytest.approx(
        sum(x["label"] is None for x in lines) / len(lines)
    )
    if task == "CB":
        assert "f1" in val
        assert results["CB/test"]["num_examples"] == 3
        assert os.path.exists(os.path.join(workdir, "submission", "CB.jsonl"))
    else:
        assert sorted(results) == ["AX-b", "RTE"] and "mcc" in results["AX-b"]
        # A labelled test split (the diagnostics): a scored file with nulls, and the
        # leaderboard file with every line labelled and the filled ones counted.
        scored = reference.read_lines(os.path.join(workdir, "predictions", "AX-b_test.jsonl"))
        gold = readers.read_split(str(data), "AX-b", "test")
        recomputed = reference.metrics_from_file("AX-b", scored, gold)
        assert recomputed == pytest.approx({k: results["AX-b"][k] for k in recomputed})
        leaderboard = reference.read_lines(os.path.join(workdir, "submission", "AX-b.jsonl"))
        assert all(x["label"] in readers.LABEL_NAMES["AX-b"] for x in leaderboard)
        filled = sum(x["label"] is None for x in scored)
        assert results["AX-b"]["filled_labels"] == filled
        assert "| RTE | 4 |" in open(os.path.join(workdir, "summary.md")).read()


def test_encoder_losses_against_float64_numpy():
    from rope_jax.families import classification_sums

    def encoder_loss(logits, batch):
        sums = classification_sums(logits, {k: np.asarray(v) for k, v in batch.items()})
        return sums["loss_sum"] / sums["weight_sum"]

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 1, 4))
    labels = np.array([0, 3, 2])
    expected = np.mean(
        [np.log(np.exp(logits[i, 0]).sum()) - logits[i, 0, labels[i]] for i in range(3)]
    )
    loss = encoder_loss(logits.astype(np.float32), {"labels": labels})
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # Multiple choice: row 0 has two right candidates of 3 valid (the 4th is padding),
    # row 1 one right of 2, row 2 none (unlabelled: excluded from the mean).
    scores = rng.normal(size=(3, 4, 1))
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    gold = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]], np.float32)
    s = scores[..., 0]
    row0 = np.log(np.exp(s[0, :3]).sum()) - np.log(np.exp(s[0, [0, 2]]).sum())
    row1 = np.log(np.exp(s[1, :2]).sum()) - s[1, 1]
    batch = {"labels": gold, "choice_mask": mask}
    loss = encoder_loss(scores.astype(np.float32), batch)
    np.testing.assert_allclose(loss, (row0 + row1) / 2, rtol=1e-5)


def test_merge_params_keeps_new_head_and_checks_the_rest():
    f32 = np.float32
    fresh = {
        "encoder": {"w": np.zeros((2, 3), f32)},
        "classifier": {"kernel": np.ones((3, 2), f32)},
    }
    loaded = {"encoder": {"w": np.full((2, 3), 5.0, f32)}, "mlm_head": {"bias": np.ones(4, f32)}}
    merged = pretrained.merge_params(fresh, loaded)
    np.testing.assert_array_equal(merged["encoder"]["w"], 5.0)
    np.testing.assert_array_equal(merged["classifier"]["kernel"], 1.0)
    assert "mlm_head" not in merged
    with pytest.raises(KeyError, match="encoder/w is missing"):
        pretrained.merge_params(fresh, {"other": {"w": np.zeros(1)}})
    with pytest.raises(ValueError, match=r"encoder/w: checkpoint shape \(3, 2\)"):
        pretrained.merge_params(fresh, {"encoder": {"w": np.zeros((3, 2))}})


def test_hf_encoder_folder_tokenizer_without_vocab_txt(tmp_path):
    """A BERT folder saved by transformers 5 has tokenizer.json and no vocab.txt."""
    transformers = pytest.importorskip("transformers")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "sky", "is", "blue"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    folder = tmp_path / "bert"
    transformers.BertTokenizerFast(str(tmp_path / "vocab.txt")).save_pretrained(folder)
    (folder / "vocab.txt").unlink(missing_ok=True)
    config = _config(tmp_path, "encoder")
    codec = pretrained._codec(config, None, str(folder))
    assert isinstance(codec, inputs.HFCodec)
    tokens, types = codec.pair(codec.encode("the sky"), codec.encode("is blue"), 16)
    assert tokens == [2, 5, 6, 3, 7, 8, 3] and types == [0, 0, 0, 0, 1, 1, 1]


def test_workdir_tokenizer_keeps_the_vocabulary_it_was_trained_for(tmp_path):
    """SentencePiece stops short of the pieces asked for on a small corpus; train.py then
    gives the rest of the vocabulary to extra ids, and fine-tuning must use the same ids."""
    from rope_jax.data import embedded

    documents = ["the sky is blue and the sea is green"] * 50
    trained = embedded.load_or_train_tokenizer(tmp_path, vocab_size=1000, documents=documents)
    assert trained.num_extra_ids > 100, "the corpus is too rich to show the case"
    codec = pretrained._codec(_config(tmp_path, "encoder_decoder"), None, str(tmp_path))
    assert codec.tokenizer.vocab_size == 1000
    assert codec.tokenizer.sentinel_id(0) == trained.sentinel_id(0) == 999


def test_a_bytes_workdir_fine_tunes_with_byte_ids(tmp_path, monkeypatch):
    """A train.py run with ``tokenizer.kind=bytes`` (an ablation cell) caches no tokenizer
    file: fine-tuning from it encodes text as the run did, UTF-8 bytes + 3."""
    config = _config(tmp_path, "encoder")
    source = tmp_path / "cell"
    (source / "checkpoints").mkdir(parents=True)
    record = {"model": config.model.to_dict(), "tokenizer": {"kind": "bytes"}}
    (source / "config.json").write_text(json.dumps(record))
    monkeypatch.setattr(pretrained, "_restore_params", lambda path: ({}, {}, f"{path}/0"))
    config.init_checkpoint = str(source)
    codec = pretrained.load_source(config).codec
    assert codec.encode("hé") == [ord("h") + 3, 0xC3 + 3, 0xA9 + 3]
    assert codec.decode(codec.encode("hé") + [codec.eos_id, 7]) == "hé"


@pytest.mark.parametrize(
    "broken,content,error,message",
    [
        ("RTE/val.jsonl", '{"idx": 0}\n', readers.SuperGlueFormatError, "missing field"),
        ("RTE/val.jsonl", "", readers.SuperGlueFormatError, "RTE val split is empty"),
        ("RTE/val.jsonl", None, FileNotFoundError, "RTE val split not found"),
        ("AX-b/AX-b.jsonl", "{not json\n", readers.SuperGlueFormatError, "invalid JSON"),
        ("CB/test.jsonl", '{"idx": 0, "premise": 1}\n', readers.SuperGlueFormatError, "premise"),
        # A test file given as training data: no labels to train on.
        ("RTE/train.jsonl", '{"idx": 0, "premise": "p", "hypothesis": "h"}\n',
         readers.SuperGlueFormatError, "no label to train on"),
    ],
)  # fmt: skip
def test_every_split_is_read_before_any_model_work(
    tmp_path, monkeypatch, broken, content, error, message
):
    """task=all trains CB first; a bad RTE, AX-b or test file must fail before that (and
    before any model is loaded), with an error naming the file."""
    from rope_jax.evaluation import finetune

    data = tmp_path / "data"
    _fixture_data(data)
    if content is None:
        (data / broken).unlink()
    else:
        (data / broken).write_text(content)
    config = _config(data, "encoder_decoder")
    config.task = "all"

    def no_model_work(config):
        raise AssertionError("a model was loaded before every split was read")

    monkeypatch.setattr(pretrained, "load_source", no_model_work)
    with pytest.raises(error, match=message) as raised:
        finetune.finetune_and_evaluate(config, str(tmp_path / "run"))
    assert str(data / broken) in str(raised.value)
    assert not (tmp_path / "run").exists()
