"""Forward-pass tokens/s of each model family with each attention kernel.

    python benchmarks/forward.py --quick          # tiny shape, a few seconds per row
    python benchmarks/forward.py --length 1024    # the full run, on a quiet machine

Tokens/s counts the input tokens of a batch (encoder_decoder: encoder tokens; the decoder
gets ``length // 4`` targets, about T5's 512/114 ratio). Random weights; the numbers are
meant to compare kernels against each other on the same machine, never as absolutes.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from rope_jax.model_config import KERNEL_TRAITS, ModelConfig
from rope_jax.models import build_model


def config_for(family: str, kernel: str, args) -> ModelConfig | None:
    traits = KERNEL_TRAITS[kernel]
    position = "none" if kernel == "random_synthesizer" else "rope"
    extra = {}
    if family == "decoder" and not traits.causal:
        return None
    if family == "encoder_decoder" and not traits.causal:
        # Nystrom has no causal form: keep it in the encoder only.
        extra = dict(decoder_attention="softmax", cross_attention="softmax")
    return ModelConfig(
        family=family,
        vocab_size=args.vocab,
        d_model=args.d_model,
        num_heads=args.d_model // 64 if args.d_model >= 128 else 2,
        head_dim=64 if args.d_model >= 128 else args.d_model // 2,
        d_ff=4 * args.d_model,
        num_layers=args.layers,
        attention=kernel,
        position=position,
        max_length=args.length,
        num_features=args.num_features,
        num_landmarks=args.num_landmarks,
        dropout_rate=0.0,
        dtype=args.dtype,
        **extra,
    )


def measure(cfg: ModelConfig, batch: int, length: int, repeats: int) -> float:
    model = build_model(cfg)
    rng = np.random.default_rng(0)
    inputs = [jnp.asarray(rng.integers(3, cfg.vocab_size, (batch, length)), jnp.int32)]
    if cfg.family == "encoder_decoder":
        inputs.append(jnp.asarray(rng.integers(3, cfg.vocab_size, (batch, length // 4)), jnp.int32))
    variables = jax.jit(model.init)(jax.random.key(0), *inputs)
    forward = jax.jit(model.apply)
    forward(variables, *inputs).block_until_ready()  # compile
    start = time.perf_counter()
    for _ in range(repeats):
        out = forward(variables, *inputs)
    out.block_until_ready()
    seconds = (time.perf_counter() - start) / repeats
    return batch * length / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape, few repeats")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--num_features", type=int, default=128)
    parser.add_argument("--num_landmarks", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--families", default="encoder,decoder,encoder_decoder")
    parser.add_argument("--kernels", default=",".join(KERNEL_TRAITS))
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.length, args.d_model, args.layers = 2, 128, 64, 1
        args.vocab, args.num_features, args.num_landmarks, args.repeats = 512, 32, 16, 3

    print(f"devices: {jax.devices()}")
    print(
        f"batch {args.batch} x length {args.length}, d_model {args.d_model}, "
        f"{args.layers} layers, {args.dtype}"
    )
    print(f"{'family':<16} {'kernel':<20} {'tokens/s':>12}")
    rows = []
    for family in args.families.split(","):
        for kernel in args.kernels.split(","):
            cfg = config_for(family, kernel, args)
            if cfg is None:
                continue
            tokens_per_second = measure(cfg, args.batch, args.length, args.repeats)
            rows.append(dict(family=family, kernel=kernel, tokens_per_second=tokens_per_second))
            print(f"{family:<16} {kernel:<20} {tokens_per_second:>12.0f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
