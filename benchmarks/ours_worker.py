"""rope_jax side of the same-run comparison (runs in the project's virtualenv).

Started by ``benchmarks/peers.py``; speaks the line protocol of ``peer_shapes.serve`` with
the same requests as ``hf_worker.py``. The train step is the trainer's own
(``rope_jax.training.step.make_train_step``: loss, accuracy, gradient norm, optimizer),
jitted with in/out shardings and the state donated, on one device; the optimizer settings
are those of ``configs/t5.py``-style T5 (Adafactor, rsqrt schedule) and
``configs/roformer.py`` (AdamW, clipping at 1.0).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import peer_shapes  # noqa: E402

from configs import common  # noqa: E402
from rope_jax import convert, decoding  # noqa: E402
from rope_jax.flops import training_flops  # noqa: E402
from rope_jax.model_config import model_config_from_dict  # noqa: E402
from rope_jax.models import build_model  # noqa: E402
from rope_jax.training import losses, metrics, optim, sharding, step  # noqa: E402

STATE: dict = {}


def optimizer_config(name: str):
    opt_config = common.base_config().optimizer
    if name == "adafactor":
        opt_config.update(
            name="adafactor", learning_rate=0.01, schedule="rsqrt", warmup_steps=0,
            rsqrt_timescale=10_000, weight_decay=0.0, grad_clip_norm=0.0,
        )  # fmt: skip
    else:
        opt_config.update(name="adamw", learning_rate=1e-4, schedule="constant", warmup_steps=0)
    return opt_config


def build_train(request: dict) -> dict:
    jax.config.update("jax_default_prng_impl", request.get("prng", "rbg"))
    shape = request["shape"]
    cfg = model_config_from_dict({**shape["model"], "dropout_rate": float(request["dropout"])})
    model = build_model(cfg)
    batch = peer_shapes.train_batch(shape)
    opt_config = optimizer_config(shape["optimizer"])
    tx, schedule = optim.make_optimizer(opt_config, num_train_steps=1000)
    mesh = sharding.make_mesh(common.base_config().mesh, jax.devices()[:1])
    rules = sharding.rules_from_config(sharding.DEFAULT_LOGICAL_AXIS_RULES)
    key = jax.random.key(0)
    max_predictions = 0
    if cfg.family == "encoder" and request.get("masked_head", True):
        max_predictions = losses.default_max_predictions(peer_shapes.MASK_RATE, shape["inputs"])
    with jax.set_mesh(mesh):
        state, state_shardings = step.create_sharded_state(model, tx, batch, key, mesh, rules)
        train_step = step.make_train_step(
            model,
            tx,
            schedule,
            grad_clip_norm=opt_config.grad_clip_norm,
            mlm_max_predictions=max_predictions,
        )
        batch_sharding = sharding.batch_sharding(mesh, rules)
        jit_step = jax.jit(
            train_step,
            in_shardings=(state_shardings, {k: batch_sharding for k in batch}, None),
            out_shardings=(state_shardings, None),
            donate_argnums=(0,),
        )
        device_batch = {k: jax.device_put(v, batch_sharding) for k, v in batch.items()}
    STATE.update(
        step=jit_step, state=state, batch=device_batch, key=key, index=0, mesh=mesh, cfg=cfg
    )
    start = time.perf_counter()
    _, loss = _run_step()
    flops = training_flops(
        cfg, shape["inputs"], shape["targets"], mlm_predictions=max_predictions
    ).total
    flops *= shape["batch"]
    return {
        "compile_s": time.perf_counter() - start,
        "loss": loss,
        "model_flops": flops,
        "max_predictions": max_predictions,
    }


def _run_step():
    STATE["index"] += 1
    rng = jax.random.fold_in(STATE["key"], STATE["index"])
    with jax.set_mesh(STATE["mesh"]):
        start = time.perf_counter()
        STATE["state"], step_metrics = STATE["step"](STATE["state"], STATE["batch"], rng)
        loss = float(jax.block_until_ready(step_metrics["loss"]))
    return time.perf_counter() - start, loss


def train_step(request: dict) -> dict:
    cpu_start = peer_shapes.cpu_seconds()
    seconds, loss = _run_step()
    return {"seconds": seconds, "cpu_seconds": peer_shapes.cpu_seconds() - cpu_start, "loss": loss}


def _random_params(model, seed=0):
    """Random weights of the model's shapes (scaled by fan-in): no init compile needed."""
    rng = np.random.default_rng(seed)
    flat = {
        path: jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(leaf.shape[0]), jnp.float32)
        for path, leaf in convert.param_shapes(model).items()
    }
    return convert.unflatten_params(flat)


def build_decode(request: dict) -> dict:
    shape = request["shape"]
    cfg = model_config_from_dict({**shape["model"], "dropout_rate": 0.0})
    model = build_model(cfg)
    params = _random_params(model)
    inputs = jnp.asarray(peer_shapes.decode_inputs(shape))
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))
    STATE.update(model=model, params=params, inputs=inputs, decode_shape=shape, encode=encode)
    compile_s = {}
    for method in ("greedy", "beam", "encode"):
        start = time.perf_counter()
        _generate(method)
        compile_s[method] = time.perf_counter() - start
    return {"compile_s": compile_s}


def _generate(method: str):
    """One jitted call: "greedy" or "beam" ``generate``, or "encode" (the encoder pass
    alone, which every generate call includes)."""
    if method == "encode":
        return np.asarray(jax.block_until_ready(STATE["encode"](STATE["params"], STATE["inputs"])))
    shape = STATE["decode_shape"]
    out = decoding.generate(
        STATE["model"],
        STATE["params"],
        STATE["inputs"],
        max_length=shape["max_length"],
        method=method,
        beam_size=shape["beam_size"],
        eos_id=-1,  # no token ends a row: every row decodes max_length tokens
    )
    return np.asarray(jax.block_until_ready(out.sequences))


def generate(request: dict) -> dict:
    cpu_start, start = peer_shapes.cpu_seconds(), time.perf_counter()
    sequences = _generate(request["method"])
    return {
        "seconds": time.perf_counter() - start,
        "cpu_seconds": peer_shapes.cpu_seconds() - cpu_start,
        "shape": list(sequences.shape),
    }


def info(request: dict) -> dict:
    reply = {
        "peak_rss_mb": peer_shapes.peak_rss_mb(),
        "versions": {"jax": jax.__version__},
        "prng": jax.config.jax_default_prng_impl,
    }
    if request.get("matmul_peak"):
        reply["matmul_peak"] = metrics.measure_matmul_peak()
    return reply


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
