"""Position encoding x attention kernel ablation (rope_jax.experiments.ablation).

Launch (the ``tiny`` grid: both tracks, one seed)::

  python eval.py --config=configs/ablation.py:tiny --workdir=runs/ablation
  python eval.py --config=configs/ablation.py:tiny,num_seeds=3 --workdir=runs/ablation3

The grid (every kernel of the attention registry marked for the ablation x every position)
runs once per track in ``config.tracks``:
``causal_lm`` (decoder-only causal LM, next-token loss; Nystrom is skipped, it has no causal
form) and ``mlm`` (bidirectional encoder with BERT's MLM head and masking, masked-token loss;
every kernel including Nystrom, t5_bias with bidirectional buckets, symmetric alibi). Each
cell trains ``config.train``, a complete pretraining config (the grid sets the kernel,
position, family, objective and ``model.max_length = train.data.inputs_length``), once per
seed; every run's ``config.json`` trains it again with
``python train.py --config=configs/recorded.py:<run>/config.json --workdir=...``.
Run one track with ``--config.tracks='("mlm",)'``.

Larger grids are config changes: ``--config.train.data.inputs_length=512
--config.train.num_train_steps=20000 --config.train.model.d_model=512 ...`` (keep
``train.model.num_landmarks`` <= ``inputs_length``); restrict the grid with
``--config.kernels='("softmax",)' --config.positions='("rope", "alibi")'``, or one track's
grid with ``--config.mlm.kernels='("nystrom",)'``. A corpus of text files:
``--config.train.data.paths='corpus/*.txt'``; SentencePiece instead of bytes:
``--config.train.tokenizer.kind=sentencepiece`` (trained once in the workdir).
"""

import ml_collections

from configs import common
from rope_jax.attention import registry

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
# Every registered kernel whose spec joins the default grid (KernelSpec.ablation).
KERNELS = tuple(name for name, spec in registry.KERNELS.items() if spec.ablation)
TRACKS = ("causal_lm", "mlm")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, overrides = common.split_arg(arg, VARIANTS)
    config = ml_collections.ConfigDict()
    config.kind = "ablation"
    config.tracks = TRACKS
    config.positions = POSITIONS
    config.kernels = KERNELS
    # Per track: kernels and positions replace the shared grid above when not empty. mlm:
    # the seed of the held-out masks (drawn once on the longest windows, whose prefixes are
    # the shorter lengths; the same for every cell and seed).
    config.causal_lm = ml_collections.ConfigDict({"kernels": (), "positions": ()})
    config.mlm = ml_collections.ConfigDict({"kernels": (), "positions": (), "eval_mask_seed": 0})
    # Runs per cell, with seeds train.seed, train.seed + 1, ... (data order, masks, init).
    config.num_seeds = 1
    config.eval_multipliers = (1, 2, 4)
    config.eval_windows = 64
    config.eval_batch_size = 8
    config.buckets_per_train_length = 4
    config.single_device = True
    # The pretraining config of every cell (train.py runs it as it is): windows of exactly
    # the training length L = data.inputs_length from one token stream, byte tokens.
    config.train = common.base_config()
    config.train.model = common.model_config(
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
    config.train.data = common.data_config(
        objective="causal_lm", sampling="windows", pack=False, inputs_length=64, eval_every=10
    )
    config.train.tokenizer.kind = "bytes"
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
        config.train.data.inputs_length = 128
        config.train.num_train_steps = 2000
        config.train.model.update({"d_model": 128, "d_ff": 256, "num_layers": 4})
    common.apply_overrides(config, overrides)
    return config
