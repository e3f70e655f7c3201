"""Thin flax.linen shells over the pure attention and position functions.

Every weight carries logical axis names from one vocabulary (``batch, length, embed, heads,
kv, mlp, vocab, relpos_buckets, layers``) through ``nn.with_logical_partitioning``, so
``nn.get_partition_spec`` / ``nn.logical_to_mesh_sharding`` turn a config's
``logical_axis_rules`` into shardings. ``dtype`` is the compute dtype, ``param_dtype`` the
storage dtype; norm statistics, attention logits/softmax and output logits run in float32.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from rope_jax import attention as attention_lib
from rope_jax.attention import masks
from rope_jax.dropout import Dropout
from rope_jax.model_config import KERNEL_TRAITS, ModelConfig
from rope_jax.positions import RopeSpec, apply_rope, rope_ntk_base
from rope_jax.projections import (
    DenseGeneral,
    Projection,
    add_bias,
    dense_contract,
    fused_projections,
    lead,
)

Initializer = Callable[..., jax.Array]


def dense_init(cfg: ModelConfig, in_axes: Sequence[int], out_axes: Sequence[int], scale=1.0):
    """BERT-style N(0, initializer_range) or T5-style fan-in truncated-normal init."""
    if cfg.initializer_range > 0:
        return nn.initializers.normal(stddev=cfg.initializer_range * scale)
    return nn.initializers.variance_scaling(
        scale, "fan_in", "truncated_normal", in_axis=tuple(in_axes), out_axis=tuple(out_axes)
    )


def embedding_init(cfg: ModelConfig):
    """T5 initialises embeddings N(0, 1) (its inputs are not rescaled); BERT N(0, range)."""
    return nn.initializers.normal(stddev=cfg.initializer_range or 1.0)


def constrain(x, names):
    """Activation sharding hint; a no-op unless logical axis rules are in context."""
    return nn.with_logical_constraint(x, names)


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
    """T5 layer norm: ``x / sqrt(mean(x^2) + eps) * scale`` (no mean, no bias); float32 stats."""

    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

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


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
    cls = RMSNorm if cfg.norm == "rms" else LayerNorm
    return cls(
        epsilon=cfg.layer_norm_epsilon,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.storage_dtype,
        name=name,
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
    def __call__(self, x_BLE, *, deterministic: bool):
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
            gate_BLF, linear_BLF = fused_projections(x_BLE, [wi(name="wi_0"), wi(name="wi_1")])
            hidden_BLF = act(gate_BLF) * linear_BLF
        else:
            hidden_BLF = act(wi(name="wi")(x_BLE))
        hidden_BLF = constrain(hidden_BLF, ("batch", "length", "mlp"))
        hidden_BLF = Dropout(cfg.dropout_rate)(hidden_BLF, deterministic=deterministic)
        wo_init = dense_init(cfg, (0,), (1,))
        return dense((cfg.d_model,), ("mlp", "embed"), wo_init, name="wo")(hidden_BLF)


def kernel_hyperparameters(cfg: ModelConfig, name: str) -> dict:
    """Config fields that parameterise the named kernel in ``get_attention_fn``."""
    if name == "performer":
        return {"kernel": cfg.performer_kernel}
    if name == "nystrom":
        return {"num_landmarks": cfg.num_landmarks}
    return {}


# Recurrent forms (init_state, step) of the causal linear-family kernels.
RECURRENT_FNS = {
    "performer": (attention_lib.performer_init_state, attention_lib.performer_step),
    "linear": (attention_lib.linear_init_state, attention_lib.linear_step),
    "taylor": (attention_lib.taylor_init_state, attention_lib.taylor_step),
}


def rope_spec(cfg: ModelConfig) -> RopeSpec:
    base = cfg.rope_base
    if cfg.rope_ntk_factor != 1.0:
        base = rope_ntk_base(base, cfg.head_dim, cfg.rope_ntk_factor)
    return RopeSpec(base=base, layout=cfg.rope_layout, scale=cfg.rope_scale, recipe=cfg.rope_recipe)


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def slot_starts(index, ndim: int, axis: int = 1) -> tuple:
    """Start indices ``(0, .., index, .., 0)`` for ``lax.dynamic_(update_)slice`` at ``axis``.

    Every start takes the dtype of ``index`` (the int32 cache counter): a bare Python ``0``
    next to it becomes int64 under ``JAX_ENABLE_X64=1``, and XLA rejects start indices of
    mixed types.
    """
    index = jnp.asarray(index)
    zero = jnp.zeros((), index.dtype)
    return tuple(index if dim == axis else zero for dim in range(ndim))


class MultiHeadAttention(nn.Module):
    """Projections, RoPE, the decode cache, and a kernel from the attention registry.

    Attributes:
      config: model config.
      kernel_name: registry name of the attention kernel.
      causal: causal self-attention (decoder).
      cross: keys/values come from another sequence (``x_kv``); in decode mode their
        projections are computed once and kept in the cache.
      use_rope: rotate q and k by RoPE (self-attention with ``position="rope"``).

    Decoding (``decode=True``, as in the Flax lm1b/wmt examples): the first call (inside
    ``init``) only creates the "cache" collection, sized by the inputs it sees; later calls
    append the new keys/values at ``cache_index`` and attend to every filled slot
    (softmax-family kernels), or advance the kernel's recurrent state token by token
    (causal linear-family kernels). Keys are stored already rotated.

    Attention dropout (T5, BERT): with ``deterministic=False`` and ``dropout_rate > 0``,
    kernels that take ``dropout_rng`` (softmax) drop attention weights after the softmax at
    the config's ``dropout_rate``, with a key from the "dropout" rng stream. Kernels
    without that argument (performer, linear, taylor, nystrom, random_synthesizer) apply
    none; the first four never form the ``[T, S]`` weight matrix. Decoding
    (``decode=True``) is always deterministic.
    """

    config: ModelConfig
    kernel_name: str
    causal: bool = False
    cross: bool = False
    use_rope: bool = False

    def setup(self):
        cfg = self.config
        heads, head_dim = cfg.num_heads, cfg.head_dim
        dense = functools.partial(
            DenseGeneral,
            use_bias=cfg.use_bias,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.storage_dtype,
        )
        projection = functools.partial(
            Projection,
            cfg.d_model,
            (heads, head_dim),
            ("embed", "heads", "kv"),
            use_bias=cfg.use_bias,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.storage_dtype,
        )
        # T5 has no 1/sqrt(D) on the logits and folds it into the query init instead.
        query_scale = 1.0 if cfg.scale_queries else head_dim**-0.5
        self.query = projection(dense_init(cfg, (0,), (1, 2), query_scale), name="query")
        self.key = projection(dense_init(cfg, (0,), (1, 2)), name="key")
        self.value = projection(dense_init(cfg, (0,), (1, 2)), name="value")
        self.out = dense(
            (cfg.d_model,),
            ("heads", "kv", "embed"),
            dense_init(cfg, (0, 1), (2,)),
            contract=2,
            name="out",
        )
        self.traits = KERNEL_TRAITS[self.kernel_name]
        self.attention_fn = attention_lib.get_attention_fn(
            self.kernel_name, **kernel_hyperparameters(cfg, self.kernel_name)
        )
        if self.kernel_name == "performer":
            if not self.is_initializing() and not self.has_variable(
                "random_features", "projection"
            ):
                raise ValueError(
                    "performer attention needs its random projections: apply the model with "
                    "{'params': params, 'random_features': variables['random_features']}."
                )
            self.projection = self.variable(
                "random_features",
                "projection",
                lambda: attention_lib.performer_projection(
                    self.make_rng("params"), cfg.num_features, head_dim, orthogonal=True
                ),
            )
        if self.kernel_name == "nystrom" and cfg.conv_kernel_size and not self.cross:
            # Depthwise convolution skip on V (Nystromformer), one filter per head.
            self.conv_weights = self.param(
                "conv_weights",
                nn.with_logical_partitioning(
                    nn.initializers.normal(stddev=cfg.conv_kernel_size**-0.5), (None, "heads")
                ),
                (cfg.conv_kernel_size, heads),
                cfg.storage_dtype,
            )
        if self.kernel_name == "random_synthesizer":
            # Random Synthesizer (Tay et al. 2021): input-independent attention logits.
            self.synthesizer_logits = self.param(
                "synthesizer_logits",
                nn.with_logical_partitioning(
                    nn.initializers.normal(stddev=cfg.initializer_range or 1.0),
                    ("heads", None, None),
                ),
                (heads, cfg.max_length, cfg.max_length),
                cfg.storage_dtype,
            )

    # The kernel applies RoPE itself only for linear-family kernels (RoFormer's recipe needs
    # the unrotated features in the denominator); otherwise q and k are rotated here so
    # that cached keys are stored rotated.
    @property
    def _kernel_rotates(self) -> bool:
        return self.use_rope and self.traits.recurrent

    def _kernel_kwargs(self, q_positions, kv_positions, q_len, kv_len, q_offset=0):
        cfg = self.config
        kwargs = {}
        if _accepts(self.attention_fn, "scale"):
            kwargs["scale"] = cfg.head_dim**-0.5 if cfg.scale_queries else 1.0
        if self.kernel_name == "performer":
            kwargs["projection"] = self.projection.value
        if self.kernel_name == "nystrom" and cfg.conv_kernel_size and not self.cross:
            kwargs["conv_weights"] = self.conv_weights
        if self.kernel_name == "random_synthesizer":
            if max(q_len, kv_len) > cfg.max_length:
                raise ValueError(
                    f"random_synthesizer attention has logits for max_length={cfg.max_length} "
                    f"positions, got lengths {q_len} x {kv_len}; raise max_length."
                )
            kwargs["logits"] = lax.dynamic_slice(
                self.synthesizer_logits,
                slot_starts(jnp.asarray(q_offset, jnp.int32), 3),
                (cfg.num_heads, q_len, kv_len),
            )
        if self._kernel_rotates:
            kwargs.update(rope=rope_spec(cfg), q_positions=q_positions, kv_positions=kv_positions)
        return kwargs

    def _query_multiplier(self) -> float:
        """Performer approximates softmax(q k^T / sqrt(D)) and has no ``scale`` argument.

        Without query scaling (T5) its queries are multiplied by sqrt(D) so that it
        approximates softmax(q k^T) instead. Kernels with ``scale`` get it directly; the
        linear (elu) kernel has no softmax to match and is left as it is.
        """
        if self.kernel_name == "performer" and not self.config.scale_queries:
            return self.config.head_dim**0.5
        return 1.0

    def _keys_values(self, x_kv):
        """Key and value projections of one input as one matmul."""
        k_BSHD, v_BSHD = fused_projections(x_kv, [self.key, self.value])
        return k_BSHD, v_BSHD

    def _cross_keys_values(self, x_kv, decode: bool):
        """Cross-attention keys and values ``[B, S, H, D]``; stored in "cross_cache" when
        decoding with that collection mutable.

        The encoder output is the same at every decoding step, so its key/value projections
        are computed once before the loop (``EncoderDecoderTask.encode_for_decoding`` applies
        the decoder with ``mutable=["cross_cache"]``, which stores them here) and then read
        each step (:meth:`_read_cross_cache`) from a collection that is not mutable: they
        stay loop constants instead of being carried, copied and (in beam search) repeated
        and reordered per step. Stored heads-major, keys ``[B, H, D, S]`` and values ``[B,
        H, S, D]``, the layouts of ``softmax_attention_heads_major``. A decode call without
        that collection computes them from ``x_kv`` (Hugging Face's Flax T5 does that at
        every step).
        """
        k_BSHD, v_BSHD = self._keys_values(x_kv)
        if decode and self.is_mutable_collection("cross_cache"):
            dtype = self.config.compute_dtype
            self.put_variable("cross_cache", "key", jnp.einsum("BSHD->BHDS", k_BSHD).astype(dtype))
            self.put_variable(
                "cross_cache", "value", jnp.einsum("BSHD->BHSD", v_BSHD).astype(dtype)
            )
        return k_BSHD, v_BSHD

    def _read_cross_cache(self, decode: bool):
        """``(k_BHDS, v_BHSD)`` from "cross_cache" while decoding, else None."""
        if decode and self.cross and self.has_variable("cross_cache", "key"):
            return self.get_variable("cross_cache", "key"), self.get_variable(
                "cross_cache", "value"
            )
        return None

    def _cached_cross(self, q_RTHD, k_BHDS, v_BHSD, mask):
        """Softmax cross-attention to the stored keys/values; ``R = B * G`` query rows (beam
        search: row ``b * G + g`` belongs to encoder row ``b``) are attended as ``G * T``
        queries of their encoder row, as in :meth:`_grouped_cross`."""
        rows, length, heads, head_dim = q_RTHD.shape
        kv_rows = k_BHDS.shape[0]
        if rows % kv_rows:
            raise ValueError(
                f"{self.name}: {rows} query rows cannot share {kv_rows} encoder rows; the "
                f"decoder batch must be a multiple of the encoder batch (beam rows b * K + k)."
            )
        group = rows // kv_rows
        q_BGHD = q_RTHD.reshape(kv_rows, group * length, heads, head_dim)
        out_BGHD = attention_lib.softmax_attention_heads_major(
            q_BGHD, k_BHDS, v_BHSD, mask=mask, **self._kernel_kwargs(None, None, 0, 0)
        )
        return out_BGHD.reshape(rows, length, heads, head_dim)

    @nn.compact
    def __call__(
        self,
        x_q_BTE,
        x_kv_BSE=None,
        *,
        mask=None,
        kv_valid_BS=None,
        bias=None,
        q_positions=None,
        kv_positions=None,
        segment_ids=None,
        kv_segment_ids=None,
        deterministic: bool = True,
        decode: bool = False,
    ):
        """Attention output ``[B, T, E]`` in the compute dtype.

        Args:
          x_q_BTE: query-side inputs.
          x_kv_BSE: key/value-side inputs (cross-attention); None for self-attention.
          mask: full boolean mask broadcastable to ``[B, H, T, S]`` (padding, segments,
            causal, prefix) for kernels that accept one.
          kv_valid_BS: key validity ``[B, S]`` for kernels that only take key padding.
          bias: additive ``[B|1, H, T, S]`` (T5 relative bias, ALiBi).
          q_positions, kv_positions: ``[B|1, T]`` / ``[B|1, S]`` positions for RoPE.
          segment_ids, kv_segment_ids: packed-row segment ids ``[B, T]`` (and ``[B, S]`` of
            the keys for cross-attention) for kernels that keep packed examples apart
            without a full mask (``KernelTraits.segments``); full-mask kernels get the
            segments through ``mask`` and ignore these.
          deterministic: no attention dropout; when False, kernels that take
            ``dropout_rng`` drop attention weights at ``config.dropout_rate`` (needs a
            "dropout" rng).
          decode: incremental decoding with the "cache" collection (never drops weights).
        """
        cfg = self.config
        cross_cache = self._read_cross_cache(decode)
        if self.cross:
            q_BTHD = self.query(x_q_BTE)
            if cross_cache is None:
                k_BSHD, v_BSHD = self._cross_keys_values(x_kv_BSE, decode)
            elif self.kernel_name != "softmax":
                k_BHDS, v_BHSD = cross_cache
                k_BSHD = jnp.einsum("BHDS->BSHD", k_BHDS)
                v_BSHD = jnp.einsum("BHSD->BSHD", v_BHSD)
                cross_cache = None
        else:
            # q, k and v as one [E, 3, H, D] product (projections.fused_projections).
            q_BTHD, k_BSHD, v_BSHD = fused_projections(x_q_BTE, [self.query, self.key, self.value])
        q_BTHD = q_BTHD * self._query_multiplier()
        q_BTHD = constrain(q_BTHD, ("batch", "length", "heads", "kv"))
        if cross_cache is not None:
            return self.out(self._cached_cross(q_BTHD, *cross_cache, mask))

        if decode and not self.cross:
            # The new keys sit at the new tokens' positions; kv_positions covers the cache.
            kv_positions = q_positions
        if self.use_rope and not self._kernel_rotates:
            spec = rope_spec(cfg)
            q_BTHD = spec.apply(q_BTHD, q_positions)
            k_BSHD = spec.apply(k_BSHD, kv_positions)

        if decode and not self.cross:
            if self.traits.recurrent and self.causal:
                out_BTHD = self._recurrent_decode(q_BTHD, k_BSHD, v_BSHD, q_positions, kv_valid_BS)
            else:
                out_BTHD = self._cached_decode(q_BTHD, k_BSHD, v_BSHD, mask, kv_valid_BS, bias)
            return self.out(out_BTHD)

        q_offset = self._cross_query_offset(q_BTHD.shape[1]) if decode and self.cross else 0
        if self.cross and q_BTHD.shape[0] != k_BSHD.shape[0]:
            out_BTHD = self._grouped_cross(q_BTHD, k_BSHD, v_BSHD, mask, kv_valid_BS, q_offset)
            return self.out(out_BTHD)
        out_BTHD = self._attend(
            q_BTHD,
            k_BSHD,
            v_BSHD,
            mask,
            kv_valid_BS,
            bias,
            q_positions,
            kv_positions,
            q_offset,
            dropout_kwargs=self._dropout_kwargs(deterministic or decode),
            segment_ids=None if decode else segment_ids,
            kv_segment_ids=None if decode else kv_segment_ids,
        )
        return self.out(out_BTHD)

    def _grouped_cross(self, q_RTHD, k_BSHD, v_BSHD, mask, kv_valid_BS, q_offset):
        """Cross-attention of ``R = B * G`` query rows to ``B`` encoder rows (beam search).

        Query row ``b * G + g`` belongs to encoder row ``b`` (``jnp.repeat`` order, as
        ``decoding.beam_search`` expands rows). Softmax attention treats every query on its
        own, so the ``G`` rows of one encoder row are attended as ``G * T`` queries of one
        row: the same result without repeating the encoder keys/values ``G`` times. Other
        kernels (Nystrom landmarks are means over the queries; the random synthesizer's
        logits depend on the query slot) get the keys, values and masks repeated.
        """
        rows, length, heads, head_dim = q_RTHD.shape
        kv_rows = k_BSHD.shape[0]
        if rows % kv_rows:
            raise ValueError(
                f"{self.name}: {rows} query rows cannot share {kv_rows} encoder rows; the "
                f"decoder batch must be a multiple of the encoder batch (beam rows b * K + k)."
            )
        group = rows // kv_rows
        if self.kernel_name == "softmax":
            q_BGHD = q_RTHD.reshape(kv_rows, group * length, heads, head_dim)
            out_BGHD = self._attend(q_BGHD, k_BSHD, v_BSHD, mask, kv_valid_BS, None, None, None)
            return out_BGHD.reshape(rows, length, heads, head_dim)

        def repeat(x):
            if x is None or x.ndim == 0 or x.shape[0] != kv_rows:
                return x
            return jnp.repeat(x, group, axis=0)

        k_RSHD, v_RSHD, mask, kv_valid_RS = (repeat(x) for x in (k_BSHD, v_BSHD, mask, kv_valid_BS))
        return self._attend(
            q_RTHD, k_RSHD, v_RSHD, mask, kv_valid_RS, None, None, None, q_offset=q_offset
        )

    def _dropout_kwargs(self, deterministic: bool) -> dict:
        """Attention-weight dropout arguments for kernels that take them (T5, BERT)."""
        rate = self.config.dropout_rate
        if deterministic or rate == 0.0 or not _accepts(self.attention_fn, "dropout_rng"):
            return {}
        return {"dropout_rate": rate, "dropout_rng": self.make_rng("dropout")}

    def _cross_query_offset(self, length):
        """Decoder slot of the first new query, for kernels whose weights depend on it.

        The random synthesizer's logits are a ``[H, T, S]`` table indexed by the query's slot,
        so incremental cross-attention must count the decoder tokens it has seen; other
        kernels need no count (and get no cache entry).
        """
        if self.kernel_name != "random_synthesizer":
            return 0
        initialized = self.has_variable("cache", "cross_query_index")
        index = self.variable("cache", "cross_query_index", lambda: jnp.zeros((), jnp.int32))
        if not initialized:
            return 0
        offset = index.value
        index.value = offset + length
        return offset

    def _attend(
        self,
        q_BTHD,
        k_BSHD,
        v_BSHD,
        mask,
        kv_valid_BS,
        bias,
        q_positions,
        kv_positions,
        q_offset=0,
        dropout_kwargs=None,
        segment_ids=None,
        kv_segment_ids=None,
    ):
        kwargs = self._kernel_kwargs(
            q_positions, kv_positions, q_BTHD.shape[1], k_BSHD.shape[1], q_offset=q_offset
        )
        kwargs.update(dropout_kwargs or {})
        if self.traits.full_mask:
            return self.attention_fn(q_BTHD, k_BSHD, v_BSHD, mask=mask, bias=bias, **kwargs)
        key_mask = None if kv_valid_BS is None else masks.padding_mask(kv_valid_BS)
        if self.traits.segments and segment_ids is not None:
            if not self.cross:
                kwargs["segment_ids"] = segment_ids
            elif kv_segment_ids is not None:
                kwargs.update(segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)
        if self.causal:
            kwargs["causal"] = True
        return self.attention_fn(q_BTHD, k_BSHD, v_BSHD, mask=key_mask, bias=bias, **kwargs)

    def _cached_decode(self, q_BTHD, k_BTHD, v_BTHD, mask, kv_valid_BT, bias):
        """Writes the new keys/values into the cache and attends to all filled slots.

        At init the cache is created with the length of the given inputs (the maximum decode
        length); later calls may pass any number of new tokens T (a prompt, then 1 at a time).
        ``mask``/``bias`` then cover the whole cache: ``[B|1, 1|H, T, S_max]``.
        """
        initialized = self.has_variable("cache", "cached_key")
        batch, length, heads, head_dim = k_BTHD.shape
        dtype = self.config.compute_dtype
        cached_key = self.variable("cache", "cached_key", jnp.zeros, k_BTHD.shape, dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, v_BTHD.shape, dtype)
        cached_valid = self.variable("cache", "cached_valid", jnp.zeros, (batch, length), bool)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if not initialized:
            return self._attend(q_BTHD, k_BTHD, v_BTHD, mask, kv_valid_BT, bias, None, None)
        index = cache_index.value
        new_valid_BT = (
            jnp.ones((batch, length), bool) if kv_valid_BT is None else kv_valid_BT.astype(bool)
        )
        cached_key.value = lax.dynamic_update_slice(
            cached_key.value, k_BTHD.astype(dtype), slot_starts(index, 4)
        )
        cached_value.value = lax.dynamic_update_slice(
            cached_value.value, v_BTHD.astype(dtype), slot_starts(index, 4)
        )
        cached_valid.value = lax.dynamic_update_slice(
            cached_valid.value, new_valid_BT, slot_starts(index, 2)
        )
        cache_index.value = index + length
        max_length = cached_key.value.shape[1]
        # Unwritten slots are still False in cached_valid. The caller's mask says which
        # written slots each query sees (causal, prefix LM); plain causal if none is given.
        cache_mask = cached_valid.value[:, None, None, :]
        if mask is None and self.causal:
            slot_S = jnp.arange(max_length)
            mask = (slot_S[None, :] <= index + jnp.arange(length)[:, None])[None, None]
        full_mask = masks.combine_masks(mask, cache_mask)
        kwargs = self._kernel_kwargs(None, None, length, max_length, q_offset=index)
        return self.attention_fn(
            q_BTHD, cached_key.value, cached_value.value, mask=full_mask, bias=bias, **kwargs
        )

    def _recurrent_decode(self, q_BTHD, k_BTHD, v_BTHD, positions_BT, kv_valid_BT):
        """Advances the causal linear kernel's recurrent state over the T new tokens."""
        init_state, step = RECURRENT_FNS[self.kernel_name]
        cfg = self.config
        batch, length = q_BTHD.shape[:2]
        init_kwargs, step_kwargs = {}, {}
        if self.kernel_name == "performer":
            init_kwargs["num_features"] = cfg.num_features
            step_kwargs.update(projection=self.projection.value, kernel=cfg.performer_kernel)
        if self.kernel_name == "taylor":
            step_kwargs["scale"] = cfg.head_dim**-0.5 if cfg.scale_queries else 1.0
        if self.use_rope:
            step_kwargs["rope"] = rope_spec(cfg)
        initialized = self.has_variable("cache", "state")
        state = self.variable(
            "cache",
            "state",
            lambda: init_state(batch, cfg.num_heads, cfg.head_dim, cfg.head_dim, **init_kwargs),
        )
        if not initialized:
            return self._attend(
                q_BTHD, k_BTHD, v_BTHD, None, None, None, positions_BT, positions_BT
            )
        if positions_BT is None:
            positions_BT = jnp.zeros((batch, length), jnp.int32)
        positions_BT = jnp.broadcast_to(positions_BT, (batch, length))
        if kv_valid_BT is None:
            kv_valid_BT = jnp.ones((batch, length), bool)

        def body(carry, inputs):
            q_t, k_t, v_t, position_t, valid_t = inputs
            carry, out_t = step(
                carry,
                q_t[:, None],
                k_t[:, None],
                v_t[:, None],
                mask=valid_t[:, None, None, None],
                position=position_t,
                **step_kwargs,
            )
            return carry, out_t[:, 0]

        time_major = [
            jnp.moveaxis(a, 1, 0)
            for a in (q_BTHD, k_BTHD, v_BTHD, positions_BT, kv_valid_BT.astype(bool))
        ]
        new_state, out_TBHD = lax.scan(body, state.value, time_major)
        state.value = new_state
        return jnp.moveaxis(out_TBHD, 0, 1).astype(q_BTHD.dtype)


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
    "dense_init",
    "embedding_init",
    "make_norm",
    "rope_spec",
]
