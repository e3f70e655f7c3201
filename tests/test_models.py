"""Model shells: parameter tree, dtypes, every valid kernel x position combo, masking
properties (causality by gradient, padding invariance, packed segments), decode
cache. Tiny shapes, mostly eager (no jit) so no test pays a long compile."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rope_jax.attention.registry import KERNELS
from rope_jax.layers import MultiHeadAttention
from rope_jax.model_config import (
    KERNEL_TRAITS,
    POSITIONS,
    ModelConfig,
    model_config_from_dict,
    validate_model_config,
)
from rope_jax.models import build_model, init_cache, positions_from_segments

BASE = dict(
    vocab_size=40,
    d_model=32,
    num_heads=2,
    head_dim=16,
    d_ff=48,
    num_layers=1,
    dropout_rate=0.0,
    num_features=32,
    num_landmarks=4,
    max_length=32,
)
BERT = dict(
    family="encoder",
    norm="layer",
    norm_placement="post",
    use_bias=True,
    mlp_activation="gelu",
    gelu_approximate=False,
    position="learned",
    type_vocab_size=2,
    tie_embeddings=True,
    scale_queries=True,
    layer_norm_epsilon=1e-12,
    initializer_range=0.02,
)


def tiny(**overrides):
    return ModelConfig(**{**BASE, **overrides})


def init(model, *args, seed=0, **kwargs):
    """Variables of the model's shapes filled with seeded Gaussians (scale 0.3).

    ``model.init`` costs seconds of compilation on CPU per config; the shapes from
    ``jax.eval_shape`` and numpy values keep these tests eager and fast.
    """
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
    rng = np.random.default_rng(seed)

    def fill(leaf):
        return jnp.asarray(0.3 * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map(fill, nn.unbox(shapes))


def tokens(batch, length, seed=0, low=3):
    return jnp.asarray(
        np.random.default_rng(seed).integers(low, BASE["vocab_size"], (batch, length)), jnp.int32
    )


def run(model, variables, *args, **kwargs):
    return model.apply(variables, *args, **kwargs)


# ---------------------------------------------------------------------------- param tree


def shapes_and_axes(model, *args):
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))["params"]
    specs = nn.get_partition_spec(boxed)
    flat = jax.tree_util.tree_flatten_with_path(nn.unbox(boxed))[0]
    spec_flat = dict(
        (jax.tree_util.keystr(p), s)
        for p, s in jax.tree_util.tree_flatten_with_path(
            specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
        )[0]
    )
    return {
        "/".join(k.key for k in path): (
            leaf.shape,
            leaf.dtype,
            tuple(spec_flat[jax.tree_util.keystr(path)]),
        )
        for path, leaf in flat
    }


def test_param_tree_golden_t5():
    cfg = tiny(num_decoder_layers=2, dtype="bfloat16")
    model = build_model(cfg)
    got = shapes_and_axes(model, tokens(1, 8), tokens(1, 4))
    f32 = jnp.float32
    expected = {
        "token_embedder/embedding": ((40, 32), f32, ("vocab", "embed")),
        "encoder/relpos_bias": ((32, 2), f32, ("relpos_buckets", "heads")),
        "encoder/layers_0/attention/query/kernel": ((32, 2, 16), f32, ("embed", "heads", "kv")),
        "encoder/layers_0/attention/key/kernel": ((32, 2, 16), f32, ("embed", "heads", "kv")),
        "encoder/layers_0/attention/value/kernel": ((32, 2, 16), f32, ("embed", "heads", "kv")),
        "encoder/layers_0/attention/out/kernel": ((2, 16, 32), f32, ("heads", "kv", "embed")),
        "encoder/layers_0/attention_norm/scale": ((32,), f32, ("embed",)),
        "encoder/layers_0/mlp/wi_0/kernel": ((32, 48), f32, ("embed", "mlp")),
        "encoder/layers_0/mlp/wi_1/kernel": ((32, 48), f32, ("embed", "mlp")),
        "encoder/layers_0/mlp/wo/kernel": ((48, 32), f32, ("mlp", "embed")),
        "encoder/layers_0/mlp_norm/scale": ((32,), f32, ("embed",)),
        "encoder/final_norm/scale": ((32,), f32, ("embed",)),
        "decoder/relpos_bias": ((32, 2), f32, ("relpos_buckets", "heads")),
        "decoder/final_norm/scale": ((32,), f32, ("embed",)),
        "lm_head/kernel": ((32, 40), f32, ("embed", "vocab")),
    }
    for layer in ("layers_0", "layers_1"):
        for part in ("attention", "cross_attention"):
            for proj in ("query", "key", "value"):
                expected[f"decoder/{layer}/{part}/{proj}/kernel"] = (
                    (32, 2, 16),
                    f32,
                    ("embed", "heads", "kv"),
                )
            expected[f"decoder/{layer}/{part}/out/kernel"] = (
                (2, 16, 32),
                f32,
                ("heads", "kv", "embed"),
            )
        for norm in ("attention_norm", "cross_attention_norm", "mlp_norm"):
            expected[f"decoder/{layer}/{norm}/scale"] = ((32,), f32, ("embed",))
        for wi in ("wi_0", "wi_1"):
            expected[f"decoder/{layer}/mlp/{wi}/kernel"] = ((32, 48), f32, ("embed", "mlp"))
        expected[f"decoder/{layer}/mlp/wo/kernel"] = ((48, 32), f32, ("mlp", "embed"))
    assert got == expected


def test_param_tree_bert_with_classifier():
    cfg = tiny(**BERT, num_labels=3)
    got = shapes_and_axes(build_model(cfg), tokens(1, 8))
    assert got["token_type_embedder/embedding"][0] == (2, 32)
    assert got["encoder/position_embedder/embedding"][:1] == ((32, 32),)
    assert got["encoder/embedding_norm/bias"][0] == (32,)
    assert got["encoder/layers_0/attention/query/bias"] == ((2, 16), jnp.float32, ("heads", "kv"))
    assert got["encoder/layers_0/mlp/wi/bias"][0] == (48,)
    assert got["classifier/kernel"][0] == (32, 3)
    assert "mlm_head/output_bias" not in got and "encoder/final_norm/scale" not in got
    mlm = shapes_and_axes(build_model(tiny(**BERT)), tokens(1, 8))
    assert mlm["mlm_head/output_bias"] == ((40,), jnp.float32, ("vocab",))
    assert mlm["mlm_head/transform/kernel"][0] == (32, 32)
    assert not any(k.startswith(("lm_head", "mlm_head/decoder")) for k in mlm)  # tied


def test_bfloat16_compute_float32_params_and_logits():
    cfg = tiny(family="decoder", position="rope", dtype="bfloat16")
    model = build_model(cfg)
    x = tokens(2, 8)
    variables = init(model, x)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(nn.unbox(variables)))
    logits, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    assert logits.dtype == jnp.float32
    layer_out = state["intermediates"]["decoder"]["layers_0"]["__call__"][0]
    assert layer_out.dtype == jnp.bfloat16
    ref = build_model(dataclasses.replace(cfg, dtype="float32")).apply(variables, x)
    np.testing.assert_allclose(logits, ref, atol=0.1)


# ------------------------------------------------------------------ every kernel x position


def combos():
    out = []
    for kernel, traits in KERNEL_TRAITS.items():
        for position in POSITIONS:
            family = "decoder" if traits.causal else "encoder"
            cfg = tiny(family=family, attention=kernel, position=position)
            try:
                validate_model_config(cfg)
            except ValueError:
                continue
            out.append((kernel, position, family))
    return out


@pytest.mark.parametrize("kernel,position,family", combos())
def test_every_valid_combo_builds_and_runs(kernel, position, family):
    cfg = tiny(family=family, attention=kernel, position=position)
    model = build_model(cfg)
    x = tokens(2, 8).at[1, 6:].set(0)
    segment_ids = (x != 0).astype(jnp.int32)
    variables = init(model, x)
    logits = run(model, variables, x, segment_ids=segment_ids)
    assert logits.shape == (2, 8, 40) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_combo_list_covers_all_kernels():
    kernels = {k for k, _, _ in combos()}
    assert kernels == set(KERNEL_TRAITS)
    assert len(combos()) >= 30


# Softmax with t5_bias is the default config that the other encoder-decoder tests use.
@pytest.mark.parametrize("kernel", ["performer", "linear"])
def test_encoder_decoder_runs_with_linear_decoder_kernels(kernel):
    cfg = tiny(
        attention="nystrom", decoder_attention=kernel, cross_attention=kernel, position="rope"
    )
    model = build_model(cfg)
    enc, dec = tokens(2, 8).at[0, 6:].set(0), tokens(2, 8, seed=1)
    variables = init(model, enc, dec)
    logits = run(model, variables, enc, dec)
    assert logits.shape == (2, 8, 40) and bool(jnp.all(jnp.isfinite(logits)))


# ---------------------------------------------------------------------- invalid combos


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (dict(family="decoder", attention="nystrom"), "no causal form"),
        (dict(attention="nystrom", position="rope"), "decoder_attention='softmax'"),
        (
            dict(
                decoder_attention="softmax",
                attention="nystrom",
                position="rope",
                cross_attention="nystrom",
            ),
            "leak future",
        ),
        (dict(attention="performer", position="t5_bias"), "additive bias"),
        (dict(family="decoder", attention="linear", position="alibi"), "additive bias"),
        (dict(position="rope", head_dim=15), "even head_dim"),
        (dict(family="decoder", attention="random_synthesizer", position="rope"), "never uses"),
        (dict(position="learned_hierarchical", hierarchical_alpha=0.5), "coincide"),
        (dict(family="decoder", type_vocab_size=2), "belong to family='encoder'"),
        (dict(family="decoder", cross_attention="softmax"), "only apply to family"),
        (dict(attention="flash"), "not a known attention kernel"),
        (dict(norm="batch"), "norm='batch' is not one of"),
    ],
)
def test_invalid_combos_raise_with_reason(overrides, fragment):
    with pytest.raises(ValueError, match=fragment):
        build_model(tiny(**overrides))


def test_packing_needs_a_full_mask_or_segment_ids():
    cfg = tiny(family="encoder", attention="nystrom", position="rope")
    validate_model_config(cfg)
    with pytest.raises(ValueError, match="packed examples"):
        validate_model_config(cfg, packed_inputs=True)
    validate_model_config(dataclasses.replace(cfg, attention="softmax"), packed_inputs=True)
    # The linear family keeps packed examples apart through segment ids.
    for kernel in ("performer", "linear", "taylor"):
        validate_model_config(dataclasses.replace(cfg, attention=kernel), packed_inputs=True)
        mt5_like = tiny(attention=kernel, position="rope")
        validate_model_config(mt5_like, packed_inputs=True)
    cfg = dataclasses.replace(cfg, family="decoder", attention="linear")
    # Packed or not, the synthesizer's masks work, but its logits are per row slot: an
    # example starting mid-row would be weighted differently than on its own.
    synthesizer = dataclasses.replace(cfg, attention="random_synthesizer", position="none")
    validate_model_config(synthesizer)
    with pytest.raises(ValueError, match="random_synthesizer.*Turn packing off"):
        validate_model_config(synthesizer, packed_inputs=True)


@pytest.mark.parametrize("kernel", ["performer", "linear", "taylor"])
def test_prefix_lm_with_a_linear_kernel_is_a_config_error(kernel):
    """A causal LM with these kernels is fine; a prefix LM needs a per-query mask they cannot
    apply, and the error names both ways out."""
    cfg = tiny(family="decoder", attention=kernel, position="rope")
    build_model(cfg)
    with pytest.raises(ValueError, match="objective='causal_lm'.*attention='softmax'"):
        build_model(cfg, prefix_lm=True)
    build_model(dataclasses.replace(cfg, attention="softmax"), prefix_lm=True)


def test_learned_positions_beyond_table():
    cfg = tiny(**BERT, max_length=8)
    with pytest.raises(ValueError, match="learned_hierarchical"):
        validate_model_config(cfg, max_sequence_length=12)
    model = build_model(cfg)
    variables = init(model, tokens(1, 8))
    with pytest.raises(ValueError, match="learned_hierarchical"):
        run(model, variables, tokens(1, 12))
    # Hierarchical extension: same params, longer inputs work, first 8 positions unchanged.
    hier = build_model(dataclasses.replace(cfg, position="learned_hierarchical"))
    long = tokens(1, 12)
    out = run(hier, variables, long)
    assert out.shape == (1, 12, 40) and bool(jnp.all(jnp.isfinite(out)))


def test_config_from_dict_rejects_unknown_key_and_wrong_type():
    cfg = model_config_from_dict({"family": "decoder", "d_model": 64, "rope_base": 500})
    assert cfg.rope_base == 500.0 and isinstance(cfg.rope_base, float)
    with pytest.raises(ValueError, match="model.num_head is not a config key.*model.num_heads"):
        model_config_from_dict({"num_head": 4})
    with pytest.raises(ValueError, match="model.scan_layers must be bool, got int 1"):
        model_config_from_dict({"scan_layers": 1})
    # Unset is None, and only where the field allows it.
    assert model_config_from_dict({"num_decoder_layers": None}).decoder_layers == 8
    with pytest.raises(ValueError, match="model.num_layers must be int, got None"):
        model_config_from_dict({"num_layers": None})
    with pytest.raises(ValueError, match="num_decoder_layers must be positive, got 0"):
        model_config_from_dict({"num_decoder_layers": 0})


# ------------------------------------------------------------------ masking properties


def embedding_grad_rows(model, variables, x, t, **kwargs):
    """|d logits[:, t] / d embedding row of each position's token| (ids are distinct)."""

    def f(table):
        params = jax.tree_util.tree_map(lambda a: a, nn.unbox(variables["params"]))
        params["token_embedder"]["embedding"] = table
        logits = model.apply({**variables, "params": params}, x, **kwargs)
        return jnp.sum(logits[:, t] ** 2)

    table = nn.unbox(variables["params"])["token_embedder"]["embedding"]
    grad = jax.jit(jax.grad(f))(table)  # jitted: op by op it takes seconds
    return np.asarray(jnp.abs(grad[x[0]]).sum(-1))


@pytest.mark.parametrize(
    "kernel,position",
    [
        ("softmax", "rope"),
        ("performer", "rope"),
        ("linear", "learned"),
        ("random_synthesizer", "none"),
    ],
)
def test_decoder_is_causal_by_gradient(kernel, position):
    cfg = tiny(family="decoder", attention=kernel, position=position)
    model = build_model(cfg)
    x = jnp.arange(3, 13, dtype=jnp.int32)[None]  # distinct ids: one embedding row each
    variables = init(model, x)
    t = 5
    grads = embedding_grad_rows(model, variables, x, t)
    assert np.all(grads[: t + 1] > 0)
    np.testing.assert_array_equal(grads[t + 1 :], 0.0)


def test_prefix_lm_sees_whole_prefix_but_not_targets():
    model = build_model(tiny(family="decoder", position="rope"))
    x = jnp.arange(3, 13, dtype=jnp.int32)[None]
    prefix = (jnp.arange(10) < 4).astype(jnp.int32)[None]
    variables = init(model, x)
    grads = embedding_grad_rows(model, variables, x, 1, prefix_mask=prefix)
    assert np.all(grads[:4] > 0)
    np.testing.assert_array_equal(grads[4:], 0.0)
    grads = embedding_grad_rows(model, variables, x, 6, prefix_mask=prefix)
    assert np.all(grads[:7] > 0)
    np.testing.assert_array_equal(grads[7:], 0.0)


def test_encoder_decoder_decoder_ignores_future_tokens():
    model = build_model(tiny())
    enc, dec = tokens(2, 8), tokens(2, 8, seed=1).at[:, 0].set(0)
    variables = init(model, enc, dec)
    changed = dec.at[:, 5:].set(dec[:, 5:] % 7 + 30)
    before, after = run(model, variables, enc, dec), run(model, variables, enc, changed)
    np.testing.assert_allclose(before[:, :5], after[:, :5], atol=1e-6, rtol=1e-6)
    assert not np.allclose(before[:, 5:], after[:, 5:])


@pytest.mark.parametrize(
    "overrides",
    [
        BERT,
        dict(BERT, position="rope"),
        dict(family="encoder", attention="nystrom", position="rope", num_landmarks=2),
        dict(family="encoder", attention="performer", position="sinusoidal"),
    ],
)
def test_encoder_padding_invariance(overrides):
    """Outputs at real tokens ignore what fills the padding (id 0, or any id in segment 0)."""
    model = build_model(tiny(**overrides))
    x = tokens(2, 8)
    real = jnp.arange(8)[None] < jnp.array([[8], [5]])
    padded = jnp.where(real, x, 0)
    variables = init(model, padded)
    by_id = run(model, variables, padded)
    by_segment = run(model, variables, x, segment_ids=real.astype(jnp.int32))
    np.testing.assert_allclose(by_id[1, :5], by_segment[1, :5], atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(by_id[0], by_segment[0], atol=2e-5, rtol=2e-5)
    if overrides is BERT:  # and equal to the unpadded sequence on its own
        alone = run(model, variables, x[1:, :5])
        np.testing.assert_allclose(by_id[1:, :5], alone, atol=2e-5, rtol=2e-5)


def test_encoder_decoder_encoder_padding_invariance():
    model = build_model(tiny())
    enc, dec = tokens(2, 8), tokens(2, 8, seed=3).at[:, 0].set(0)  # start id 0 is not padding
    padded = enc.at[:, 6:].set(0)
    variables = init(model, padded, dec)
    other_fill = enc.at[:, 6:].set(0).at[:, 6:].set(enc[:, 6:])
    segments = (jnp.arange(8) < 6).astype(jnp.int32)[None].repeat(2, 0)
    np.testing.assert_allclose(
        run(model, variables, padded, dec),
        run(model, variables, other_fill, dec, encoder_segment_ids=segments),
        atol=2e-5,
        rtol=2e-5,
    )


def packed_and_separate(seed=1, split=3, length=8, start_id=None):
    """Two [2, L] batches: a row packing two examples (twice), and each example in its own
    row (left-aligned, padding = segment 0). ``start_id`` sets each example's first token."""
    x_L = tokens(1, length, seed=seed)[0]
    if start_id is not None:
        x_L = x_L.at[0].set(start_id).at[split].set(start_id)
    first_L = jnp.arange(length) < split
    packed = jnp.stack([x_L, x_L])
    packed_segments = jnp.stack([jnp.where(first_L, 1, 2)] * 2).astype(jnp.int32)
    separate = jnp.stack([jnp.where(first_L, x_L, 0), jnp.roll(x_L, -split)])
    separate_segments = jnp.stack([first_L, jnp.arange(length) < length - split]).astype(jnp.int32)
    return packed, packed_segments, separate, separate_segments


@pytest.mark.parametrize(
    "overrides",
    [
        dict(family="decoder", position="rope"),
        dict(family="decoder", position="learned"),
        dict(family="decoder", position="alibi"),
        dict(BERT, position="t5_bias"),
    ],
)
def test_packed_segments_do_not_interact(overrides):
    model = build_model(tiny(**overrides))
    row, segments, separate, separate_segments = packed_and_separate()
    variables = init(model, row)
    packed = run(model, variables, row, segment_ids=segments)  # positions from segment ids
    alone = run(model, variables, separate, segment_ids=separate_segments)
    np.testing.assert_allclose(packed[0, :3], alone[0, :3], atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(packed[1, 3:], alone[1, :5], atol=2e-5, rtol=2e-5)


def test_packed_encoder_decoder_rows_do_not_interact():
    model = build_model(tiny())
    enc, enc_seg, enc_sep, enc_sep_seg = packed_and_separate(seed=1, split=3)
    dec, dec_seg, dec_sep, dec_sep_seg = packed_and_separate(seed=2, split=4, start_id=0)
    variables = init(model, enc, dec)
    packed = run(
        model, variables, enc, dec, encoder_segment_ids=enc_seg, decoder_segment_ids=dec_seg
    )
    alone = run(
        model,
        variables,
        enc_sep,
        dec_sep,
        encoder_segment_ids=enc_sep_seg,
        decoder_segment_ids=dec_sep_seg,
    )
    np.testing.assert_allclose(packed[0, :4], alone[0, :4], atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(packed[1, 4:], alone[1, :4], atol=2e-5, rtol=2e-5)


def test_positions_from_segments():
    segments = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(positions_from_segments(segments), [[0, 1, 2, 0, 1, 0, 0, 1]])


# ------------------------------------------------------------------ heads, remat, dropout


def test_classifier_head_and_token_types():
    cfg = tiny(**BERT, num_labels=3)
    model = build_model(cfg)
    x = tokens(2, 6)
    variables = init(model, x)
    logits = run(model, variables, x, token_type_ids=jnp.ones_like(x))
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    assert not np.allclose(logits, run(model, variables, x))  # token types matter


def test_tied_t5_rescales_decoder_output():
    cfg = tiny(tie_embeddings=True)
    model = build_model(cfg)
    enc, dec = tokens(1, 5), tokens(1, 4, seed=1)
    variables = init(model, enc, dec)
    assert "lm_head" not in variables["params"]
    hidden = {}

    def grab(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.module.name == "decoder" and context.method_name == "__call__":
            hidden["h"] = out
        return out

    with nn.intercept_methods(grab):
        logits = run(model, variables, enc, dec)
    table = nn.unbox(variables["params"])["token_embedder"]["embedding"]
    np.testing.assert_allclose(logits, hidden["h"] @ table.T * 32**-0.5, rtol=1e-5, atol=1e-5)


# Remat policies (none, full, save_dots) with and without scanned layers:
# tests/test_scan_layers.py::test_remat_policies_give_the_same_gradients.


def test_dropout_needs_rng_and_changes_output():
    cfg = tiny(family="decoder", position="rope", dropout_rate=0.5)
    model = build_model(cfg)
    x = tokens(1, 6)
    variables = init(model, x)
    a = run(model, variables, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    b = run(model, variables, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(run(model, variables, x), run(model, variables, x))


def test_attention_dropout_in_training_only_and_only_for_softmax():
    cfg = tiny(dropout_rate=0.5)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 5, 32)), jnp.float32)
    layer = MultiHeadAttention(cfg, "softmax", causal=True)
    variables = init(layer, x)
    train = jax.jit(
        lambda key: layer.apply(variables, x, deterministic=False, rngs={"dropout": key})
    )
    assert not np.allclose(train(jax.random.key(1)), train(jax.random.key(2)))
    plain_cfg = dataclasses.replace(cfg, dropout_rate=0.0)
    no_dropout = MultiHeadAttention(plain_cfg, "softmax", causal=True)
    np.testing.assert_array_equal(
        layer.apply(variables, x, deterministic=True),
        no_dropout.apply(variables, x, deterministic=False),
    )
    # A kernel that takes no dropout rng ignores training mode.
    synthesizer = MultiHeadAttention(cfg, "random_synthesizer", causal=True)
    synthesizer_variables = init(synthesizer, x)
    np.testing.assert_array_equal(
        synthesizer.apply(synthesizer_variables, x, deterministic=False),
        synthesizer.apply(synthesizer_variables, x),
    )
    # Decoding never drops weights (and needs no dropout rng), in self- and cross-attention.
    cross = MultiHeadAttention(cfg, "softmax", cross=True)

    def decode_step(module, deterministic):
        args = (x[:, :2],) if module is layer else (x[:, :2], x)
        cache = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, decode=True))
        cache = jax.tree_util.tree_map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), cache)
        # Cross-attention keeps no "cache" of its own: without a "cross_cache" collection
        # it projects the encoder side at every call.
        return module.apply(
            {**variables, **{name: cache[name] for name in ("cache",) if name in cache}},
            *args,
            decode=True,
            deterministic=deterministic,
            mutable=["cache"],
        )[0]

    decode_steps = jax.jit(
        lambda deterministic: [decode_step(m, deterministic) for m in (layer, cross)],
        static_argnums=0,
    )
    for trained, evaluated in zip(decode_steps(False), decode_steps(True), strict=True):
        np.testing.assert_array_equal(trained, evaluated)


def test_performer_projection_is_a_non_trainable_collection():
    model = build_model(tiny(family="decoder", attention="performer", position="rope"))
    x = tokens(1, 6)
    variables = init(model, x)
    projection = variables["random_features"]["decoder"]["layers_0"]["attention"]["projection"]
    assert projection.shape == (32, 16)
    assert "projection" not in str(jax.tree_util.tree_structure(variables["params"]))
    with pytest.raises(ValueError, match="random_features"):
        run(model, {"params": variables["params"]}, x)
    redrawn = {
        **variables,
        "random_features": jax.tree_util.tree_map(lambda p: p * 0.5, variables["random_features"]),
    }
    assert not np.allclose(run(model, variables, x), run(model, redrawn, x))


# ------------------------------------------------------------------ decode cache


def decode_incrementally(model, variables, x, prompt_len, **kwargs):
    cache = init_cache(model, x.shape[0], x.shape[1])
    logits, mutated = model.apply(
        {**variables, "cache": cache}, x[:, :prompt_len], decode=True, mutable=["cache"], **kwargs
    )
    outs = [logits]
    cache = mutated["cache"]
    for t in range(prompt_len, x.shape[1]):
        logits, mutated = model.apply(
            {**variables, "cache": cache}, x[:, t : t + 1], decode=True, mutable=["cache"]
        )
        cache = mutated["cache"]
        outs.append(logits)
    return jnp.concatenate(outs, axis=1)


# Every registered kernel with a causal form (RoPE where it uses q and k), and the biases.
DECODE_CASES = [
    (name, "none" if spec.traits.rope == "none" else "rope")
    for name, spec in KERNELS.items()
    if spec.traits.causal
] + [("softmax", "t5_bias"), ("softmax", "alibi"), ("linear", "sinusoidal")]


@pytest.mark.parametrize("kernel,position", DECODE_CASES)
def test_cached_decoding_matches_full_forward(kernel, position):
    # A window and a top-k smaller than the 8 tokens, so neither is plain softmax here.
    cfg = tiny(family="decoder", attention=kernel, position=position)
    cfg = dataclasses.replace(cfg, window_size=3, sparse_top_k=3)
    model = build_model(cfg)
    x = tokens(2, 8)
    variables = init(model, x)
    full = run(model, variables, x)
    np.testing.assert_allclose(
        decode_incrementally(model, variables, x, 3), full, atol=1e-4, rtol=1e-4
    )


def test_cached_prefix_lm_decoding_matches_full_forward():
    model = build_model(tiny(family="decoder", position="rope"))
    x = tokens(2, 8)
    prefix = (jnp.arange(8) < 3).astype(jnp.int32)[None].repeat(2, 0)
    variables = init(model, x)
    full = run(model, variables, x, prefix_mask=prefix)
    got = decode_incrementally(model, variables, x, 3, prefix_mask=prefix[:, :3])
    np.testing.assert_allclose(got, full, atol=1e-4, rtol=1e-4)


# The random synthesizer's cross-attention logits are indexed by the decoder slot, which
# incremental decoding has to track.
@pytest.mark.parametrize("overrides", [{}, dict(cross_attention="random_synthesizer")])
def test_encoder_decoder_cached_decoding_matches_full_forward(overrides):
    model = build_model(tiny(**overrides))
    enc = tokens(2, 6).at[1, 4:].set(0)
    dec = tokens(2, 5, seed=1).at[:, 0].set(0)
    variables = init(model, enc, dec)
    full = run(model, variables, enc, dec)
    encoded = model.apply(variables, enc, method="encode")
    cache = init_cache(model, 2, 5, encoder_length=6)
    outs = []
    for t in range(5):
        logits, mutated = model.apply(
            {**variables, "cache": cache},
            encoded,
            enc,
            dec[:, t : t + 1],
            decode=True,
            mutable=["cache"],
            method="decode",
        )
        cache = mutated["cache"]
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-4, rtol=1e-4)
    for leaf in jax.tree_util.tree_leaves(cache):
        assert leaf.ndim == 0 or leaf.shape[0] == 2  # batch-major: beams can reorder it


@pytest.mark.parametrize("family", ["encoder", "encoder_decoder"])
def test_training_mode_reaches_every_attention_layer(family):
    """Attention dropout needs ``deterministic=False`` to reach self- and cross-attention."""
    cfg = tiny(family=family, position="rope", dropout_rate=0.1)
    model = build_model(cfg)
    x = tokens(1, 6)
    args = (x, x) if family == "encoder_decoder" else (x,)
    variables = init(model, *args)
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, MultiHeadAttention) and context.method_name == "__call__":
            seen.append((context.module.name, kwargs.get("deterministic", True)))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        model.apply(variables, *args, deterministic=False, rngs={"dropout": jax.random.key(1)})
    names = {name for name, _ in seen}
    assert names == (
        {"attention", "cross_attention"} if family == "encoder_decoder" else {"attention"}
    )
    assert all(flag is False for _, flag in seen), seen


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_logits_are_sharded_by_the_vocab_rule(family):
    """The logits [B, L, V] carry (batch, length, vocab): on 8 simulated devices with the
    default rules their vocabulary is split over `tensor` and their rows over `data`, though
    every weight is replicated (without the constraint they come out replicated)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from rope_jax.training import sharding

    overrides = dict(BERT) if family == "encoder" else dict(family="decoder", position="rope")
    model = build_model(tiny(**overrides))
    x = tokens(2, 4)
    variables = init(model, x)
    mesh = sharding.make_mesh({"data": 2, "tensor": 4}, jax.devices()[:8])
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_LOGICAL_AXIS_RULES):
        logits = jax.jit(model.apply)(variables, x)
    want = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "tensor"))
    assert logits.shape == (2, 4, 40)
    assert logits.sharding.is_equivalent_to(want, logits.ndim), logits.sharding
