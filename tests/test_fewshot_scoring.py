"""Cloze scores against manual float64 numpy lookups of the model's logits, per family, and
the P-tuning prompt substitution."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from rope_jax import families
from rope_jax.evaluation import cloze, cloze_inputs, pvp
from rope_jax.model_config import model_config_from_dict
from rope_jax.models import build_model

MASK_ID, SENTINEL_ID = 259, 258


class ByteCodec:
    """UTF-8 bytes past the T5 specials (pad 0, EOS 1), with a mask and a sentinel id."""

    eos_id, pad_id, mask_id, num_sentinels = 1, 0, MASK_ID, 1

    def sentinel_id(self, k):
        return SENTINEL_ID - k

    def encode(self, text):
        return [b + 3 for b in text.encode()]

    def decode(self, ids):
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode(errors="replace")


RTE = [
    {"premise": "a b.", "hypothesis": "c d.", "label": "entailment", "idx": 0},
    {"premise": "xy", "hypothesis": "z.", "label": "not_entailment", "idx": 1},
]
COPA = [{"premise": "p.", "choice1": "Ab", "choice2": "Cde", "question": "effect", "label": 1,
         "idx": 0}]  # fmt: skip


LENGTH = 48  # every encoder and decoder row, so each program compiles once


@functools.cache
def _task(family, **kwargs):
    """The cloze task and random variables drawn on the host from the init's shapes (any
    values do: the tests compare the cloze code with the same model run by hand)."""
    cfg = model_config_from_dict(
        dict(
            common.model_config(
                family=family, vocab_size=260, d_model=16, num_heads=2, head_dim=8, d_ff=32,
                num_layers=1, max_length=64, dropout_rate=0.0,
            )
        )
    )  # fmt: skip
    inner = families.for_model(build_model(cfg))
    task = cloze.ClozeTask(inner, **kwargs)
    shapes = jax.eval_shape(lambda key: nn.unbox(task.init(task.init_rngs(key))), jax.random.key(0))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.normal(0.0, 0.5, s.shape).astype(s.dtype), shapes)
    return task, variables


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, variables, *args, **kwargs):
    """The model run by hand (jitted once per model and shape)."""
    return model.apply(variables, *args, **kwargs)


@functools.partial(jax.jit, static_argnums=0, static_argnames="iterative")
def _candidate_scores(task, variables, batch, iterative=None):
    return task.candidate_scores(variables, batch, iterative=iterative)


def _scores(task, variables, batch, **kwargs):
    return np.asarray(
        _candidate_scores(task, variables, {k: jnp.asarray(v) for k, v in batch.items()}, **kwargs)
    )


def _pad(ids, length):
    return np.asarray([list(ids) + [0] * (length - len(ids))], np.int32)


def _log_softmax64(logits):
    logits = np.asarray(logits, np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def test_encoder_verbalizer_scores_are_the_mlm_log_probs_at_the_mask():
    clozes = pvp.cloze_examples("RTE", RTE, method="pet", pattern_id=4, training=False)
    codec = ByteCodec()
    arrays = cloze_inputs.cloze_arrays(clozes, codec, family="encoder", max_length=LENGTH)
    task, variables = _task("encoder")
    apply = functools.partial(_apply, task.model)
    # The row as PET builds it: parts tokenised one by one, one mask per verbalizer token, EOS.
    ids = []
    for part in clozes[0].parts_a:
        ids += [MASK_ID] * 4 if part.kind == "mask" else codec.encode(part.text)  # "true"
    np.testing.assert_array_equal(arrays["tokens"][0, 0, : len(ids) + 1], ids + [1])
    # One-token verbalizers (a byte each): PET's single mask.
    one_token = [pvp.Cloze(c.parts_a, c.parts_b, ("Y", "N"), c.label, c.record) for c in clozes]
    arrays = cloze_inputs.cloze_arrays(one_token, codec, family="encoder", max_length=LENGTH)
    assert arrays["tokens"].shape[1] == 1  # one shared row scores both labels
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}
    scores = _scores(task, variables, batch)
    for i in range(len(one_token)):
        row = arrays["tokens"][i, 0]
        logits = np.asarray(apply(variables, jnp.asarray(row[None])))[0]
        mask_at = int(np.flatnonzero(row == MASK_ID)[0])
        expected = _log_softmax64(logits)[mask_at][[ord("Y") + 3, ord("N") + 3]]
        np.testing.assert_allclose(scores[i], expected, rtol=1e-5)
        # PET's convert_mlm_logits_to_cls_logits takes raw logits: the same ranking.
        raw = logits[mask_at][[ord("Y") + 3, ord("N") + 3]]
        assert np.argmax(raw) == np.argmax(scores[i])
    loss_sums = jax.jit(functools.partial(task.loss_sums, deterministic=True))
    sums = loss_sums(variables, batch)
    log_norm = np.log(np.exp(np.asarray(scores, np.float64)).sum(-1))
    gold = np.asarray(scores, np.float64)[[0, 1], [0, 1]]
    np.testing.assert_allclose(sums["loss_sum"], np.sum(log_norm - gold), rtol=1e-5)


def test_encoder_multi_token_candidates_iterative_and_parallel():
    """PET's default decoding: fill the most probable remaining mask, run again, sum."""
    clozes = pvp.cloze_examples("COPA", COPA, method="pet", pattern_id=1, training=False)
    codec = ByteCodec()
    arrays = cloze_inputs.cloze_arrays(clozes, codec, family="encoder", max_length=LENGTH)
    task, variables = _task("encoder")
    apply = functools.partial(_apply, task.model)
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}
    iterative = _scores(task, variables, batch, iterative=True)[0]
    parallel = _scores(task, variables, batch, iterative=False)[0]
    for k, choice in enumerate(("ab", "cde")):
        targets = codec.encode(choice)
        row = arrays["tokens"][0, k].copy()
        masks = list(np.flatnonzero(row == MASK_ID))
        assert len(masks) == len(targets)
        first = _log_softmax64(apply(variables, jnp.asarray(row[None]))[0])
        np.testing.assert_allclose(
            parallel[k], sum(first[m, t] for m, t in zip(masks, targets, strict=True)), rtol=1e-5
        )
        total, todo = 0.0, dict(zip(masks, targets, strict=True))
        while todo:
            lp = _log_softmax64(apply(variables, jnp.asarray(row[None]))[0])
            m = max(todo, key=lambda pos: lp[pos, todo[pos]])
            total += lp[m, todo[m]]
            row[m] = todo.pop(m)
        np.testing.assert_allclose(iterative[k], total, rtol=1e-5)


@pytest.mark.parametrize("family", ["decoder", "encoder_decoder"])
def test_decoder_and_encoder_decoder_scores_are_manual_log_likelihoods(family):
    clozes = pvp.cloze_examples("COPA", COPA, method="pet", pattern_id=1, training=False)
    codec = ByteCodec()
    arrays = cloze_inputs.cloze_arrays(clozes, codec, family=family, max_length=LENGTH)
    task, variables = _task(family)
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}
    scores = _scores(task, variables, batch)[0]
    # The pattern up to the mask: '<c1> or <c2> ? <premise> , so' (parts tokenised one by one).
    a = clozes[0].parts_a
    before = [p for p in a[: [p.kind for p in a].index("mask")]]
    prefix = [t for p in before for t in codec.encode(p.text)]
    for k, choice in enumerate(("ab", "cde")):
        target = codec.encode(choice)
        if family == "decoder":
            # Padded on the right to one length: a causal LM's earlier outputs are the same.
            logits = _apply(task.model, variables, _pad(prefix + target, LENGTH))
            log_probs = _log_softmax64(logits[0])
            expected = sum(log_probs[len(prefix) + j - 1, t] for j, t in enumerate(target))
        else:
            encoder = prefix + [SENTINEL_ID] + [codec.encode(".")[0], 1]
            decoder = _pad([0, SENTINEL_ID] + target, 8)  # causal decoder: padding after
            logits = _apply(task.model, variables, jnp.asarray([encoder]), decoder)
            log_probs = _log_softmax64(logits[0])
            expected = sum(log_probs[1 + j, t] for j, t in enumerate(target))
        np.testing.assert_allclose(scores[k], expected, rtol=1e-5)


WIC = [
    {"word": "bank", "sentence1": "A bank.", "sentence2": "The bank.", "start1": 2, "end1": 6,
     "start2": 4, "end2": 8, "idx": 0, "label": False},
]  # fmt: skip


def test_prompt_positions_take_the_prompt_encoder_vectors_in_order():
    # WiC's P-tuning pattern 4 has four prompt positions: the i-th takes vector i.
    clozes = pvp.cloze_examples("WiC", WIC, method="ptuning", pattern_id=4, training=True)
    arrays = cloze_inputs.cloze_arrays(clozes, ByteCodec(), family="encoder", max_length=LENGTH)
    assert (arrays["prompt_mask"].sum(-1) == 4).all()
    # PET's auxiliary MLM loss never masks a prompt position (its input is not a token).
    maskable = cloze.mlm_maskable(arrays, MASK_ID)
    assert maskable.any() and not (maskable & (arrays["prompt_mask"][:, 0] > 0)).any()
    task, variables = _task("encoder", num_prompts=4, prompt_kind="embedding")
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}
    scores = _scores(task, variables, batch, iterative=False)  # one pass, as below
    # Manually: embed, overwrite the prompt positions with the table's rows, run the stack.
    table = np.asarray(variables["params"][cloze.PROMPT_PARAMS]["embedding"])
    lm = {"params": {k: v for k, v in variables["params"].items() if k != cloze.PROMPT_PARAMS}}
    assert arrays["tokens"].shape[1] == 2  # "Yes"/"No" are 3/2 bytes: a row per candidate
    changed = False
    for k in range(2):
        for i in range(len(clozes)):
            row, mask = arrays["tokens"][i, k][None], arrays["prompt_mask"][i, k][None]
            prompts = np.zeros(row.shape + table.shape[-1:], table.dtype)
            prompts[0, np.flatnonzero(mask[0])] = table
            logits = _apply(
                task.model, lm, row, prompt_embeddings=jnp.asarray(prompts), prompt_mask=mask
            )[0]
            changed |= not np.allclose(logits, _apply(task.model, lm, row)[0])
            lp = _log_softmax64(logits)
            slots = arrays["slot_positions"][i, k][arrays["slot_weights"][i, k] > 0]
            tokens = arrays["candidate_tokens"][i, k][: len(slots)]
            np.testing.assert_allclose(
                np.asarray(scores)[i, k],
                sum(lp[p, t] for p, t in zip(slots, tokens, strict=True)),
                rtol=1e-5,
            )
    assert changed  # the prompt vectors reach the output
    # freeze_lm: the LM's gradient is zero (so the clipping norm is the prompts' alone).
    frozen = cloze.ClozeTask(task.inner, num_prompts=4, prompt_kind="embedding", freeze_lm=True)
    grads = jax.jit(
        jax.grad(lambda p: frozen.loss_sums({"params": p}, batch, deterministic=True)["loss_sum"])
    )(variables["params"])
    for name, grad in grads.items():
        nonzero = bool(jnp.any(jax.tree.reduce(lambda a, g: a | jnp.any(g != 0), grad, False)))
        assert nonzero == (name == cloze.PROMPT_PARAMS), name


def test_pet_auxiliary_mlm_loss_mixes_linearly_with_the_cloze_loss():
    """PET ``mlm_train_step``: ``alpha * L_cloze + (1 - alpha) * L_mlm`` (same dropout key,
    so the same BERT masking at every alpha)."""
    clozes = pvp.cloze_examples("RTE", RTE, method="pet", pattern_id=4, training=True)
    arrays = cloze_inputs.cloze_arrays(clozes, ByteCodec(), family="encoder", max_length=LENGTH)
    task, variables = _task("encoder")
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}

    @jax.jit
    def losses(variables, batch, key):
        out = []
        for alpha in (1.0, 0.0, 0.25):
            mixed = cloze.ClozeTask(task.inner, pet_alpha=alpha, mask_id=MASK_ID)
            sums = mixed.loss_sums(variables, batch, deterministic=False, rngs={"dropout": key})
            out.append(sums["loss_sum"])
        return out

    key = jax.random.key(1)
    cloze_only, mlm_only, mixed = (float(x) for x in losses(variables, batch, key))
    assert mlm_only > 0 and abs(mlm_only - cloze_only) > 1e-3
    np.testing.assert_allclose(mixed, 0.25 * cloze_only + 0.75 * mlm_only, rtol=1e-5)
    # The MLM part by hand: the mean float64 cross entropy of the original tokens at the
    # corrupted positions (the corruption is the step's, from its key), per example.
    tokens = arrays["tokens"][:, 0]
    maskable = np.asarray(cloze.mlm_maskable(arrays, MASK_ID))
    np.testing.assert_array_equal(
        maskable,
        (arrays["segment_ids"][:, 0] > 0) & (tokens != MASK_ID),  # RTE: no prompts
    )
    masking = jax.jit(functools.partial(cloze.bert_masking, mask_id=MASK_ID, vocab_size=260))
    inputs, chosen = jax.device_get(masking(tokens, maskable, key))
    assert chosen.any() and not (chosen & ~maskable).any()
    logits = _apply(
        task.model,
        variables,
        jnp.asarray(inputs),
        segment_ids=jnp.asarray(arrays["segment_ids"][:, 0]),
        positions=jnp.asarray(arrays["positions"][:, 0]),
    )
    log_probs = _log_softmax64(logits)
    rows, cols = np.nonzero(chosen)
    expected = -log_probs[rows, cols, tokens[rows, cols]].mean() * len(tokens)
    np.testing.assert_allclose(mlm_only, expected, rtol=1e-5)


def test_bert_masking_rates():
    """15 % of the maskable positions, of which 80 % mask, 10 % a random id, 10 % kept."""
    tokens = np.arange(64 * 512, dtype=np.int32).reshape(64, 512) % 250 + 3
    maskable = np.ones_like(tokens, bool)
    maskable[:, ::4] = False
    masking = jax.jit(functools.partial(cloze.bert_masking, mask_id=MASK_ID, vocab_size=260))
    inputs, chosen = jax.device_get(masking(tokens, maskable, jax.random.key(3)))
    assert not (chosen & ~maskable).any() and (inputs[~chosen] == tokens[~chosen]).all()
    assert abs(chosen.sum() / maskable.sum() - 0.15) < 0.01
    masked = inputs[chosen] == MASK_ID
    kept = inputs[chosen] == tokens[chosen]
    assert abs(masked.mean() - 0.8) < 0.03 and abs(kept.mean() - 0.1) < 0.02
    # Random ids span the vocabulary (1 in 260 equals the original by chance).
    assert abs((~masked & ~kept).mean() - 0.1 * 259 / 260) < 0.02
