"""Packed rows through the model shells with linear-family attention: an encoder MLM and a
decoder LM (and a T5-style encoder-decoder) whose rows pack several examples give each
example the logits and the loss gradients it gets in a padded row of its own, for
performer, linear and taylor with RoPE in both recipes (the segment ids reach the kernels)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_models import BERT, init, tiny

from rope_jax.models import build_model
from rope_jax.training import losses

LENGTH = 16
# Two packed rows (the second packs the same examples in the other order, so every example
# also starts at another offset) against four padded rows, one example each.
EXAMPLE_LENGTHS = (5, 7, 9, 6)
PACKED_ROWS = ((0, 1), (2, 3), (1, 0), (3, 2))


def quick_jit(fn):
    """``jax.jit`` without XLA's backend optimisations: tiny programs that run once."""
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


def _rows(example_rows, fields):
    """``[R, LENGTH]`` arrays of each field plus segment ids, packing ``example_rows`` (rows
    of one example are what ``pack=False`` gives: the example, then padding)."""
    out = {name: np.zeros((len(example_rows), LENGTH), np.int32) for name in fields}
    out["segment_ids"] = np.zeros((len(example_rows), LENGTH), np.int32)
    for row, indices in enumerate(example_rows):
        start = 0
        for segment, index in enumerate(indices):
            n = EXAMPLE_LENGTHS[index]
            for name in fields:
                out[name][row, start : start + n] = fields[name][index]
            out["segment_ids"][row, start : start + n] = segment + 1
            start += n
    return out


def _examples(seed, vocab_size, mlm):
    rng = np.random.default_rng(seed)
    tokens = [rng.integers(3, vocab_size, n) for n in EXAMPLE_LENGTHS]
    targets = [rng.integers(3, vocab_size, n) for n in EXAMPLE_LENGTHS]
    weights = [
        (rng.random(n) < 0.4).astype(np.int32) if mlm else np.ones(n, np.int32)
        for n in EXAMPLE_LENGTHS
    ]
    return {"input_tokens": tokens, "target_tokens": targets, "loss_weights": weights}


def _loss_and_grads(model, variables, batch, weight_rows):
    """Logits and the gradient of the summed cross-entropy over ``weight_rows``."""

    def loss(params):
        logits = model.apply(
            {**variables, "params": params},
            batch["input_tokens"],
            segment_ids=batch["segment_ids"],
        )
        weights = batch["loss_weights"] * weight_rows[:, None]
        return losses.weighted_cross_entropy(logits, batch["target_tokens"], weights)[
            "loss_sum"
        ], logits

    grads, logits = jax.grad(loss, has_aux=True)(variables["params"])
    return logits, grads


def _logits_per_example(logits, example_rows):
    """``{example index: its logits}`` from rows that hold ``example_rows`` in that order."""
    out = {}
    for row, indices in enumerate(example_rows):
        start = 0
        for index in indices:
            out.setdefault(index, []).append(logits[row, start : start + EXAMPLE_LENGTHS[index]])
            start += EXAMPLE_LENGTHS[index]
    return out


@pytest.mark.parametrize("recipe", ["feature", "input"])
@pytest.mark.parametrize("kernel", ["performer", "linear", "taylor"])
@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_packed_rows_equal_each_example_alone(family, kernel, recipe):
    family_overrides = dict(BERT, type_vocab_size=0) if family == "encoder" else {}
    cfg = tiny(
        **{
            **family_overrides,
            "family": family,
            "position": "rope",
            "attention": kernel,
            "rope_recipe": recipe,
            "head_dim": 8,
            "num_features": 8,
        }
    )
    model = build_model(cfg, packed_inputs=True)
    fields = _examples(0, cfg.vocab_size, mlm=family == "encoder")
    alone_rows = tuple((index,) for index in range(len(EXAMPLE_LENGTHS)))
    packed, alone = _rows(PACKED_ROWS, fields), _rows(alone_rows, fields)
    variables = init(model, packed["input_tokens"], segment_ids=packed["segment_ids"])
    step = quick_jit(functools.partial(_loss_and_grads, model))
    # Rows 2 and 3 hold the examples again, in the other order: their logits must agree
    # too; their loss stays out so that both batches differentiate the same total.
    packed_logits, packed_grads = step(variables, packed, np.array([1, 1, 0, 0], np.int32))
    alone_logits, alone_grads = step(variables, alone, np.ones(4, np.int32))
    want = _logits_per_example(np.asarray(alone_logits), alone_rows)
    for index, got in _logits_per_example(np.asarray(packed_logits), PACKED_ROWS).items():
        for logits in got:
            np.testing.assert_allclose(logits, want[index][0], rtol=1e-4, atol=1e-5)
    for got, want in zip(jax.tree.leaves(packed_grads), jax.tree.leaves(alone_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-6)


def test_packed_encoder_decoder_with_linear_cross_attention():
    """T5-style packing (encoder and decoder rows with segments 1, 2, ...) with performer
    everywhere: the decoder's cross-attention sees only its own example's encoder tokens."""
    cfg = tiny(attention="performer", position="rope", head_dim=8, num_features=8)
    model = build_model(cfg, packed_inputs=True)
    rng = np.random.default_rng(1)
    enc_lengths, dec_lengths = (6, 9), (5, 3)
    pairs = [
        (rng.integers(3, cfg.vocab_size, e), rng.integers(3, cfg.vocab_size, d))
        for e, d in zip(enc_lengths, dec_lengths, strict=True)
    ]

    def rows(groups):
        enc = np.zeros((len(groups), LENGTH), np.int32)
        dec = np.zeros((len(groups), LENGTH), np.int32)
        enc_ids, dec_ids = np.zeros_like(enc), np.zeros_like(dec)
        for row, indices in enumerate(groups):
            e_start = d_start = 0
            for segment, index in enumerate(indices):
                e, d = pairs[index]
                enc[row, e_start : e_start + len(e)], dec[row, d_start : d_start + len(d)] = e, d
                enc_ids[row, e_start : e_start + len(e)] = segment + 1
                dec_ids[row, d_start : d_start + len(d)] = segment + 1
                e_start, d_start = e_start + len(e), d_start + len(d)
        return enc, dec, enc_ids, dec_ids

    packed = rows(((0, 1), (1, 0)))
    alone = rows(((0,), (1,)))
    variables = init(model, packed[0], packed[1])

    @quick_jit
    def logits_and_grads(variables, enc, dec, enc_ids, dec_ids, weight_rows):
        def loss(params):
            logits = model.apply(
                {**variables, "params": params},
                enc,
                dec,
                encoder_segment_ids=enc_ids,
                decoder_segment_ids=dec_ids,
            )
            weights = (dec_ids != 0) * weight_rows[:, None]
            return jnp.sum(jax.nn.log_softmax(logits)[..., 3] * weights), logits

        grads, logits = jax.grad(loss, has_aux=True)(variables["params"])
        return logits, grads

    packed_logits, packed_grads = logits_and_grads(variables, *packed, np.array([1, 0]))
    alone_logits, alone_grads = logits_and_grads(variables, *alone, np.array([1, 1]))
    for row, order in enumerate(((0, 1), (1, 0))):
        start = 0
        for index in order:
            n = dec_lengths[index]
            np.testing.assert_allclose(
                packed_logits[row, start : start + n], alone_logits[index, :n], rtol=1e-4, atol=1e-5
            )
            start += n
    for got, want in zip(jax.tree.leaves(packed_grads), jax.tree.leaves(alone_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-6)
