"""T5 PEGASUS end to end: the Hugging Face form (MT5 + BERT vocab.txt) against PyTorch, and
Chinese pseudo-summary pretraining with the jieba_bert tokenizer through the trainer."""

import importlib
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from training_toys import enable_compilation_cache, restore_compilation_cache

from rope_jax import convert, decoding
from rope_jax.data.bert_tokenizer import JiebaBertTokenizer
from rope_jax.evaluation import formats, pretrained
from rope_jax.evaluation import inputs as inputs_lib
from rope_jax.training import trainer

VOCAB = (
    ["[PAD]", "[unused1]", "[unused2]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + list("我爱北京天安门的模型在年发布了研究人员使用数据，。！文本摘要生成中")
    + ["bert", "##s", "t", "##5", "2021", "北京", "模型", "研究", "人员", "数据", "摘要"]
)
SOURCES = ["研究人员使用数据研究模型。", "北京的研究人员在2021年发布了BERT模型！"]
TARGETS = ["模型摘要", "研究人员发布了T5"]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny random MT5ForConditionalGeneration saved with a BertTokenizer vocab.txt, the
    layout of T5 PEGASUS' Hugging Face ports (built locally, nothing downloaded)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("t5_pegasus_hf")
    torch.manual_seed(0)
    config = transformers.MT5Config(
        vocab_size=len(VOCAB) + 3,  # a model may have more rows than the vocabulary
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        # mT5's ids, as a converted checkpoint may keep them; the vocabulary decides.
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    model = transformers.MT5ForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True})
    )
    return folder, model


def _rows(token_lists):
    width = max(map(len, token_lists))
    return np.array([t + [0] * (width - len(t)) for t in token_lists], np.int32)


def test_hf_folder_gives_the_bert_vocabulary_and_logits_parity(hf_folder):
    import jieba
    import torch
    import transformers

    folder, hf_model = hf_folder
    tokenizer = convert.tokenizer_from_hf(folder)
    assert isinstance(tokenizer, JiebaBertTokenizer)
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.decoder_start_id) == (0, 5, 4)
    assert tokenizer.bos_id == 4 and tokenizer.vocab_size == len(VOCAB)
    # The ids are those of the Hugging Face ports' tokenizer: BertTokenizer plus whole jieba
    # words (on lower-case text, where the ports and bert4keras agree).
    hf_tokenizer = transformers.BertTokenizer.from_pretrained(str(folder))
    for text in SOURCES + TARGETS:
        text = text.lower()
        want = []
        for word in jieba.cut(text, HMM=False):
            if word in hf_tokenizer.vocab:
                want.append(hf_tokenizer.vocab[word])
            else:
                want += hf_tokenizer.encode(word, add_special_tokens=False)
        assert tokenizer.encode(text).tolist() == want

    model, params = convert.from_hf(folder)
    # bert4keras' encode: [CLS] text [SEP] for the encoder, [CLS] target for the decoder.
    cls, sep = tokenizer.decoder_start_id, tokenizer.eos_id
    encoder = _rows([[cls, *tokenizer.encode(s).tolist(), sep] for s in SOURCES])
    decoder = _rows([[cls, *tokenizer.encode(t).tolist()] for t in TARGETS])
    with torch.no_grad():
        want = hf_model(
            input_ids=torch.from_numpy(encoder.astype(np.int64)),
            attention_mask=torch.from_numpy((encoder != 0).astype(np.int64)),
            decoder_input_ids=torch.from_numpy(decoder.astype(np.int64)),
        ).logits.numpy()
    got = jax.jit(model.apply)({"params": params}, jnp.asarray(encoder), jnp.asarray(decoder))
    valid = decoder != 0
    np.testing.assert_allclose(np.asarray(got)[valid], want[valid], atol=1e-4, rtol=0)

    # Greedy decoding from [CLS] to [SEP], as the fine-tuning script's AutoRegressiveDecoder.
    with torch.no_grad():
        hf_greedy = hf_model.generate(
            input_ids=torch.from_numpy(encoder.astype(np.int64)),
            attention_mask=torch.from_numpy((encoder != 0).astype(np.int64)),
            do_sample=False,
            num_beams=1,
            max_length=8,
            decoder_start_token_id=cls,
            eos_token_id=sep,
            pad_token_id=0,
        ).numpy()
    ids = dict(eos_id=sep, pad_id=0, decoder_start_id=cls)
    ours = np.asarray(decoding.generate(model, params, encoder, max_length=8, **ids).sequences)
    np.testing.assert_array_equal(ours[:, : hf_greedy.shape[1]], hf_greedy)
    assert (ours[:, 0] == cls).all()
    t5_start = decoding.generate(model, params, encoder, max_length=8, eos_id=sep).sequences
    t5_start = np.asarray(t5_start)
    assert (t5_start[:, 0] == 0).all() and not np.array_equal(t5_start[:, 1:], ours[:, 1:])


def test_pretrained_loading_uses_the_jieba_bert_codec(hf_folder):
    folder, _ = hf_folder
    config = ml_collections.ConfigDict(
        {"init_checkpoint": str(folder), "tokenizer": "", "model": {}, "pretrain_config": ""}
    )
    source = pretrained.load_source(config)
    codec = source.codec
    assert isinstance(codec.tokenizer, JiebaBertTokenizer)
    assert (codec.eos_id, codec.decoder_start_id, codec.bos_id, codec.pad_id) == (5, 4, 4, 0)
    examples = [
        formats.TextExample(inputs=s, targets=t, record=i)
        for i, (s, t) in enumerate(zip(SOURCES, TARGETS, strict=True))
    ]
    arrays = inputs_lib.seq2seq_arrays(examples, codec, max_input_length=16, max_target_length=10)
    first = codec.tokenizer.encode(SOURCES[0]).tolist()
    assert arrays["encoder_input_tokens"][0, : len(first) + 2].tolist() == [4, *first, 5]
    target = codec.tokenizer.encode(TARGETS[1]).tolist()
    assert arrays["decoder_target_tokens"][1, : len(target) + 1].tolist() == [*target, 5]
    assert arrays["decoder_input_tokens"][1, : len(target) + 1].tolist() == [4, *target]
    assert codec.decode([*target, 5, 7, 8]) == codec.tokenizer.decode(target)
    # A BERT vocab.txt given as config.tokenizer selects the same tokenizer.
    config.init_checkpoint = ""
    config.tokenizer = str(folder / "vocab.txt")
    config.model = {"family": "encoder_decoder", "vocab_size": len(VOCAB)}
    assert isinstance(pretrained.load_source(config).codec.tokenizer, JiebaBertTokenizer)


def test_tokenizer_from_hf_errors(tmp_path, hf_folder):
    folder, _ = hf_folder
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(convert.ConversionError, match="vocab.txt"):
        convert.tokenizer_from_hf(tmp_path)
    big = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"t{i}" for i in range(len(VOCAB) + 10)]
    (tmp_path / "vocab.txt").write_text("\n".join(big) + "\n", encoding="utf-8")
    with pytest.raises(convert.ConversionError, match="only"):
        convert.tokenizer_from_hf(tmp_path)


# ----------------------------------------------------------------------------- pretraining

PHRASES = [
    "研究人员使用新的数据训练模型",
    "北京今天天气很好",
    "我们提出了一种文本摘要方法",
    "实验结果表明该方法是有效的",
    "模型在多个数据集上取得了最好的结果",
    "这篇文章介绍了中文生成式预训练模型",
    "伪摘要任务选择与原文最相似的句子",
    "我们在2021年发布了T5 PEGASUS模型",
]


def _chinese_documents(count, seed=0):
    rng = np.random.default_rng(seed)
    return [
        "".join(PHRASES[i] + "。" for i in rng.choice(len(PHRASES), size=6)) for _ in range(count)
    ]


SHRINK = (
    "tiny,num_train_steps=2,batch_size=4,inputs_length=64,targets_length=16,num_layers=1,"
    "log_every_steps=1,checkpoint_every_steps=2,eval_every_steps=2,eval_steps=1,"
    "measure_matmul_peak=False"
)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    previous = enable_compilation_cache(tmp_path_factory.mktemp("xla_cache"))
    yield
    restore_compilation_cache(previous)


def _config(arg):
    config = importlib.import_module("configs.t5_pegasus").get_config(arg)
    config.lock()
    return config


def test_chinese_pseudo_summary_pretraining_through_the_trainer(tmp_path):
    documents = _chinese_documents(40)
    text_file = tmp_path / "zh.txt"
    text_file.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    config = _config(f"{SHRINK},paths={text_file}")
    assert config.tokenizer.kind == "jieba_bert" and config.data.objective == "pseudo_summary"
    workdir = tmp_path / "run"
    result = trainer.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
    assert sorted(result.history) == [1, 2]
    assert all(np.isfinite(m["loss"]) and m["loss"] > 0 for m in result.history.values())
    assert np.isfinite(result.eval_history[2]["loss"])
    tokenizer = JiebaBertTokenizer.load(workdir / "tokenizer" / "vocab.txt")
    meta = json.loads((workdir / "tokenizer" / "vocab.json").read_text())
    assert meta == {"kind": "jieba_bert", "vocab_size": 2048, "corpus": str(text_file)}
    assert tokenizer.vocab_size < 2048 and "研究" in tokenizer.vocab  # every unit fits
    # The batches the trainer reads: [CLS] source [SEP] -> [CLS] summary / summary [SEP].
    batch = next(trainer.build_inputs(config, str(workdir)).train)
    cls, sep = tokenizer.vocab["[CLS]"], tokenizer.vocab["[SEP]"]
    first = batch["encoder_positions"] == 0
    assert (batch["encoder_input_tokens"][first & (batch["encoder_segment_ids"] > 0)] == cls).all()
    starts = (batch["decoder_positions"] == 0) & (batch["decoder_segment_ids"] > 0)
    assert starts.any() and (batch["decoder_input_tokens"][starts] == cls).all()
    assert (batch["decoder_target_tokens"] == sep).any()
    assert tokenizer.unk_id not in batch["encoder_input_tokens"].tolist()
    # Another corpus in the same workdir is refused before anything is overwritten.
    other = tmp_path / "other.txt"
    other.write_text("另一个语料。第二句话。", encoding="utf-8")
    with pytest.raises(ValueError, match="never rebuilt or overwritten"):
        trainer.build_tokenizer(_config(f"{SHRINK},paths={other}"), str(workdir))
    with pytest.raises(ValueError, match="tokenizer.vocab_path"):
        trainer.build_tokenizer(_config(f"{SHRINK},tokenizer.path=x.model"), str(tmp_path / "x"))


def test_jsonl_corpus_and_a_given_vocabulary(tmp_path):
    jsonl = tmp_path / "zh.jsonl"
    lines = [json.dumps({"content": d}, ensure_ascii=False) for d in _chinese_documents(8, 1)]
    jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    config = _config(
        f"{SHRINK},paths={jsonl},format=jsonl,text_field=content,eval_steps=0,"
        f"tokenizer.vocab_path={vocab}"
    )
    tokenizer = trainer.build_tokenizer(config, str(tmp_path / "run"))
    assert tokenizer.tokens == VOCAB
    assert (tmp_path / "run" / "tokenizer" / "vocab.txt").read_text(encoding="utf-8") == (
        vocab.read_text(encoding="utf-8")
    )
    batch = next(trainer.build_inputs(config, str(tmp_path / "run")).train)
    assert batch["encoder_input_tokens"].shape == (4, 64)
    assert set(np.unique(batch["decoder_target_tokens"])) <= set(range(len(VOCAB)))
    with pytest.raises(ValueError, match="kind=jieba_bert"):
        trainer.build_tokenizer(
            _config(f"tiny,tokenizer.kind=sentencepiece,tokenizer.vocab_path={vocab}"),
            str(tmp_path / "y"),
        )
