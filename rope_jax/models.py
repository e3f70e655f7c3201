"""Encoder (BERT/RoFormer), EncoderDecoder (T5 v1.1/mT5) and Decoder (causal/prefix LM).

Parameter tree (``E`` d_model, ``H`` heads, ``D`` head_dim, ``F`` d_ff, ``V`` vocab,
``N`` relative-position buckets, ``P`` max_length, ``C`` num_labels; logical axis names in
brackets; ``bias`` entries only with ``use_bias``)::

  token_embedder/embedding                 [V, E]  (vocab, embed)
  token_type_embedder/embedding            [type_vocab_size, E] (None, embed)  Encoder only
  <stack>/position_embedder/embedding      [P, E]  (None, embed)   position learned*
  <stack>/embedding_norm/{scale,bias}      [E]     (embed)         norm_placement "post"
  <stack>/relpos_bias                      [N, H]  (relpos_buckets, heads)  position t5_bias
  <stack>/layers_{i}/attention/{query,key,value}/kernel  [E, H, D] (embed, heads, kv)
  <stack>/layers_{i}/attention/{query,key,value}/bias    [H, D]    (heads, kv)
  <stack>/layers_{i}/attention/out/kernel                [H, D, E] (heads, kv, embed)
  <stack>/layers_{i}/attention/out/bias                  [E]       (embed)
  <stack>/layers_{i}/attention_norm/{scale,bias}         [E]
  decoder/layers_{i}/cross_attention/...                 as attention (EncoderDecoder)
  decoder/layers_{i}/cross_attention_norm/{scale,bias}   [E]
  <stack>/layers_{i}/mlp/wi/kernel         [E, F]  (embed, mlp)  or wi_0 and wi_1 (gated)
  <stack>/layers_{i}/mlp/wo/kernel         [F, E]  (mlp, embed)
  <stack>/layers_{i}/mlp_norm/{scale,bias} [E]
  <stack>/final_norm/{scale,bias}          [E]     norm_placement "pre"
  lm_head/kernel                           [E, V]  (embed, vocab)  untied EncoderDecoder/Decoder
  mlm_head/transform/{kernel,bias}         [E, E]  (embed, mlp) / (mlp,)   Encoder, num_labels 0
  mlm_head/transform_norm/{scale,bias}     [E]
  mlm_head/output_bias                     [V]     (vocab)   (+ mlm_head/decoder/kernel if untied)
  pooler/{kernel,bias}, classifier/{kernel,bias}  [E, E], [E, C]   Encoder, num_labels > 0

``<stack>`` is ``encoder`` (Encoder, EncoderDecoder) or ``decoder`` (EncoderDecoder, Decoder).
With ``scan_layers`` the layers are one ``<stack>/layers`` subtree whose every array has a
leading ``[num_layers]`` axis (logical name ``layers``): ``<stack>/layers/attention/query/
kernel`` is ``[L, E, H, D]`` (layers, embed, heads, kv); the same holds for the Performer
projections, the decode cache and the cross-attention keys/values (``rope_jax.scanning``
converts between the two forms).
RMSNorm has only ``scale``. Non-trainable Performer projections live in the
"random_features" collection at ``<stack>/layers_{i}/<attention>/projection`` ``[M, D]``;
the decode cache in the "cache" collection (see ``init_cache``); the decoder's
cross-attention keys/values, computed once per encoder input, in the read-only
"cross_cache" collection at ``decoder/layers_{i}/cross_attention/{key,value}``, keys ``[B,
H, D, S]`` and values ``[B, H, S, D]`` (``families.EncoderDecoderTask.encode_for_decoding``).

The relative-position bias table lives at stack level: T5 computes it in layer 0 and every
layer of the stack reuses it, which is what the stack does (HF name
``block.0.layer.0.SelfAttention.relative_attention_bias``). Padding: encoder-side id
``pad_id`` (0) is masked out of attention unless segment ids are given (then segment 0 is
padding); decoder inputs start with id 0, which is not padding: decoder padding comes only
from ``decoder_segment_ids``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from rope_jax import scanning
from rope_jax.attention import masks
from rope_jax.dropout import Dropout
from rope_jax.layers import (
    MLP,
    DenseGeneral,
    Embed,
    MultiHeadAttention,
    activation_fn,
    add_bias,
    constrain,
    dense_init,
    embedding_init,
    make_norm,
    slot_starts,
)
from rope_jax.model_config import (
    KERNEL_TRAITS,
    ModelConfig,
    validate_model_config,
)
from rope_jax.position_encodings import POSITION_ENCODINGS


def positions_from_segments(segment_ids_BL):
    """Positions restarting at 0 at every segment change along the row."""
    length = segment_ids_BL.shape[1]
    index_BL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), segment_ids_BL.shape)
    starts_BL = jnp.concatenate(
        [
            jnp.ones_like(segment_ids_BL[:, :1], bool),
            segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1],
        ],
        axis=1,
    )
    start_index_BL = lax.cummax(jnp.where(starts_BL, index_BL, 0), axis=1)
    return index_BL - start_index_BL


class TransformerLayer(nn.Module):
    """One block: self-attention, optional cross-attention, MLP; pre- or post-norm."""

    config: ModelConfig
    kernel_name: str
    causal: bool = False
    cross_kernel_name: str = ""
    # Under nn.scan: return (x, None), the (carry, output) pair the scan wants.
    scanned: bool = False

    @nn.compact
    def __call__(
        self,
        x_BLE,
        self_mask,
        self_kv_valid,
        self_bias,
        positions_BL,
        kv_positions_BS,
        encoded_BSE,
        cross_mask,
        cross_kv_valid,
        deterministic,
        decode,
        segment_ids_BL=None,
        encoder_segment_ids_BS=None,
    ):
        """One block. ``segment_ids_BL`` / ``encoder_segment_ids_BS`` (packed rows) reach the
        kernels that take segment ids instead of a full mask (``KernelTraits.segments``)."""
        cfg = self.config
        pre = cfg.norm_placement == "pre"
        dropout = Dropout(cfg.dropout_rate)

        def sublayer(x, norm_name, fn):
            """``fn(h, input_scale)`` as a residual branch. A pre-norm RMS norm leaves its scale
            to the branch's input projections, which fold it into their kernels
            (``projections.fused_projections``): the same block in exact arithmetic."""
            if pre and cfg.norm == "rms":
                normed, scale = make_norm(cfg, norm_name, fold_scale=True)(x)
                return x + dropout(fn(normed, scale), deterministic=deterministic)
            if pre:
                h = make_norm(cfg, norm_name)(x)
                return x + dropout(fn(h, None), deterministic=deterministic)
            h = x + dropout(fn(x, None), deterministic=deterministic)
            return make_norm(cfg, norm_name)(h)

        attention = MultiHeadAttention(
            cfg,
            self.kernel_name,
            causal=self.causal,
            use_rope=POSITION_ENCODINGS[cfg.position].kind == "rotary",
            name="attention",
        )
        x_BLE = sublayer(
            x_BLE,
            "attention_norm",
            lambda h, scale: attention(
                h,
                input_scale=scale,
                mask=self_mask,
                kv_valid_BS=self_kv_valid,
                bias=self_bias,
                q_positions=positions_BL,
                kv_positions=kv_positions_BS,
                segment_ids=segment_ids_BL,
                deterministic=deterministic,
                decode=decode,
            ),
        )
        if self.cross_kernel_name:
            cross = MultiHeadAttention(
                cfg, self.cross_kernel_name, cross=True, name="cross_attention"
            )
            x_BLE = sublayer(
                x_BLE,
                "cross_attention_norm",
                lambda h, scale: cross(
                    h,
                    encoded_BSE,
                    input_scale=scale,
                    mask=cross_mask,
                    kv_valid_BS=cross_kv_valid,
                    segment_ids=segment_ids_BL,
                    kv_segment_ids=encoder_segment_ids_BS,
                    deterministic=deterministic,
                    decode=decode,
                ),
            )
        mlp = MLP(cfg, name="mlp")
        x_BLE = sublayer(
            x_BLE,
            "mlp_norm",
            lambda h, scale: mlp(h, deterministic=deterministic, input_scale=scale),
        )
        x_BLE = constrain(x_BLE, ("batch", "length", "embed"))
        return (x_BLE, None) if self.scanned else x_BLE


class TransformerStack(nn.Module):
    """Absolute positions, masks, the shared position bias, the layers and the final norm.

    Input: embedded tokens ``[B, L, E]`` (token and token-type embeddings already summed).
    """

    config: ModelConfig
    num_layers: int
    kernel_name: str
    causal: bool = False
    cross_kernel_name: str = ""

    def _absolute_positions(self, positions_BL, table_length):
        """The position encoding's absolute table (``PositionSpec.table``) at the positions;
        a learned one reads the stack's "position_embedder" ``[max_length, E]``."""
        cfg = self.config
        encoding = POSITION_ENCODINGS[cfg.position]
        learned_PE = None
        if encoding.learned_table:
            learned_PE = Embed(
                cfg.max_length,
                cfg.d_model,
                embedding_init(cfg),
                axes=(None, "embed"),
                dtype=cfg.compute_dtype,
                param_dtype=cfg.storage_dtype,
                name="position_embedder",
            ).embedding
        table_PE = encoding.table(cfg, learned_PE, table_length)
        return jnp.take(table_PE, positions_BL, axis=0).astype(cfg.compute_dtype)

    def _layers(self, x_BLE, *layer_args):
        """The layers in order: a Python loop over ``layers_{i}``, or (``scan_layers``) one
        ``nn.scan`` of a layer whose variables carry a leading ``layers`` axis; each layer
        under ``nn.remat`` with the config's policy unless it is ``none`` (a scanned stack
        runs ``none`` as ``scanning.SCANNED_NONE``: ``scanning.layer_policy``)."""
        cfg = self.config
        layer_cls = TransformerLayer
        policy = scanning.layer_policy(cfg.remat, cfg.scan_layers)
        if policy is not None:
            # Positions count `self` as argument 0: deterministic and decode are static.
            layer_cls = nn.remat(
                TransformerLayer,
                policy=policy,
                static_argnums=(10, 11),
                prevent_cse=not cfg.scan_layers,
            )
        attributes = dict(
            causal=self.causal, cross_kernel_name=self.cross_kernel_name, scanned=cfg.scan_layers
        )
        if not cfg.scan_layers:
            for i in range(self.num_layers):
                layer = layer_cls(cfg, self.kernel_name, **attributes, name=f"layers_{i}")
                x_BLE = layer(x_BLE, *layer_args)
            return x_BLE
        stacked = ("params", "random_features", "cache", "cross_cache")
        scanned_cls = nn.scan(
            layer_cls,
            variable_axes={collection: 0 for collection in stacked},
            split_rngs={"params": True, "dropout": True, "random_features": True},
            in_axes=(nn.broadcast,) * len(layer_args),
            length=self.num_layers,
            metadata_params={nn.PARTITION_NAME: scanning.LAYERS_AXIS},
        )
        layer = scanned_cls(cfg, self.kernel_name, **attributes, name=scanning.LAYERS)
        x_BLE, _ = layer(x_BLE, *layer_args)
        return x_BLE

    def _position_bias(self, positions_BL, kv_positions_BS):
        """The encoding's additive bias (``PositionSpec.bias``), or None; a learned one
        reads the stack's "relpos_bias" table, shared by all layers as in T5."""
        cfg = self.config
        encoding = POSITION_ENCODINGS[cfg.position]
        if encoding.kind != "bias":
            return None
        table = None
        if encoding.bias_table is not None:
            table = self.param(
                "relpos_bias",
                nn.with_logical_partitioning(
                    nn.initializers.normal(stddev=cfg.initializer_range or 1.0),
                    encoding.bias_table_axes,
                ),
                encoding.bias_table(cfg),
                cfg.storage_dtype,
            )
        return encoding.bias(cfg, table, positions_BL, kv_positions_BS, self.causal)

    @nn.compact
    def __call__(
        self,
        x_BLE,
        *,
        segment_ids_BL=None,
        valid_BL=None,
        positions_BL=None,
        prefix_mask_BL=None,
        encoded_BSE=None,
        encoder_valid_BS=None,
        encoder_segment_ids_BS=None,
        deterministic=True,
        decode=False,
    ):
        cfg = self.config
        batch, length = x_BLE.shape[:2]
        traits = KERNEL_TRAITS[self.kernel_name]
        if prefix_mask_BL is not None and not traits.full_mask:
            raise ValueError(
                f"A prefix-LM mask is a per-query mask, which {self.kernel_name!r} attention "
                f"cannot take (it accepts only key padding, segment ids and causal); use "
                f"softmax attention for prefix LM, or leave prefix_mask out for a causal LM."
            )
        if segment_ids_BL is not None:
            valid_BL = segment_ids_BL != 0
        # Positions the stack derives itself (not given, not decoding): a shift-invariant
        # bias is then the same for every row (PositionSpec.shift_invariant).
        own_positions = positions_BL is None and not decode
        if own_positions and segment_ids_BL is not None:
            positions_BL = positions_from_segments(segment_ids_BL)

        # Decode bookkeeping at stack level: where the next tokens go and the positions (and
        # prefix flags) of every cached key, for the position bias and the prefix-LM mask.
        cache_ready = decode and self.has_variable("cache", "cache_index")
        if decode:
            cache_index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
            key_positions = self.variable(
                "cache", "key_positions", jnp.zeros, (batch, length), jnp.int32
            )
            key_prefix = self.variable("cache", "key_prefix", jnp.zeros, (batch, length), bool)
        if positions_BL is None:
            offset = cache_index.value if cache_ready else 0
            positions_BL = offset + jnp.arange(length, dtype=jnp.int32)[None, :]
        positions_BL = jnp.broadcast_to(jnp.asarray(positions_BL, jnp.int32), (batch, length))

        if cache_ready:
            index = cache_index.value
            key_positions.value = lax.dynamic_update_slice(
                key_positions.value, positions_BL, slot_starts(index, 2)
            )
            prefix_BL = (
                jnp.zeros((batch, length), bool)
                if prefix_mask_BL is None
                else prefix_mask_BL.astype(bool)
            )
            key_prefix.value = lax.dynamic_update_slice(
                key_prefix.value, prefix_BL, slot_starts(index, 2)
            )
            cache_index.value = index + length
            kv_positions_BS = key_positions.value
            max_length = kv_positions_BS.shape[1]
            slot_S = jnp.arange(max_length)
            query_slot_T = index + jnp.arange(length)
            # Causal over cache slots (valid only because tokens are written in order),
            # widened by the prefix-LM rule; unwritten slots are removed by the layer.
            visible_BTS = jnp.broadcast_to(
                slot_S[None, None, :] <= query_slot_T[None, :, None], (1, length, max_length)
            )
            if prefix_mask_BL is not None:
                visible_BTS = visible_BTS | (prefix_BL[:, :, None] & key_prefix.value[:, None, :])
            self_mask = visible_BTS[:, None]
            table_length = max_length
        else:
            kv_positions_BS = positions_BL
            table_length = length
            self_mask = None
            if traits.full_mask:
                if segment_ids_BL is not None:
                    self_mask = masks.segment_mask(segment_ids_BL, segment_ids_BL)
                elif valid_BL is not None:
                    self_mask = masks.padding_mask(valid_BL)
                if self.causal:
                    visible = masks.causal_mask(length, length)
                    if prefix_mask_BL is not None:
                        prefix = prefix_mask_BL.astype(bool)
                        visible = visible | (prefix[:, None, :, None] & prefix[:, None, None, :])
                    self_mask = masks.combine_masks(self_mask, visible)

        if POSITION_ENCODINGS[cfg.position].kind == "absolute":
            x_BLE = x_BLE + self._absolute_positions(positions_BL, table_length)
        if cfg.norm_placement == "post":
            x_BLE = make_norm(cfg, "embedding_norm")(x_BLE)
        x_BLE = Dropout(cfg.dropout_rate)(x_BLE, deterministic=deterministic)
        x_BLE = constrain(x_BLE.astype(cfg.compute_dtype), ("batch", "length", "embed"))

        if own_positions and POSITION_ENCODINGS[cfg.position].shift_invariant:
            index_1L = jnp.arange(length, dtype=jnp.int32)[None, :]
            self_bias = self._position_bias(index_1L, index_1L)
        else:
            self_bias = self._position_bias(positions_BL, kv_positions_BS)

        cross_mask = None
        if encoded_BSE is not None and encoder_valid_BS is not None:
            if segment_ids_BL is not None and encoder_segment_ids_BS is not None and not decode:
                cross_mask = masks.segment_mask(segment_ids_BL, encoder_segment_ids_BS)
            else:
                cross_mask = masks.padding_mask(encoder_valid_BS)

        # Kernels without a full mask keep packed examples apart through the segment ids
        # (not while decoding: the cache holds one sequence per row).
        layer_segment_ids = None if decode else segment_ids_BL
        layer_encoder_segment_ids = None
        if layer_segment_ids is not None and encoded_BSE is not None:
            layer_encoder_segment_ids = encoder_segment_ids_BS

        x_BLE = self._layers(
            x_BLE,
            self_mask,
            valid_BL,
            self_bias,
            positions_BL,
            kv_positions_BS,
            encoded_BSE,
            cross_mask,
            encoder_valid_BS,
            deterministic,
            decode,
            layer_segment_ids,
            layer_encoder_segment_ids,
        )
        if cfg.norm_placement == "pre":
            x_BLE = make_norm(cfg, "final_norm")(x_BLE)
            x_BLE = Dropout(cfg.dropout_rate)(x_BLE, deterministic=deterministic)
        return x_BLE


def _token_embedder(cfg: ModelConfig) -> Embed:
    return Embed(
        cfg.vocab_size,
        cfg.d_model,
        embedding_init(cfg),
        dtype=cfg.compute_dtype,
        param_dtype=cfg.storage_dtype,
        name="token_embedder",
    )


def _lm_head(cfg: ModelConfig, name: str = "lm_head") -> DenseGeneral:
    return DenseGeneral(
        (cfg.vocab_size,),
        ("embed", "vocab"),
        dense_init(cfg, (0,), (1,)),
        dtype=cfg.compute_dtype,
        param_dtype=cfg.storage_dtype,
        float32_output=True,
        name=name,
    )


def _constrain_logits(logits_BLV):
    """Sharding hint on the float32 logits ``[B, L, V]``: the largest activation of a
    large-vocabulary model (mT5: V = 250,112, 1 GB per 1,024 tokens), so the config's rules
    (``vocab -> tensor`` by default) split it like the output layer instead of leaving the
    compiler to gather it on one device."""
    return constrain(logits_BLV, ("batch", "length", "vocab"))


def _check_tokens(name, tokens):
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"{name} must be an integer [batch, length] array, got {tokens.shape} {tokens.dtype}."
        )


def _with_prompts(x_BLE, prompt_embeddings, prompt_mask):
    """Token embeddings with the positions of ``prompt_mask`` ``[B, L]`` taken from
    ``prompt_embeddings`` ``[B, L, E]`` (P-tuning's continuous prompts, Liu et al. 2021,
    "GPT Understands, Too": THUDM/P-tuning ``PT-Fewshot/pet/wrapper.py``
    ``generate_default_inputs`` writes the prompt encoder's vectors over the word embeddings
    of the flagged positions before the model sees them)."""
    if prompt_embeddings is None:
        return x_BLE
    if prompt_mask is None or prompt_embeddings.shape != x_BLE.shape:
        raise ValueError(
            f"prompt_embeddings {getattr(prompt_embeddings, 'shape', None)} need the token "
            f"embeddings' shape {x_BLE.shape} and a [batch, length] prompt_mask."
        )
    return jnp.where(prompt_mask[..., None] > 0, prompt_embeddings.astype(x_BLE.dtype), x_BLE)


class Encoder(nn.Module):
    """BERT / RoFormer encoder with the BERT MLM head, or a classifier when num_labels > 0.

    ``__call__`` returns float32 MLM logits ``[B, L, V]`` (``num_labels == 0``) or
    classification logits ``[B, num_labels]`` from BERT's pooler (tanh dense on the first
    token) and a linear classifier.
    """

    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.token_embedder = _token_embedder(cfg)
        if cfg.type_vocab_size:
            self.token_type_embedder = Embed(
                cfg.type_vocab_size,
                cfg.d_model,
                embedding_init(cfg),
                axes=(None, "embed"),
                dtype=cfg.compute_dtype,
                param_dtype=cfg.storage_dtype,
            )
        self.encoder = TransformerStack(cfg, cfg.num_layers, cfg.attention)
        dense = functools.partial(
            DenseGeneral, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, use_bias=True
        )
        if cfg.num_labels:
            self.pooler = dense((cfg.d_model,), ("embed", "mlp"), dense_init(cfg, (0,), (1,)))
            self.classifier = dense(
                (cfg.num_labels,),
                ("mlp", None),
                dense_init(cfg, (0,), (1,)),
                float32_output=True,
            )
            self.classifier_dropout = Dropout(cfg.dropout_rate)
        else:
            self.mlm_head = MLMHead(cfg)

    def encode(
        self,
        input_tokens,
        *,
        segment_ids=None,
        positions=None,
        token_type_ids=None,
        deterministic=True,
        prompt_embeddings=None,
        prompt_mask=None,
    ):
        """Final hidden states ``[B, L, E]`` in the compute dtype; ``prompt_embeddings``
        ``[B, L, E]`` replace the token embeddings where ``prompt_mask`` is set."""
        cfg = self.config
        _check_tokens("input_tokens", input_tokens)
        x_BLE = _with_prompts(self.token_embedder(input_tokens), prompt_embeddings, prompt_mask)
        if cfg.type_vocab_size:
            if token_type_ids is None:
                token_type_ids = jnp.zeros_like(input_tokens)
            x_BLE = x_BLE + self.token_type_embedder(token_type_ids)
        elif token_type_ids is not None:
            raise ValueError("token_type_ids given but the config has type_vocab_size=0.")
        return self.encoder(
            x_BLE,
            segment_ids_BL=segment_ids,
            valid_BL=input_tokens != cfg.pad_id,
            positions_BL=positions,
            deterministic=deterministic,
        )

    def __call__(
        self,
        input_tokens,
        *,
        segment_ids=None,
        positions=None,
        token_type_ids=None,
        masked_positions=None,
        deterministic=True,
        prompt_embeddings=None,
        prompt_mask=None,
    ):
        """MLM logits ``[B, L, V]``, or ``[B, P, V]`` at ``masked_positions`` ``[B, P]``.

        ``masked_positions`` (int, MLM head only) runs the head on the hidden states of
        those positions alone, as BERT's pretraining gathers its ``max_predictions_per_seq``
        masked positions before the output layer; ``families.EncoderTask.predict`` picks them.
        """
        hidden_BLE = self.encode(
            input_tokens,
            segment_ids=segment_ids,
            positions=positions,
            token_type_ids=token_type_ids,
            deterministic=deterministic,
            prompt_embeddings=prompt_embeddings,
            prompt_mask=prompt_mask,
        )
        if self.config.num_labels:
            if masked_positions is not None:
                raise ValueError("masked_positions is for the MLM head; this model classifies.")
            pooled_BE = jnp.tanh(self.pooler(hidden_BLE[:, 0]))
            pooled_BE = self.classifier_dropout(pooled_BE, deterministic=deterministic)
            return self.classifier(pooled_BE)
        if masked_positions is not None:
            _check_tokens("masked_positions", masked_positions)
            if masked_positions.shape[0] != hidden_BLE.shape[0]:
                raise ValueError(
                    f"masked_positions has {masked_positions.shape[0]} rows, the inputs "
                    f"{hidden_BLE.shape[0]}."
                )
            hidden_BLE = jnp.take_along_axis(hidden_BLE, masked_positions[..., None], axis=1)
        return _constrain_logits(self.mlm_head(hidden_BLE, self.token_embedder))


class MLMHead(nn.Module):
    """BERT's prediction head: dense + activation + norm, then the (tied) vocab projection."""

    config: ModelConfig

    @nn.compact
    def __call__(self, hidden_BLE, token_embedder: Embed):
        cfg = self.config
        transform = DenseGeneral(
            (cfg.d_model,),
            ("embed", "mlp"),
            dense_init(cfg, (0,), (1,)),
            use_bias=True,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.storage_dtype,
            name="transform",
        )
        act = activation_fn(cfg)
        h_BLE = make_norm(cfg, "transform_norm")(act(transform(hidden_BLE)))
        if cfg.tie_embeddings:
            logits_BLV = token_embedder.attend(h_BLE)
        else:
            logits_BLV = _lm_head(cfg, "decoder")(h_BLE)
        output_bias = self.param(
            "output_bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vocab",)),
            (cfg.vocab_size,),
            cfg.storage_dtype,
        )
        return add_bias(logits_BLV, output_bias)


class EncoderDecoder(nn.Module):
    """T5 v1.1 / mT5-style encoder-decoder (any kernel and position encoding from config).

    Methods: ``encode`` -> ``[B, S, E]``; ``decode`` -> float32 logits ``[B, T, V]``
    (``decode=True`` uses the "cache" collection, see ``init_cache``); ``__call__`` both.
    """

    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.token_embedder = _token_embedder(cfg)
        self.encoder = TransformerStack(cfg, cfg.num_layers, cfg.attention)
        self.decoder = TransformerStack(
            cfg,
            cfg.decoder_layers,
            cfg.decoder_self_attention,
            causal=True,
            cross_kernel_name=cfg.decoder_cross_attention,
        )
        if not cfg.tie_embeddings:
            self.lm_head = _lm_head(cfg)

    def encode(
        self,
        encoder_input_tokens,
        *,
        encoder_segment_ids=None,
        encoder_positions=None,
        deterministic=True,
        prompt_embeddings=None,
        prompt_mask=None,
    ):
        _check_tokens("encoder_input_tokens", encoder_input_tokens)
        embedded_BSE = self.token_embedder(encoder_input_tokens)
        return self.encoder(
            _with_prompts(embedded_BSE, prompt_embeddings, prompt_mask),
            segment_ids_BL=encoder_segment_ids,
            valid_BL=encoder_input_tokens != self.config.pad_id,
            positions_BL=encoder_positions,
            deterministic=deterministic,
        )

    def decode(
        self,
        encoded,
        encoder_input_tokens,
        decoder_input_tokens,
        *,
        encoder_segment_ids=None,
        decoder_segment_ids=None,
        decoder_positions=None,
        deterministic=True,
        decode=False,
    ):
        """Decoder logits given the encoder output; the encoder tokens give its padding."""
        cfg = self.config
        _check_tokens("decoder_input_tokens", decoder_input_tokens)
        if encoder_segment_ids is not None:
            encoder_valid_BS = encoder_segment_ids != 0
        else:
            encoder_valid_BS = encoder_input_tokens != cfg.pad_id
        hidden_BTE = self.decoder(
            self.token_embedder(decoder_input_tokens),
            segment_ids_BL=decoder_segment_ids,
            positions_BL=decoder_positions,
            encoded_BSE=encoded,
            encoder_valid_BS=encoder_valid_BS,
            encoder_segment_ids_BS=encoder_segment_ids,
            deterministic=deterministic,
            decode=decode,
        )
        if cfg.tie_embeddings:
            # T5 (original, tied) rescales before the shared-embedding projection.
            return _constrain_logits(self.token_embedder.attend(hidden_BTE * cfg.d_model**-0.5))
        return _constrain_logits(self.lm_head(hidden_BTE))

    def __call__(
        self,
        encoder_input_tokens,
        decoder_input_tokens,
        *,
        encoder_segment_ids=None,
        decoder_segment_ids=None,
        encoder_positions=None,
        decoder_positions=None,
        deterministic=True,
        prompt_embeddings=None,
        prompt_mask=None,
    ):
        """Decoder logits; ``prompt_embeddings`` / ``prompt_mask`` act on the encoder input."""
        encoded = self.encode(
            encoder_input_tokens,
            encoder_segment_ids=encoder_segment_ids,
            encoder_positions=encoder_positions,
            deterministic=deterministic,
            prompt_embeddings=prompt_embeddings,
            prompt_mask=prompt_mask,
        )
        return self.decode(
            encoded,
            encoder_input_tokens,
            decoder_input_tokens,
            encoder_segment_ids=encoder_segment_ids,
            decoder_segment_ids=decoder_segment_ids,
            decoder_positions=decoder_positions,
            deterministic=deterministic,
        )


class Decoder(nn.Module):
    """Decoder-only LM: causal, or prefix LM with ``prefix_mask`` (1 = bidirectional prefix).

    With ``decode=True`` it consumes new tokens against the "cache" collection (any number
    per call: a prompt, then one at a time); positions default to the running count.
    """

    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.token_embedder = _token_embedder(cfg)
        self.decoder = TransformerStack(cfg, cfg.num_layers, cfg.attention, causal=True)
        if not cfg.tie_embeddings:
            self.lm_head = _lm_head(cfg)

    def __call__(
        self,
        input_tokens,
        *,
        segment_ids=None,
        positions=None,
        prefix_mask=None,
        deterministic=True,
        decode=False,
        prompt_embeddings=None,
        prompt_mask=None,
    ):
        _check_tokens("input_tokens", input_tokens)
        embedded_BLE = self.token_embedder(input_tokens)
        hidden_BLE = self.decoder(
            _with_prompts(embedded_BLE, prompt_embeddings, prompt_mask),
            segment_ids_BL=segment_ids,
            positions_BL=positions,
            prefix_mask_BL=prefix_mask,
            deterministic=deterministic,
            decode=decode,
        )
        if self.config.tie_embeddings:
            return _constrain_logits(self.token_embedder.attend(hidden_BLE))
        return _constrain_logits(self.lm_head(hidden_BLE))


MODEL_CLASSES = {"encoder": Encoder, "encoder_decoder": EncoderDecoder, "decoder": Decoder}


def build_model(
    cfg: ModelConfig,
    *,
    packed_inputs: bool = False,
    max_sequence_length: int = 0,
    prefix_lm: bool = False,
) -> nn.Module:
    """Validates the config and returns the flax module of its family.

    ``packed_inputs``, ``max_sequence_length`` (the longest row the data will give, 0 =
    unknown) and ``prefix_lm`` (batches carry a prefix-LM mask) let ``validate_model_config``
    reject what the batches would break before any tracing: kernels that cannot keep packed
    examples apart or apply a prefix mask, learned tables too short.
    """
    if not isinstance(cfg, ModelConfig):
        raise TypeError(
            f"build_model expects a ModelConfig (use model_config_from_dict), got {type(cfg)}."
        )
    validate_model_config(
        cfg,
        packed_inputs=packed_inputs,
        max_sequence_length=max_sequence_length,
        prefix_lm=prefix_lm,
    )
    return MODEL_CLASSES[cfg.family](cfg)


def init_cache(
    model: nn.Module, batch_size: int, max_decode_length: int, *, encoder_length: int = 0
):
    """The "cache" collection for incremental decoding of up to ``max_decode_length`` tokens.

    Decoder: ``model.apply({"params": p, "cache": cache}, tokens_BT, decode=True,
    mutable=["cache"])``. EncoderDecoder: ``model.apply({...}, encoded, encoder_tokens,
    tokens_BT, decode=True, mutable=["cache"], method="decode")`` with ``encoder_length``
    the encoder length here. Performer models also pass "random_features". Every cache array
    with ndim >= 1 has the batch on axis 0 (beam search can expand/reorder it); scalars are
    write indices. Under a scanned stack's ``layers`` entry every array has a leading layers
    axis first (the batch on axis 1, the write indices ``[layers]``).
    """
    cfg = model.config
    tokens = jnp.ones((batch_size, max_decode_length), jnp.int32)

    def make():
        rngs = {"params": jax.random.key(0)}
        if isinstance(model, EncoderDecoder):
            if encoder_length <= 0:
                raise ValueError("init_cache needs encoder_length for an EncoderDecoder.")
            encoder_tokens = jnp.ones((batch_size, encoder_length), jnp.int32)
            encoded = jnp.zeros((batch_size, encoder_length, cfg.d_model), cfg.compute_dtype)
            variables = model.init(
                rngs, encoded, encoder_tokens, tokens, decode=True, method=model.decode
            )
        elif isinstance(model, Decoder):
            variables = model.init(rngs, tokens, decode=True)
        else:
            raise ValueError(f"{type(model).__name__} has no incremental decoding.")
        return variables["cache"]

    return jax.jit(make)()
