"""Decoding: filters against numpy references, search invariants on a toy recurrent model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rope_jax import decoding

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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_size_one_equals_greedy(seed):
    params = _toy_params(seed, eos_bias=0.5)
    prompt = np.zeros((2, 1), np.int32)
    kwargs = dict(max_length=10, eos_id=EOS)
    greedy = decoding.greedy(_toy_step_fn(params), _toy_state(2), prompt, **kwargs)
    beam = decoding.beam_search(
        _toy_step_fn(params), _toy_state(2), prompt, beam_size=1, alpha=0.0, **kwargs
    )
    np.testing.assert_array_equal(beam.sequences[:, 0], greedy.sequences)
    np.testing.assert_allclose(beam.log_probs[:, 0], greedy.log_probs, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_search_scores_at_least_greedy(alpha):
    prompt = np.array([[0, 5], [0, 6]], np.int32)
    kwargs = dict(max_length=9, eos_id=EOS)
    improved = compared = 0
    for seed in range(4):
        params = _toy_params(seed, eos_bias=0.5)
        greedy = decoding.greedy(_toy_step_fn(params), _toy_state(2), prompt, **kwargs)
        beam = decoding.beam_search(
            _toy_step_fn(params), _toy_state(2), prompt, beam_size=4, alpha=alpha, **kwargs
        )
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
        scores = np.asarray(beam.scores)
        assert np.all(scores[:, :-1] >= scores[:, 1:])
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
