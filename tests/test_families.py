"""The per-family task layer: each family's loss sums equal a float64 numpy cross entropy on
the same logits; the model call is the module's own contract; classification heads and
candidate scores against numpy; a batch of another family is refused by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rope_jax import families
from rope_jax.model_config import ModelConfig
from rope_jax.models import build_model

TINY = dict(
    vocab_size=40, d_model=32, num_heads=2, head_dim=16, d_ff=48, num_layers=1, dropout_rate=0.0
)


def _lm_batch(family, rng, batch=3, length=6):
    tokens = rng.integers(2, 40, (batch, length)).astype(np.int32)
    targets = rng.integers(2, 40, (batch, length)).astype(np.int32)
    weights = (rng.random((batch, length)) < 0.6).astype(np.int32)
    weights[:, 0] = 1
    weights[-1, -2:] = 0  # padding at the end of a row
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy()
    segments = np.ones((batch, length), np.int32)
    if family == "encoder_decoder":
        return {
            "encoder_input_tokens": tokens,
            "encoder_segment_ids": segments,
            "encoder_positions": positions,
            "decoder_input_tokens": np.roll(targets, 1, axis=1),
            "decoder_target_tokens": targets,
            "decoder_segment_ids": segments,
            "decoder_positions": positions,
            "decoder_loss_weights": weights,
        }
    batch_ = {
        "input_tokens": tokens,
        "target_tokens": targets,
        "loss_weights": weights,
        "segment_ids": segments,
        "positions": positions,
    }
    if family == "decoder":
        batch_["prefix_mask"] = np.zeros_like(tokens)
    return batch_


def _numpy_cross_entropy(logits, targets, weights):
    """float64: per-token -log softmax(logits)[target], weighted sums and argmax accuracy."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    token_ce = log_z - picked
    correct = logits.argmax(-1) == targets
    return token_ce, {
        "cross_entropy_sum": (token_ce * weights).sum(),
        "weight_sum": weights.sum(),
        "correct_sum": (correct * weights).sum(),
    }


@pytest.mark.parametrize("family", ["encoder", "encoder_decoder", "decoder"])
def test_loss_sums_equal_float64_numpy_cross_entropy(family):
    model = build_model(ModelConfig(family=family, **TINY))
    task = families.for_model(model)
    assert task.family == family and type(task) is families.TASKS[family]
    batch = {k: jnp.asarray(v) for k, v in _lm_batch(family, np.random.default_rng(0)).items()}
    # Every call jitted: eagerly, each of the model's ops would compile on its own.
    variables = jax.jit(task.init)(task.init_rngs(jax.random.key(0)), batch)
    # The model call is the module's own contract (contracts.md batch format).
    logits = jax.jit(task.logits)(variables, batch)
    if family == "encoder_decoder":
        direct = jax.jit(model.apply)(
            variables,
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            encoder_segment_ids=batch["encoder_segment_ids"],
            decoder_segment_ids=batch["decoder_segment_ids"],
            encoder_positions=batch["encoder_positions"],
            decoder_positions=batch["decoder_positions"],
        )
    else:
        direct = jax.jit(model.apply)(
            variables,
            batch["input_tokens"],
            segment_ids=batch["segment_ids"],
            positions=batch["positions"],
        )
    np.testing.assert_array_equal(logits, direct)

    # Targets and weights named by the batch contract, not asked of the task.
    prefix = "decoder_" if family == "encoder_decoder" else ""
    targets = np.asarray(batch[f"{prefix}target_tokens"])
    weights = np.asarray(batch[f"{prefix}loss_weights"])
    token_ce, expected = _numpy_cross_entropy(logits, targets, weights)
    loss_sums = jax.jit(task.loss_sums, static_argnames=("deterministic", "z_loss"))
    sums = loss_sums(variables, batch, deterministic=True)
    for name, value in expected.items():
        np.testing.assert_allclose(float(sums[name]), value, rtol=1e-5, err_msg=name)
    assert float(sums["dropped_sum"]) == 0.0
    np.testing.assert_allclose(jax.jit(task.token_losses)(variables, batch), token_ce, rtol=1e-5)
    np.testing.assert_allclose(
        jax.jit(task.score)(variables, batch), -(token_ce * weights).sum(-1), rtol=1e-5
    )
    # z-loss: weighted sum of logsumexp squared, on top of the cross entropy.
    with_z = loss_sums(variables, batch, deterministic=True, z_loss=1e-2)
    logits64 = np.asarray(logits, np.float64)
    log_z = np.log(np.exp(logits64).sum(-1))
    np.testing.assert_allclose(
        float(with_z["loss_sum"]),
        expected["cross_entropy_sum"] + 1e-2 * (log_z**2 * weights).sum(),
        rtol=1e-5,
    )


def test_batch_of_another_family_is_refused_by_name():
    task = families.for_model(build_model(ModelConfig(family="encoder_decoder", **TINY)))
    batch = _lm_batch("decoder", np.random.default_rng(0))
    with pytest.raises(KeyError, match="encoder_decoder batch needs .*encoder_input_tokens"):
        task.loss_sums({}, batch, deterministic=True)
    with pytest.raises(ValueError, match="unknown model family 'mlm'"):
        families.for_family("mlm", None)
    with pytest.raises(TypeError, match="no config.family"):
        families.for_model(object())


def test_classification_head_sums_against_numpy():
    """Encoder with a class head: [N, 1, L] arrays, softmax over classes; multiple choice:
    one score per candidate, -log of the right candidates' share among the valid ones."""
    cfg = ModelConfig(family="encoder", num_labels=3, type_vocab_size=2, **TINY)
    task = families.for_model(build_model(cfg))
    assert task.classifies
    rng = np.random.default_rng(1)
    n, length = 4, 5
    arrays = {
        "input_tokens": rng.integers(2, 40, (n, 1, length)).astype(np.int32),
        "token_type_ids": np.zeros((n, 1, length), np.int32),
        "segment_ids": np.ones((n, 1, length), np.int32),
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (n, 1, length)).copy(),
        "choice_mask": np.ones((n, 1), np.int32),
        "labels": np.array([0, 2, 1, 2], np.int32),
    }
    variables = jax.jit(task.init)(task.init_rngs(jax.random.key(0)), arrays)
    logits = np.asarray(jax.jit(task.head_logits)(variables, arrays), np.float64)
    assert logits.shape == (n, 1, 3)
    ce, expected = _numpy_cross_entropy(logits[:, 0], arrays["labels"], np.ones(n))
    sums = jax.jit(task.loss_sums, static_argnames="deterministic")(
        variables, arrays, deterministic=True
    )
    for name, value in expected.items():
        np.testing.assert_allclose(float(sums[name]), value, rtol=1e-5, err_msg=name)

    # Multiple choice (one score per candidate): row 0 has two right of 3 valid, row 1 one
    # right of 2, row 2 none (unlabelled: no weight).
    scores = rng.normal(size=(3, 4, 1))
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    gold = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]], np.float32)
    s = scores[..., 0]
    row0 = np.log(np.exp(s[0, :3]).sum()) - np.log(np.exp(s[0, [0, 2]]).sum())
    row1 = np.log(np.exp(s[1, :2]).sum()) - s[1, 1]
    correct = (np.argmax(s[0, :3]) in (0, 2)) + (np.argmax(s[1, :2]) == 1)
    sums = families.classification_sums(
        jnp.asarray(scores, jnp.float32), {"labels": gold, "choice_mask": mask}
    )
    np.testing.assert_allclose(float(sums["cross_entropy_sum"]), row0 + row1, rtol=1e-5)
    assert float(sums["weight_sum"]) == 2.0 and float(sums["correct_sum"]) == correct
