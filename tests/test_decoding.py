"""Decoding: filters against numpy references, search invariants on a toy recurrent model."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rope_jax import decoding, families, projections

VOCAB = 11
EOS = 1


# ----------------------------------------------------------------------------- filters


def _numpy_top_k(logits, k, keep_id=None):
    out = np.full_like(logits, -np.inf)
    for row in range(logits.shape[0]):
        ids = np.argsort(-logits[row], kind="stable")[:k]
        out[row, ids] = logits[row, ids]
        if keep_id is not None:
            out[row, keep_id] = logits[row, keep_id]
    return out


def _numpy_top_p(logits, p, keep_id=None):
    logits = logits.astype(np.float64)
    out = np.full_like(logits, -np.inf)
    for row in range(logits.shape[0]):
        probs = np.exp(logits[row] - logits[row].max())
        probs /= probs.sum()
        mass = 0.0
        for token in np.argsort(-probs, kind="stable"):
            out[row, token] = logits[row, token]
            mass += probs[token]
            if mass >= p:
                break
        if keep_id is not None:
            out[row, keep_id] = logits[row, keep_id]
    return out


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("keep_id", [None, EOS])
def test_top_k_filter_matches_numpy(k, keep_id):
    logits = np.random.default_rng(k).normal(size=(4, VOCAB)).astype(np.float32)
    got = np.asarray(decoding.top_k_filter(jnp.asarray(logits), k, keep_id=keep_id))
    np.testing.assert_array_equal(got, _numpy_top_k(logits, k, keep_id))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("keep_id", [None, EOS])
def test_top_p_filter_matches_numpy(p, keep_id):
    logits = 2.0 * np.random.default_rng(7).normal(size=(5, VOCAB)).astype(np.float32)
    got = np.asarray(decoding.top_p_filter(jnp.asarray(logits), p, keep_id=keep_id))
    want = _numpy_top_p(logits, p, keep_id)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)


def test_length_penalty_matches_wu_et_al():
    for length, alpha in [(1, 0.6), (10, 0.6), (7, 1.0), (3, 0.0)]:
        want = ((5.0 + length) / 6.0) ** alpha
        assert float(decoding.length_penalty(length, alpha)) == pytest.approx(want, rel=1e-6)


# ----------------------------------------------------------------------------- toy model

HIDDEN = 8


def _toy_params(seed, eos_bias=0.0):
    rng = np.random.default_rng(seed)
    return {
        "embed": jnp.asarray(rng.normal(size=(VOCAB, HIDDEN)), jnp.float32),
        "recur": jnp.asarray(rng.normal(size=(HIDDEN, HIDDEN)) / np.sqrt(HIDDEN), jnp.float32),
        "out": jnp.asarray(2.0 * rng.normal(size=(HIDDEN, VOCAB)), jnp.float32),
        "bias": jnp.zeros((VOCAB,), jnp.float32).at[EOS].set(eos_bias),
    }


def _toy_step_fn(params):
    """A recurrent LM: its hidden state plays the role of a key/value cache."""

    def step_fn(token_ids_B, state):
        hidden_BE = jnp.tanh(state["hidden"] @ params["recur"] + params["embed"][token_ids_B])
        logits_BV = hidden_BE @ params["out"] + params["bias"][None, :]
        return logits_BV, {"hidden": hidden_BE, "steps": state["steps"] + 1}

    return step_fn


def _toy_state(batch):
    return {"hidden": jnp.zeros((batch, HIDDEN)), "steps": jnp.asarray(0)}


@functools.partial(jax.jit, static_argnames=("max_length",))
def _toy_greedy(params, prompt, *, max_length):
    state = _toy_state(prompt.shape[0])
    return decoding.greedy(_toy_step_fn(params), state, prompt, max_length=max_length, eos_id=EOS)


@functools.partial(jax.jit, static_argnames=("max_length", "beam_size", "alpha"))
def _toy_beam(params, prompt, *, max_length, beam_size, alpha):
    return decoding.beam_search(
        _toy_step_fn(params),
        _toy_state(prompt.shape[0]),
        prompt,
        beam_size=beam_size,
        alpha=alpha,
        max_length=max_length,
        eos_id=EOS,
    )


def _uncached_greedy(params, prompt, prompt_len, max_length):
    """Recomputes the whole prefix at every step (no state carried between steps)."""
    step_fn = _toy_step_fn(params)
    tokens = list(prompt[:prompt_len])
    while len(tokens) < max_length:
        state = _toy_state(1)
        for token in tokens:
            logits, state = step_fn(jnp.asarray([token]), state)
        tokens.append(int(jnp.argmax(logits[0])))
        if tokens[-1] == EOS:
            break
    return tokens


def _sequence_log_prob(params, tokens, prompt_len):
    step_fn = _toy_step_fn(params)
    state = _toy_state(1)
    total = 0.0
    for position in range(len(tokens) - 1):
        logits, state = step_fn(jnp.asarray([tokens[position]]), state)
        if position + 1 >= prompt_len:
            total += float(jax.nn.log_softmax(logits[0])[tokens[position + 1]])
    return total


def _strip(row, length):
    return [int(t) for t in row[:length]]


def test_greedy_with_state_equals_recomputation():
    params = _toy_params(0, eos_bias=1.0)
    prompt = np.array([[3, 4, 5], [6, 0, 0], [7, 8, 0]], np.int32)
    prompt_lengths = np.array([3, 1, 2], np.int32)
    out = jax.jit(
        lambda p: decoding.greedy(
            _toy_step_fn(p),
            _toy_state(3),
            prompt,
            prompt_lengths_B=prompt_lengths,
            max_length=12,
            eos_id=EOS,
        )
    )(params)
    for row in range(3):
        want = _uncached_greedy(params, prompt[row], prompt_lengths[row], 12)
        assert _strip(out.sequences[row], int(out.lengths[row])) == want
        assert (np.asarray(out.sequences[row, int(out.lengths[row]) :]) == 0).all()
        assert bool(out.finished[row]) == (want[-1] == EOS)
        assert float(out.log_probs[row]) == pytest.approx(
            _sequence_log_prob(params, want, prompt_lengths[row]), abs=1e-4
        )


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("eos_bias", [0.5, 2.0])
def test_beam_size_one_equals_greedy(seed, eos_bias):
    # Several of these rows have EOS as the second-best token somewhere: a size-1 beam must
    # not finish there, since greedy decoding would not.
    params = _toy_params(seed, eos_bias=eos_bias)
    prompt = np.zeros((2, 1), np.int32)
    greedy = _toy_greedy(params, prompt, max_length=10)
    beam = _toy_beam(params, prompt, max_length=10, beam_size=1, alpha=0.0)
    np.testing.assert_array_equal(beam.sequences[:, 0], greedy.sequences)
    np.testing.assert_allclose(beam.log_probs[:, 0], greedy.log_probs, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_search_scores_at_least_greedy(alpha):
    prompt = np.array([[0, 5], [0, 6]], np.int32)
    improved = compared = 0
    for seed in range(4):
        params = _toy_params(seed, eos_bias=0.5)
        greedy = _toy_greedy(params, prompt, max_length=9)
        beam = _toy_beam(params, prompt, max_length=9, beam_size=4, alpha=alpha)
        for row in range(2):
            length = int(greedy.lengths[row])
            greedy_score = float(greedy.log_probs[row]) / float(
                decoding.length_penalty(length - 2, alpha)
            )
            best = float(beam.scores[row, 0])
            assert bool(beam.finished[row, 0])
            # Finished hypotheses outrank unfinished ones, so compare with finished greedy rows.
            if bool(greedy.finished[row]):
                compared += 1
                assert best >= greedy_score - 1e-5
                improved += best > greedy_score + 1e-4
            # The returned score is the length-penalised log-probability of the sequence.
            tokens = [int(t) for t in beam.sequences[row, 0]]
            end = tokens.index(EOS, 2) + 1 if EOS in tokens[2:] else len(tokens)
            assert float(beam.log_probs[row, 0]) == pytest.approx(
                _sequence_log_prob(params, tokens[:end], 2), abs=1e-4
            )
            assert best == pytest.approx(
                float(beam.log_probs[row, 0]) / float(decoding.length_penalty(end - 2, alpha)),
                rel=1e-5,
            )
        # Finished hypotheses first, then unfinished beams in the slots left; best first in
        # each group, and no slot left empty.
        scores, finished = np.asarray(beam.scores), np.asarray(beam.finished)
        assert np.all(finished[:, :-1] >= finished[:, 1:]) and np.all(np.isfinite(scores))
        for row in range(2):
            for group in (finished[row], ~finished[row]):
                assert np.all(np.diff(scores[row][group]) <= 0)
    # Beam search is not a no-op: it beats greedy somewhere.
    assert compared >= 4 and improved > 0


def _eos_last_step_fn(params):
    """The toy model with logits squashed into [-0.5, 0.5] and EOS strictly last at -1."""
    toy_step_fn = _toy_step_fn(params)

    def step_fn(token_ids_B, state):
        logits_BV, state = toy_step_fn(token_ids_B, state)
        return (0.5 * jnp.tanh(logits_BV)).at[:, EOS].set(-1.0), state

    return step_fn


def test_consistent_top_k_always_terminates():
    # EOS is never the argmax, so plain top-1 sampling never stops; the consistent candidate
    # set {argmax, eos} keeps EOS reachable (probability >= 0.18 per step here) and every run
    # ends with EOS.
    step_fn = _eos_last_step_fn(_toy_params(3))
    prompt = np.zeros((8, 1), np.int32)
    run = jax.jit(
        lambda rng, consistent: decoding.sample(
            step_fn,
            _toy_state(8),
            prompt,
            max_length=64,
            eos_id=EOS,
            rng=rng,
            top_k=1,
            consistent=consistent,
        ),
        static_argnums=1,
    )
    plain = run(jax.random.PRNGKey(0), False)
    assert not bool(plain.finished.any())
    greedy = decoding.greedy(step_fn, _toy_state(8), prompt, max_length=64, eos_id=EOS)
    for seed in range(20):
        out = run(jax.random.PRNGKey(seed), True)
        assert bool(out.finished.all()), seed
        lengths = np.asarray(out.lengths)
        np.testing.assert_array_equal(out.sequences[np.arange(8), lengths - 1], EOS)
        # Before EOS only the argmax token was ever chosen (top-1 plus EOS, nothing else).
        for row in range(8):
            np.testing.assert_array_equal(
                out.sequences[row, : lengths[row] - 1], greedy.sequences[row, : lengths[row] - 1]
            )


def test_consistent_top_p_keeps_eos():
    step_fn = _eos_last_step_fn(_toy_params(3))
    prompt = np.zeros((8, 1), np.int32)
    kwargs = dict(max_length=64, eos_id=EOS, rng=jax.random.PRNGKey(1), top_p=0.01)
    plain = decoding.sample(step_fn, _toy_state(8), prompt, **kwargs)
    assert not bool(plain.finished.any())
    out = decoding.sample(step_fn, _toy_state(8), prompt, consistent=True, **kwargs)
    assert bool(out.finished.all())


def test_sampling_matches_distribution():
    # A state-free step function with fixed logits: first-token frequencies follow the
    # temperature-scaled, top-k-restricted softmax.
    logits_V = jnp.asarray([0.0, -1.0, 1.0, 2.0, 0.5, -0.5, 0.2, 0.1, -2.0, 0.3, 1.5])
    batch = 4000

    def step_fn(token_ids_B, state):
        return jnp.broadcast_to(logits_V, (token_ids_B.shape[0], VOCAB)), state

    out = decoding.sample(
        step_fn,
        None,
        np.zeros((batch, 1), np.int32),
        max_length=2,
        eos_id=EOS,
        rng=jax.random.PRNGKey(0),
        temperature=0.7,
        top_k=4,
    )
    counts = np.bincount(np.asarray(out.sequences[:, 1]), minlength=VOCAB) / batch
    want = _numpy_top_k(np.asarray(logits_V)[None] / 0.7, 4)[0]
    want = np.exp(want - want.max())
    want /= want.sum()
    np.testing.assert_allclose(counts, want, atol=0.03)


# ----------------------------------------------------------------------------- real models


def _tiny_model(family, **overrides):
    from rope_jax import model_config, models

    values = dict(
        family=family,
        vocab_size=VOCAB + 21,
        d_model=32,
        num_heads=4,
        head_dim=8,
        d_ff=64,
        num_layers=2,
        dropout_rate=0.0,
        relpos_num_buckets=8,
        relpos_max_distance=16,
    )
    if family == "decoder":
        values.update(position="rope")
    values.update(overrides)
    model = models.build_model(model_config.model_config_from_dict(values))
    tokens = jnp.ones((1, 4), jnp.int32)
    args = (tokens, tokens) if family == "encoder_decoder" else (tokens,)
    variables = model.init(jax.random.PRNGKey(0), *args)
    import flax.linen as nn

    variables = nn.unbox(variables)
    params = variables.pop("params")
    return model, params, variables or None


def _reference_greedy(model, params, variables, inputs, max_length, prompt_lengths=None):
    """Argmax decoding that recomputes the full forward pass for every new token."""
    collections = {"params": params, **(variables or {})}
    batch = inputs.shape[0]
    if model.config.family == "encoder_decoder":
        tokens = np.zeros((batch, max_length), np.int32)
        lengths = np.ones(batch, np.int32)
        forward = jax.jit(lambda t: model.apply(collections, jnp.asarray(inputs), t))
    else:
        tokens = np.zeros((batch, max_length), np.int32)
        tokens[:, : inputs.shape[1]] = inputs
        lengths = np.asarray(prompt_lengths, np.int32).copy()
        forward = jax.jit(lambda t: model.apply(collections, t))
    done = np.zeros(batch, bool)
    while not done.all() and lengths[~done].min() < max_length:
        logits = np.asarray(forward(jnp.asarray(tokens)))
        for row in np.flatnonzero(~done):
            if lengths[row] >= max_length:
                done[row] = True
                continue
            next_token = int(np.argmax(logits[row, lengths[row] - 1]))
            tokens[row, lengths[row]] = next_token
            lengths[row] += 1
            done[row] = next_token == EOS
    for row in range(batch):
        tokens[row, lengths[row] :] = 0
    return tokens


def test_encoder_decoder_cached_greedy_equals_recomputation():
    model, params, variables = _tiny_model("encoder_decoder")
    inputs = np.array([[5, 6, 7, 8, 9, 1], [10, 11, 1, 0, 0, 0]], np.int32)
    want = _reference_greedy(model, params, variables, inputs, 10)
    cached = decoding.generate(model, params, inputs, max_length=10, variables=variables)
    np.testing.assert_array_equal(cached.sequences, want)
    uncached = decoding.generate(
        model, params, inputs, max_length=10, variables=variables, use_cache=False
    )
    np.testing.assert_array_equal(uncached.sequences, want)


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_decoder_cached_greedy_equals_recomputation(attention):
    # Linear attention decodes with its recurrent state (running sums), softmax with keys and
    # values; prompts of different lengths are prefilled up to the shortest one.
    model, params, variables = _tiny_model("decoder", attention=attention)
    prompts = np.array([[3, 4, 5, 6], [7, 8, 0, 0], [9, 10, 11, 0]], np.int32)
    prompt_lengths = np.array([4, 2, 3], np.int32)
    want = _reference_greedy(model, params, variables, prompts, 12, prompt_lengths)
    got = decoding.generate(
        model,
        params,
        prompts,
        prompt_lengths_B=prompt_lengths,
        max_length=12,
        variables=variables,
    )
    np.testing.assert_array_equal(got.sequences, want)


def _hlo_computations(hlo_text):
    """{name: body lines} of a compiled HLO module's text."""
    computations, name = {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"(?:ENTRY )?%?([\w.\-]+) \(.*\{$", line)
        if header:
            name = header.group(1)
            computations[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            computations[name].append(line)
    return computations


def _loop_bodies(hlo_text):
    """The lines of every ``while`` body and of every computation called from one."""
    computations = _hlo_computations(hlo_text)
    pending = [
        body
        for lines in computations.values()
        for line in lines
        for body in re.findall(r"body=%?([\w.\-]+)", line)
    ]
    seen = set()
    while pending:
        name = pending.pop()
        if name in seen or name not in computations:
            continue
        seen.add(name)
        for line in computations[name]:
            pending += re.findall(r"(?:calls|body|condition|to_apply)=%?([\w.\-]+)", line)
    return [line for name in seen for line in computations[name]], computations


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_decoding_loop_reads_kernels_copied_outputs_major_once(method):
    # projections.decoding_loop: inside the loop the decoder's projections and output layer
    # read [out, in] copies of their kernels; the copies must be made before the loop (XLA
    # hoists them), never per token. Widths are chosen so that no activation shares a
    # transposed kernel's shape.
    model, params, variables = _tiny_model(
        "encoder_decoder", d_model=24, num_heads=2, head_dim=8, d_ff=40, tie_embeddings=False
    )
    inputs = jnp.asarray(np.array([[5, 6, 7, 1], [8, 9, 1, 0], [4, 1, 0, 0]], np.int32))
    hlo = (
        jax.jit(
            lambda p, x: (
                decoding.generate(
                    model, p, x, max_length=6, method=method, beam_size=2, variables=variables
                ).sequences
            )
        )
        .lower(params, inputs)
        .compile()
        .as_text()
    )
    vocab = VOCAB + 21
    transposed = {
        "output layer": f"[{vocab},24]",
        "self-attention q/k/v": "[48,24]",
        "gated MLP input": "[80,24]",
        "MLP output": "[24,40]",
        "attention output": "[24,16]",
    }
    body, computations = _loop_bodies(hlo)
    assert body, "no while loop in the compiled decoding"
    carried = [line for lines in computations.values() for line in lines if " while(" in line]
    for what, shape in transposed.items():
        # The token embedding table is [vocab, d_model] too: only the other copies are
        # told apart by their shape in the loop's carried values.
        if what != "output layer":
            assert any(f"f32{shape}" in line for line in carried), f"{what}: no {shape} copy"
        copied_inside = [
            line
            for line in body
            if re.search(rf"= f32{re.escape(shape)}\{{[\d,]*\}} (transpose|copy|fusion)\(", line)
        ]
        assert not copied_inside, f"{what} kernel copied inside the loop: {copied_inside[:2]}"


def _generate_both_ways(model, params, variables, inputs, **kwargs):
    """``generate`` eagerly (kernel copies made once and kept) and under an outer jit
    (tracers: the copies are made in the call's own trace)."""

    def call(p):
        return decoding.generate(model, p, inputs, variables=variables, **kwargs)

    return call(params), jax.jit(call)(params)


@pytest.mark.parametrize(
    "family, overrides",
    [
        ("encoder_decoder", {}),
        ("encoder_decoder", {"scan_layers": True}),
        ("decoder", {}),
    ],
)
@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_kept_kernel_copies_decode_as_copies_made_in_the_call(family, overrides, method):
    # generate keeps the decoding loop's kernel copies across calls with the same
    # parameters; the sequences and scores must be those of copies made in the call. With
    # nn.scan over layers only the output layer's copy is kept (the layers' kernels are the
    # scan's values).
    model, params, variables = _tiny_model(family, **overrides)
    inputs = jnp.asarray(np.array([[5, 6, 7, 1], [8, 9, 1, 0], [4, 1, 0, 0]], np.int32))
    kwargs = dict(max_length=7, method=method, beam_size=2)
    if family == "decoder":
        kwargs["prompt_lengths_B"] = np.array([4, 3, 2], np.int32)
    decoding._KERNEL_CACHE.clear()
    kept, in_call = _generate_both_ways(model, params, variables, inputs, **kwargs)
    kernels = decoding._KERNEL_CACHE.get(
        families.as_task(model), params, variables, lambda: pytest.fail("copies not kept")
    )
    layers = 0 if overrides.get("scan_layers") else 2
    # Per layer: self-attention q/k/v and output, MLP in and out; cross-attention query
    # and output in the encoder-decoder's decoder. Plus the output layer.
    per_layer = 6 if family == "encoder_decoder" else 4
    assert len(kernels) == layers * per_layer + 1
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(in_call), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_kernel_copies_are_made_once_per_parameters(monkeypatch):
    # Calls with the same parameter arrays reuse the copies; new arrays (a training step
    # later) get new ones; numpy parameters are never kept (they can change in place).
    model, params, variables = _tiny_model("encoder_decoder")
    inputs = jnp.asarray(np.array([[5, 6, 7, 1], [8, 9, 1, 0]], np.int32))
    made = []
    make = decoding._loop_kernels_jit

    def counting(*args, **kwargs):
        made.append(1)
        return make(*args, **kwargs)

    monkeypatch.setattr(decoding, "_loop_kernels_jit", counting)
    decoding._KERNEL_CACHE.clear()

    def call(p):
        return decoding.generate(model, p, inputs, max_length=5, variables=variables)

    first = call(params)
    call(params)
    assert len(made) == 1
    moved = jax.tree.map(lambda leaf: leaf + 0.5, params)
    second = call(moved)
    assert len(made) == 2
    assert not np.array_equal(np.asarray(first.log_probs), np.asarray(second.log_probs))
    np.testing.assert_array_equal(np.asarray(call(params).log_probs), np.asarray(first.log_probs))
    assert len(made) == 3
    call(jax.tree.map(np.asarray, params))
    assert len(made) == 3
    del moved, second
    # The kept copies go with the parameters they were made from.
    params_copy = jax.tree.map(lambda leaf: leaf * 1.0, params)
    call(params_copy)
    assert decoding._KERNEL_CACHE._entry is not None
    del params_copy
    import gc

    gc.collect()
    assert decoding._KERNEL_CACHE._entry is None


def _greedy_with_kernels(task, params, variables, inputs, kernels, **kwargs):
    """The traced body of ``generate`` (greedy, cached) with the given kernel copies."""
    return decoding._generate(
        task,
        params,
        inputs,
        None,
        jax.random.PRNGKey(0),
        variables,
        method="greedy",
        eos_id=1,
        pad_id=0,
        decoder_start_id=0,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        consistent=False,
        beam_size=1,
        alpha=0.0,
        use_cache=True,
        loop_kernels=kernels,
        **kwargs,
    )


def test_decoding_with_kept_copies_copies_no_kernel():
    # With the copies passed in, the compiled decoding makes none: no transposed kernel
    # anywhere in the program (the in-call form hoists them out of the loop; here they are
    # inputs).
    model, params, variables = _tiny_model(
        "encoder_decoder", d_model=24, num_heads=2, head_dim=8, d_ff=40, tie_embeddings=False
    )
    inputs = jnp.asarray(np.array([[5, 6, 7, 1], [8, 9, 1, 0], [4, 1, 0, 0]], np.int32))
    task = families.as_task(model)
    kwargs = dict(max_length=6, prefill_length=0)
    kernels = decoding._loop_kernels_jit(task, params, variables, inputs, **kwargs)
    hlo = (
        jax.jit(
            lambda p, k: _greedy_with_kernels(task, p, variables, inputs, k, **kwargs).sequences
        )
        .lower(params, kernels)
        .compile()
        .as_text()
    )
    vocab = VOCAB + 21
    for shape in (f"[{vocab},24]", "[48,24]", "[80,24]", "[24,40]", "[24,16]"):
        copies = re.findall(rf"= f32{re.escape(shape)}\{{[\d,]*\}} (?:transpose|copy)\(", hlo)
        assert not copies, f"{shape} kernel copied in the compiled decoding"


def test_given_kernel_copies_of_another_model_are_refused():
    model, params, variables = _tiny_model("encoder_decoder")
    other, other_params, other_variables = _tiny_model("encoder_decoder", d_ff=48)
    inputs = jnp.asarray(np.array([[5, 6, 7, 1]], np.int32))
    kwargs = dict(max_length=5, prefill_length=0)
    kernels = decoding._loop_kernels_jit(
        families.as_task(other), other_params, other_variables, inputs, **kwargs
    )
    with pytest.raises(ValueError, match="made for another model"):
        _greedy_with_kernels(families.as_task(model), params, variables, inputs, kernels, **kwargs)
    x, kernel = jnp.ones((1, 32)), params["lm_head"]["kernel"]
    with projections.decoding_loop() as made:
        projections.contract(x, kernel)
    with projections.decoding_loop(made.made * 2) as loop:
        projections.contract(x, kernel)
    with pytest.raises(ValueError, match="used 1 of the 2 given"):
        loop.check_complete()


def test_beam_search_on_model_scores_at_least_greedy():
    model, params, variables = _tiny_model("encoder_decoder")
    inputs = np.array([[5, 6, 7, 8, 9, 1], [10, 11, 1, 0, 0, 0]], np.int32)
    kwargs = dict(max_length=8, variables=variables)
    greedy = decoding.generate(model, params, inputs, **kwargs)
    beam = decoding.generate(model, params, inputs, method="beam", beam_size=3, alpha=0.0, **kwargs)
    # alpha = 0: beam scores are plain log-probabilities; greedy's is one of the candidates.
    for row in range(2):
        if bool(greedy.finished[row]) or not bool(beam.finished[row, 0]):
            assert float(beam.scores[row, 0]) >= float(greedy.log_probs[row]) - 1e-5
    # A beam of one that reorders the key/value cache is greedy decoding.
    single = decoding.generate(
        model, params, inputs, method="beam", beam_size=1, alpha=0.0, **kwargs
    )
    np.testing.assert_array_equal(single.sequences[:, 0], greedy.sequences)


def test_beam_search_neither_repeats_nor_reorders_the_shared_entry():
    """State under families.SHARED stays one row per input (the step maps beam rows to
    it); the search equals one whose state carries the same values repeated per beam."""
    params = _toy_params(2, eos_bias=0.5)
    batch, beam_size = 3, 3
    bias_BV = jnp.asarray(np.random.default_rng(7).normal(size=(batch, VOCAB)), jnp.float32)
    prompt = np.array([[3], [6], [7]], np.int32)
    toy_step_fn = _toy_step_fn(params)

    def shared_step_fn(token_ids_R, state):
        shared_BV = state[families.SHARED]["bias"]
        assert shared_BV.shape == (batch, VOCAB), shared_BV.shape
        logits_RV, toy = toy_step_fn(token_ids_R, state["toy"])
        group = token_ids_R.shape[0] // batch
        return logits_RV + jnp.repeat(shared_BV, group, axis=0), {**state, "toy": toy}

    def per_row_step_fn(token_ids_R, state):
        logits_RV, toy = toy_step_fn(token_ids_R, state["toy"])
        return logits_RV + state["bias"], {**state, "toy": toy}

    kwargs = dict(beam_size=beam_size, max_length=10, eos_id=EOS, alpha=0.6)
    shared = {"toy": _toy_state(batch), families.SHARED: {"bias": bias_BV}}
    got = jax.jit(lambda s: decoding.beam_search(shared_step_fn, s, prompt, **kwargs))(shared)
    per_row = {"toy": _toy_state(batch), "bias": bias_BV}
    want = jax.jit(lambda s: decoding.beam_search(per_row_step_fn, s, prompt, **kwargs))(per_row)
    np.testing.assert_array_equal(got.sequences, want.sequences)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6)


def _beam_with_encoder_in_state(model, params, variables, inputs, **kwargs):
    """Beam search whose state carries the encoder side per row (repeated, reordered)."""
    task = families.as_task(model)
    state, _ = task.decode_start(
        params,
        jnp.asarray(inputs),
        max_length=kwargs["max_length"],
        variables=variables,
        use_cache=True,
    )
    state = {"cache": state["cache"], **state[families.SHARED]}
    step_fn = task.step_fn(params, variables)
    prompt = jnp.zeros((inputs.shape[0], 1), jnp.int32)
    return jax.jit(lambda s: decoding.beam_search(step_fn, s, prompt, **kwargs))(state)


@pytest.mark.parametrize("cross_attention", ["softmax", "performer", "random_synthesizer"])
def test_beam_search_with_shared_encoder_keys_equals_repeated(cross_attention):
    """generate keeps one copy of each encoder row's cross-attention keys/values for its
    beams (softmax: beams attended as queries of one row; other kernels: repeated per step);
    scores and sequences equal beam search with the encoder side repeated in the state."""
    model, params, variables = _tiny_model("encoder_decoder", cross_attention=cross_attention)
    inputs = np.array([[5, 6, 7, 8, 9, 1], [10, 11, 1, 0, 0, 0], [4, 9, 9, 2, 1, 0]], np.int32)
    kwargs = dict(beam_size=3, max_length=9, alpha=0.6)
    want = _beam_with_encoder_in_state(model, params, variables, inputs, **kwargs)
    got = decoding.generate(model, params, inputs, method="beam", variables=variables, **kwargs)
    np.testing.assert_array_equal(got.sequences, want.sequences)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-5)


def test_cross_cache_holds_encoder_projections_once():
    """The cross-attention keys/values are the key/value projections of the encoder output,
    one array per layer, and the carried decode cache has none."""
    model, params, variables = _tiny_model("encoder_decoder")
    inputs = jnp.asarray([[5, 6, 7, 8, 9, 1], [10, 11, 1, 0, 0, 0]], jnp.int32)
    encoder = families.as_task(model).encode_for_decoding(params, inputs, variables)
    layer = params["decoder"]["layers_1"]["cross_attention"]
    # Stored heads-major: keys [B, H, D, S], values [B, H, S, D].
    want_key = np.einsum("BSE,EHD->BHDS", encoder["encoded"], layer["key"]["kernel"])
    want_value = np.einsum("BSE,EHD->BHSD", encoder["encoded"], layer["value"]["kernel"])
    got = encoder["cross_cache"]["decoder"]["layers_1"]["cross_attention"]
    np.testing.assert_allclose(got["key"], want_key, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["value"], want_value, rtol=1e-5, atol=1e-5)
    assert got["key"].shape == (2, 4, 8, 6)
    cache = models_init_cache(model, 2, 9, 6)
    names = {path[-1].key for path, _ in jax.tree_util.tree_leaves_with_path(cache)}
    assert not names & {"key", "value", "cross_key", "cross_value"}, names


def models_init_cache(model, batch, max_length, encoder_length):
    from rope_jax import models

    return models.init_cache(model, batch, max_length, encoder_length=encoder_length)


def test_greedy_matches_hf_t5_generate(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from rope_jax import convert

    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=VOCAB + 21,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    hf_model = transformers.T5ForConditionalGeneration(config).eval()
    hf_model.save_pretrained(tmp_path)
    model, params = convert.from_hf(tmp_path)
    inputs = np.array([[5, 6, 7, 8, 9, 1], [10, 11, 12, 1, 0, 0], [13, 1, 0, 0, 0, 0]], np.int32)

    def hf_greedy(eos_id):
        with torch.no_grad():
            return hf_model.generate(
                input_ids=torch.from_numpy(inputs.astype(np.int64)),
                attention_mask=torch.from_numpy((inputs != 0).astype(np.int64)),
                do_sample=False,
                num_beams=1,
                max_length=12,
                eos_token_id=eos_id,
                pad_token_id=0,
                decoder_start_token_id=0,
            ).numpy()

    # Use a token that greedy decoding of row 0 emits early as EOS, so that stopping at EOS
    # (and padding after it) is compared too, not only the argmax path.
    eos_id = int(hf_greedy(1)[0, 3])
    want = hf_greedy(eos_id)
    got = decoding.generate(model, params, inputs, max_length=12, eos_id=eos_id)
    sequences = np.asarray(got.sequences)
    np.testing.assert_array_equal(sequences[:, : want.shape[1]], want)
    assert (sequences[:, want.shape[1] :] == 0).all()
    assert bool(got.finished[0]) and int(got.lengths[0]) <= 4


def test_beam_search_rows_are_independent_with_ragged_prompts():
    # A batch of prompts of different lengths gives each row what it gets decoded alone.
    params = _toy_params(5, eos_bias=0.5)
    prompts = np.array([[3, 4, 5], [6, 0, 0], [7, 8, 0]], np.int32)
    lengths = np.array([3, 1, 2], np.int32)
    kwargs = dict(beam_size=3, max_length=10, eos_id=EOS, alpha=0.6)
    batch = decoding.beam_search(
        _toy_step_fn(params), _toy_state(3), prompts, prompt_lengths_B=lengths, **kwargs
    )
    for row in range(3):
        alone = decoding.beam_search(
            _toy_step_fn(params), _toy_state(1), prompts[row : row + 1, : lengths[row]], **kwargs
        )
        np.testing.assert_array_equal(batch.sequences[row], alone.sequences[0])
        np.testing.assert_allclose(batch.scores[row], alone.scores[0], rtol=1e-5)
        np.testing.assert_array_equal(
            batch.sequences[row, :, : lengths[row]],
            np.broadcast_to(prompts[row, : lengths[row]], (3, lengths[row])),
        )


def test_cached_decoding_under_x64_equals_the_default_precision():
    # JAX_ENABLE_X64=1 turns bare Python ints into int64; every cache write must keep one
    # index dtype. The random synthesizer's decoder covers all three kinds: the stack's key
    # positions, the layer's keys/values/validity, and the window of its logits table.
    model, params, variables = _tiny_model(
        "decoder", attention="random_synthesizer", position="learned", num_layers=1, max_length=8
    )
    prompts = np.array([[3, 4, 5, 6], [7, 8, 0, 0]], np.int32)
    kwargs = dict(prompt_lengths_B=np.array([4, 2], np.int32), max_length=8, variables=variables)
    want = decoding.generate(model, params, prompts, **kwargs)
    with jax.enable_x64(True):
        got = decoding.generate(model, params, prompts, **kwargs)
    assert got.sequences.dtype == want.sequences.dtype == jnp.int32
    np.testing.assert_array_equal(got.sequences, want.sequences)
    np.testing.assert_array_equal(got.log_probs, want.log_probs)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_first_argmax_is_argmax_with_ties_infinities_and_nans(dtype):
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, size=(7, 50)).astype(np.float32)  # small integers: many ties
    x[1, [5, 40]] = np.nan  # the first NaN wins, as in numpy
    x[2, 9] = np.inf
    x[3] = -np.inf  # all equal: index 0
    x[4, :] = 2.0
    x[4, 33] = 3.0
    x[5, [0, 49]] = np.nan
    got = np.asarray(decoding.first_argmax(jnp.asarray(x, dtype)))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(x, dtype), axis=-1)))
