"""T5 PEGASUS (Su 2021, "T5 PEGASUS: open-sourcing a Chinese generative pretraining model"):
an mT5 v1.1 encoder-decoder pretrained with pseudo-summaries chosen by character-level LCS,
with the jieba + BERT-vocabulary tokenizer (``tokenizer.kind=jieba_bert``).

Launch (``tiny`` runs in a few minutes on 2 CPU cores; ``small`` and ``base`` are the
released sizes with the 50000-token vocabulary):

    python train.py --config=configs/t5_pegasus.py:tiny --config.data.paths=/data/zh/*.txt \\
        --config.data.text_mode=lines --workdir=runs/t5_pegasus_tiny
    python train.py --config=configs/t5_pegasus.py:base \\
        --config.tokenizer.vocab_path=/models/chinese_t5_pegasus_base/vocab.txt \\
        --config.data.paths='/data/zh/*.jsonl' --config.data.format=jsonl --workdir=runs/t5p

Without ``tokenizer.vocab_path`` a ``model.vocab_size``-token ``vocab.txt`` is built on the
training corpus (BERT's special tokens, every character, then the most frequent jieba words)
and cached in ``<workdir>/tokenizer/``. Without ``data.paths`` the corpus is the embedded
English one, which runs but is not what this model is for.

The blog's recipe, as the reference code does it: cut the text into short pieces (newlines,
then 。！？.!?, merged up to 32 characters: ``data.summary_max_chars``), grow the target
greedily by the piece that maximises the LCS with the source until it passes 25% of the
source, and keep the longer side as the source; inputs 512, targets 256 tokens. Encoder
inputs are ``[CLS] source [SEP]``, decoder targets ``summary [SEP]`` behind ``[CLS]``, as
the released model was trained.
"""

from configs import common
from configs.mt5 import T5_V1_1

VARIANTS = ("tiny", "small", "base")

SIZES = {
    "tiny": dict(d_model=128, num_heads=4, head_dim=32, d_ff=256, num_layers=2, vocab_size=2048),
    "small": dict(d_model=512, num_heads=6, head_dim=64, d_ff=1024, num_layers=8, vocab_size=50000),
    "base": dict(
        d_model=768, num_heads=12, head_dim=64, d_ff=2048, num_layers=12, vocab_size=50000
    ),
}


def get_config(arg: str | None = None):
    variant, overrides = common.split_arg(arg, VARIANTS)
    config = common.base_config()
    config.model = common.model_config(**T5_V1_1, **SIZES[variant])
    config.data = common.data_config(
        objective="pseudo_summary", inputs_length=512, targets_length=256, summary_rate=0.25
    )
    config.tokenizer.kind = "jieba_bert"
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
        # About 5 CPU-minutes for 600 steps measured on a busy 2-core machine; 300 keep the
        # run to a couple of minutes (a 20-document sample is memorised by step 100).
        common.shrink_to_tiny(config, targets_length=64, num_train_steps=300, every=100)
        config.optimizer.rsqrt_timescale = 100
    common.apply_overrides(config, overrides)
    return config
