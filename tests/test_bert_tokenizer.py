"""The jieba_bert (T5 PEGASUS) tokenizer against an independent re-statement of its rules
and against Hugging Face's BertTokenizer; the vocabulary builder and its workdir cache."""

import json
import pickle
import unicodedata

import jieba
import numpy as np
import pytest

from rope_jax.data import bert_vocab, pipeline
from rope_jax.data.bert_tokenizer import JiebaBertTokenizer, decode_tokens
from rope_jax.data.tokenizers import TextTokenizer

SPECIALS = ["[PAD]", "[unused1]", "[unused2]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CHARACTERS = list("我爱北京天安门的模型在年发布了研究人员使用数据，。！？、（）")
ENGLISH = ["bert", "##s", "a", "##b", "##c", "t", "##5", "caf", "##e", "pe", "##gas", "##us"]
NUMBERS = ["2021", "3", ".", "14", "1", "##0", "%", "-", "(", ")", ","]
WORDS = ["北京", "天安门", "模型", "研究", "人员", "数据", "发布"]
MIXED = [
    "我爱北京天安门，BERTs模型在2021年发布了！",
    "研究人员使用T5 PEGASUS (Café) 研究数据：3.14、10%的abc-ab。",
    "  北京\t天安门\n模型？ unknownword 数据abcab ",
    "研究\u200b人员使用\x07数据",  # a zero-width space (Cf) and a bell (Cc) vanish
]


def _vocab(with_words: bool) -> list[str]:
    return SPECIALS + CHARACTERS + ENGLISH + NUMBERS + (WORDS if with_words else [])


# ----------------------------------------------------------------------------- re-statement


def _is_cjk(ch):  # the test texts only use the main CJK block
    return "\u4e00" <= ch <= "\u9fff"


def _is_punct(ch):
    if ch.isascii():
        return ch.isprintable() and not ch.isalnum() and ch != " "
    return unicodedata.category(ch)[0] == "P"


def _restated_words(segment):
    """BERT's basic tokenizer on one (already normalised) segment."""
    words, current = [], ""
    for ch in segment:
        if _is_punct(ch) or _is_cjk(ch) or ch.isspace():
            words += [current] if current else []
            words += [] if ch.isspace() else [ch]
            current = ""
        elif unicodedata.category(ch) not in ("Cc", "Cf"):
            current += ch
    return words + ([current] if current else [])


def _restated_pieces(word, vocab):
    pieces, rest, first = [], word, True
    while rest:
        for cut in range(len(rest), 0, -1):
            candidate = rest[:cut] if first else "##" + rest[:cut]
            if candidate in vocab:
                pieces.append(candidate)
                rest, first = rest[cut:], False
                break
        else:
            return ["[UNK]"]
    return pieces


def _restated_tokens(text, vocab):
    """The reference's rules: lower-case and strip accents, cut with jieba (HMM off), keep a
    segment found in the vocabulary, else basic-split it and WordPiece every word."""
    text = "".join(
        c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn"
    )
    tokens = []
    for segment in jieba.cut(text, HMM=False):
        if segment in vocab:
            tokens.append(segment)
        else:
            for word in _restated_words(segment):
                tokens += _restated_pieces(word, vocab)
    return tokens


@pytest.fixture(scope="module")
def tokenizer():
    return JiebaBertTokenizer(_vocab(with_words=True))


def test_tokens_match_the_restated_rules(tokenizer):
    vocab = set(tokenizer.tokens)
    for text in MIXED:
        want = _restated_tokens(text, vocab)
        assert tokenizer.tokenize(text) == want, text
        ids = tokenizer.encode(text)
        assert ids.dtype == np.int32
        assert [tokenizer.id_to_piece(i) for i in ids] == want
    # jieba words of the vocabulary are one token; the rest is characters and word pieces.
    assert tokenizer.tokenize("北京天安门的模型, Café BERTs T5")[:5] == [
        "北京",
        "天安门",
        "的",
        "模型",
        ",",
    ]
    assert tokenizer.tokenize("Café BERTs T5") == ["caf", "##e", "bert", "##s", "t", "##5"]
    assert tokenizer.tokenize("xyz 研究人员") == ["[UNK]", "研究", "人员"]
    assert tokenizer.encode_batch(MIXED[:2])[1].tolist() == tokenizer.encode(MIXED[1]).tolist()


def test_matches_hugging_face_bert_where_jieba_adds_no_word(tmp_path):
    """With no multi-character word in the vocabulary, jieba's cut changes nothing and the
    ids are BERT's (the T5 PEGASUS tokenizer is BERT's plus whole jieba words)."""
    transformers = pytest.importorskip("transformers")
    tokens = _vocab(with_words=False)
    (tmp_path / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    hf = transformers.BertTokenizer.from_pretrained(str(tmp_path))
    ours = JiebaBertTokenizer.load(tmp_path / "vocab.txt")
    for text in MIXED + ["ÀÉÎ 北京 Pegasus peGASus, (10%)"]:
        want = hf.encode(text, add_special_tokens=False)
        assert ours.encode(text).tolist() == want, text
    assert (hf.pad_token_id, hf.cls_token_id, hf.sep_token_id) == (
        ours.pad_id,
        ours.decoder_start_id,
        ours.eos_id,
    )
    # A vocabulary with jieba words differs from BERT exactly there.
    with_words = JiebaBertTokenizer(_vocab(with_words=True))
    assert with_words.tokenize("北京") == ["北京"] and hf.tokenize("北京") == ["北", "京"]


def test_special_ids_and_protocol(tokenizer):
    assert isinstance(tokenizer, TextTokenizer)
    assert tokenizer.kind == "jieba_bert"
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.decoder_start_id) == (0, 3, 4)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.mask_id) == (4, 5, 6)
    assert (tokenizer.mask1_id, tokenizer.mask2_id) == (1, 2)
    assert tokenizer.vocab_size == tokenizer.piece_size == len(_vocab(True))
    assert tokenizer.random_token_range == (len(SPECIALS), tokenizer.vocab_size)
    assert tokenizer.num_sentinels == 0
    with pytest.raises(ValueError, match="no T5 sentinels"):
        tokenizer.sentinel_id(0)
    starts = tokenizer.word_start_table()
    assert starts.shape == (tokenizer.vocab_size,)
    assert not starts[tokenizer.vocab["##s"]] and starts[tokenizer.vocab["bert"]]
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.encode(MIXED[1]).tolist() == tokenizer.encode(MIXED[1]).tolist()


def test_decode_joins_chinese_without_spaces(tokenizer):
    # Worked by hand from bert4keras Tokenizer.decode: CJK joins, '##' glues, ASCII
    # punctuation is followed by a space, CJK punctuation is not, "3. 14" closes up,
    # special tokens ([CLS], [SEP], [UNK], [PAD]) vanish.
    tokens = ["[CLS]", "我", "爱", "北京", "，", "bert", "##s", "3", ".", "14", "[SEP]", "[PAD]"]
    assert decode_tokens(tokens) == "我爱北京，berts 3.14"
    # " 模型" "( " "  caf" "e" ") " "! " "  t" "5" -> single spaces -> no space after "(".
    assert decode_tokens(["模型", "(", "caf", "##e", ")", "!", "t", "##5", "[UNK]"]) == (
        "模型(cafe) ! t5"
    )
    ids = [tokenizer.vocab[t] for t in tokens]
    assert tokenizer.decode(ids) == "我爱北京，berts 3.14"
    assert tokenizer.decode(tokenizer.encode("研究人员使用数据。")) == "研究人员使用数据。"
    with pytest.raises(ValueError, match="outside vocabulary"):
        tokenizer.decode([tokenizer.vocab_size])


def test_vocabulary_errors_name_the_problem(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("[UNK]\n[PAD]\n[CLS]\n[SEP]\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\[PAD\] is id 1"):
        JiebaBertTokenizer.load(path)
    path.write_text("[PAD]\n[UNK]\n[CLS]\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"missing \['\[SEP\]'\]"):
        JiebaBertTokenizer.load(path)
    path.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n我\n我\n", encoding="utf-8")
    with pytest.raises(ValueError, match="vocab.txt:6: token '我' repeats line 5"):
        JiebaBertTokenizer.load(path)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        JiebaBertTokenizer.load(tmp_path / "missing.txt")
    no_mask = JiebaBertTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    with pytest.raises(ValueError, match=r"no \[MASK\]"):
        _ = no_mask.mask_id


def test_span_corruption_is_refused_at_start(tokenizer):
    config = pipeline.DataConfig(objective="span_corruption", inputs_length=32, batch_size=2)
    with pytest.raises(ValueError, match="span_corruption needs T5 sentinel ids.*jieba_bert"):
        pipeline.make_pipeline(config, tokenizer, documents=["我爱北京。"] * 4)


def test_pseudo_summary_examples_use_cls_and_sep(tokenizer):
    from rope_jax.data.examples import ExampleMaker

    maker = ExampleMaker("pseudo_summary", tokenizer, inputs_length=64)
    text = "我爱北京天安门。研究人员使用数据。模型在2021年发布了。北京的研究人员发布了模型！"
    (example,) = maker(text, np.random.default_rng(0))
    inputs, targets = example["encoder_input_tokens"], example["decoder_target_tokens"]
    assert inputs[0] == tokenizer.vocab["[CLS]"] and inputs[-1] == tokenizer.vocab["[SEP]"]
    assert targets[-1] == tokenizer.eos_id
    np.testing.assert_array_equal(
        example["decoder_input_tokens"], np.concatenate([[tokenizer.vocab["[CLS]"]], targets[:-1]])
    )
    # The source and target are the tokens of the chosen sentences.
    assert tokenizer.decode(inputs) + tokenizer.decode(targets) != ""
    assert 1 not in inputs.tolist()  # T5's EOS id is [unused1] here and never appears


# ----------------------------------------------------------------------------- vocabulary


CORPUS = [
    "研究人员使用数据研究模型。研究人员发布了模型！",
    "北京的研究人员在2021年发布了BERT模型。",
    "模型，数据，研究。",
]


def test_build_vocab_orders_specials_characters_then_words():
    tokens = bert_vocab.build_vocab(CORPUS, vocab_size=10_000, num_unused=2)
    assert tokens[:7] == ["[PAD]", "[unused1]", "[unused2]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # Counted by hand: 研 and 究 appear 5 times each, 模 and 型 4, 人 员 。 3, ...
    units = tokens[7:]
    assert units[:4] == ["研", "究", "型", "模"]  # ties broken by the character's text
    chars = {t for t in units if len(t) == 1 or t.startswith("##")}
    assert {"b", "##e", "##r", "##t", "2", "##0", "##2", "##1", "。", "，", "！"} <= chars
    words = [t for t in units if t not in chars]
    # jieba (HMM off) cuts 研究 x5, 模型 x4, 人员 x3, 数据 x2, 发布 x2, 使用, 北京, 2021, bert.
    assert words[:3] == ["研究", "模型", "人员"]
    assert set(words[3:5]) == {"数据", "发布"}
    assert set(words[5:]) == {"使用", "北京", "2021", "bert"}
    assert units.index(words[0]) > max(units.index(c) for c in chars)
    small = bert_vocab.build_vocab(CORPUS, vocab_size=12, num_unused=2)
    assert small == tokens[:12]
    assert bert_vocab.build_vocab(CORPUS, vocab_size=10_000, num_unused=2) == tokens
    with pytest.raises(ValueError, match="no room"):
        bert_vocab.build_vocab(CORPUS, vocab_size=7, num_unused=2)
    with pytest.raises(ValueError, match="empty"):
        bert_vocab.build_vocab(["  "], vocab_size=200)


def test_built_vocab_covers_its_corpus():
    tokenizer = JiebaBertTokenizer(bert_vocab.build_vocab(CORPUS, vocab_size=400))
    assert tokenizer.vocab["[CLS]"] == 101 and tokenizer.vocab["[MASK]"] == 103  # BERT's ids
    decoded = []
    for text in CORPUS:
        ids = tokenizer.encode(text)
        assert tokenizer.unk_id not in ids.tolist()
        decoded.append(tokenizer.decode(ids))
    assert decoded[0] == CORPUS[0] and decoded[2] == CORPUS[2]
    # bert4keras puts a space before a word token that follows a non-CJK character.
    assert decoded[1] == "北京的研究人员在2021年发布了bert 模型。"


def test_vocab_cache_is_reused_and_never_overwritten(tmp_path):
    tokenizer = bert_vocab.load_or_build_tokenizer(
        tmp_path, vocab_size=200, documents=iter(CORPUS), corpus_name="zh"
    )
    cached = tmp_path / "tokenizer" / "vocab.txt"
    meta = json.loads((tmp_path / "tokenizer" / "vocab.json").read_text())
    assert meta == {"kind": "jieba_bert", "vocab_size": 200, "corpus": "zh"}
    before = cached.read_bytes()
    again = bert_vocab.load_or_build_tokenizer(
        tmp_path, vocab_size=200, documents=iter(["不同的文本"]), corpus_name="zh"
    )
    assert again.tokens == tokenizer.tokens
    with pytest.raises(ValueError, match="never rebuilt or overwritten.*another --workdir"):
        bert_vocab.load_or_build_tokenizer(
            tmp_path, vocab_size=200, documents=iter(CORPUS), corpus_name="other"
        )
    given = tmp_path / "given.txt"
    given.write_text("\n".join(_vocab(True)) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="never rebuilt"):
        bert_vocab.load_or_build_tokenizer(tmp_path, vocab_size=200, vocab_path=str(given))
    assert cached.read_bytes() == before
    # A given vocabulary is copied into a fresh workdir, which eval.py then finds there.
    fresh = tmp_path / "fresh"
    loaded = bert_vocab.load_or_build_tokenizer(fresh, vocab_size=0, vocab_path=str(given))
    assert loaded.tokens == _vocab(True)
    assert (fresh / "tokenizer" / "vocab.txt").read_text(encoding="utf-8") == given.read_text(
        encoding="utf-8"
    )
    given.write_text("\n".join(_vocab(False)) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="vocab_sha256"):
        bert_vocab.load_or_build_tokenizer(fresh, vocab_size=0, vocab_path=str(given))


def test_a_sentencepiece_workdir_is_not_reused(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "spm.model").write_bytes(b"x")
    with pytest.raises(ValueError, match="SentencePiece tokenizer"):
        bert_vocab.load_or_build_tokenizer(tmp_path, vocab_size=200, documents=iter(CORPUS))
