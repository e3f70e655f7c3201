"""Output layers and their losses: the bias add's gradient, accuracy from the row maximum,
and the masked-position MLM head against the head at every position."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rope_jax import families
from rope_jax.layers import DenseGeneral, add_bias
from rope_jax.model_config import ModelConfig
from rope_jax.models import build_model
from rope_jax.training import losses, step

BERT_TINY = dict(
    family="encoder",
    vocab_size=50,
    d_model=32,
    num_heads=2,
    head_dim=16,
    d_ff=48,
    num_layers=1,
    norm="layer",
    norm_placement="post",
    use_bias=True,
    mlp_activation="gelu",
    gelu_approximate=False,
    position="rope",
    type_vocab_size=2,
    tie_embeddings=True,
    scale_queries=True,
    initializer_range=0.02,
    dropout_rate=0.0,
)


def test_add_bias_value_and_gradients_match_the_broadcast_sum_in_float64():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 2, 4))
    bias = rng.normal(size=(2, 4))
    cotangent = rng.normal(size=x.shape)
    out, vjp = jax.vjp(add_bias, jnp.asarray(x, jnp.float32), jnp.asarray(bias, jnp.float32))
    dx, dbias = vjp(jnp.asarray(cotangent, jnp.float32))
    np.testing.assert_allclose(out, x + bias, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx, cotangent, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dbias, cotangent.sum(axis=(0, 1)), rtol=1e-5, atol=1e-5)
    assert dbias.dtype == jnp.float32 and dbias.shape == (2, 4)


def test_add_bias_gradient_is_a_product_not_a_reduce():
    """The point of ``add_bias``: its bias gradient compiles to a dot, never a reduce of the
    output (which jaxlib 0.10's CPU backend runs slowly over vocabulary-sized outputs)."""

    def loss(x, bias):
        return jnp.sum(jnp.sin(add_bias(x, bias)))

    hlo = (
        jax.jit(jax.grad(loss, argnums=1))
        .lower(jnp.ones((4, 6, 7)), jnp.ones((7,)))
        .compile()
        .as_text()
    )
    reduces = [line for line in hlo.splitlines() if " reduce(" in line and "f32[7]" in line]
    assert not reduces, reduces
    assert "dot(" in hlo or "convolution(" in hlo


def test_bias_gradient_under_bfloat16_accumulates_in_float32():
    dense = DenseGeneral((3,), ("embed", "mlp"), nn.initializers.ones, use_bias=True)
    x = jnp.full((512, 2), 1.0, jnp.bfloat16)
    params = nn.unbox(dense.init(jax.random.key(0), x))["params"]
    grads = jax.grad(lambda p: jnp.sum(dense.apply({"params": p}, x).astype(jnp.float32)))(params)
    # 512 ones summed: exact in float32 (a bfloat16 running sum would stall at 256).
    np.testing.assert_array_equal(grads["bias"], np.full(3, 512.0, np.float32))


def test_accuracy_from_the_row_maximum_equals_argmax_away_from_ties():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 9, 11))  # continuous draws: no ties
    targets = np.where(rng.random((4, 9)) < 0.5, logits.argmax(-1), rng.integers(0, 11, (4, 9)))
    weights = rng.integers(0, 2, (4, 9)).astype(np.float32)
    got = losses.weighted_cross_entropy(
        jnp.asarray(logits, jnp.float32), jnp.asarray(targets), jnp.asarray(weights)
    )
    want = ((logits.argmax(-1) == targets) * weights).sum()
    assert want > 0
    assert float(got["correct_sum"]) == want


def test_accuracy_counts_a_target_tied_for_the_maximum_as_correct():
    logits = jnp.asarray([[[2.0, 5.0, 5.0, 1.0], [2.0, 5.0, 5.0, 1.0], [0.0, 1.0, 0.0, 0.0]]])
    targets = jnp.asarray([[1, 2, 2]])  # first tied id, second tied id, a loser
    got = losses.weighted_cross_entropy(logits, targets, jnp.ones((1, 3)))
    assert float(got["correct_sum"]) == 2.0  # argmax would give 1 (it picks id 1 only)


def test_cross_entropy_gradient_is_softmax_minus_onehot():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 3, 5)) * 4
    targets = rng.integers(0, 5, (2, 3))
    grad = jax.grad(
        lambda x: losses.weighted_cross_entropy(x, jnp.asarray(targets), jnp.ones((2, 3)))[
            "loss_sum"
        ]
    )(jnp.asarray(logits, jnp.float32))
    softmax = np.exp(logits - logits.max(-1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
    np.testing.assert_allclose(grad, softmax - np.eye(5)[targets], atol=1e-6)


def test_default_max_predictions_follows_bert_and_leaves_room_for_packing():
    assert losses.default_max_predictions(0.15, 512) == 96  # 77 masked, +20 %, multiple of 8
    assert losses.default_max_predictions(0.15, 128) == 24  # BERT used 20 for 19
    assert losses.default_max_predictions(1.0, 10) == 10  # never more than the row
    with pytest.raises(ValueError, match="mask_rate"):
        losses.default_max_predictions(0.0, 128)
    assert losses.resolve_max_predictions(None, objective="mlm", mask_rate=0.15, length=512) == 96
    assert losses.resolve_max_predictions(None, objective="span_corruption", mask_rate=0.15,
                                          length=512) == 0  # fmt: skip
    assert losses.resolve_max_predictions(0, objective="mlm", mask_rate=0.15, length=512) == 0
    with pytest.raises(ValueError, match="exceeds the row length"):
        losses.resolve_max_predictions(600, objective="mlm", mask_rate=0.15, length=512)


def test_masked_positions_takes_the_first_targets_in_order_and_counts_the_rest():
    weights = np.zeros((3, 10), np.int32)
    weights[0, [7, 1, 4]] = 1
    weights[1, [0, 2, 3, 5, 9]] = 1  # 5 targets, cap 4: one dropped
    positions, valid, dropped = losses.masked_positions(jnp.asarray(weights), 4)
    positions, valid = np.asarray(positions), np.asarray(valid)
    np.testing.assert_array_equal(positions[0, :3], [1, 4, 7])
    np.testing.assert_array_equal(valid[0], [True, True, True, False])
    np.testing.assert_array_equal(positions[1], [0, 2, 3, 5])
    assert valid[1].all() and not valid[2].any()
    assert int(dropped) == 1
    with pytest.raises(ValueError, match="max_predictions"):
        losses.masked_positions(jnp.asarray(weights), 11)


def _mlm_batch(batch, length, vocab, rate, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, vocab, (batch, length)).astype(np.int32)
    weights = np.zeros((batch, length), np.int32)
    for row in range(batch):
        weights[row, rng.choice(length, max(1, round(rate * length)), replace=False)] = 1
    weights[1, :3] = 1  # rows with different counts
    return {
        "input_tokens": np.where(weights == 1, 4, tokens).astype(np.int32),
        "target_tokens": tokens,
        "loss_weights": weights,
        "segment_ids": np.ones((batch, length), np.int32),
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
    }


def test_masked_position_head_gives_the_full_heads_loss_accuracy_and_gradients():
    model = build_model(ModelConfig(**BERT_TINY))
    batch = {k: jnp.asarray(v) for k, v in _mlm_batch(3, 16, 50, 0.25).items()}
    # Jitted: run eagerly, each of the model's few hundred ops would compile on its own.
    variables = jax.jit(model.init)(jax.random.key(0), batch["input_tokens"])
    params = variables["params"]
    shapes = {}

    def stats(params, max_predictions):
        logits, targets, weights, dropped = families.for_model(model).predict(
            {"params": params},
            batch,
            deterministic=True,
            mlm_max_predictions=max_predictions,
        )
        shapes[max_predictions] = logits.shape
        out = losses.weighted_cross_entropy(logits, targets, weights)
        return out["loss_sum"] / out["weight_sum"], (out, dropped)

    grad_fn = jax.jit(jax.value_and_grad(stats, has_aux=True), static_argnums=1)
    (full_loss, (full, _)), full_grads = grad_fn(params, 0)
    (loss, (gathered, dropped)), grads = grad_fn(params, 8)
    full_shape, shape = shapes[0], shapes[8]
    assert full_shape == (3, 16, 50) and shape == (3, 8, 50)
    assert int(dropped) == 0
    np.testing.assert_allclose(loss, full_loss, rtol=1e-6)
    for name in ("weight_sum", "correct_sum"):
        assert float(gathered[name]) == float(full[name])
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(full_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_masked_position_head_counts_tokens_beyond_the_cap_in_the_train_step():
    import optax

    model = build_model(ModelConfig(**BERT_TINY))
    batch = _mlm_batch(2, 16, 50, 0.25)  # row 1 has up to 7 targets
    count = batch["loss_weights"].sum(-1)
    tx = optax.sgd(0.0)
    init = jax.jit(model.init)  # eager, each op would compile on its own
    params = nn.unbox(init(jax.random.key(0), jnp.asarray(batch["input_tokens"])))["params"]
    state = step.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        random_features={},
        rng=jax.random.key_data(jax.random.key(0)),
    )
    train_step = step.make_train_step(
        model, tx, lambda s: 0.0, grad_clip_norm=0.0, mlm_max_predictions=4
    )
    _, metrics = jax.jit(train_step)(state, batch, jax.random.key(1))
    assert float(metrics["mlm_dropped_tokens"]) == np.maximum(count - 4, 0).sum() > 0
    assert float(metrics["num_target_tokens"]) == np.minimum(count, 4).sum()


def test_masked_positions_are_rejected_by_a_classifier():
    model = build_model(ModelConfig(**{**BERT_TINY, "num_labels": 2}))
    tokens = jnp.ones((1, 4), jnp.int32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))
    with pytest.raises(ValueError, match="MLM head"):
        jax.eval_shape(
            lambda v: model.apply(v, tokens, masked_positions=jnp.zeros((1, 2), jnp.int32)),
            nn.unbox(variables),
        )


@pytest.mark.parametrize("num_contract", [1, 2])
def test_dense_contract_value_and_gradients_match_float64_einsum(num_contract):
    from rope_jax.projections import dense_contract

    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, 4, 5))
    kernel = rng.normal(size=(4, 5, 6)) if num_contract == 2 else rng.normal(size=(5, 2, 3))
    spec = "BLHD,HDE->BLE" if num_contract == 2 else "BLHD,DNK->BLHNK"
    want = np.einsum(spec, x, kernel)
    cotangent = rng.normal(size=want.shape)
    out, vjp = jax.vjp(
        lambda a, b: dense_contract(a, b, num_contract),
        jnp.asarray(x, jnp.float32),
        jnp.asarray(kernel, jnp.float32),
    )
    dx, dkernel = vjp(jnp.asarray(cotangent, jnp.float32))
    _, reference_vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), x, kernel)
    want_dx, want_dkernel = reference_vjp(cotangent)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dkernel, want_dkernel, rtol=1e-5, atol=1e-5)


def test_dense_contract_keeps_operand_dtypes_and_float32_logits():
    from rope_jax.projections import dense_contract

    x = jnp.ones((3, 4), jnp.bfloat16)
    kernel = jnp.ones((4, 5), jnp.bfloat16)
    out, vjp = jax.vjp(lambda a, b: dense_contract(a, b, 1, True), x, kernel)
    assert out.dtype == jnp.float32
    dx, dkernel = vjp(jnp.ones((3, 5), jnp.float32))
    assert dx.dtype == jnp.bfloat16 and dkernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(dkernel, np.float32), np.full((4, 5), 3.0))


@pytest.mark.parametrize("num_contract", [1, 2])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_contract_in_a_decoding_loop_equals_float64_einsum(num_contract, dtype):
    # Inside projections.decoding_loop the product reads a transposed row-major copy of the
    # kernel (on CPU); its value, dtype and float32 logits must not change.
    from rope_jax.projections import contract, decoding_loop, dense_contract

    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 1, 4, 5))
    kernel = rng.normal(size=(4, 5, 7)) if num_contract == 2 else rng.normal(size=(5, 2, 3))
    spec = "BLHD,HDE->BLE" if num_contract == 2 else "BLHD,DNK->BLHNK"
    x_c, kernel_c = jnp.asarray(x, dtype), jnp.asarray(kernel, dtype)
    want = np.einsum(spec, np.asarray(x_c, np.float64), np.asarray(kernel_c, np.float64))
    for float32_output in (False, True):

        def looped(a, b, float32_output=float32_output):
            with decoding_loop():
                return contract(a, b, num_contract, float32_output)

        got = jax.jit(looped)(x_c, kernel_c)
        plain = dense_contract(x_c, kernel_c, num_contract, float32_output)
        assert got.shape == plain.shape == want.shape
        assert got.dtype == plain.dtype == (jnp.float32 if float32_output else dtype)
        tolerance = 1e-5 if dtype == jnp.float32 else 5e-2
        np.testing.assert_allclose(
            np.asarray(got, np.float64), want, rtol=tolerance, atol=tolerance
        )


def _projections(names):
    """Projections ``6 -> (2, 3)`` with biases, one per name (inside a compact method)."""
    from rope_jax.projections import Projection

    init = nn.initializers.normal(1.0)
    return [
        Projection(6, (2, 3), ("embed", "heads", "kv"), init, use_bias=True, name=name)
        for name in names
    ]


def test_fused_projections_equal_the_separate_products_and_their_gradients():
    from rope_jax.projections import fused_projections

    class Pair(nn.Module):
        fused: bool

        @nn.compact
        def __call__(self, x):
            make = _projections(("a", "b", "c"))
            if self.fused:
                return fused_projections(x, make)
            return [m(x) for m in make]

    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 5, 6)), jnp.float32)
    params = nn.unbox(Pair(True).init(jax.random.key(0), x))
    params = jax.tree.map(lambda p: p + 0.1, params)  # nonzero biases

    def total(fused, p):
        outs = Pair(fused).apply(p, x)
        return sum(jnp.sum(jnp.sin(out) * (i + 1)) for i, out in enumerate(outs))

    separate = Pair(False).apply(params, x)
    for got, want in zip(Pair(True).apply(params, x), separate, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    grads = jax.grad(lambda p: total(True, p))(params)
    want_grads = jax.grad(lambda p: total(False, p))(params)
    # float32 rounding of sums whose terms reach ~14: scale the absolute tolerance with them
    # (the fused and separate products may add in another order).
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("num_projections", [1, 3])
def test_an_input_scale_folded_into_the_kernels_equals_the_scaled_input(num_projections):
    # A pre-norm RMS norm's scale folded into the next projections (fused_projections'
    # input_scale) against float64 (x * scale) @ W: values and the gradients of x, the
    # kernels, the biases and the scale.
    from rope_jax.projections import fused_projections

    names = ("a", "b", "c")[:num_projections]

    class Folded(nn.Module):
        @nn.compact
        def __call__(self, x, scale):
            make = _projections(names)
            return fused_projections(x, make, input_scale=scale)

    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 5, 6))
    scale = rng.normal(size=(6,))
    params = nn.unbox(Folded().init(jax.random.key(0), jnp.zeros((1, 1, 6)), jnp.ones(6)))
    params = jax.tree.map(lambda p: np.asarray(p, np.float64) + 0.1, params)
    weights = [rng.normal(size=(2, 5, 2, 3)) for _ in names]

    def objective(outs):
        return sum(jnp.sum(jnp.sin(out) * w) for out, w in zip(outs, weights, strict=True))

    def folded(p, a, s):
        return objective(Folded().apply(p, a, s))

    def reference(p, a, s):
        layer = p["params"]
        outs = [
            jnp.einsum("BLE,E,EHD->BLHD", a, s, layer[n]["kernel"]) + layer[n]["bias"][None, None]
            for n in names
        ]
        return objective(outs)

    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    got_value, got_grads = jax.value_and_grad(folded, argnums=(0, 1, 2))(
        jax.tree.map(f32, params), f32(x), f32(scale)
    )
    with jax.enable_x64():
        want_value, want_grads = jax.value_and_grad(reference, argnums=(0, 1, 2))(params, x, scale)
    np.testing.assert_allclose(got_value, want_value, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_cross_entropy_with_z_loss_has_the_float64_gradient():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(2, 3, 7)) * 3
    targets = rng.integers(0, 7, (2, 3))
    weights = rng.integers(0, 3, (2, 3)).astype(np.float64)

    def reference(x):
        log_z = jax.nn.logsumexp(x, axis=-1)
        target = jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
        return jnp.sum((log_z - target + 1e-2 * log_z**2) * weights)

    def ours(x):
        return losses.weighted_cross_entropy(
            x, jnp.asarray(targets), jnp.asarray(weights, jnp.float32), z_loss=1e-2
        )["loss_sum"]

    want = jax.grad(reference)(logits)
    got = jax.grad(ours)(jnp.asarray(logits, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
