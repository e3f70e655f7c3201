"""Scanned layers (``scan_layers``): the same function of the same weights as the Python loop
over layers, for every family, in training (gradients, remat policies), decoding (cache,
recurrent states, beam search) and the parameter tree; named remat policies. Two-layer tiny
models, jitted."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.ad_checkpoint import print_saved_residuals

from rope_jax import decoding, scanning
from rope_jax.model_config import ModelConfig, model_config_from_dict
from rope_jax.models import build_model, init_cache
from tests.test_models import BERT, init, shapes_and_axes, tiny, tokens

FAMILIES = {
    "bert": dict(BERT, num_layers=2),
    "t5": dict(num_layers=2, num_decoder_layers=2),
    "performer_lm": dict(family="decoder", attention="performer", position="rope", num_layers=2),
}


def _pair(overrides):
    cfg = tiny(**overrides)
    return build_model(cfg), build_model(dataclasses.replace(cfg, scan_layers=True))


def _args(model, batch=2):
    x = tokens(batch, 6).at[1, 4:].set(0)
    return (x, tokens(batch, 5, seed=1)) if model.config.family == "encoder_decoder" else (x,)


def _stacked(variables):
    return {name: scanning.stack_layers(tree) for name, tree in variables.items()}


def test_stack_and_unstack_are_inverse():
    tree = {
        "encoder": {
            "relpos_bias": np.ones((3, 2)),
            "layers_0": {"mlp": {"wo": np.full((2, 2), 0.0)}},
            "layers_1": {"mlp": {"wo": np.full((2, 2), 1.0)}},
        },
        "lm_head": {"kernel": np.zeros((2, 5))},
    }
    stacked = scanning.stack_layers(tree)
    assert set(stacked["encoder"]) == {"relpos_bias", "layers"}
    np.testing.assert_array_equal(stacked["encoder"]["layers"]["mlp"]["wo"][:, 0, 0], [0.0, 1.0])
    back = scanning.unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    jax.tree.map(np.testing.assert_array_equal, back, tree)
    with pytest.raises(ValueError, match="numbered"):
        scanning.stack_layers({"layers_0": 1, "layers_2": 2})


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_scanned_model_matches_the_layer_loop(family):
    """Logits and gradients of the scanned model equal the loop's on stacked weights."""
    plain, scanned = _pair(FAMILIES[family])
    args = _args(plain)
    variables = init(plain, *args)

    def loss_and_grads(model, variables):
        def loss(params):
            logits = model.apply({**variables, "params": params}, *args)
            return jnp.mean(logits**2), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

    (_, logits), grads = loss_and_grads(plain, variables)
    (_, scanned_logits), scanned_grads = loss_and_grads(scanned, _stacked(variables))
    np.testing.assert_allclose(scanned_logits, logits, rtol=1e-5, atol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        scanning.unstack_layers(scanned_grads),
        grads,
    )


def test_scanned_param_tree_golden_t5():
    """The scanned T5's names, shapes and logical axes: one ``layers`` subtree per stack,
    every array with a leading ``[L]`` axis named ``layers`` (the unscanned golden is
    ``test_models.test_param_tree_golden_t5``)."""
    cfg = tiny(num_decoder_layers=2, scan_layers=True)
    got = shapes_and_axes(build_model(cfg), tokens(1, 8), tokens(1, 4))
    f32 = jnp.float32
    qkv = ("layers", "embed", "heads", "kv")
    out = ("layers", "heads", "kv", "embed")
    expected = {
        "token_embedder/embedding": ((40, 32), f32, ("vocab", "embed")),
        "encoder/relpos_bias": ((32, 2), f32, ("relpos_buckets", "heads")),
        "encoder/final_norm/scale": ((32,), f32, ("embed",)),
        "decoder/relpos_bias": ((32, 2), f32, ("relpos_buckets", "heads")),
        "decoder/final_norm/scale": ((32,), f32, ("embed",)),
        "lm_head/kernel": ((32, 40), f32, ("embed", "vocab")),
    }
    for stack, layers, parts in (
        ("encoder", 1, ("attention",)),
        ("decoder", 2, ("attention", "cross_attention")),
    ):
        for part in parts:
            for proj in ("query", "key", "value"):
                expected[f"{stack}/layers/{part}/{proj}/kernel"] = ((layers, 32, 2, 16), f32, qkv)
            expected[f"{stack}/layers/{part}/out/kernel"] = ((layers, 2, 16, 32), f32, out)
            expected[f"{stack}/layers/{part}_norm/scale"] = ((layers, 32), f32, ("layers", "embed"))
        expected[f"{stack}/layers/mlp_norm/scale"] = ((layers, 32), f32, ("layers", "embed"))
        for wi in ("wi_0", "wi_1"):
            expected[f"{stack}/layers/mlp/{wi}/kernel"] = (
                (layers, 32, 48),
                f32,
                ("layers", "embed", "mlp"),
            )
        expected[f"{stack}/layers/mlp/wo/kernel"] = (
            (layers, 48, 32),
            f32,
            ("layers", "mlp", "embed"),
        )
    assert got == expected


# Batch 2 with 2 layers: a cache leaf [layers, B, ...] has as many layers as rows, so beam
# search must find the rows by the leaf's place, not by its size.
@pytest.mark.parametrize(
    "overrides,method",
    [
        (FAMILIES["t5"], "beam"),
        (FAMILIES["performer_lm"], "beam"),
        (dict(family="decoder", position="alibi", num_layers=2), "greedy"),
    ],
    ids=["t5_beam", "performer_lm_beam", "softmax_lm_greedy"],
)
def test_scanned_decoding_matches_the_layer_loop(overrides, method):
    plain, scanned = _pair(overrides)
    inputs = tokens(2, 4)
    args = (inputs, inputs) if plain.config.family == "encoder_decoder" else (inputs,)
    variables = init(plain, *args)
    results = []
    for model, tree in ((plain, variables), (scanned, _stacked(variables))):
        extra = {k: v for k, v in tree.items() if k != "params"}
        results.append(
            decoding.generate(
                model,
                tree["params"],
                inputs,
                max_length=8,
                method=method,
                eos_id=99,
                variables=extra,
                beam_size=2,
            )
        )
    want, got = results
    np.testing.assert_array_equal(got.sequences, want.sequences)
    np.testing.assert_allclose(got.log_probs, want.log_probs, rtol=1e-4, atol=1e-4)


def test_scanned_cache_has_a_leading_layers_axis():
    _, scanned = _pair(FAMILIES["t5"])
    cache = init_cache(scanned, 3, 5, encoder_length=6)
    layers = cache["decoder"]["layers"]["attention"]
    # layers, rows, then the heads-major cache of softmax attention: keys [H, D, S]
    assert layers["cached_key"].shape == (2, 3, 2, 16, 5)
    assert layers["cached_value"].shape == (2, 3, 2, 5, 16)
    assert layers["cache_index"].shape == (2,)
    assert cache["decoder"]["key_positions"].shape == (3, 5)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_remat_policies_give_the_same_gradients(scan):
    cfg = tiny(family="decoder", position="rope", num_layers=2, dropout_rate=0.1, scan_layers=scan)
    x = tokens(2, 8)
    variables = init(build_model(dataclasses.replace(cfg, scan_layers=False)), x)
    params = scanning.stack_layers(variables["params"]) if scan else variables["params"]

    def grads(remat):
        model = build_model(dataclasses.replace(cfg, remat=remat))

        def loss(params):
            logits = model.apply(
                {"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(1)}
            )
            return jnp.mean(logits**2)

        return jax.jit(jax.grad(loss))(params)

    plain = grads("none")
    for policy in ("full", "save_dots"):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
            plain,
            grads(policy),
        )


def _residual_shapes(model, params, args, capsys, kind):
    """Shapes of the residuals the model's backward pass reads, of one ``kind`` ("output of
    scan": the stacked ``[L, ...]`` buffers a scanned stack writes; "named 'projection'"),
    as ``jax.ad_checkpoint.print_saved_residuals`` lists them."""
    capsys.readouterr()
    print_saved_residuals(lambda p: jnp.sum(model.apply({"params": p}, *args) ** 2), params)
    shapes = []
    for line in capsys.readouterr().out.splitlines():
        match = re.match(r"\w+\[([\d,]*)\] (.*)", line)
        if match and match.group(2).startswith(kind):
            shapes.append(tuple(int(d) for d in match.group(1).split(",")))
    return sorted(shapes)


def test_a_scanned_layer_keeps_only_its_input_and_its_matmul_outputs(capsys):
    """Under nn.scan every residual is a stacked buffer the scan zero-fills, copies and writes
    layer by layer (scanning's docstring): with remat 'none' a scanned T5 layer keeps its
    input, its projections' outputs and the attention products, not the ~20 elementwise
    intermediates autodiff names (the norms' statistics, the gated GELU's pieces)."""
    L, B, T, S = 3, 2, 5, 6
    cfg = tiny(num_layers=L, num_decoder_layers=L, scan_layers=True)
    E, H, D, F = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_ff
    model = build_model(cfg)
    args = (tokens(B, S), tokens(B, T, seed=1))
    params = init(model, *args)["params"]
    got = [
        shape
        for shape in _residual_shapes(model, params, args, capsys, "output of scan")
        if shape[0] == L
    ]

    def attention(q_len, kv_len):  # the scores and the weighted values
        return [(L, B, H, q_len, kv_len), (L, B, H, q_len, D)]

    encoder = [
        (L, B, S, E),  # the layer's input
        (L, B, S, 3, H, D),  # fused q/k/v
        (L, B, S, E),  # the attention's output projection
        (L, B, S, 2, F),  # fused wi_0/wi_1
        *attention(S, S),
    ]
    decoder = [
        (L, B, T, E),
        (L, B, T, 3, H, D),
        (L, B, T, E),
        (L, B, T, H, D),  # cross-attention query
        (L, B, S, 2, H, D),  # cross-attention key/value of the encoder output
        (L, B, T, E),
        (L, B, T, 2, F),
        *attention(T, T),
        *attention(T, S),
    ]
    assert got == sorted(encoder + decoder)


def test_save_dots_keeps_the_projections(capsys):
    """``save_dots`` saves every projection's output (a custom_vjp that the dots policies do
    not see; they are saved by name): per layer the fused q/k/v and wi_0/wi_1 products."""
    L, B, T = 2, 2, 6
    cfg = tiny(family="decoder", position="rope", num_layers=L, remat="save_dots")
    model = build_model(cfg)
    args = (tokens(B, T),)
    params = init(model, *args)["params"]
    got = _residual_shapes(model, params, args, capsys, "named 'projection'")
    qkv, wi = (B, T, 3, cfg.num_heads, cfg.head_dim), (B, T, 2, cfg.d_ff)
    assert got.count(qkv) == L and got.count(wi) == L


def test_layer_policy():
    assert scanning.layer_policy("none", False) is None
    assert scanning.layer_policy("none", True) is scanning.SCANNED_NONE
    for name in ("full", "save_dots"):
        for scan in (False, True):
            assert scanning.layer_policy(name, scan) is scanning.REMAT_POLICIES[name]
    with pytest.raises(ValueError, match="not a remat policy"):
        scanning.layer_policy("dots", True)


def test_remat_names_and_legacy_booleans():
    assert model_config_from_dict({"remat": True}).remat == "full"
    assert model_config_from_dict({"remat": False}).remat == "none"
    assert model_config_from_dict({"remat": "True"}).remat == "full"
    assert ModelConfig(remat=True).remat == "full"
    assert model_config_from_dict({"remat": "save_dots"}).remat == "save_dots"
    with pytest.raises(
        ValueError, match="remat='dots' is not a remat policy; choose one of none, full, save_dots"
    ):
        model_config_from_dict({"remat": "dots"})
    assert set(scanning.REMAT_POLICIES) == {"none", "full", "save_dots"}


def test_scanned_variables_carry_the_layers_axis_in_their_partitioning():
    _, scanned = _pair(FAMILIES["performer_lm"])
    boxed = jax.eval_shape(lambda: scanned.init(jax.random.key(0), tokens(1, 4)))
    projection = boxed["random_features"]["decoder"]["layers"]["attention"]["projection"]
    assert nn.unbox(projection).shape == (2, 32, 16)


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_optimizers_update_each_scanned_layer_as_its_own_array(name):
    """The optimizer on stacked layers equals it on the unstacked ones over two steps:
    Adafactor's factored moments, block-RMS clipping and parameter scale per layer, and
    AdamW's weight decay for the layer's matrices only (a stacked vector is 2-D); an encoder
    and a decoder of different depths."""
    from rope_jax.training import optim

    rng = np.random.default_rng(0)
    # Layer 1's weights are 10x layer 0's: a parameter scale over both would mix them.
    params = {
        "decoder": {
            f"layers_{i}": {
                "mlp": {"wi": {"kernel": (10.0**i) * rng.standard_normal((130, 140))}},
                "gate": rng.standard_normal(130) + 1.0,
            }
            for i in range(2)
        },
        # Another depth: stacks of 3 and 2 layers are vmapped apart.
        "encoder": {
            f"layers_{i}": {"wo": (3.0**i) * rng.standard_normal((140, 130))} for i in range(3)
        },
        "lm_head": {"kernel": rng.standard_normal((130, 150))},
    }
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)]
    grads.append(jax.tree.map(lambda g: 0.5 * g, grads[0]))
    config = optim.OptimizerConfig(name=name, learning_rate=0.01, warmup_steps=0, weight_decay=0.1)
    tx, _ = optim.make_optimizer(config, 10)

    def run(params, grads):
        state = tx.init(params)
        for g in grads:
            updates, state = tx.update(g, state, params)
            params = optax.apply_updates(params, updates)
        return params

    plain = run(params, grads)
    stacked = run(scanning.stack_layers(params), [scanning.stack_layers(g) for g in grads])
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        scanning.unstack_layers(stacked),
        plain,
    )
