"""Small stand-ins for the trainer tests: a toy MLM encoder with logical axis names and a
deterministic, checkpointable batch iterator (batch ``i`` depends only on seed and ``i``)."""

from __future__ import annotations

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _init(names, base=None):
    return nn.with_logical_partitioning(base or nn.initializers.lecun_normal(), names)


class ToyEncoder(nn.Module):
    """Embedding -> MLP block -> LayerNorm -> tied output; follows the Encoder apply contract."""

    vocab_size: int = 64
    d_model: int = 32
    d_ff: int = 64
    dropout_rate: float = 0.1
    # What rope_jax.families reads of a model config: an MLM encoder (no class head).
    config = types.SimpleNamespace(family="encoder", num_labels=0, type_vocab_size=0)

    @nn.compact
    def __call__(self, input_tokens, *, segment_ids=None, positions=None, deterministic=True):
        del segment_ids
        embedding_VE = self.param(
            "embedding",
            _init(("vocab", "embed"), nn.initializers.normal(1.0)),
            (self.vocab_size, self.d_model),
        )
        x_BLE = embedding_VE[input_tokens]
        if positions is not None:
            x_BLE = x_BLE + 0.01 * positions[..., None].astype(jnp.float32)
        hidden_BLF = nn.Dense(self.d_ff, kernel_init=_init(("embed", "mlp")), name="wi")(x_BLE)
        hidden_BLF = nn.Dropout(self.dropout_rate)(nn.gelu(hidden_BLF), deterministic=deterministic)
        x_BLE = x_BLE + nn.Dense(self.d_model, kernel_init=_init(("mlp", "embed")), name="wo")(
            hidden_BLF
        )
        x_BLE = nn.LayerNorm(
            scale_init=_init(("embed",), nn.initializers.ones),
            bias_init=_init(("embed",), nn.initializers.zeros),
            name="final_norm",
        )(x_BLE)
        return jnp.einsum("BLE,VE->BLV", x_BLE, embedding_VE).astype(jnp.float32)


class ToyMLMIterator:
    """MLM batches where batch ``i`` is a pure function of (seed, i); state is ``{"index": i}``."""

    def __init__(self, batch_size: int, length: int = 16, vocab_size: int = 64, seed: int = 0):
        self.batch_size, self.length, self.vocab_size, self.seed = (
            batch_size,
            length,
            vocab_size,
            seed,
        )
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.index])
        self.index += 1
        targets = rng.integers(3, self.vocab_size, (self.batch_size, self.length))
        # Learnable structure: each token predicts itself through a 15% mask.
        masked = rng.random((self.batch_size, self.length)) < 0.15
        masked[:, 0] = True
        inputs = np.where(masked, 2, targets)
        positions = np.broadcast_to(np.arange(self.length), (self.batch_size, self.length))
        return {
            "input_tokens": inputs.astype(np.int32),
            "target_tokens": targets.astype(np.int32),
            "loss_weights": masked.astype(np.int32),
            "segment_ids": np.ones((self.batch_size, self.length), np.int32),
            "positions": positions.astype(np.int32),
        }

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = int(state["index"])


def toy_params_count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def enable_compilation_cache(directory) -> tuple:
    """Persistent XLA cache so identical programs compiled by several runs in one test
    session compile once; returns the previous settings for ``restore_compilation_cache``."""
    previous = (
        jax.config.jax_compilation_cache_dir,
        jax.config.jax_persistent_cache_min_compile_time_secs,
        jax.config.jax_persistent_cache_min_entry_size_bytes,
    )
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return previous


def restore_compilation_cache(previous) -> None:
    jax.config.update("jax_compilation_cache_dir", previous[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", previous[2])


def toy_train_config(**overrides):
    """A pretraining config for the toy encoder: 4 steps of 8 rows, checkpoints every 2,
    a schedule that does not depend on num_train_steps (runs of other lengths agree)."""
    from configs import common

    config = common.base_config()
    config.update(
        num_train_steps=4,
        log_every_steps=1,
        checkpoint_every_steps=2,
        eval_every_steps=0,
        eval_steps=0,
        batch_size=8,
        measure_matmul_peak=False,
        async_checkpointing=True,
    )
    config.optimizer.update(warmup_steps=1, learning_rate=3e-3, decay_steps=10)
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def train_toy(workdir, config, iterator=None, dropout_rate=0.1):
    """``train_and_evaluate`` on the toy encoder and iterator, on one device."""
    from rope_jax.training import trainer

    return trainer.train_and_evaluate(
        config,
        str(workdir),
        inputs=trainer.Inputs(train=iterator or ToyMLMIterator(config.batch_size)),
        model=ToyEncoder(dropout_rate=dropout_rate),
        devices=jax.devices()[:1],
    )


def tree_digest(root) -> str:
    """sha256 over every file's and directory's relative path and modification time, and
    every file's bytes: equal digests mean nothing was written, renamed or removed."""
    import hashlib
    import os

    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        digest.update(f"{os.path.relpath(folder, root)} {os.stat(folder).st_mtime_ns}".encode())
        for name in sorted(files):
            path = os.path.join(folder, name)
            digest.update(f"{os.path.relpath(path, root)} {os.stat(path).st_mtime_ns}".encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()
