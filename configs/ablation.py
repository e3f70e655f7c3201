"""Position encoding x attention kernel ablation (rope_jax.evaluation.ablation).

Launch (the ``tiny`` grid: both tracks, 8.5 minutes on 2 quiet CPU cores, about 11 under
load)::

  python eval.py --config=configs/ablation.py:tiny --workdir=runs/ablation

The grid (every kernel x every position) runs once per track in ``config.tracks``:
``causal_lm`` (decoder-only causal LM, next-token loss; Nystrom is skipped, it has no causal
form) and ``mlm`` (bidirectional encoder with BERT's MLM head and masking, masked-token loss;
every kernel including Nystrom, t5_bias with bidirectional buckets, symmetric alibi). Both
tracks train for the same steps and batch and are evaluated on the same held-out windows.
Run one track with ``--config.tracks='("mlm",)'``.

Larger grids are config changes: ``--config.train_length=512 --config.train.num_train_steps=
20000 --config.model.d_model=512 ...`` (keep ``model.num_landmarks`` <= ``train_length``);
restrict the grid with ``--config.kernels='("softmax",)' --config.positions='("rope",
"alibi")'``, or one track's grid with ``--config.mlm.kernels='("nystrom",)'``.
"""

import ml_collections

from configs import common

VARIANTS = ("tiny", "small")
POSITIONS = (
    "none",
    "sinusoidal",
    "learned",
    "learned_hierarchical",
    "rope",
    "rope_half",
    "rope_interpolation",
    "t5_bias",
    "alibi",
)
KERNELS = ("softmax", "performer", "nystrom", "linear")
TRACKS = ("causal_lm", "mlm")


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    variant = arg or "tiny"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    config = ml_collections.ConfigDict()
    config.kind = "ablation"
    config.tracks = TRACKS
    config.positions = POSITIONS
    config.kernels = KERNELS
    # Per track: kernels and positions replace the shared grid above when not empty. mlm:
    # BERT masking of training batches, and the seed of the held-out masks (drawn once on
    # the longest windows, whose prefixes are the shorter lengths; the same for every cell).
    config.causal_lm = ml_collections.ConfigDict({"kernels": (), "positions": ()})
    config.mlm = ml_collections.ConfigDict(
        {"kernels": (), "positions": (), "mask_rate": 0.15, "eval_mask_seed": 0}
    )
    config.seed = 0
    # "" = the embedded default corpus; else a glob of text files.
    config.corpus = ""
    config.heldout_every = 10
    config.tokenizer = "bytes"
    config.train_length = 64
    config.eval_multipliers = (1, 2, 4)
    config.eval_windows = 64
    config.eval_batch_size = 8
    config.buckets_per_train_length = 4
    config.single_device = True
    # Every ModelConfig field (any can be overridden); attention, position, family and
    # max_length are set per grid cell.
    config.model = common.model_config(
        vocab_size=320,
        d_model=64,
        num_heads=4,
        head_dim=16,
        d_ff=128,
        num_layers=2,
        dropout_rate=0.0,
        num_features=32,
        # 16 divides 64, 128 and 256: Nystrom segments of 4, 8 and 16 tokens at 1x, 2x, 4x L.
        num_landmarks=16,
    )
    # The trainer's own config (every key it reads), shared by all cells.
    config.train = common.base_config()
    config.train.seed = 0
    config.train.num_train_steps = 300
    config.train.batch_size = 16
    config.train.log_every_steps = 50
    config.train.checkpoint_every_steps = 0
    config.train.eval_every_steps = 0
    config.train.eval_steps = 0
    config.train.keep_checkpoints = 1
    config.train.async_checkpointing = False
    config.train.measure_matmul_peak = False
    config.train.optimizer.learning_rate = 3e-3
    config.train.optimizer.warmup_steps = 30
    if variant == "small":
        config.train_length = 128
        config.train.num_train_steps = 2000
        config.model.update({"d_model": 128, "d_ff": 256, "num_layers": 4})
    return config
