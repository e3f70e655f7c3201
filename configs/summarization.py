"""Summarization fine-tuning and evaluation (rope_jax.evaluation.summary_finetune).

Launch (``tiny`` runs on the 20-pair CSL sample on 2 CPU cores in a few minutes, from a
``configs/t5_pegasus.py:tiny`` pretraining workdir; ``base`` is the T5 PEGASUS recipe)::

  python eval.py --config=configs/summarization.py:tiny \
      --config.train_path=/data/csl/train.tsv --config.eval_path=/data/csl/val.tsv \
      --config.init_checkpoint=runs/t5p_tiny --workdir=runs/csl_tiny
  python eval.py --config=configs/summarization.py:base \
      --config.train_path=/data/csl/train.tsv --config.eval_path=/data/csl/val.tsv \
      --config.init_checkpoint=/models/chinese_t5_pegasus_base_hf --workdir=runs/csl

``train_path`` / ``eval_path``: CSL-style ``title<TAB>content`` TSV or JSONL (``format``,
``source_field``, ``target_field``, ``id_field``; ``rope_jax.evaluation.summarization``).
``init_checkpoint``: a train.py workdir, a Hugging Face folder (T5/mT5, or T5 PEGASUS: an
MT5 folder with a BERT ``vocab.txt``) or "" (random init from ``config.model``, needs
``config.tokenizer``: a SentencePiece ``.model`` or a BERT ``vocab.txt``); it is only read.
The run trains in ``<workdir>`` with the train loop of pretraining (``mesh``,
``logical_axis_rules``, ``optimizer.grad_accum_steps``, ``prng_impl``, checkpoints, resume:
run the same command again), evaluates every ``eval_every_steps`` (``evaluators``:
``summarization``, ``held_out_loss``, ``loss_by_position``), keeps the best checkpoint by
``best_metric`` and ends with ``<workdir>/metrics.json`` (rouge-1, rouge-2, rouge-l, bleu)
and ``predictions/<eval file name>.jsonl`` from it.

``base`` follows ZhuiyiTechnology/t5-pegasus ``finetune.py``: ``max_c_len=256``,
``max_t_len=32`` (both count ``[CLS]`` and ``[SEP]``), batch 32, Adam at a constant 2e-4
(bert4keras' Adam: epsilon 1e-6, no weight decay, no clipping), decoding up to 32 tokens with
``topk=1`` (beam size 1). It trains 40 epochs: set ``num_train_steps`` to
``40 * <training pairs> / 32``. It keeps the best epoch by BLEU; here ``best_metric`` picks.
"""

import ml_collections

from configs import common
from configs.mt5 import T5_V1_1
from configs.t5_pegasus import SIZES
from rope_jax.training import optim

VARIANTS = ("base", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, overrides = common.split_arg(arg, VARIANTS)
    config = common.add_loop_keys(ml_collections.ConfigDict())
    config.kind = "summarization"
    config.train_path = ""
    config.eval_path = ""
    # "auto": .jsonl/.json files are JSONL, .tsv/.txt files title<TAB>content.
    config.format = "auto"
    config.source_field = "content"
    config.target_field = "title"
    config.id_field = "id"
    # Text put before every source; T5's multi-task mixtures use "summarize: ".
    config.source_prefix = ""
    config.init_checkpoint = ""
    # The config train.py ran with ("configs/t5_pegasus.py:tiny"): gives the model of a
    # workdir that recorded none.
    config.pretrain_config = ""
    config.tokenizer = ""
    config.seed = 0
    # Tokens of the encoder input and of the target, each counting its start ([CLS], or
    # none for SentencePiece) and end ([SEP] / EOS) token, as the reference's maxlen does.
    config.max_source_length = 256
    config.max_target_length = 32
    # Tokens generated after the decoder start, EOS included (the reference's maxlen).
    config.decode_max_length = 32
    # Beam search (rope_jax.decoding.beam_search); size 1 with alpha 0 is greedy decoding,
    # which the reference's evaluation (topk=1) is. alpha: length penalty of Wu et al.
    config.beam_size = 1
    config.beam_alpha = 0.0
    config.kv_cache = True
    config.batch_size = 32
    config.eval_batch_size = 32
    config.num_train_steps = 4000
    config.log_every_steps = 50
    config.checkpoint_every_steps = 500
    config.eval_every_steps = 500
    # The loop's evaluators: (name, every_steps (None = eval_every_steps, 0 = only after the
    # last step), kwargs).
    config.evaluators = [("summarization", None, {}), ("held_out_loss", None, {})]
    # "<evaluator>/<scalar>" the best checkpoint is kept by ("" = keep none, use the final
    # state); a scalar named like a loss is minimised, any other maximised.
    config.best_metric = "summarization/rouge-l"
    # Fine-tuning dropout (None = keep the checkpoint's): a float field that may be None; the
    # released model's is 0.1.
    config.dropout_rate = ml_collections.config_dict.placeholder(float)
    config.dropout_rate = 0.1
    # The layers as a loop or one nn.scan (rope_jax/scanning.py), None = as the checkpoint was
    # written; the pretrained weights are converted to the other form on load.
    config.scan_layers = ml_collections.config_dict.placeholder(bool)
    config.optimizer = optim.default_optimizer_config()
    config.optimizer.update(
        learning_rate=2e-4,
        schedule="constant",
        warmup_steps=0,
        eps=1e-6,
        weight_decay=0.0,
        grad_clip_norm=0.0,
    )
    # Every ModelConfig field, so any can be overridden. Used only for random init (empty
    # init_checkpoint) and as the last fallback for the model of a train.py workdir.
    config.model = common.model_config(**{**T5_V1_1, "dropout_rate": 0.1}, **SIZES[variant])
    if variant == "tiny":
        # configs/t5_pegasus.py:tiny pretrains 128 input tokens; CSL titles fit in 32.
        config.max_source_length = 128
        config.batch_size = 8
        config.eval_batch_size = 10
        config.num_train_steps = 150
        config.log_every_steps = 10
        config.checkpoint_every_steps = 50
        config.eval_every_steps = 50
        config.measure_matmul_peak = False
        config.optimizer.learning_rate = 1e-3
    common.apply_overrides(config, overrides)
    return config
