"""Optimizer pieces against hand formulas: schedules, clipping, decay mask, AdamW's decoupled
decay, Adafactor against optax's and its stacked form against ``jax.vmap`` of it, gradient
accumulation equal to the big-batch gradient, and the MFU denominator."""

import math
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from training_toys import ToyEncoder, ToyMLMIterator

from configs import common
from rope_jax.training import adafactor, losses, metrics, optim, sharding, step


def _schedule(name, **kw):
    args = dict(learning_rate=0.5, schedule=name, warmup_steps=10, decay_steps=110)
    args.update(kw)
    return optim.learning_rate_schedule(**args)


@pytest.mark.parametrize("name", optim.SCHEDULES)
def test_schedules_match_hand_formulas(name):
    fn = _schedule(name, end_factor=0.2, rsqrt_timescale=10)
    peak, end = 0.5, 0.1
    for s in [0, 3, 10, 35, 60, 110, 200]:
        if s < 10:
            want = peak * s / 10
        elif name == "constant":
            want = peak
        elif name == "cosine":
            done = min((s - 10) / 100, 1.0)
            want = end + (peak - end) * 0.5 * (1 + math.cos(math.pi * done))
        elif name == "linear":
            want = peak + (end - peak) * min((s - 10) / 100, 1.0)
        else:
            want = peak * math.sqrt(10 / max(s, 10))
        assert float(fn(s)) == pytest.approx(want, rel=1e-6, abs=1e-7), (name, s)


def test_t5_rsqrt_schedule():
    fn = optim.learning_rate_schedule(
        learning_rate=0.01, schedule="rsqrt", warmup_steps=0, decay_steps=1, rsqrt_timescale=10_000
    )
    for s in [0, 5_000, 10_000, 40_000]:
        assert float(fn(s)) == pytest.approx(1 / math.sqrt(max(s, 10_000)), rel=1e-6)


def test_unknown_schedule_names_choices():
    with pytest.raises(ValueError, match="cosine"):
        _schedule("exp")


def test_clip_by_global_norm():
    grads = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[4.0]])}
    clipped, norm = optim.clip_by_global_norm(grads, 1.0)
    assert float(norm) == pytest.approx(5.0)
    np.testing.assert_allclose(clipped["a"], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(clipped["b"], [[0.8]], rtol=1e-6)
    unclipped, _ = optim.clip_by_global_norm(grads, 10.0)
    np.testing.assert_allclose(unclipped["a"], grads["a"])
    off, norm_off = optim.clip_by_global_norm(grads, 0.0)
    np.testing.assert_allclose(off["b"], grads["b"])
    assert float(norm_off) == pytest.approx(5.0)


def _toy_params():
    init = jax.jit(lambda key: ToyEncoder().init(key, jnp.zeros((1, 4), jnp.int32)))
    return nn.unbox(init(jax.random.key(0)))["params"]


def test_decay_mask_excludes_norms_and_biases():
    shapes = jax.eval_shape(lambda: ToyEncoder().init(jax.random.key(0), jnp.zeros((1, 4), int)))
    mask = optim.decay_mask(nn.unbox(shapes)["params"])
    assert mask["embedding"] and mask["wi"]["kernel"] and mask["wo"]["kernel"]
    assert not mask["wi"]["bias"] and not mask["final_norm"]["scale"]
    assert not mask["final_norm"]["bias"]
    # A matrix under a norm-named scope is excluded by the pattern.
    assert not optim.decay_mask({"layer_norm": {"w": jnp.ones((2, 2))}})["layer_norm"]["w"]


def test_adamw_decay_is_decoupled_and_masked():
    config = common.base_config().optimizer
    config.update(learning_rate=0.1, schedule="constant", warmup_steps=0, weight_decay=0.5)
    tx, _ = optim.make_optimizer(config, num_train_steps=10)
    params = _toy_params()
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zero_grads, tx.init(params), params)
    # Zero gradient: Adam's direction is 0, so the update is -lr * wd * p where decayed.
    np.testing.assert_allclose(
        updates["wi"]["kernel"], -0.1 * 0.5 * params["wi"]["kernel"], rtol=1e-6
    )
    np.testing.assert_allclose(updates["final_norm"]["scale"], 0.0)
    np.testing.assert_allclose(updates["wi"]["bias"], 0.0)


def test_adafactor_builds_and_steps():
    config = common.base_config().optimizer
    config.update(name="adafactor", learning_rate=0.01, schedule="rsqrt", warmup_steps=0)
    config.rsqrt_timescale = 100
    config.weight_decay = 0.0
    tx, _ = optim.make_optimizer(config, num_train_steps=10)
    params = _toy_params()
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    assert float(jnp.max(updates["wi"]["kernel"])) < 0


def test_grad_accumulation_equals_big_batch_gradient():
    """SGD(lr=1) turns the update into -grad; microbatches hold different token counts."""
    model = ToyEncoder(dropout_rate=0.0)
    batch = next(ToyMLMIterator(8, length=12))
    counts = batch["loss_weights"].reshape(2, 4, 12).swapaxes(0, 1).sum(axis=(1, 2))
    assert counts[0] != counts[1]  # rows 0,2,4,6 vs 1,3,5,7: unequal weights per microbatch
    tx = optax.sgd(1.0)
    schedule = lambda s: jnp.float32(1.0)
    results = []
    key = jax.random.key(0)
    params = nn.unbox(jax.jit(lambda k: step.init_variables(model, batch, k))(key))["params"]
    for accum in (1, 2):
        state = step.TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            random_features={},
            rng=jax.random.key_data(key),
        )
        train_step = step.make_train_step(
            model, tx, schedule, grad_clip_norm=0.0, grad_accum_steps=accum
        )
        new_state, metrics = jax.jit(train_step)(state, batch, key)
        grads = jax.tree.map(lambda new, old: old - new, new_state.params, params)
        results.append((grads, float(metrics["loss"]), float(metrics["num_target_tokens"])))

    # Independent reference: optax's cross entropy on the whole batch, weighted mean.
    def reference_loss(params):
        logits = model.apply(
            {"params": params}, batch["input_tokens"], positions=batch["positions"]
        )
        per_token = optax.softmax_cross_entropy_with_integer_labels(logits, batch["target_tokens"])
        weights = batch["loss_weights"]
        return jnp.sum(per_token * weights) / jnp.sum(weights)

    ref_loss, ref_grads = jax.jit(jax.value_and_grad(reference_loss))(params)
    assert results[0][1] == pytest.approx(float(ref_loss), rel=1e-5)
    for got, want in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
    for grads, loss, tokens in results[1:]:
        assert loss == pytest.approx(results[0][1], rel=1e-5)
        assert tokens == results[0][2]
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(results[0][0]), strict=True):
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)


def test_weighted_cross_entropy_matches_float64_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)) * 3
    targets = rng.integers(0, 7, (2, 5))
    weights = rng.integers(0, 2, (2, 5)).astype(np.float64)
    got = losses.weighted_cross_entropy(
        jnp.asarray(logits, jnp.float32), jnp.asarray(targets), jnp.asarray(weights), z_loss=1e-2
    )
    shifted = logits - logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(-1)) + logits.max(-1)
    ce = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    want_ce = (ce * weights).sum()
    want_z = (1e-2 * log_z**2 * weights).sum()
    assert float(got["cross_entropy_sum"]) == pytest.approx(want_ce, rel=1e-5)
    assert float(got["z_loss_sum"]) == pytest.approx(want_z, rel=1e-5)
    assert float(got["loss_sum"]) == pytest.approx(want_ce + want_z, rel=1e-5)
    assert float(got["weight_sum"]) == weights.sum()
    assert float(got["correct_sum"]) == ((logits.argmax(-1) == targets) * weights).sum()


def test_mesh_shape_fills_and_checks():
    assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
    assert sharding.mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="needs 4 devices"):
        sharding.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)


@pytest.mark.parametrize("platform,warns", [("cpu", False), ("gpu", True)])
def test_mesh_without_a_topology_rule_uses_the_listed_order(monkeypatch, platform, warns):
    """Where mesh_utils has no topology rule for the devices, the mesh takes them in listed
    order; on accelerators (where the order decides which links the tensor axis uses) the
    run logs a warning naming the mesh and the fix."""

    def no_rule(shape, devices):
        raise NotImplementedError("no rule for this topology")

    warnings = []
    monkeypatch.setattr(sharding.mesh_utils, "create_device_mesh", no_rule)
    monkeypatch.setattr(sharding, "Mesh", lambda grid, axes: (grid, axes))
    monkeypatch.setattr(sharding.logging, "warning", lambda msg, *a: warnings.append(msg % a))
    devices = [types.SimpleNamespace(id=i, platform=platform, device_kind="kind") for i in range(8)]
    grid, axes = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 2}, devices)
    assert axes == sharding.MESH_AXES
    assert [d.id for d in grid.reshape(-1)] == list(range(8)) and grid.shape == (2, 2, 2)
    assert len(warnings) == int(warns)
    if warns:
        assert "no rule for this topology" in warnings[0] and "config.mesh" in warnings[0]
    with pytest.raises(ValueError, match="unknown axes"):
        sharding.mesh_shape({"data": -1, "model": 2}, 8)


def test_mfu_peak_counts_every_accelerator_and_each_cpu_host_once():
    def devices(platform, per_process, processes):
        return [
            types.SimpleNamespace(platform=platform, process_index=p)
            for p in range(processes)
            for _ in range(per_process)
        ]

    # The step's FLOPs are the global batch's: 8 GPUs on 2 hosts compute 8x one GPU's rate.
    assert metrics.total_matmul_peak(100.0, devices("gpu", 4, 2)) == 800.0
    assert metrics.total_matmul_peak(100.0, devices("tpu", 4, 1)) == 400.0
    # Simulated CPU devices share one host's cores: once per process.
    assert metrics.total_matmul_peak(100.0, devices("cpu", 8, 1)) == 100.0
    assert metrics.total_matmul_peak(100.0, devices("cpu", 2, 3)) == 300.0
    assert metrics.total_matmul_peak(100.0, jax.devices()) == 100.0


@pytest.mark.parametrize("momentum,weight_decay", [(None, None), (0.9, 0.01)])
def test_adafactor_matches_optax_adafactor(momentum, weight_decay):
    """Same chain, state tree and updates as optax.adafactor: the product-based statistics
    are the same means and RMS values."""
    rng = np.random.default_rng(0)
    shapes = {
        "matrix": (130, 200),  # factored, reduce over both axes
        "wide": (128, 1000),  # the output-layer case: column means over the leading axis
        "heads": (140, 3, 150),  # 3-D kernel, factored over axes 0 and 2
        "small": (50, 10),  # below min_dim_size_to_factor: full second moment
        "vector": (20,),
    }
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    kwargs = dict(
        learning_rate=0.01,
        momentum=momentum,
        weight_decay_rate=weight_decay,
        weight_decay_mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p),
    )
    ours, reference = adafactor.adafactor(**kwargs), optax.adafactor(**kwargs)
    state, ref_state = ours.init(params), reference.init(params)
    assert jax.tree.structure(state) == jax.tree.structure(ref_state)
    # Jitted: op by op, the two optimizers' many small updates take seconds on a CPU.
    _assert_same_steps(
        jax.jit(ours.update), jax.jit(reference.update), state, ref_state, params, rng
    )


def _assert_same_steps(ours_update, ref_update, ours_state, ref_state, params, rng):
    """Three steps of both updates on the same random gradients (growing scale), each from
    its own params: equal updates at every step and equal state at the end, up to float
    rounding of the sums in another order, relative to each leaf's scale."""

    def assert_close(ours, reference):
        for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6 * np.abs(want).max())

    ours_params, ref_params = params, params
    for index in range(3):
        grads = {
            k: jnp.asarray(rng.normal(size=v.shape) * (index + 1), jnp.float32)
            for k, v in params.items()
        }
        updates, ours_state = ours_update(grads, ours_state, ours_params)
        ref_updates, ref_state = ref_update(grads, ref_state, ref_params)
        assert jax.tree.structure(ours_state) == jax.tree.structure(ref_state)
        assert_close(updates, ref_updates)
        ours_params = optax.apply_updates(ours_params, updates)
        ref_params = optax.apply_updates(ref_params, ref_updates)
    assert_close(ours_state, ref_state)


@pytest.mark.parametrize("momentum,weight_decay", [(None, None), (0.9, 0.01)])
def test_stacked_adafactor_is_vmap_of_adafactor(momentum, weight_decay):
    """``adafactor(stacked=True)`` on ``[L, ...]`` leaves, from ``jax.vmap(init)``'s state,
    gives ``jax.vmap(update)``'s updates and state: every statistic per layer (layers of
    different scales, so a statistic over all layers would differ), factored over each
    layer's own two largest axes (never the layers axis, the largest of ``tall``), the
    weight-decay mask and the schedule per layer."""
    rng = np.random.default_rng(0)
    layers = 3
    shapes = {
        "matrix": (130, 200),  # factored over both of a layer's axes
        "heads": (140, 3, 150),  # factored over a layer's axes 0 and 2
        # min_dim_size_to_factor=3: a layer's [2, 129] has a full second moment; with the
        # layers axis (3) counted, the stacked [3, 2, 129] would be factored.
        "tall": (2, 129),
        "small": (50, 10),  # factored (10 >= 3)
        "vector": (20,),  # a stacked vector: [3, 20], no weight decay
    }
    scale = (10.0 ** np.arange(layers)).reshape(-1, 1)
    params = {
        k: jnp.asarray(rng.normal(size=(layers, *s)) * scale.reshape((-1,) + (1,) * len(s)))
        for k, s in shapes.items()
    }
    params = jax.tree.map(lambda x: x.astype(jnp.float32), params)

    def build(stacked):
        return adafactor.adafactor(
            learning_rate=optim.learning_rate_schedule(
                learning_rate=0.01, schedule="linear", warmup_steps=2, decay_steps=10
            ),
            min_dim_size_to_factor=3,
            momentum=momentum,
            weight_decay_rate=weight_decay,
            weight_decay_mask=lambda p: optim.decay_mask(p, stacked=stacked),
            stacked=stacked,
        )

    per_layer_tx, stacked_tx = build(False), build(True)
    state = jax.vmap(per_layer_tx.init)(params)
    _assert_same_steps(
        jax.jit(stacked_tx.update),
        jax.jit(jax.vmap(per_layer_tx.update)),
        state,
        state,
        params,
        rng,
    )


def test_stacked_decay_mask_does_not_count_the_layers_axis():
    params = {"w": jnp.ones((3, 4, 5)), "v": jnp.ones((3, 4)), "norm": jnp.ones((3, 4, 5))}
    assert optim.decay_mask(params, stacked=True) == {"w": True, "v": False, "norm": False}
    assert optim.decay_mask(params) == {"w": True, "v": True, "norm": False}


def test_stacked_mean_refuses_the_layers_axis():
    with pytest.raises(ValueError, match="layer's own axes"):
        adafactor.mean_over_axis(jnp.ones((2, 3)), 0, stacked=True)
