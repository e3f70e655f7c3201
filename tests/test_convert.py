"""Hugging Face import: logits parity on tiny random models built locally, and error paths."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from rope_jax import convert, scanning  # noqa: E402

TOLERANCE = 1e-4
VOCAB = 100


def _save(model, path, *, safetensors=True):
    model.save_pretrained(path)
    if not safetensors:
        # transformers 5 only writes safetensors; a PyTorch state dict is what older
        # checkpoints (and many on the Hub) ship as pytorch_model.bin.
        (path / convert.SAFETENSORS_FILE).unlink()
        torch.save(model.state_dict(), path / convert.TORCH_FILE)
    return path


def _t5_config(**kwargs):
    values = dict(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    values.update(kwargs)
    return values


def _bert_config(**kwargs):
    values = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    values.update(kwargs)
    return values


def _randomise(model, seed):
    """Default inits leave LayerNorms at 1/0 and biases at 0; perturb every trained weight
    (not RoFormer's fixed sinusoid table, which the model recomputes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "embed_positions" not in name:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def _inputs(seed, batch, length, *, pad_from=None):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, VOCAB, size=(batch, length)).astype(np.int32)
    if pad_from is not None:
        for row, start in enumerate(pad_from):
            tokens[row, start:] = 0
    return tokens


def _torch(array):
    return torch.from_numpy(np.asarray(array, np.int64))


def _encoder_decoder_parity(hf_model, path):
    model, params = convert.from_hf(path)
    encoder_tokens = _inputs(0, 3, 9, pad_from=[9, 5, 2])
    decoder_tokens = _inputs(1, 3, 6)
    decoder_tokens[:, 0] = 0  # T5's decoder start id, not padding
    with torch.no_grad():
        want = hf_model(
            input_ids=_torch(encoder_tokens),
            attention_mask=_torch(encoder_tokens != 0),
            decoder_input_ids=_torch(decoder_tokens),
        ).logits.numpy()
    for scan in (False, True):
        model, params = convert.from_hf(path, scan_layers=scan)
        got = jax.jit(model.apply)(
            {"params": params}, jnp.asarray(encoder_tokens), jnp.asarray(decoder_tokens)
        )
        assert got.dtype == jnp.float32 and got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), want, atol=TOLERANCE, rtol=0)
    return convert.from_hf(path)


def _encoder_parity(hf_model, path, *, pad_from=(11, 6)):
    model, params = convert.from_hf(path)
    tokens = _inputs(2, 2, 11, pad_from=list(pad_from))
    valid = tokens != 0
    with torch.no_grad():
        want = hf_model(input_ids=_torch(tokens), attention_mask=_torch(valid)).logits.numpy()
    # Scanned layers (one stacked `layers` subtree) give the same logits.
    for scan in (False, True):
        model, params = convert.from_hf(path, scan_layers=scan)
        got = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(tokens)))
        assert got.dtype == np.float32 and got.shape == want.shape
        # Outputs at padded positions are not defined by either model; compare the real tokens.
        np.testing.assert_allclose(got[valid], want[valid], atol=TOLERANCE, rtol=0)
    return convert.from_hf(path)


def test_t5_v1_1_gated_gelu_matches_hf(tmp_path):
    torch.manual_seed(0)
    config = transformers.T5Config(
        **_t5_config(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    )
    hf_model = _randomise(transformers.T5ForConditionalGeneration(config), 0)
    model, _ = _encoder_decoder_parity(hf_model, _save(hf_model, tmp_path))
    assert model.config.mlp_activation == "gated-gelu" and not model.config.tie_embeddings


def test_t5_original_relu_tied_from_torch_bin(tmp_path):
    torch.manual_seed(1)
    config = transformers.T5Config(**_t5_config(feed_forward_proj="relu"))
    hf_model = _randomise(transformers.T5ForConditionalGeneration(config), 1)
    path = _save(hf_model, tmp_path, safetensors=False)
    model, _ = _encoder_decoder_parity(hf_model, path)
    assert model.config.mlp_activation == "relu" and model.config.tie_embeddings


def test_mt5_matches_hf(tmp_path):
    torch.manual_seed(2)
    config = transformers.MT5Config(**_t5_config(feed_forward_proj="gated-gelu"))
    hf_model = _randomise(transformers.MT5ForConditionalGeneration(config), 2)
    model, _ = _encoder_decoder_parity(hf_model, _save(hf_model, tmp_path))
    # mT5 never rescales the decoder output (v1.1 recipe) whatever tie_word_embeddings says.
    assert not model.config.tie_embeddings


def test_bert_mlm_matches_hf(tmp_path):
    torch.manual_seed(3)
    config = transformers.BertConfig(**_bert_config())
    hf_model = _randomise(transformers.BertForMaskedLM(config), 3)
    _encoder_parity(hf_model, _save(hf_model, tmp_path))


def test_roformer_interleaved_rope_matches_hf(tmp_path):
    torch.manual_seed(4)
    config = transformers.RoFormerConfig(**_bert_config(embedding_size=32))
    hf_model = _randomise(transformers.RoFormerForMaskedLM(config), 4)
    path = _save(hf_model, tmp_path)
    model, params = _encoder_parity(hf_model, path)
    assert model.config.position == "rope" and model.config.rope_layout == "interleaved"
    # The pair layout matters: the half-split layout on the same weights gives other logits.
    half = convert.from_hf(path, rope_layout="half")[0]
    tokens = jnp.asarray(_inputs(2, 2, 11))
    gap = jnp.max(
        jnp.abs(
            jax.jit(model.apply)({"params": params}, tokens)
            - jax.jit(half.apply)({"params": params}, tokens)
        )
    )
    assert float(gap) > 100 * TOLERANCE


def test_bert_sequence_classification_matches_hf(tmp_path):
    torch.manual_seed(5)
    config = transformers.BertConfig(**_bert_config(num_labels=3))
    hf_model = _randomise(transformers.BertForSequenceClassification(config), 5)
    path = _save(hf_model, tmp_path)
    model, params = convert.from_hf(path)
    tokens = _inputs(6, 2, 9, pad_from=[9, 4])
    with torch.no_grad():
        want = hf_model(input_ids=_torch(tokens), attention_mask=_torch(tokens != 0)).logits
    got = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens))
    assert got.shape == (2, 3)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=TOLERANCE, rtol=0)


# ----------------------------------------------------------------------------- error paths


@pytest.fixture(scope="module")
def bert_checkpoint(tmp_path_factory):
    torch.manual_seed(6)
    config = transformers.BertConfig(**_bert_config(num_hidden_layers=1))
    hf_model = transformers.BertForMaskedLM(config).eval()
    return _save(hf_model, tmp_path_factory.mktemp("bert"))


def _rewrite(source, target, edit_tensors=None, edit_config=None):
    hf_config, tensors = convert.load_hf_checkpoint(source)
    target.mkdir()
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(hf_config)
    (target / "config.json").write_text(json.dumps(hf_config))
    from safetensors.numpy import save_file

    save_file(tensors, str(target / convert.SAFETENSORS_FILE))
    return target


def test_missing_tensor_is_named(bert_checkpoint, tmp_path):
    name = "bert.encoder.layer.0.attention.self.key.weight"
    path = _rewrite(bert_checkpoint, tmp_path / "ckpt", edit_tensors=lambda t: t.pop(name))
    with pytest.raises(convert.ConversionError, match=f"missing tensor '{name}'"):
        convert.from_hf(path)


def test_wrong_shape_names_tensor_and_shapes(bert_checkpoint, tmp_path):
    name = "bert.encoder.layer.0.intermediate.dense.weight"

    def shrink(tensors):
        tensors[name] = tensors[name][:48]

    path = _rewrite(bert_checkpoint, tmp_path / "ckpt", edit_tensors=shrink)
    with pytest.raises(convert.ConversionError) as info:
        convert.from_hf(path)
    message = str(info.value)
    assert name in message and "(48, 32)" in message and "(32, 64)" in message


def test_unknown_architecture_lists_supported(bert_checkpoint, tmp_path):
    def rename(hf_config):
        hf_config["architectures"] = ["GPT2LMHeadModel"]

    path = _rewrite(bert_checkpoint, tmp_path / "ckpt", edit_config=rename)
    with pytest.raises(convert.ConversionError, match="GPT2LMHeadModel") as info:
        convert.from_hf(path)
    for supported in convert.SUPPORTED_ARCHITECTURES:
        assert supported in str(info.value)


def test_unused_tensors_are_reported(bert_checkpoint, tmp_path):
    def add(tensors):
        tensors["bert.encoder.layer.7.output.dense.weight"] = np.zeros((2, 2), np.float32)

    path = _rewrite(bert_checkpoint, tmp_path / "ckpt", edit_tensors=add)
    with pytest.warns(UserWarning, match="layer.7.output.dense.weight"):
        convert.from_hf(path)
    with pytest.raises(convert.ConversionError, match="not used"):
        convert.from_hf(path, strict=True)


def test_bfloat16_safetensors_are_read(bert_checkpoint, tmp_path):
    from safetensors.torch import save_file

    tensors = {"a": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3) / 4}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    got = convert._read_safetensors(str(tmp_path / "x.safetensors"))["a"]
    np.testing.assert_array_equal(np.asarray(got, np.float32), tensors["a"].float().numpy())


def test_missing_files_are_explained(tmp_path):
    with pytest.raises(convert.ConversionError, match="config.json"):
        convert.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    with pytest.raises(convert.ConversionError, match="model.safetensors"):
        convert.from_hf(tmp_path)


def test_params_are_float32_arrays(bert_checkpoint):
    _, params = convert.from_hf(bert_checkpoint)
    leaves = jax.tree_util.tree_leaves(params)
    assert leaves and all(leaf.dtype == jnp.float32 for leaf in leaves)


# ----------------------------------------------------------------------------- export


def _project_model(**values):
    """A model of this project with random params drawn from its parameter shapes."""
    from rope_jax import model_config, models

    model = models.build_model(model_config.model_config_from_dict(values))
    rng = np.random.default_rng(1)
    flat = {
        path: jnp.asarray(rng.normal(size=shape.shape) / np.sqrt(shape.shape[0]), jnp.float32)
        for path, shape in convert.param_shapes(model).items()
    }
    return model, convert.unflatten_params(flat)


@pytest.mark.parametrize("tied", [False, True])
def test_t5_export_runs_in_hf_and_round_trips(tmp_path, tied):
    model, params = _project_model(
        family="encoder_decoder",
        vocab_size=VOCAB,
        d_model=32,
        num_heads=4,
        head_dim=8,
        d_ff=64,
        num_layers=2,
        relpos_num_buckets=8,
        relpos_max_distance=16,
        dropout_rate=0.0,
        mlp_activation="relu" if tied else "gated-gelu",
        tie_embeddings=tied,
    )
    assert convert.to_hf(model, params, tmp_path) == "T5ForConditionalGeneration"
    hf_model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    encoder_tokens = _inputs(0, 2, 7, pad_from=[7, 3])
    decoder_tokens = _inputs(1, 2, 5)
    decoder_tokens[:, 0] = 0
    with torch.no_grad():
        want = hf_model(
            input_ids=_torch(encoder_tokens),
            attention_mask=_torch(encoder_tokens != 0),
            decoder_input_ids=_torch(decoder_tokens),
        ).logits.numpy()
    got = jax.jit(model.apply)(
        {"params": params}, jnp.asarray(encoder_tokens), jnp.asarray(decoder_tokens)
    )
    np.testing.assert_allclose(np.asarray(got), want, atol=TOLERANCE, rtol=0)
    reloaded_model, reloaded = convert.from_hf(tmp_path, strict=True)
    jax.tree_util.tree_map(np.testing.assert_array_equal, reloaded, params)
    # Scanned: imported stacked, exported one block per layer, the same tensors.
    scanned_model, stacked = convert.from_hf(tmp_path, strict=True, scan_layers=True)
    jax.tree_util.tree_map(np.testing.assert_array_equal, stacked, scanning.stack_layers(params))
    architecture = "T5ForConditionalGeneration"
    jax.tree_util.tree_map(
        np.testing.assert_array_equal,
        convert.to_hf_tensors(architecture, scanned_model.config, stacked),
        convert.to_hf_tensors(architecture, model.config, params),
    )
    assert reloaded_model.config.tie_embeddings == tied
    assert reloaded_model.config.mlp_activation == model.config.mlp_activation


def test_bert_export_runs_in_hf_and_round_trips(tmp_path):
    model, params = _project_model(
        family="encoder",
        vocab_size=VOCAB,
        d_model=32,
        num_heads=4,
        head_dim=8,
        d_ff=64,
        num_layers=2,
        norm="layer",
        norm_placement="post",
        use_bias=True,
        tie_embeddings=True,
        scale_queries=True,
        position="learned",
        max_length=32,
        type_vocab_size=2,
        mlp_activation="gelu",
        gelu_approximate=False,
        layer_norm_epsilon=1e-12,
        dropout_rate=0.0,
        initializer_range=0.02,
    )
    assert convert.to_hf(model, params, tmp_path) == "BertForMaskedLM"
    hf_model = transformers.BertForMaskedLM.from_pretrained(tmp_path).eval()
    tokens = _inputs(3, 2, 9, pad_from=[9, 5])
    valid = tokens != 0
    with torch.no_grad():
        want = hf_model(input_ids=_torch(tokens), attention_mask=_torch(valid)).logits.numpy()
    got = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(tokens)))
    np.testing.assert_allclose(got[valid], want[valid], atol=TOLERANCE, rtol=0)
    _, reloaded = convert.from_hf(tmp_path, strict=True)
    jax.tree_util.tree_map(np.testing.assert_array_equal, reloaded, params)


def test_export_rejects_what_hf_cannot_run(tmp_path):
    from rope_jax import model_config

    cfg = model_config.model_config_from_dict(dict(family="encoder_decoder", position="rope"))
    with pytest.raises(convert.ConversionError, match="position='t5_bias'"):
        convert.to_hf(cfg, None, tmp_path)
    cfg = model_config.model_config_from_dict(dict(family="decoder", position="rope"))
    with pytest.raises(convert.ConversionError, match="no Hugging Face export"):
        convert.to_hf(cfg, None, tmp_path)
