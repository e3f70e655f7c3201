"""The attention layer: projections, RoPE and the kernel its config names.

The kernel is a ``KernelSpec`` from ``rope_jax.attention.registry``; the layer reads its
traits (masks, bias, causal form, packed rows, RoPE, logit scale, dropout), creates the
variables it declares and calls it, so it holds no kernel names. Incremental decoding (the
key/value cache, recurrent states, the cross-attention cache) is in ``attention_decoding``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from rope_jax import attention_decoding as decoding
from rope_jax.attention import masks, registry
from rope_jax.model_config import ModelConfig
from rope_jax.positions import RopeSpec, rope_ntk_base
from rope_jax.projections import DenseGeneral, Projection, constrain, dense_init, fused_projections


def rope_spec(cfg: ModelConfig) -> RopeSpec:
    base = cfg.rope_base
    if cfg.rope_ntk_factor != 1.0:
        base = rope_ntk_base(base, cfg.head_dim, cfg.rope_ntk_factor)
    return RopeSpec(base=base, layout=cfg.rope_layout, scale=cfg.rope_scale, recipe=cfg.rope_recipe)


class MultiHeadAttention(nn.Module):
    """Projections, RoPE, the decode cache, and a kernel from the attention registry.

    Attributes:
      config: model config.
      kernel_name: registry name of the attention kernel.
      causal: causal self-attention (decoder).
      cross: keys/values come from another sequence (``x_kv``); in decode mode their
        projections are computed once and kept in "cross_cache".
      use_rope: rotate q and k by RoPE (self-attention with a rotary position encoding);
        before the kernel, or inside it when its spec says it rotates itself.

    Decoding (``decode=True``, as in the Flax lm1b/wmt examples): the first call (inside
    ``init``) only creates the "cache" collection, sized by the inputs it sees; later calls
    advance the kernel's recurrent state token by token (kernels with a recurrent form, when
    causal) or append the new keys/values at ``cache_index`` and attend to every filled slot.
    Keys are stored already rotated. Attention dropout (T5, BERT) applies with
    ``deterministic=False`` to kernels whose traits say they drop weights; never in decoding.
    """

    config: ModelConfig
    kernel_name: str
    causal: bool = False
    cross: bool = False
    use_rope: bool = False

    def setup(self):
        cfg = self.config
        self.spec = registry.get_spec(self.kernel_name)
        projection = functools.partial(
            Projection,
            cfg.d_model,
            (cfg.num_heads, cfg.head_dim),
            ("embed", "heads", "kv"),
            use_bias=cfg.use_bias,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.storage_dtype,
        )
        # T5 has no 1/sqrt(D) on the logits and folds it into the query init instead.
        query_init_scale = 1.0 if cfg.scale_queries else cfg.head_dim**-0.5
        self.query = projection(dense_init(cfg, (0,), (1, 2), query_init_scale), name="query")
        self.key = projection(dense_init(cfg, (0,), (1, 2)), name="key")
        self.value = projection(dense_init(cfg, (0,), (1, 2)), name="value")
        self.out = DenseGeneral(
            (cfg.d_model,),
            ("heads", "kv", "embed"),
            dense_init(cfg, (0, 1), (2,)),
            contract=2,
            use_bias=cfg.use_bias,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.storage_dtype,
            name="out",
        )
        self.kernel_arrays = {
            variable.name: self._kernel_variable(variable)
            for variable in self.spec.variables
            if variable.used(cfg, self.cross)
        }

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
        input_scale=None,
    ):
        """Attention output ``[B, T, E]`` in the compute dtype.

        ``mask``: boolean, broadcastable to ``[B, H, T, S]`` (padding, segments, causal,
        prefix), for full-mask kernels; ``kv_valid_BS``: key validity for the others;
        ``bias``: additive ``[B|1, H, T, S]``; ``q_positions`` / ``kv_positions``: ``[B|1, L]``
        for RoPE; ``segment_ids`` / ``kv_segment_ids``: packed rows, for kernels that keep
        them apart without a full mask (``KernelTraits.segments``); ``input_scale``: a scale
        of ``x_q_BTE``'s features that its projections fold into their kernels
        (``projections.fused_projections``).
        """
        if self.cross:
            q_BTHD = self._queries(self.query(x_q_BTE, input_scale))
            out_BTHD = decoding.cross_attention(
                self, q_BTHD, x_kv_BSE, mask, kv_valid_BS, segment_ids, kv_segment_ids,
                deterministic, decode,
            )  # fmt: skip
            return self.out(out_BTHD)
        # q, k and v as one [E, 3, H, D] product (projections.fused_projections).
        q_BTHD, k_BSHD, v_BSHD = fused_projections(
            x_q_BTE, [self.query, self.key, self.value], input_scale=input_scale
        )
        q_BTHD = self._queries(q_BTHD)
        if decode:  # the new keys sit at the new tokens' positions
            kv_positions = q_positions
        if self.use_rope and self.spec.traits.rope == "inputs":
            spec = rope_spec(self.config)
            q_BTHD, k_BSHD = spec.apply(q_BTHD, q_positions), spec.apply(k_BSHD, kv_positions)
        if decode and self.causal and self.spec.recurrent is not None:
            out_BTHD = decoding.recurrent_decode(
                self, q_BTHD, k_BSHD, v_BSHD, q_positions, kv_valid_BS
            )
        elif decode:
            out_BTHD = decoding.cached_decode(self, q_BTHD, k_BSHD, v_BSHD, mask, kv_valid_BS, bias)
        else:
            out_BTHD = self.attend(
                q_BTHD, k_BSHD, v_BSHD, mask, kv_valid_BS, bias, q_positions, kv_positions,
                deterministic=deterministic, segment_ids=segment_ids,
            )  # fmt: skip
        return self.out(out_BTHD)

    def attend(
        self, q_BTHD, k_BSHD, v_BSHD, mask, kv_valid_BS, bias, q_positions, kv_positions,
        *, q_offset=0, deterministic=True, segment_ids=None, kv_segment_ids=None,
    ):  # fmt: skip
        """Calls the kernel: a full mask, or key padding + ``causal`` + segment ids."""
        kwargs = self.kernel_kwargs(
            q_BTHD.shape[1], k_BSHD.shape[1], q_offset, q_positions, kv_positions
        )
        rate = self.config.dropout_rate
        if not deterministic and rate > 0.0 and self.spec.traits.dropout:
            kwargs.update(dropout_rate=rate, dropout_rng=self.make_rng("dropout"))
        if self.spec.traits.full_mask:
            return self.spec.fn(q_BTHD, k_BSHD, v_BSHD, mask=mask, bias=bias, **kwargs)
        if self.spec.traits.segments and segment_ids is not None:
            if not self.cross:
                kwargs["segment_ids"] = segment_ids
            elif kv_segment_ids is not None:
                kwargs.update(segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)
        if self.causal:
            kwargs["causal"] = True
        key_mask = None if kv_valid_BS is None else masks.padding_mask(kv_valid_BS)
        return self.spec.fn(q_BTHD, k_BSHD, v_BSHD, mask=key_mask, bias=bias, **kwargs)

    def kernel_kwargs(self, q_len, kv_len, q_offset=0, q_positions=None, kv_positions=None):
        """The kernel's keywords: config hyperparameters, variables, logit scale, RoPE."""
        cfg, spec = self.config, self.spec
        kwargs = {keyword: getattr(cfg, field) for keyword, field in spec.hyperparameters.items()}
        for variable in spec.variables:
            if variable.name in self.kernel_arrays:
                value = self.kernel_arrays[variable.name]
                if variable.read is not None:
                    value = variable.read(value, cfg, q_offset, q_len, kv_len)
                kwargs[variable.argument] = value
        if spec.traits.scale == "argument":
            kwargs["scale"] = cfg.head_dim**-0.5 if cfg.scale_queries else 1.0
        if self.use_rope and spec.traits.rope == "kernel":
            kwargs.update(rope=rope_spec(cfg), q_positions=q_positions, kv_positions=kv_positions)
        return kwargs

    def _queries(self, q_BTHD):
        """Queries for a kernel of fixed scale ``1 / sqrt(D)`` (Performer) are multiplied by
        ``sqrt(D)`` without query scaling (T5), so it approximates ``softmax(q k^T)``."""
        if self.spec.traits.scale == "fixed" and not self.config.scale_queries:
            q_BTHD = q_BTHD * self.config.head_dim**0.5
        return constrain(q_BTHD, ("batch", "length", "heads", "kv"))

    def _kernel_variable(self, variable):
        """Creates (or reads) one of the variables the kernel's spec declares."""
        cfg = self.config
        if variable.collection == "params":
            init = nn.with_logical_partitioning(variable.init(cfg), variable.axes)
            return self.param(variable.name, init, variable.shape(cfg), cfg.storage_dtype)
        if not self.is_initializing() and not self.has_variable(variable.collection, variable.name):
            raise ValueError(
                f"{self.kernel_name} attention needs its {variable.name} from the "
                f"{variable.collection!r} collection: apply the model with {{'params': params, "
                f"'{variable.collection}': variables['{variable.collection}']}}."
            )
        return self.variable(
            variable.collection,
            variable.name,
            lambda: variable.init(cfg)(self.make_rng("params"), variable.shape(cfg), jnp.float32),
        ).value
