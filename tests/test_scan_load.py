"""Reading weights across ``scan_layers`` outside train.py's resume: the pretrained weights a
fine-tune or an evaluation starts from (``evaluation.pretrained``), a fine-tune's best
checkpoint (``training.best``), and eval.py's fine-tune from a train.py workdir written in
the other form. The converted weights give the same logits as the originals; two-layer tiny
models."""

import dataclasses
import json
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from rope_jax import families, scanning
from rope_jax.evaluation import pretrained
from rope_jax.models import build_model
from rope_jax.training import best as best_lib
from rope_jax.training import checkpoint, relayout
from tests.test_models import init, tiny, tokens

# Performer attention: the layers also hold "random_features", which convert with the params.
T5_PERFORMER = dict(
    num_layers=2, num_decoder_layers=2, attention="performer", position="rope", max_length=32
)


def _args():
    return tokens(2, 6).at[1, 4:].set(0), tokens(2, 5, seed=1)


def _logits(cfg, variables):
    return jax.jit(build_model(cfg).apply)(variables, *_args())


def _source_variables(scan: bool):
    cfg = tiny(**T5_PERFORMER, scan_layers=scan)
    variables = init(build_model(cfg), *_args())
    assert relayout.layout_of(variables[families.RANDOM_FEATURES]) is not None
    return cfg, variables


def _capture_info(monkeypatch, module):
    messages = []
    monkeypatch.setattr(
        module.logging,
        "info",
        lambda msg, *args: messages.append(str(msg) % args if args else str(msg)),
    )
    return messages


def _load(source_scan: bool, scan_layers, monkeypatch):
    cfg, variables = _source_variables(source_scan)
    source = pretrained.Source(
        cfg, variables["params"], variables[families.RANDOM_FEATURES], None, "runs/pt/7"
    )
    config = ml_collections.ConfigDict(
        {"dropout_rate": None, "scan_layers": scan_layers, "seed": 0}
    )
    messages = _capture_info(monkeypatch, pretrained)
    tm = pretrained.load_for_task("CB", config, source=source)
    converted = [m for m in messages if m.startswith("Converted the pretrained weights")]
    return cfg, variables, tm, converted


def test_pretrained_weights_of_the_loop_fine_tune_scanned(monkeypatch):
    """``config.scan_layers`` of a fine-tune picks the form; the checkpoint's params and
    random features are stacked to it, it is logged, and the logits are the checkpoint's."""
    cfg, variables, tm, converted = _load(False, True, monkeypatch)
    assert tm.cfg.scan_layers is True
    assert relayout.layout_of(tm.params) == relayout.STACKED
    assert relayout.layout_of(tm.random_features) == relayout.STACKED
    assert len(converted) == 2, converted  # params, then random features
    assert converted[0] == (
        "Converted the pretrained weights: runs/pt/7 holds per-layer layers (written with "
        "scan_layers=False) and this model has scan_layers=True, so they were stacked."
    )
    logits = _logits(tm.cfg, {"params": tm.params, families.RANDOM_FEATURES: tm.random_features})
    np.testing.assert_allclose(logits, _logits(cfg, variables), rtol=1e-5, atol=1e-5)


def test_pretrained_scanned_weights_fine_tune_with_the_loop_or_as_written(monkeypatch):
    _, variables, tm, converted = _load(True, False, monkeypatch)
    assert tm.cfg.scan_layers is False and len(converted) == 2
    assert "so they were unstacked" in converted[0]
    want = {name: scanning.unstack_layers(tree) for name, tree in variables.items()}
    jax.tree.map(np.testing.assert_array_equal, tm.params, want["params"])
    jax.tree.map(np.testing.assert_array_equal, tm.random_features, want[families.RANDOM_FEATURES])
    # None keeps the checkpoint's form (as does every config without the key).
    config = ml_collections.ConfigDict({"dropout_rate": 0.2, "scan_layers": None})
    assert pretrained.task_model_config(tm.cfg, config) == dataclasses.replace(
        tm.cfg, dropout_rate=0.2
    )


def test_a_checkpoint_that_does_not_fit_after_converting_names_both_forms():
    _, variables = _source_variables(False)  # two layers per stack
    bigger = tiny(**{**T5_PERFORMER, "num_layers": 3, "num_decoder_layers": 3}, scan_layers=True)
    fresh = jax.eval_shape(lambda: init(build_model(bigger), *_args()))["params"]
    with pytest.raises(ValueError) as error:
        pretrained.merge_pretrained(fresh, variables["params"], "runs/pt/7")
    message = str(error.value)
    assert "runs/pt/7 holds per-layer layers (written with scan_layers=False)" in message
    assert "this model has scan_layers=True" in message
    assert "--config.scan_layers=False" in message and "(3," in message


def test_best_checkpoint_restores_in_the_other_form(tmp_path, monkeypatch):
    """A best step saved by one form of a fine-tune, restored by a resumed start in the
    other (with ``runner.final_params``' abstract trees): the same arrays, stacked or
    unstacked (whose logits are the same: ``test_scan_layers``); both directions."""
    messages = _capture_info(monkeypatch, relayout)
    for saved_scan in (False, True):
        _, variables = _source_variables(saved_scan)
        directory = str(tmp_path / f"best_{saved_scan}")
        best = best_lib.BestCheckpoint(directory, "acc")
        features = variables[families.RANDOM_FEATURES]
        state = types.SimpleNamespace(params=variables["params"], random_features=features)
        assert best.update(4, state, {"acc": 0.5})
        best.close()

        flip = scanning.unstack_layers if saved_scan else scanning.stack_layers
        other = {name: jax.device_put(flip(tree)) for name, tree in variables.items()}
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), other
        )
        resumed = best_lib.BestCheckpoint(directory, "acc")
        resumed.resume(4)
        messages.clear()
        params, random_features = resumed.restore(
            abstract["params"], abstract[families.RANDOM_FEATURES]
        )
        resumed.close()
        assert any("Converted the parameters and random features" in m for m in messages)
        assert any(f"written with scan_layers={saved_scan}." in m for m in messages), messages
        assert jax.tree.structure(params) == jax.tree.structure(other["params"])
        jax.tree.map(np.testing.assert_array_equal, params, other["params"])
        jax.tree.map(
            np.testing.assert_array_equal, random_features, other[families.RANDOM_FEATURES]
        )


def test_eval_fine_tunes_scanned_from_a_workdir_pretrained_with_the_loop(tmp_path, monkeypatch):
    """The user path: ``finetune_and_evaluate`` (what eval.py runs) with
    ``scan_layers=True`` and ``init_checkpoint`` a train.py workdir whose checkpoint holds
    per-layer weights: it converts them, says so, and trains and checkpoints scanned."""
    from rope_jax.evaluation import finetune
    from rope_jax.model_config import model_config_from_dict
    from tests.test_superglue_finetune import _config, _fixture_data

    data = tmp_path / "data"
    _fixture_data(data)
    config = _config(data, "encoder")
    config.model.num_layers = 2
    config.num_train_steps = 1
    config.checkpoint_every_steps = 1
    config.evaluators = []  # the final evaluation of val and test only

    # The pretraining run: a per-layer encoder (MLM head), its recorded config and one step.
    pretrain = tmp_path / "pretrain"
    record = {"model": config.model.to_dict(), "tokenizer": {"kind": "bytes"}}
    (pretrain / "checkpoints").mkdir(parents=True)
    (pretrain / "config.json").write_text(json.dumps(record))
    task = families.for_model(build_model(model_config_from_dict(record["model"])))
    shapes = jax.eval_shape(lambda: nn.unbox(task.init(task.init_rngs(jax.random.key(3)))))
    rng = np.random.default_rng(3)
    params = jax.tree.map(
        lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), shapes["params"]
    )
    saver = checkpoint.Checkpointer(pretrain / "checkpoints", async_save=False)
    saver.save(5, {"params": params}, {})
    saver.close()

    config.init_checkpoint = str(pretrain)
    config.scan_layers = True
    messages = _capture_info(monkeypatch, pretrained)
    workdir = tmp_path / "run"
    results = finetune.finetune_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
    assert np.isfinite(results["CB"]["final_train_loss"])
    converted = [m for m in messages if m.startswith("Converted the pretrained weights")]
    assert converted and "per-layer layers (written with scan_layers=False)" in converted[0]
    assert "this model has scan_layers=True" in converted[0], messages
    saved = checkpoint.saved_shapes(workdir / "CB" / "checkpoints" / "1")
    assert relayout.layout_of_names(saved) == relayout.STACKED
    assert saved["params/encoder/layers/mlp/wo/kernel"][0] == 2


@pytest.mark.parametrize("source_scan", [False, True])
def test_fewshot_task_loads_pretrained_weights_in_the_other_form(
    tmp_path, source_scan, monkeypatch
):
    """PET / P-tuning (``fewshot.build_task``) with ``scan_layers`` set against the
    checkpoint's form: the LM's weights are converted (and it says so), and converting them
    back gives the checkpoint's weights exactly; None keeps the checkpoint's form."""
    from rope_jax.evaluation import fewshot
    from tests.test_fewshot_run import _config
    from tests.test_fewshot_scoring import ByteCodec

    config = _config(tmp_path, "pet")
    config.model.num_layers = 2
    config.model.scan_layers = source_scan
    cfg = pretrained._model_config(config.model)
    source_params = init(build_model(cfg), tokens(1, 4))["params"]
    assert relayout.layout_of(source_params) == (
        relayout.STACKED if source_scan else relayout.PER_LAYER
    )
    source = pretrained.Source(cfg, source_params, None, ByteCodec(), "runs/pt/3")

    config.scan_layers = None
    _, kept, _ = fewshot.build_task("RTE", config, source)
    config.scan_layers = not source_scan
    messages = _capture_info(monkeypatch, pretrained)
    task_obj, converted, _ = fewshot.build_task("RTE", config, source)
    assert task_obj.inner.model.config.scan_layers is (not source_scan)
    assert relayout.layout_of(kept) == relayout.layout_of(source_params)
    assert relayout.layout_of(converted) != relayout.layout_of(source_params)
    said = [m for m in messages if m.startswith("Converted the pretrained weights")]
    assert said and f"this model has scan_layers={not source_scan}" in said[0], messages
    back, _ = relayout.to_layout_of(converted, source_params)
    flat_back, flat_source = (traverse_util.flatten_dict(t) for t in (back, source_params))
    assert set(flat_back) == set(flat_source)
    for name, value in flat_source.items():
        np.testing.assert_array_equal(np.asarray(flat_back[name]), np.asarray(value))
