"""PEGASUS (Zhang et al. 2020): encoder-decoder pretrained with gap-sentence generation.

Launch (``tiny`` runs on a laptop CPU; ``small`` uses T5-small-like shapes; ``base`` is
PEGASUS-base: 12+12 layers, d_model 768, 12 heads, d_ff 3072, 96k vocabulary):

    python train.py --config=configs/pegasus.py:tiny --workdir=runs/pegasus_tiny
    python train.py --config=configs/pegasus.py:base --config.data.paths='/data/news/*.txt' \\
        --workdir=runs/pegasus_base

PEGASUS-base as published: sinusoidal positions, pre-LayerNorm, ReLU MLP, tied embeddings,
30% of the sentences selected by independent ROUGE-1 F1 (Ind-Orig) as targets, inputs 512 and
targets 256 tokens, Adafactor with square-root learning-rate decay.
"""

from configs import common

VARIANTS = ("tiny", "small", "base")

PEGASUS = dict(
    family="encoder_decoder",
    position="sinusoidal",
    norm="layer",
    norm_placement="pre",
    use_bias=True,
    mlp_activation="relu",
    tie_embeddings=True,
    scale_queries=True,
    initializer_range=0.02,
    dropout_rate=0.1,
)

SIZES = {
    "tiny": dict(d_model=128, num_heads=4, head_dim=32, d_ff=512, num_layers=2, vocab_size=2048),
    "small": dict(d_model=512, num_heads=8, head_dim=64, d_ff=2048, num_layers=6, vocab_size=96103),
    "base": dict(
        d_model=768, num_heads=12, head_dim=64, d_ff=3072, num_layers=12, vocab_size=96103
    ),
}


def get_config(arg: str | None = None):
    variant, overrides = common.split_arg(arg, VARIANTS)
    config = common.base_config()
    config.model = common.model_config(**PEGASUS, **SIZES[variant], max_length=1024)
    config.data = common.data_config(
        objective="gap_sentences", inputs_length=512, targets_length=256, gap_ratio=0.3
    )
    config.optimizer.update(
        name="adafactor",
        learning_rate=0.01,
        schedule="rsqrt",
        warmup_steps=0,
        rsqrt_timescale=10_000,
        weight_decay=0.0,
        grad_clip_norm=0.0,
    )
    config.batch_size = 256
    config.num_train_steps = 500_000
    if variant == "tiny":
        common.shrink_to_tiny(config, targets_length=64)
        config.optimizer.rsqrt_timescale = 100
    common.apply_overrides(config, overrides)
    return config
