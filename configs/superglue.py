"""SuperGLUE fine-tuning and evaluation (rope_jax.evaluation.finetune).

Launch (``tiny`` runs on a laptop CPU; ``base`` is the T5-paper-like setting)::

  python eval.py --config=configs/superglue.py:tiny --config.task=CB \
      --config.data_dir=/data/super_glue --config.init_checkpoint=runs/t5_tiny --workdir=runs/cb
  python eval.py --config=configs/superglue.py:tiny,task=CB,data_dir=/data/super_glue \
      --config.init_checkpoint=runs/t5_tiny --workdir=runs/cb

The argument after the file is a variant and comma-separated overrides, parsed as for the
pretraining configs (``configs/common.py``: ``split_arg``, ``apply_overrides``).

``init_checkpoint``: a train.py workdir, a Hugging Face folder (T5/mT5/BERT/RoFormer) or
"" (random init from ``config.model``, needs ``config.tokenizer``); it is only read.
Each task trains in ``<workdir>/<task>`` with the train loop of pretraining (``mesh``,
``logical_axis_rules``, ``optimizer.grad_accum_steps``, ``prng_impl``, checkpoints, resume:
run the same command again), evaluates every ``eval_every_steps`` and keeps the best
validation checkpoint (``evaluators``: ``(name, every_steps, kwargs)`` of ``superglue``,
``held_out_loss``, ``loss_by_position``; every_steps None = ``eval_every_steps``).
``task=all`` runs every task folder in ``data_dir`` (AX-b/AX-g with the RTE model) and
writes ``summary.md``.
Few-shot (FewGLUE): ``--config.train_data_dir=<fewglue> --config.data_dir=<super_glue>``, or
``--config.data_dir=<fewglue> --config.eval_split=dev32``.
"""

import ml_collections
from ml_collections import config_dict

from configs import common
from rope_jax.training import optim

VARIANTS = ("base", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, overrides = common.split_arg(arg, VARIANTS)
    config = common.add_loop_keys(ml_collections.ConfigDict())
    config.kind = "superglue"
    config.task = "CB"
    config.data_dir = ""
    # Training files from another folder (FewGLUE's 32-example sets); "" = data_dir.
    config.train_data_dir = ""
    config.train_split = "train"
    config.eval_split = "val"
    config.test_split = "test"
    config.init_checkpoint = ""
    # The config train.py ran with ("configs/mt5.py:tiny"): gives the model of a workdir.
    config.pretrain_config = ""
    config.tokenizer = ""
    config.seed = 0
    config.max_input_length = 512
    config.max_target_length = 16
    config.batch_size = 32
    config.eval_batch_size = 32
    config.num_train_steps = 2000
    config.log_every_steps = 50
    config.checkpoint_every_steps = 200
    config.eval_every_steps = 200
    # The loop's evaluators: (name, every_steps (None = eval_every_steps, 0 = only after the
    # last step), kwargs).
    config.evaluators = [("superglue", None, {}), ("held_out_loss", None, {})]
    # Fine-tuning dropout (None = keep the checkpoint's): a float field that may be None.
    config.dropout_rate = config_dict.placeholder(float)
    config.dropout_rate = 0.1
    # The layers as a loop or one nn.scan (rope_jax/scanning.py), None = as the checkpoint was
    # written; the pretrained weights are converted to the other form on load.
    config.scan_layers = config_dict.placeholder(bool)
    # Text-to-text decoding: "greedy" or "beam" (beam_size, length penalty alpha of Wu et al.).
    config.decode_method = "greedy"
    config.beam_size = 4
    config.beam_alpha = 0.6
    # Decode against the key/value cache (False: re-run the decoder over the prefix per token).
    config.kv_cache = True
    config.optimizer = optim.default_optimizer_config()
    config.optimizer.learning_rate = 1e-4
    config.optimizer.warmup_steps = 100
    config.optimizer.schedule = "linear"
    config.optimizer.end_factor = 0.0
    # Every ModelConfig field, so any can be overridden. Used only for random init (empty
    # init_checkpoint) and as the last fallback for the model of a train.py workdir.
    config.model = common.model_config(
        family="encoder_decoder",
        vocab_size=32128,
        d_model=512,
        num_heads=8,
        head_dim=64,
        d_ff=1024,
        num_layers=8,
        dropout_rate=0.1,
    )
    if variant == "tiny":
        config.max_input_length = 64
        config.max_target_length = 8
        config.batch_size = 8
        config.eval_batch_size = 8
        config.num_train_steps = 20
        config.log_every_steps = 5
        config.checkpoint_every_steps = 10
        config.eval_every_steps = 10
        config.measure_matmul_peak = False
        config.optimizer.learning_rate = 3e-3
        config.optimizer.warmup_steps = 2
        config.model.update(
            {
                "vocab_size": 512,
                "d_model": 32,
                "num_heads": 2,
                "head_dim": 16,
                "d_ff": 64,
                "num_layers": 1,
                "max_length": 64,
            }
        )
    common.apply_overrides(config, overrides)
    return config
