"""mT5 / T5 v1.1 encoder-decoder pretrained with T5 span corruption (Xue et al. 2021).

Launch (``tiny`` runs on a laptop CPU; ``small`` and ``base`` are the published T5 v1.1 /
mT5 sizes):

    python train.py --config=configs/mt5.py:tiny --workdir=runs/mt5_tiny
    python train.py --config=configs/mt5.py:small --config.tokenizer.path=/ckpt/mt5/spiece.model \\
        --config.data.paths='/data/mc4/*.jsonl' --config.data.format=jsonl --workdir=runs/mt5_small
    python train.py --config=configs/mt5.py:tiny,attention=performer,position=rope \\
        --workdir=runs/mt5_performer

T5's recipe: Adafactor, learning rate ``1 / sqrt(max(step, 10_000))``, 512 input and 114
target tokens per example (568 raw tokens), noise density 0.15, mean span 3, no dropout in
pretraining (T5 v1.1).
"""

from configs import common

VARIANTS = ("tiny", "small", "base")

T5_V1_1 = dict(
    family="encoder_decoder",
    position="t5_bias",
    norm="rms",
    norm_placement="pre",
    use_bias=False,
    mlp_activation="gated-gelu",
    gelu_approximate=True,
    tie_embeddings=False,
    scale_queries=False,
    relpos_num_buckets=32,
    relpos_max_distance=128,
    dropout_rate=0.0,
)

SIZES = {
    "tiny": dict(d_model=128, num_heads=4, head_dim=32, d_ff=256, num_layers=2, vocab_size=2048),
    # T5 v1.1 / mT5 small and base; mT5's SentencePiece vocabulary has 250112 ids.
    "small": dict(
        d_model=512, num_heads=6, head_dim=64, d_ff=1024, num_layers=8, vocab_size=250112
    ),
    "base": dict(
        d_model=768, num_heads=12, head_dim=64, d_ff=2048, num_layers=12, vocab_size=250112
    ),
}


def get_config(arg: str | None = None):
    variant, overrides = common.split_arg(arg, VARIANTS)
    config = common.base_config()
    config.model = common.model_config(**T5_V1_1, **SIZES[variant])
    config.data = common.data_config(
        objective="span_corruption",
        inputs_length=512,
        noise_density=0.15,
        mean_noise_span_length=3.0,
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
    config.num_train_steps = 1_000_000
    if variant == "tiny":
        common.shrink_to_tiny(config)
        config.optimizer.rsqrt_timescale = 100
    common.apply_overrides(config, overrides)
    return config
