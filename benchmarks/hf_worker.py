"""Hugging Face Flax side of the same-run comparison (runs in ``.venv-hf``, see ``make hf-venv``).

Started by ``benchmarks/peers.py``; speaks the line protocol of ``peer_shapes.serve``. It
imports transformers 4.x (``FlaxT5ForConditionalGeneration``, ``FlaxRoFormerForMaskedLM``),
their jax, flax and optax, never rope_jax. Weights are random (HF's own initialisers, seed 0),
built locally: nothing is downloaded.

The train step is the one of HF's Flax pretraining examples (``run_t5_mlm_flax.py``,
``run_mlm_flax.py``): ``value_and_grad`` of the cross-entropy over the labels (MLM: masked
positions only, via the label mask), then ``TrainState.apply_gradients``, jitted with the
state donated. Two deliberate changes make the peer faster, not slower: the loss uses
``optax.softmax_cross_entropy_with_integer_labels`` instead of the examples' one-hot
``[B, L, V]`` product, and the step is ``jax.jit`` on one device instead of ``pmap``.
Optimizers as the examples build them: ``optax.adafactor`` (T5's settings are optax's
defaults) and ``optax.adamw`` with weight decay off for biases and LayerNorm scales.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peer_shapes
from flax.training import train_state

STATE: dict = {}


def _t5_config(model: dict, dropout: float):
    from transformers import T5Config

    return T5Config(
        vocab_size=model["vocab_size"],
        d_model=model["d_model"],
        d_kv=model["head_dim"],
        d_ff=model["d_ff"],
        num_layers=model["num_layers"],
        num_heads=model["num_heads"],
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=dropout,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )


def _roformer_config(model: dict, dropout: float):
    from transformers import RoFormerConfig

    return RoFormerConfig(
        vocab_size=model["vocab_size"],
        embedding_size=model["d_model"],
        hidden_size=model["d_model"],
        num_hidden_layers=model["num_layers"],
        num_attention_heads=model["num_heads"],
        intermediate_size=model["d_ff"],
        hidden_act="gelu",
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        max_position_embeddings=512,
        type_vocab_size=model["type_vocab_size"],
        initializer_range=model["initializer_range"],
    )


def _build_model(model: dict, dropout: float):
    if model["family"] == "encoder_decoder":
        from transformers import FlaxT5ForConditionalGeneration

        return FlaxT5ForConditionalGeneration(_t5_config(model, dropout), seed=0)
    from transformers import FlaxRoFormerForMaskedLM

    return FlaxRoFormerForMaskedLM(_roformer_config(model, dropout), seed=0)


def _decay_mask(params):
    """run_mlm_flax.py's mask: no weight decay on biases and LayerNorm scales."""
    flat = {
        path: not (path[-1] == "bias" or (path[-2:] == ("LayerNorm", "scale")))
        for path in _flatten(params)
    }
    return _unflatten(flat)


def _flatten(tree, prefix=()):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def _unflatten(flat):
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def build_train(request: dict) -> dict:
    jax.config.update("jax_default_prng_impl", request.get("prng", "threefry2x32"))
    shape = request["shape"]
    dropout = float(request["dropout"])
    model = _build_model(shape["model"], dropout)
    batch = peer_shapes.train_batch(shape)
    if shape["optimizer"] == "adafactor":
        tx = optax.adafactor(learning_rate=0.01)
    else:
        tx = optax.adamw(
            learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, mask=_decay_mask
        )
    state = train_state.TrainState.create(apply_fn=model.__call__, params=model.params, tx=tx)
    seq2seq = shape["model"]["family"] == "encoder_decoder"
    if seq2seq:
        inputs = {
            "input_ids": batch["encoder_input_tokens"],
            "decoder_input_ids": batch["decoder_input_tokens"],
        }
        labels, label_mask = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
    else:
        inputs = {"input_ids": batch["input_tokens"]}
        labels, label_mask = batch["target_tokens"], batch["loss_weights"]

    def train_step(state, inputs, labels, label_mask, dropout_rng):
        def loss_fn(params):
            logits = state.apply_fn(**inputs, params=params, dropout_rng=dropout_rng, train=True)[0]
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels) * label_mask
            return loss.sum() / label_mask.sum()

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    step = jax.jit(train_step, donate_argnums=(0,))
    device = {
        "inputs": jax.device_put(inputs),
        "labels": jax.device_put(labels),
        "label_mask": jax.device_put(label_mask.astype(np.float32)),
    }
    del model
    STATE.update(step=step, state=state, batch=device, key=jax.random.PRNGKey(0), index=0)
    start = time.perf_counter()
    seconds, loss = _run_step()
    return {"compile_s": time.perf_counter() - start, "loss": loss}


def _run_step():
    STATE["index"] += 1
    rng = jax.random.fold_in(STATE["key"], STATE["index"])
    batch = STATE["batch"]
    start = time.perf_counter()
    STATE["state"], loss = STATE["step"](
        STATE["state"], batch["inputs"], batch["labels"], batch["label_mask"], rng
    )
    loss = float(jax.block_until_ready(loss))
    return time.perf_counter() - start, loss


def train_step(request: dict) -> dict:
    cpu_start = peer_shapes.cpu_seconds()
    seconds, loss = _run_step()
    return {"seconds": seconds, "cpu_seconds": peer_shapes.cpu_seconds() - cpu_start, "loss": loss}


def build_decode(request: dict) -> dict:
    shape = request["shape"]
    model = _build_model(shape["model"], 0.0)
    inputs = jnp.asarray(peer_shapes.decode_inputs(shape))
    max_length = shape["max_length"]

    def generate(params, input_ids, num_beams):
        # min_length = max_length masks EOS at every step (HF accepts no out-of-range EOS
        # id), so every row decodes max_length tokens, as rope_jax's with eos_id=-1.
        return model.generate(
            input_ids,
            params=params,
            max_length=max_length,
            min_length=max_length,
            num_beams=num_beams,
            do_sample=False,
        ).sequences

    STATE.update(
        params=model.params,
        inputs=inputs,
        generate={
            "greedy": jax.jit(lambda p, x: generate(p, x, 1)),
            "beam": jax.jit(lambda p, x: generate(p, x, shape["beam_size"])),
            # The encoder pass alone, which every generate call includes.
            "encode": jax.jit(lambda p, x: model.encode(x, params=p).last_hidden_state),
        },
    )
    compile_s = {}
    for method in ("greedy", "beam", "encode"):
        start = time.perf_counter()
        _generate(method)
        compile_s[method] = time.perf_counter() - start
    return {"compile_s": compile_s}


def _generate(method: str):
    sequences = STATE["generate"][method](STATE["params"], STATE["inputs"])
    return np.asarray(jax.block_until_ready(sequences))


def generate(request: dict) -> dict:
    cpu_start, start = peer_shapes.cpu_seconds(), time.perf_counter()
    sequences = _generate(request["method"])
    return {
        "seconds": time.perf_counter() - start,
        "cpu_seconds": peer_shapes.cpu_seconds() - cpu_start,
        "shape": list(sequences.shape),
    }


def info(request: dict) -> dict:
    import flax
    import transformers

    return {
        "peak_rss_mb": peer_shapes.peak_rss_mb(),
        "versions": {
            "transformers": transformers.__version__,
            "jax": jax.__version__,
            "flax": flax.__version__,
            "optax": optax.__version__,
        },
        "prng": jax.config.jax_default_prng_impl,
    }


if __name__ == "__main__":
    peer_shapes.serve(
        {
            "build_train": build_train,
            "train_step": train_step,
            "build_decode": build_decode,
            "generate": generate,
            "info": info,
        }
    )
