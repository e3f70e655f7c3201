"""Configs: overrides and their errors, flag parsing, and a 2-step run of every job family
at its tiny variant on the embedded corpus (the path ``train.py`` takes)."""

import importlib
import json
import os
import shlex
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from training_toys import enable_compilation_cache, restore_compilation_cache

from configs import common
from rope_jax.data import embedded
from rope_jax.training import checkpoint, trainer

FAMILIES = ("roformer", "mt5", "pegasus", "t5_pegasus", "decoder")
# Small enough to compile in seconds; everything else is the tiny variant as shipped.
SHRINK = (
    "num_train_steps=2,batch_size=4,inputs_length=32,num_layers=1,log_every_steps=1,"
    "checkpoint_every_steps=2,eval_every_steps=2,eval_steps=1,measure_matmul_peak=False"
)
# Held-out evaluation compiles a third program; two families (one per model call) cover it.
WITH_EVAL = ("roformer", "mt5")
# Gap sentences and pseudo-summaries default to targets of half the input length.
# The decoder run also covers mixed precision (bfloat16 compute, float32 params), scanned
# layers with a named remat policy and the MFU column (against the matmul rate measured at
# start-up).
EXTRA = {
    "pegasus": "targets_length=8",
    "t5_pegasus": "targets_length=8",
    "decoder": "dtype=bfloat16,remat=save_dots,scan_layers=True,measure_matmul_peak=True",
}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    previous = enable_compilation_cache(tmp_path_factory.mktemp("xla_cache"))
    yield
    restore_compilation_cache(previous)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """The tiny configs' tokenizer, trained once and copied into each run's workdir."""
    workdir = tmp_path_factory.mktemp("tokenizer_cache")
    embedded.load_or_train_tokenizer(workdir, vocab_size=2048, num_extra_ids=100)
    return workdir / "tokenizer"


def load(family, arg):
    return importlib.import_module(f"configs.{family}").get_config(arg)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_has_driver_keys_and_variants(family):
    for variant in ("tiny", "small", "base"):
        config = load(family, variant)
        for key in (
            "num_train_steps",
            "log_every_steps",
            "checkpoint_every_steps",
            "eval_every_steps",
            "seed",
        ):
            assert isinstance(config[key], int), key
    module = importlib.import_module(f"configs.{family}")
    assert f"--config=configs/{family}.py:tiny" in module.__doc__


def test_base_presets_scan_where_it_measured_better():
    """README "Start-up by depth": scanned at the base size of RoFormer and the decoder-only
    LM (start-up below the loop's, step within 5 %); elsewhere the loop, which still reads
    as an override."""
    scanned = {("roformer", "base"), ("decoder", "base")}
    for family in ("mt5", "t5_pegasus", "roformer", "decoder", "pegasus"):
        for variant in ("tiny", "small", "base"):
            want = (family, variant) in scanned
            assert load(family, variant).model.scan_layers is want, (family, variant)
    assert load("roformer", "base,scan_layers=False").model.scan_layers is False


def test_overrides_resolve_and_errors_name_the_key():
    config = load("mt5", "tiny,attention=performer,pack=False,optimizer.learning_rate=3e-3")
    assert config.model.attention == "performer" and config.data.pack is False
    assert config.optimizer.learning_rate == 3e-3
    with pytest.raises(KeyError, match="atention"):
        load("mt5", "tiny,atention=performer")
    with pytest.raises(TypeError, match="num_layers"):
        load("mt5", "tiny,num_layers=two")
    with pytest.raises(ValueError, match="huge"):
        load("mt5", "huge")


def _parse_flags(*args, config="roformer.py:tiny"):
    """What train.py does with its command line, on a private FlagValues."""
    path = os.path.join(os.path.dirname(__file__), "..", "configs", config)
    argv = ["train.py", f"--config={path}", *args]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=values, lock_config=True, sys_argv=argv
    )
    values(argv)
    return values.config


def test_flags_reject_unknown_key_and_wrong_type():
    for bad, name in (
        ("--config.model.num_layer=3", "num_layer"),
        ("--config.model.num_layers=abc", "num_layers"),
        ("--config.optimizer.nme=adamw", "nme"),
    ):
        with pytest.raises(Exception, match=name):
            _parse_flags(bad)
    assert _parse_flags("--config.model.num_layers=3").model.num_layers == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_docstring_launch_commands_start(family):
    """Every launch command in a config's docstring parses and passes the model checks."""
    doc = importlib.import_module(f"configs.{family}").__doc__.replace("\\\n", " ")
    lines = [line for line in doc.splitlines() if "python train.py" in line]
    assert lines
    for line in lines:
        argv = shlex.split(line.strip())
        config_arg = next(a for a in argv if a.startswith("--config=configs/"))
        overrides = [a for a in argv if a.startswith("--config.")]
        config = _parse_flags(*overrides, config=config_arg.removeprefix("--config=configs/"))
        trainer.build_model(config)


def _run(family, arg, workdir, tokenizer_dir):
    variant, _, overrides = arg.partition(",")
    config = load(family, ",".join(p for p in (variant, SHRINK, overrides) if p))
    config.lock()
    if config.tokenizer.kind == "sentencepiece":  # jieba_bert builds its vocab.txt (seconds)
        shutil.copytree(tokenizer_dir, workdir / "tokenizer")
    return trainer.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])


@pytest.mark.parametrize("family", FAMILIES)
def test_two_steps_on_the_embedded_corpus(family, tmp_path, tokenizer_dir):
    arg = "tiny" if family in WITH_EVAL else "tiny,eval_steps=0"
    if family in EXTRA:
        arg += "," + EXTRA[family]
    result = _run(family, arg, tmp_path, tokenizer_dir)
    assert sorted(result.history) == [1, 2]
    assert all(np.isfinite(m["loss"]) and m["loss"] > 0 for m in result.history.values())
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert {r["step"] for r in records} == {1, 2}
    # The time to the first step (tracing and compilation included) is in the first record.
    assert records[0]["step"] == 1 and records[0]["compile_seconds"] > 0
    assert not any("compile_seconds" in r for r in records[1:])
    if "measure_matmul_peak=True" in arg:
        # Step 1 compiles: its window has no timing, so no throughput (not a bogus one).
        step_1, step_2 = sorted((r for r in records if "loss" in r), key=lambda r: r["step"])
        assert "tokens_per_sec" not in step_1 and "mfu" not in step_1
        # The matmul peak is measured once at start; on a shared machine the load can
        # change before step 2, so MFU can come out a little above 1. Counting the
        # compiling step's window gave over 100x.
        assert step_2["tokens_per_sec"] > 0 and 0 < step_2["mfu"] < 5
    if family in WITH_EVAL:
        assert sorted(result.eval_history) == [2] and np.isfinite(result.eval_history[2]["loss"])
        assert any("eval_loss" in r for r in records)
    assert os.path.isdir(tmp_path / "checkpoints" / "2")
    params = jax.tree.leaves(result.state.params)
    assert all(p.dtype == jnp.float32 for p in params), "params are stored in float32"


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.schedule=cosin", "optimizer.schedule"),
        ("optimizer.name=adam", "optimizer.name"),
        ("mesh.tensor=3", "mesh"),
        ("batch_size=6,mesh.data=4", "batch_size=6"),
        ("position=learned,max_length=64", "learned"),
    ],
)
def test_config_errors_come_before_the_corpus_is_read(tmp_path, override, message):
    """A bad optimizer or mesh setting stops the job before a tokenizer is trained on (here:
    a missing) corpus, which can take minutes on a real one."""
    config = load("decoder", f"tiny,paths={tmp_path}/missing/*.txt,{override}")
    with pytest.raises(ValueError, match=message):
        trainer.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:4])


def test_performer_features_are_redrawn(tmp_path, tokenizer_dir):
    # Scanned layers: the features are one stacked [layers, M, D] array per stack.
    arg = (
        "tiny,attention=performer,pack=False,num_features=16,redraw_features_every=1,"
        "eval_steps=0,scan_layers=True"
    )
    result = _run("roformer", arg + ",checkpoint_every_steps=1", tmp_path, tokenizer_dir)
    assert jax.tree.leaves(result.state.random_features), "performer keeps random features"
    # Checkpoint 1 holds the initial draw (no redraw before the first update); the second
    # step (index 1) redrew it, so checkpoint 2 differs. Only redraws change these arrays.
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints")
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), result.state
    )
    first, _ = ckpt.restore(1, abstract)
    second, _ = ckpt.restore(2, abstract)
    ckpt.close()
    for before, after in zip(
        jax.tree.leaves(first.random_features),
        jax.tree.leaves(second.random_features),
        strict=True,
    ):
        assert before.shape == (1, 16, 32)
        assert not np.allclose(np.asarray(before), np.asarray(after))


def test_common_defaults_are_complete():
    config = common.base_config()
    assert config.optimizer.name == "adamw" and config.mesh.data == -1


def test_loaded_tokenizer_keeps_its_extra_ids_in_a_padded_vocabulary(tmp_path, tokenizer_dir):
    """mT5's layout: spiece.model + 100 extra ids, embedding padded beyond (250100 in 250112).
    Sentinels count down from the tokenizer's end, not the model's padded vocabulary."""
    spm_path = str(tokenizer_dir / "spm.model")
    config = load("mt5", "tiny,vocab_size=2060")
    config.tokenizer.path = spm_path
    tokenizer = trainer.build_tokenizer(config, str(tmp_path))
    assert tokenizer.vocab_size == 2048 and tokenizer.sentinel_id(0) == 2047
    config = load("mt5", "tiny,vocab_size=2000")
    config.tokenizer.path = spm_path
    with pytest.raises(ValueError, match="model.vocab_size=2000"):
        trainer.build_tokenizer(config, str(tmp_path))
