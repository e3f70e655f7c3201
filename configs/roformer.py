"""RoFormer (Su et al. 2021): a BERT encoder with rotary position embeddings, MLM pretraining.

Launch (``tiny`` runs on a laptop CPU; ``small`` is BERT-small-like, ``base`` is
RoFormer-base / BERT-base sized):

    python train.py --config=configs/roformer.py:tiny --workdir=runs/roformer_tiny
    python train.py --config=configs/roformer.py:base,attention=performer \\
        --workdir=runs/roformer_performer
    python train.py --config=configs/roformer.py:small --config.data.paths='/data/*.txt' \\
        --config.mesh.fsdp=4 --workdir=runs/roformer_small

The argument after ``:`` is a variant name plus comma-separated overrides (see
``configs/common.py``); flags like ``--config.model.num_layers=6`` work as well.
"""

from configs import common

VARIANTS = ("tiny", "small", "base")

# RoFormer = BERT (post-LN, biases, exact GELU, tied MLM head, scaled queries) + RoPE.
ROFORMER = dict(
    family="encoder",
    position="rope",
    rope_layout="interleaved",
    norm="layer",
    norm_placement="post",
    layer_norm_epsilon=1e-12,
    use_bias=True,
    mlp_activation="gelu",
    gelu_approximate=False,
    tie_embeddings=True,
    scale_queries=True,
    type_vocab_size=2,
    initializer_range=0.02,
    dropout_rate=0.1,
)

SIZES = {
    "tiny": dict(d_model=128, num_heads=4, head_dim=32, d_ff=512, num_layers=2, vocab_size=2048),
    # BERT-small-like (hidden 512, 4 layers, 8 heads, intermediate 2048).
    "small": dict(d_model=512, num_heads=8, head_dim=64, d_ff=2048, num_layers=4, vocab_size=32000),
    # RoFormer-base (chinese_roformer_L-12_H-768_A-12 has a 50000-id vocabulary).
    "base": dict(
        d_model=768, num_heads=12, head_dim=64, d_ff=3072, num_layers=12, vocab_size=50000
    ),
}


def get_config(arg: str | None = None):
    variant, overrides = common.split_arg(arg, VARIANTS)
    config = common.base_config()
    config.model = common.model_config(**ROFORMER, **SIZES[variant], max_length=512)
    # Scanned at base size: start-up well below the layer loop's at the same step time
    # (README "Start-up by depth"); tiny and small keep the loop.
    config.model.scan_layers = variant == "base"
    config.data = common.data_config(objective="mlm", inputs_length=512, mlm_rate=0.15)
    config.optimizer.update(
        name="adamw",
        learning_rate=1e-4,
        schedule="linear",
        warmup_steps=10_000,
        end_factor=0.0,
        weight_decay=0.01,
        b2=0.999,
        eps=1e-6,
        grad_clip_norm=1.0,
    )
    config.batch_size = 256
    config.num_train_steps = 1_000_000
    if variant == "tiny":
        common.shrink_to_tiny(config)
        config.optimizer.update(learning_rate=2e-3, warmup_steps=50, schedule="cosine")
    elif variant == "small":
        config.batch_size = 128
    common.apply_overrides(config, overrides)
    return config
