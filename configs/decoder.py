"""Decoder-only language model (causal LM or prefix LM), for length-extrapolation studies.

Launch (``tiny`` runs on a laptop CPU; ``small`` is GPT-2 small sized, ``base`` GPT-2
medium sized):

    python train.py --config=configs/decoder.py:tiny --workdir=runs/lm_tiny
    python train.py --config=configs/decoder.py:tiny,objective=prefix_lm --workdir=runs/plm
    python train.py --config=configs/decoder.py:small,position=alibi --workdir=runs/lm_alibi
    python train.py --config=configs/decoder.py:tiny,attention=performer --workdir=runs/lm_favor

With ``attention=performer`` (or ``linear``, ``taylor``) the LM trains on packed rows and
generates with the kernel's recurrent state (``decoding.generate``); a prefix LM needs
``attention=softmax``.

Pre-RMSNorm, gated-GELU MLP, no biases, untied output layer, RoPE by default (``position``
selects rope/alibi/t5_bias/sinusoidal/learned/none); AdamW with warmup and cosine decay.
"""

from configs import common

VARIANTS = ("tiny", "small", "base")

DECODER = dict(
    family="decoder",
    position="rope",
    rope_layout="half",
    norm="rms",
    norm_placement="pre",
    use_bias=False,
    mlp_activation="gated-gelu",
    tie_embeddings=False,
    scale_queries=True,
    initializer_range=0.02,
    dropout_rate=0.0,
)

SIZES = {
    "tiny": dict(d_model=128, num_heads=4, head_dim=32, d_ff=384, num_layers=2, vocab_size=2048),
    "small": dict(
        d_model=768, num_heads=12, head_dim=64, d_ff=2048, num_layers=12, vocab_size=32000
    ),
    "base": dict(
        d_model=1024, num_heads=16, head_dim=64, d_ff=2816, num_layers=24, vocab_size=32000
    ),
}


def get_config(arg: str | None = None):
    variant, overrides = common.split_arg(arg, VARIANTS)
    config = common.base_config()
    config.model = common.model_config(**DECODER, **SIZES[variant], max_length=1024)
    # Scanned at base size: start-up well below the layer loop's at the same step time
    # (README "Start-up by depth"); tiny and small keep the loop.
    config.model.scan_layers = variant == "base"
    config.data = common.data_config(objective="causal_lm", inputs_length=1024)
    config.optimizer.update(
        name="adamw",
        learning_rate=6e-4,
        schedule="cosine",
        warmup_steps=2_000,
        end_factor=0.1,
        weight_decay=0.1,
        b2=0.95,
        grad_clip_norm=1.0,
    )
    config.batch_size = 256
    config.num_train_steps = 100_000
    if variant == "tiny":
        common.shrink_to_tiny(config)
        config.optimizer.update(learning_rate=2e-3, warmup_steps=50)
    common.apply_overrides(config, overrides)
    return config
