"""Summarization fine-tuning through the train loop (eval.py with configs/summarization.py):
the config, the errors at start, a tiny fine-tune from a T5 PEGASUS-style pretraining workdir
(jieba_bert vocabulary) with its metrics.json and predictions, the evaluator's summaries
against a beam search run here on the same checkpoint, and a SIGTERM-interrupted and resumed
eval.py run that ends like an uninterrupted one."""

import importlib
import json
import os
import signal
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import subprocess_env
from absl import flags
from ml_collections import config_flags

from rope_jax import cli, decoding, families
from rope_jax.data.bert_tokenizer import JiebaBertTokenizer
from rope_jax.evaluation import pretrained, summarization, summary_finetune
from rope_jax.evaluation.summary_metrics import summarization_metrics
from rope_jax.models import build_model
from rope_jax.training import best as best_lib
from rope_jax.training import checkpoint, interrupts, preflight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PHRASES = [
    "研究人员使用新的数据训练模型",
    "北京今天天气很好",
    "我们提出了一种文本摘要方法",
    "实验结果表明该方法是有效的",
    "模型在多个数据集上取得了最好的结果",
    "这篇文章介绍了中文生成式预训练模型",
]
TITLES = ["数据模型", "北京天气", "文本摘要", "实验结果", "最好结果", "中文模型"]
SPECIALS = ["[PAD]", "[unused1]", "[unused2]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIALS + sorted(set("".join(PHRASES + TITLES) + "，。")) + ["研究", "模型", "数据"]


def _pairs(indices):
    """(title, source): the title's phrase and the next one make the source."""
    return [
        (TITLES[i], PHRASES[i] + "，" + PHRASES[(i + 1) % len(PHRASES)] + "。") for i in indices
    ]


def _write_data(root):
    train = root / "train.tsv"
    train.write_text(
        "".join(f"{t}\t{s}\n" for t, s in _pairs([0, 1, 2, 3, 4, 5, 0, 2])), encoding="utf-8"
    )
    records = [
        {"id": f"val-{i}", "content": s, "title": t} for i, (t, s) in enumerate(_pairs([1, 3, 5]))
    ]
    val = root / "val.jsonl"
    val.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )
    return train, val


TINY_MODEL = dict(d_model=16, num_heads=2, head_dim=8, d_ff=32, num_layers=1)


def _write_pretraining_workdir(root):
    """What train.py leaves after a configs/t5_pegasus.py run: config.json with the model,
    the cached vocab.txt and a checkpoint (random weights: the fine-tune is what is tested)."""
    from configs import common
    from configs.mt5 import T5_V1_1

    model = common.model_config(**{**T5_V1_1, **TINY_MODEL, "vocab_size": len(VOCAB) + 2})
    cfg = pretrained._model_config(model)
    task = families.for_model(build_model(cfg))
    # Shapes only, then numpy draws of about the init's scales: no compilation, which takes
    # seconds on a busy CPU (norm scales 1, embeddings and relative biases 1, kernels 0.25).
    shapes = jax.eval_shape(lambda: nn.unbox(task.init(task.init_rngs(jax.random.key(5)))))
    rng = np.random.default_rng(5)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            return np.ones(leaf.shape, leaf.dtype)
        scale = 1.0 if ("embedding" in name or "relpos" in name) else 0.25
        return (scale * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    params = jax.tree_util.tree_map_with_path(draw, shapes["params"])
    writer = checkpoint.Checkpointer(root / "checkpoints", async_save=False)
    writer.save(
        3, {"params": params, "random_features": {}, "step": jnp.asarray(3)}, {}, force=True
    )
    writer.close()
    (root / "config.json").write_text(json.dumps({"kind": "pretrain", "model": model.to_dict()}))
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("summaries")
    train, val = _write_data(root)
    source = _write_pretraining_workdir(root / "t5p")
    return {"train_path": train, "eval_path": val, "init_checkpoint": source}


# The run of the end-to-end tests: 12 steps, evaluated at 4, 8 and 12; beam search with two
# beams; evaluation batches of 2 rows, so the 3 evaluation pairs fill one and a padded one.
RUN = {
    "num_train_steps": 12,
    "eval_every_steps": 4,
    "log_every_steps": 1,
    "checkpoint_every_steps": 100,
    "batch_size": 4,
    "eval_batch_size": 2,
    "max_source_length": 24,
    "max_target_length": 8,
    "decode_max_length": 6,
    "beam_size": 2,
    "prng_impl": "rbg",
    "dropout_rate": 0.0,
    "optimizer.learning_rate": 0.01,
    # held_out_loss is the loop's generic evaluator (tests/test_finetune_loop.py); one fewer
    # program to compile here.
    "evaluators": [("summarization", None, {})],
}


def _config(files, **overrides):
    config = importlib.import_module("configs.summarization").get_config("tiny")
    for key, value in {**RUN, **files, **overrides}.items():
        value = str(value) if isinstance(value, os.PathLike) else value
        node = config
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def _rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------- config


def test_config_variants_keys_and_flags(files):
    module = importlib.import_module("configs.summarization")
    base, tiny = module.get_config("base"), module.get_config("tiny")
    assert base.kind == tiny.kind == "summarization"
    preflight.check_kind(tiny, "eval.py")
    # The reference's lengths and optimizer (t5-pegasus finetune.py), and the loop's keys.
    assert (base.max_source_length, base.max_target_length, base.decode_max_length) == (
        256,
        32,
        32,
    )
    assert (base.batch_size, base.optimizer.learning_rate, base.beam_size) == (32, 2e-4, 1)
    for key in ("mesh", "logical_axis_rules", "prng_impl", "keep_checkpoints", "accept_changes"):
        assert key in tiny, key
    assert tiny.optimizer.grad_accum_steps == 1 and tiny.best_metric == "summarization/rouge-l"
    assert tiny.model.family == "encoder_decoder"
    with pytest.raises(ValueError, match="unknown variant 'huge'"):
        module.get_config("huge")
    # eval.py's flags: overrides of the data keys, and a typo named with its close match.
    values = flags.FlagValues()
    spec = os.path.join(ROOT, "configs", "summarization.py") + ":tiny"
    argv = [
        "eval.py",
        f"--config={spec}",
        f"--config.train_path={files['train_path']}",
        "--config.format=jsonl",
        "--config.optimizer.grad_accum_steps=2",
    ]
    config_flags.DEFINE_config_file("config", None, "", values, lock_config=True, sys_argv=argv)
    cli.parse_flags(argv, values)
    parsed = values["config"].value
    assert parsed.train_path == str(files["train_path"]) and parsed.format == "jsonl"
    assert parsed.optimizer.grad_accum_steps == 2
    message = cli.describe_override_error(["eval.py", f"--config={spec}", "--config.beam_sise=2"])
    assert "did you mean beam_size" in message


# --------------------------------------------------------------------- errors at start


def test_errors_at_start_name_the_problem_and_write_nothing(tmp_path, files):
    workdir = tmp_path / "run"

    def fails(error, match, **overrides):
        with pytest.raises(error, match=match):
            summary_finetune.finetune_and_evaluate(_config(files, **overrides), str(workdir))
        assert not workdir.exists()

    fails(preflight.ConfigError, "train_path='': give a title<TAB>content", train_path="")
    fails(FileNotFoundError, "summarization file not found: .*nothing.tsv", eval_path="nothing.tsv")
    bad = tmp_path / "bad.tsv"
    bad.write_text("标题\t正文\n只有一列\n", encoding="utf-8")
    fails(summarization.SummaryFormatError, f"^{bad}:2: expected title<TAB>content", train_path=bad)
    fails(
        preflight.ConfigError,
        "best_metric='summarization/rouge-3'",
        best_metric="summarization/rouge-3",
    )
    fails(
        preflight.ConfigError,
        "best_metric='held_out_loss/loss'.*no evaluator",
        best_metric="held_out_loss/loss",
    )
    fails(preflight.ConfigError, "unknown evaluator 'superglue'", evaluators=[("superglue", 0, {})])
    fails(preflight.ConfigError, "entry 'summarization' is not", evaluators=["summarization"])
    fails(preflight.ConfigError, "is the init_checkpoint", init_checkpoint=str(workdir))
    # A model that is no encoder-decoder, here a decoder-only LM from config.model.
    vocab = files["init_checkpoint"] / "tokenizer" / "vocab.txt"
    config = _config(files, init_checkpoint="", tokenizer=str(vocab))
    config.model.family = "decoder"
    with pytest.raises(preflight.ConfigError, match="is a decoder model; summarization needs"):
        summary_finetune.finetune_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
    assert not workdir.exists()


@pytest.fixture(scope="module")
def env():
    return subprocess_env.one_device()


def test_eval_py_reports_a_malformed_file_in_one_line(tmp_path, files, env):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "正文", "title": "标题"}\n{"content": 3, "title": "x"}\n')
    command = [
        sys.executable,
        "eval.py",
        "--config=configs/summarization.py:tiny",
        f"--config.train_path={files['train_path']}",
        f"--config.eval_path={bad}",
        f"--workdir={tmp_path / 'run'}",
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"eval.py: error: {bad}:2: field 'content' is a int, not text"
    )
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- inputs


def test_inputs_are_cut_as_the_reference_encodes_them(files):
    """bert4keras ``tokenizer.encode(text, maxlen=n)``: ``[CLS] text [SEP]`` of at most n
    tokens, the text cut from the right; the decoder reads ``[CLS] title`` and predicts
    ``title [SEP]``. SentencePiece (no [CLS]): ``source EOS`` in, start id 0."""
    from test_superglue_finetune import ByteCodec

    tokenizer = JiebaBertTokenizer.load(files["init_checkpoint"] / "tokenizer" / "vocab.txt")
    codec = pretrained._bert_vocab_codec(files["init_checkpoint"] / "tokenizer" / "vocab.txt")
    cls, sep = tokenizer.vocab["[CLS]"], tokenizer.vocab["[SEP]"]
    examples = summarization.read_summaries(files["train_path"])[:2]
    config = _config(files, max_source_length=10, max_target_length=4)
    arrays = summary_finetune.summary_arrays(examples, codec, config)
    assert arrays["encoder_input_tokens"].shape == (2, 10)
    assert arrays["decoder_input_tokens"].shape == (2, 3)  # [CLS] title [SEP] <= 4
    for row, example in enumerate(examples):
        source = tokenizer.encode(example.source).tolist()
        title = tokenizer.encode(example.target).tolist()
        assert len(source) > 8 and len(title) > 2  # both are cut
        assert arrays["encoder_input_tokens"][row].tolist() == [cls, *source[:8], sep]
        assert arrays["decoder_input_tokens"][row].tolist() == [cls, *title[:2]]
        assert arrays["decoder_target_tokens"][row].tolist() == [*title[:2], sep]
    short = [summarization.SummaryExample(0, "ab", "c")]
    config = _config(files, max_source_length=6, max_target_length=4, source_prefix="s: ")
    arrays = summary_finetune.summary_arrays(short, ByteCodec(), config)
    byte = ByteCodec().encode
    assert arrays["encoder_input_tokens"].tolist() == [[*byte("s: ab")[:5], 1]]
    assert arrays["decoder_input_tokens"].tolist() == [[0, *byte("c"), 1]]
    assert arrays["decoder_target_tokens"].tolist() == [[*byte("c"), 1, 0]]
    assert arrays["decoder_loss_weights"].tolist() == [[1, 1, 0]]


# ------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, files):
    """The uninterrupted run, in this process on one device."""
    workdir = tmp_path_factory.mktemp("reference")
    metrics = summary_finetune.finetune_and_evaluate(
        _config(files), str(workdir), devices=jax.devices()[:1]
    )
    return workdir, metrics


def test_metrics_json_predictions_and_the_best_checkpoint(files, reference_run):
    workdir, metrics = reference_run
    with open(workdir / "metrics.json") as f:
        written = json.load(f)
    assert written == metrics
    assert sorted(written) == ["best_step", "bleu", "num_examples", "rouge-1", "rouge-2", "rouge-l"]
    predictions = _rows(workdir / "predictions" / "val.jsonl")
    assert [p["id"] for p in predictions] == ["val-0", "val-1", "val-2"]
    assert [p["reference"] for p in predictions] == [TITLES[1], TITLES[3], TITLES[5]]
    # The scores are those of the file's predictions ...
    rescored = summarization_metrics((p["reference"], p["prediction"]) for p in predictions)
    assert {k: written[k] for k in rescored} == rescored
    # ... and of the loop's evaluation of the best step, chosen by rouge-l (first on a tie).
    logged = {
        row["step"]: row
        for row in _rows(workdir / "metrics.jsonl")
        if "summarization/rouge-l" in row
    }
    assert sorted(logged) == [4, 8, 12]
    best_step = max(sorted(logged), key=lambda s: logged[s]["summarization/rouge-l"])
    assert written["best_step"] == best_step
    for name in ("rouge-1", "rouge-2", "rouge-l", "bleu"):
        assert written[name] == pytest.approx(logged[best_step][f"summarization/{name}"], abs=1e-12)
    assert checkpoint.complete_steps_on_disk(workdir / "best") == [best_step]
    assert checkpoint.complete_steps_on_disk(workdir / "checkpoints") == [12]


def test_evaluator_summaries_equal_a_beam_search_on_the_best_checkpoint(files, reference_run):
    """Independent of the evaluator's batching and arrays: each source encoded on its own
    as bert4keras does ([CLS] source [SEP], cut to max_c_len), decoded with two beams."""
    workdir, _ = reference_run
    config = _config(files)
    source = pretrained.load_source(config)
    model = build_model(source.cfg)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), source.params)
    best = best_lib.BestCheckpoint(str(workdir / "best"), config.best_metric)
    best.resume(0)
    params, _ = best.restore(abstract, {})
    best.close()
    tokenizer = JiebaBertTokenizer.load(files["init_checkpoint"] / "tokenizer" / "vocab.txt")
    cls, sep = tokenizer.vocab["[CLS]"], tokenizer.vocab["[SEP]"]
    predictions = _rows(workdir / "predictions" / "val.jsonl")
    texts = []
    for _, text in _pairs([1, 3, 5]):
        ids = [cls, *tokenizer.encode(text).tolist()[: config.max_source_length - 2], sep]
        out = decoding.generate(
            model,
            params,
            np.array([ids]),
            max_length=config.decode_max_length + 1,
            method="beam",
            beam_size=2,
            alpha=0.0,
            eos_id=sep,
            decoder_start_id=cls,
        )
        generated = np.asarray(out.sequences)[0, 0, 1:].tolist()
        generated = generated[: generated.index(sep)] if sep in generated else generated
        texts.append(tokenizer.decode(generated))
        assert len(ids) == config.max_source_length  # every source here is cut
    assert [p["prediction"] for p in predictions] == texts
    assert any(texts), "the fine-tuned model should say something"


# ------------------------------------------------------------------- SIGTERM and resume


def test_sigterm_then_the_same_run_ends_like_an_uninterrupted_one(
    tmp_path, files, reference_run, monkeypatch
):
    """A SIGTERM to this process during the evaluation at step 4 (a preemption notice) saves
    step 4 and stops; the same call again resumes there and ends with the reference's
    metrics, predictions and per-step scalars (eval.py exits 143 and resumes the same way:
    tests/test_finetune_loop.py)."""
    reference_dir, reference = reference_run
    workdir = tmp_path / "run"
    decode = summary_finetune.SummaryPredictor.__call__
    calls = []

    def decode_and_signal(self, variables, tokens):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return decode(self, variables, tokens)

    monkeypatch.setattr(summary_finetune.SummaryPredictor, "__call__", decode_and_signal)
    with pytest.raises(interrupts.StoppedBySignal, match="SIGTERM"):
        summary_finetune.finetune_and_evaluate(
            _config(files), str(workdir), devices=jax.devices()[:1]
        )
    monkeypatch.undo()
    assert checkpoint.complete_steps_on_disk(workdir / "checkpoints") == [4]
    assert not (workdir / "metrics.json").exists()

    resumed = summary_finetune.finetune_and_evaluate(
        _config(files), str(workdir), devices=jax.devices()[:1]
    )
    assert resumed == pytest.approx(reference, rel=1e-6)
    name = "predictions/val.jsonl"
    assert (workdir / name).read_text() == (reference_dir / name).read_text()
    resumed_rows, reference_rows = (
        _rows(workdir / "metrics.jsonl"),
        _rows(reference_dir / "metrics.jsonl"),
    )
    assert [r["step"] for r in resumed_rows if "loss" in r] == list(range(1, 13))  # each once
    for key in ("loss", "grad_norm", "summarization/rouge-l", "summarization/bleu"):
        got = [r[key] for r in resumed_rows if key in r]
        want = [r[key] for r in reference_rows if key in r]
        assert got == pytest.approx(want, rel=1e-6), key
