"""Thin flax.linen shells: embeddings, norms, the MLP (and the attention layer, from
``attention_layer``, re-exported here).

Every weight carries logical axis names from one vocabulary (``batch, length, embed, heads,
kv, mlp, vocab, relpos_buckets, layers``) through ``nn.with_logical_partitioning``, so
``nn.get_partition_spec`` / ``nn.logical_to_mesh_sharding`` turn a config's
``logical_axis_rules`` into shardings. ``dtype`` is the compute dtype, ``param_dtype`` the
storage dtype; norm statistics, attention logits/softmax and output logits run in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from rope_jax.attention_decoding import slot_starts
from rope_jax.attention_layer import MultiHeadAttention, rope_spec
from rope_jax.dropout import Dropout
from rope_jax.model_config import ModelConfig
from rope_jax.positions import apply_rope
from rope_jax.projections import (
    DenseGeneral,
    Projection,
    add_bias,
    constrain,
    dense_contract,
    dense_init,
    fused_projections,
    lead,
)

Initializer = Callable[..., jax.Array]


def embedding_init(cfg: ModelConfig):
    """T5 initialises embeddings N(0, 1) (its inputs are not rescaled); BERT N(0, range)."""
    return nn.initializers.normal(stddev=cfg.initializer_range or 1.0)


class Embed(nn.Module):
    """Token (or position / token-type) embedding table ``[num_embeddings, E]``."""

    num_embeddings: int
    features: int
    embedding_init: Initializer
    axes: tuple[str, str] = ("vocab", "embed")
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(self.embedding_init, self.axes),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )

    def __call__(self, ids):
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"{self.name}: expected integer ids, got dtype {ids.dtype}.")
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, x_BLE):
        """Logits ``x @ table^T``: inputs in the compute dtype, float32 result ``[B, L, V]``."""
        return jnp.einsum(
            "BLE,VE->BLV",
            x_BLE.astype(self.dtype),
            self.embedding.astype(self.dtype),
            preferred_element_type=jnp.float32,
        )


class RMSNorm(nn.Module):
    """T5 layer norm: ``x / sqrt(mean(x^2) + eps) * scale`` (no mean, no bias); float32 stats.

    With ``fold_scale`` it returns ``(x / sqrt(mean(x^2) + eps), scale)``: a pre-norm block
    hands the scale to the projections that read the norm's output, which fold it into
    their kernels (``projections.fused_projections``'s ``input_scale``).
    """

    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    fold_scale: bool = False

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x_f32 = x.astype(jnp.float32)
        mean_square = jnp.mean(jnp.square(x_f32), axis=-1, keepdims=True)
        normed = x_f32 * lax.rsqrt(mean_square + self.epsilon)
        if self.fold_scale:
            return normed.astype(self.dtype), scale
        return (normed * lead(scale.astype(jnp.float32), x.ndim)).astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm of Ba et al. 2016 with scale and bias; float32 statistics."""

    epsilon: float = 1e-12
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = (x.shape[-1],)
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
            features,
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
            features,
            self.param_dtype,
        )
        x_f32 = x.astype(jnp.float32)
        mean = jnp.mean(x_f32, axis=-1, keepdims=True)
        variance = jnp.mean(jnp.square(x_f32 - mean), axis=-1, keepdims=True)
        normed = (x_f32 - mean) * lax.rsqrt(variance + self.epsilon)
        scale = lead(scale.astype(jnp.float32), x.ndim)
        return (normed * scale + lead(bias.astype(jnp.float32), x.ndim)).astype(self.dtype)


def make_norm(cfg: ModelConfig, name: str, **kwargs) -> nn.Module:
    cls = RMSNorm if cfg.norm == "rms" else LayerNorm
    return cls(
        epsilon=cfg.layer_norm_epsilon,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.storage_dtype,
        name=name,
        **kwargs,
    )


def activation_fn(cfg: ModelConfig) -> Callable[[jax.Array], jax.Array]:
    base = cfg.mlp_activation.removeprefix("gated-")
    if base == "gelu":
        return functools.partial(nn.gelu, approximate=cfg.gelu_approximate)
    if base == "relu":
        return nn.relu
    return nn.silu


class MLP(nn.Module):
    """Position-wise feed-forward: ``wo(act(wi x))`` or gated ``wo(act(wi_0 x) * wi_1 x)``.

    The gated form is T5 v1.1's "gated-gelu" (Shazeer 2020, "GLU Variants Improve
    Transformer"). Dropout follows the activation, as in T5.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BLE, *, deterministic: bool, input_scale=None):
        """``input_scale``: see ``projections.fused_projections``."""
        cfg = self.config
        dense = functools.partial(
            DenseGeneral,
            use_bias=cfg.use_bias,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.storage_dtype,
        )
        act = activation_fn(cfg)
        wi = functools.partial(
            Projection,
            cfg.d_model,
            (cfg.d_ff,),
            ("embed", "mlp"),
            dense_init(cfg, (0,), (1,)),
            use_bias=cfg.use_bias,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.storage_dtype,
        )
        if cfg.gated_mlp:
            # wi_0 and wi_1 as one [E, 2, F] product (projections.fused_projections).
            gate_BLF, linear_BLF = fused_projections(
                x_BLE, [wi(name="wi_0"), wi(name="wi_1")], input_scale=input_scale
            )
            hidden_BLF = act(gate_BLF) * linear_BLF
        else:
            hidden_BLF = act(wi(name="wi")(x_BLE, input_scale))
        hidden_BLF = constrain(hidden_BLF, ("batch", "length", "mlp"))
        hidden_BLF = Dropout(cfg.dropout_rate)(hidden_BLF, deterministic=deterministic)
        wo_init = dense_init(cfg, (0,), (1,))
        return dense((cfg.d_model,), ("mlp", "embed"), wo_init, name="wo")(hidden_BLF)


__all__ = [
    "DenseGeneral",
    "Projection",
    "add_bias",
    "dense_contract",
    "fused_projections",
    "Embed",
    "LayerNorm",
    "MLP",
    "MultiHeadAttention",
    "RMSNorm",
    "activation_fn",
    "apply_rope",
    "constrain",
    "dense_init",
    "embedding_init",
    "make_norm",
    "rope_spec",
    "slot_starts",
]
