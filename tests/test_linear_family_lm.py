"""Causal LMs with linear-family kernels end to end: ``configs/decoder.py`` with
``attention=performer`` (``linear``, ``taylor``) trains and evaluates through the trainer,
packed or not, and generates with the kernel's recurrent state, which equals the full
forward pass."""

import shutil

import jax
import numpy as np
import pytest
from training_toys import enable_compilation_cache, restore_compilation_cache

from configs import decoder as decoder_config
from rope_jax import decoding
from rope_jax.attention import FeatureState
from rope_jax.data import embedded, pipeline
from rope_jax.models import init_cache
from rope_jax.training import trainer

SHRINK = (
    "num_train_steps=2,batch_size=2,inputs_length=16,num_layers=1,d_model=32,d_ff=64,"
    "num_heads=2,head_dim=16,num_features=16,log_every_steps=1,checkpoint_every_steps=2,"
    "eval_every_steps=2,eval_steps=1,measure_matmul_peak=False"
)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    previous = enable_compilation_cache(tmp_path_factory.mktemp("xla_cache"))
    yield
    restore_compilation_cache(previous)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tokenizer_cache")
    embedded.load_or_train_tokenizer(workdir, vocab_size=2048, num_extra_ids=100)
    return workdir / "tokenizer"


def _train(arg, workdir, tokenizer_dir):
    shutil.copytree(tokenizer_dir, workdir / "tokenizer")
    config = decoder_config.get_config(f"tiny,{SHRINK},{arg}")
    config.lock()
    model, _ = trainer.build_model(config)
    result = trainer.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
    return model, result


@pytest.mark.parametrize(
    "kernel, pack", [("performer", False), ("linear", True), ("taylor", False)]
)
def test_causal_lm_trains_evaluates_and_generates_recurrently(
    kernel, pack, tmp_path, tokenizer_dir
):
    model, result = _train(f"attention={kernel},pack={pack}", tmp_path, tokenizer_dir)
    assert sorted(result.history) == [1, 2]
    assert all(np.isfinite(m["loss"]) for m in result.history.values())
    assert np.isfinite(result.eval_history[2]["loss"])

    params = result.state.params
    variables = {"random_features": result.state.random_features} if kernel == "performer" else None
    cache = init_cache(model, 2, 12)
    # Recurrent decoding keeps running sums, not keys and values.
    layer_cache = cache["decoder"]["layers_0"]["attention"]
    assert set(layer_cache) == {"state"} and isinstance(layer_cache["state"], FeatureState)

    # Greedy decoding through the recurrent state equals re-running the full forward pass over
    # the prefix at every step: same tokens, same log-probabilities.
    prompts = np.array([[5, 6, 7, 8], [9, 10, 0, 0]], np.int32)
    kwargs = dict(prompt_lengths_B=np.array([4, 2]), max_length=12, variables=variables)
    recurrent = decoding.generate(model, params, prompts, **kwargs)
    recomputed = decoding.generate(model, params, prompts, use_cache=False, **kwargs)
    np.testing.assert_array_equal(recurrent.sequences, recomputed.sequences)
    np.testing.assert_allclose(recurrent.log_probs, recomputed.log_probs, rtol=1e-4, atol=1e-4)


def test_prefix_lm_with_a_linear_kernel_fails_at_config_time():
    config = decoder_config.get_config("tiny,attention=performer,objective=prefix_lm")
    with pytest.raises(ValueError, match="objective='causal_lm'.*attention='softmax'"):
        trainer.build_model(config)


def test_only_prefix_lm_batches_carry_a_prefix_mask():
    """A causal-LM row has no prefix; its batch has no prefix mask to reject (T5X's causal
    LM feature converter likewise emits no ``decoder_causal_attention``)."""
    causal = pipeline.pack_spec(pipeline.DataConfig(objective="causal_lm", inputs_length=8))
    prefix = pipeline.pack_spec(pipeline.DataConfig(objective="prefix_lm", inputs_length=8))
    assert "prefix_mask" not in causal.output_keys()
    assert "prefix_mask" in prefix.output_keys()
