"""Resuming across ``model.scan_layers`` (``rope_jax.training.relayout``): a tiny T5 trained
two steps in one form, saved, and restored in the other takes the same next step (loss,
parameters and optimizer state) as the run continued in its own form."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from rope_jax import families, scanning
from rope_jax.models import build_model
from rope_jax.training import checkpoint, optim, relayout, sharding
from rope_jax.training import step as step_lib
from tests.test_models import init, tiny, tokens

CONFIG = dict(num_layers=2, num_decoder_layers=2)


def _batch():
    batch = {
        "encoder_input_tokens": tokens(2, 8),
        "decoder_input_tokens": tokens(2, 4, seed=1),
        "decoder_target_tokens": tokens(2, 4, seed=2),
        "decoder_loss_weights": np.ones((2, 4), np.float32),
        "encoder_segment_ids": np.ones((2, 8), np.int32),
        "decoder_segment_ids": np.ones((2, 4), np.int32),
        "encoder_positions": np.tile(np.arange(8, dtype=np.int32), (2, 1)),
        "decoder_positions": np.tile(np.arange(4, dtype=np.int32), (2, 1)),
    }
    return {k: np.asarray(v) for k, v in batch.items()}


class _Form:
    """One form's task, optimizer, abstract state, shardings and jitted train step."""

    def __init__(self, scan, optimizer):
        self.mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
        self.rules = sharding.DEFAULT_LOGICAL_AXIS_RULES
        config = optim.OptimizerConfig(
            name=optimizer, learning_rate=0.01, warmup_steps=1, weight_decay=0.1, momentum=0.5
        )
        self.tx, schedule = optim.make_optimizer(config, 10)
        self.task = families.for_model(build_model(tiny(**CONFIG, scan_layers=scan)))
        with self.context():
            self.abstract, self.shardings, self.init = step_lib.plan_state(
                self.task, self.tx, _batch(), jax.random.key(0), self.mesh, self.rules
            )
        step = step_lib.make_train_step(self.task, self.tx, schedule, grad_clip_norm=1.0)
        self.step = jax.jit(step)

    def context(self):
        mesh, rules = self.mesh, self.rules

        class Both:
            def __enter__(self):
                self.a, self.b = jax.set_mesh(mesh), nn.logical_axis_rules(rules)
                self.a.__enter__(), self.b.__enter__()

            def __exit__(self, *exc):
                self.b.__exit__(*exc), self.a.__exit__(*exc)

        return Both()

    def train(self, state, steps):
        loss = None
        with self.context():
            for _ in range(steps):
                state, metrics = self.step(state, _batch(), jax.random.key(1))
                loss = float(metrics["loss"])
        return state, loss


def _per_layer(tree):
    return jax.tree.map(np.asarray, scanning.unstack_layers(jax.device_get(tree)))


def _resume_in_the_other_form(tmp_path, monkeypatch, saved_form, resumed_form):
    with saved_form.context():
        state = saved_form.init(jax.random.key(0))
    state, _ = saved_form.train(state, 2)
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", async_save=False)
    ckpt.save(2, state, {})
    continued, want_loss = saved_form.train(state, 1)

    abstract = checkpoint.abstract_with_shardings(resumed_form.abstract, resumed_form.shardings)
    messages = []
    monkeypatch.setattr(
        relayout.logging,
        "info",
        lambda msg, *args: messages.append(str(msg) % args if args else str(msg)),
    )
    with resumed_form.context():
        restored, _ = relayout.restore(ckpt, 2, abstract, resumed_form.tx)
    ckpt.close()
    assert any("Converted the train state" in m for m in messages), messages
    assert jax.tree.structure(restored) == jax.tree.structure(resumed_form.abstract)
    resumed, got_loss = resumed_form.train(restored, 1)

    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    jax.tree.map(
        lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6),
        _per_layer(resumed.params),
        _per_layer(continued.params),
    )
    # And back: the resumed form's optimizer state, converted to the saved form, is the
    # continued run's (every moment and count, not only what the next step read).
    back = relayout.convert(jax.device_get(resumed), jax.device_get(continued))
    jax.tree.map(
        lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6),
        back.opt_state,
        jax.device_get(continued.opt_state),
    )


def test_resume_in_the_other_form_takes_the_same_step(tmp_path, monkeypatch):
    """Both directions with Adafactor (factored and full-size moments, per-layer counts);
    the two forms' train steps are compiled once and serve both directions."""
    loop, scan = _Form(False, "adafactor"), _Form(True, "adafactor")
    _resume_in_the_other_form(tmp_path / "loop_to_scan", monkeypatch, loop, scan)
    _resume_in_the_other_form(tmp_path / "scan_to_loop", monkeypatch, scan, loop)


def test_adamw_state_converts_both_ways_layer_by_layer():
    """AdamW's moments and count between the forms, without training: every per-layer
    moment lands in its slice of the stacked one and comes back unchanged."""
    config = optim.OptimizerConfig(name="adamw", learning_rate=0.01, weight_decay=0.1)
    tx, _ = optim.make_optimizer(config, 10)
    model = build_model(tiny(**CONFIG))
    params = init(model, tokens(2, 8), tokens(2, 4, seed=1))["params"]
    rng = np.random.default_rng(0)
    state = jax.tree.map(
        lambda x: (
            np.asarray(rng.normal(size=np.shape(x)), np.asarray(x).dtype)
            if np.issubdtype(np.asarray(x).dtype, np.floating)
            else np.asarray(x)
        ),
        tx.init(params),
    )
    stacked_params = scanning.stack_layers(params)
    stacked_tx, _ = optim.make_optimizer(config, 10)
    stacked_like = jax.eval_shape(stacked_tx.init, stacked_params)
    stacked = relayout.convert(state, stacked_like)
    assert jax.tree.structure(stacked) == jax.tree.structure(stacked_like)
    back = relayout.convert(stacked, state)
    jax.tree.map(np.testing.assert_array_equal, back, state)
    mu = state[0].mu["decoder"]
    stacked_mu = stacked.inner_states["layers"].inner_state[0].mu["decoder"]["layers"]
    np.testing.assert_array_equal(
        stacked_mu["mlp"]["wo"]["kernel"][1], mu["layers_1"]["mlp"]["wo"]["kernel"]
    )


def test_a_state_that_cannot_be_converted_names_both_settings(tmp_path):
    saved_form = _Form(False, "adafactor")
    with saved_form.context():
        state = saved_form.init(jax.random.key(0))
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", async_save=False)
    ckpt.save(1, state, {})
    # Three layers per stack scanned: the checkpoint's two cannot be stacked into three.
    task = families.for_model(
        build_model(tiny(num_layers=3, num_decoder_layers=3, scan_layers=True))
    )
    with saved_form.context():
        abstract, shardings, _ = step_lib.plan_state(
            task, saved_form.tx, _batch(), jax.random.key(0), saved_form.mesh, saved_form.rules
        )
    abstract = checkpoint.abstract_with_shardings(abstract, shardings)
    with pytest.raises(checkpoint.CheckpointError) as error:
        relayout.restore(ckpt, 1, abstract, saved_form.tx)
    ckpt.close()
    message = str(error.value)
    assert "model.scan_layers=False" in message and "model.scan_layers=True" in message
    assert "--config.model.scan_layers=False" in message


def test_layouts_are_read_from_paths():
    assert relayout.layout_of_names(["params/encoder/layers_0/mlp/wo/kernel"]) == "per-layer"
    assert relayout.layout_of_names(["params/encoder/layers/mlp/wo/kernel"]) == "stacked"
    assert relayout.layout_of_names(["params/lm_head/kernel"]) is None
    tree = {"a": {"layers_0": {"w": np.zeros(2)}, "layers_1": {"w": np.ones(2)}}}
    stacked = relayout.convert(tree, scanning.stack_layers(tree))
    np.testing.assert_array_equal(stacked["a"]["layers"]["w"], [[0, 0], [1, 1]])
    back = relayout.convert(stacked, tree)
    np.testing.assert_array_equal(back["a"]["layers_1"]["w"], [1, 1])
    assert dataclasses.is_dataclass(step_lib.TrainState)
