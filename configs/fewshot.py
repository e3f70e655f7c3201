"""Few-shot SuperGLUE by cloze (rope_jax.evaluation.fewshot): PET patterns or P-tuning prompts.

Launch (``tiny`` runs on a laptop CPU; FewGLUE: 32 training examples per task, ``dev32``
for selection)::

  python eval.py --config=configs/fewshot.py:tiny --config.method=pet --config.task=RTE \
      --config.data_dir=/data/FewGLUE --config.init_checkpoint=runs/roformer_tiny --workdir=runs/pet
  python eval.py --config=configs/fewshot.py:tiny --config.method=ptuning --config.task=all \
      --config.data_dir=/data/FewGLUE --config.init_checkpoint=runs/roformer_tiny \
      --config.num_seeds=3 --workdir=runs/ptuning

``init_checkpoint`` as in ``configs/superglue.py`` (a train.py workdir or a Hugging Face
folder; "" = random init of ``config.model``); any family: encoders score the mask (MLM
head), decoders the next token at the pattern's end, encoder-decoders the sentinel's span.
Evaluation (``eval_split="auto"``): every split present among ``dev32`` (selection) and
``val`` (the official validation set, reported, as the paper does): copy SuperGLUE's
``val.jsonl`` into the FewGLUE task folders, or ``--config.train_data_dir=<FewGLUE>
--config.data_dir=<SuperGLUE>`` (``val`` only); ``--config.eval_split=dev32`` names one.
``num_train_steps=0`` scores zero-shot. ``pattern_id`` None (the default) takes the
method's first pattern (``rope_jax/evaluation/pvp.py`` lists them). ``freeze_lm=True``
(P-tuning) trains only the prompt encoder. The argument after ``:`` is a variant plus
``key=value`` overrides, as for every config (``configs/fewshot.py:tiny,pattern_id=2,
prompt_learning_rate=None``): a None goes there, a ``--config.<key>`` flag cannot be None.
"""

import ml_collections

from configs import common
from rope_jax.training import optim

VARIANTS = ("base", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, overrides = common.split_arg(arg, VARIANTS)
    config = common.add_loop_keys(ml_collections.ConfigDict())
    config.kind = "fewshot"
    config.method = "pet"
    # None: the method's first pattern for each task (pvp.PATTERN_IDS); an int field.
    config.pattern_id = ml_collections.config_dict.placeholder(int)
    config.task = "RTE"
    config.data_dir = ""
    config.train_data_dir = ""
    config.train_split = "train"
    # "auto": every split present among dev32 (selects) and val (reported); or one name.
    config.eval_split = "auto"
    config.test_split = "test"
    config.init_checkpoint = ""
    config.pretrain_config = ""
    config.tokenizer = ""
    config.seed = 0
    config.num_seeds = 1
    # P-tuning: "lstm" (the paper), "mlp", or "embedding" (plain trainable vectors).
    config.prompt_encoder = "lstm"
    # Train the prompts only (the LM's parameters stay bit-identical).
    config.freeze_lm = False
    # The prompts' learning rate (None = optimizer.learning_rate): a float that may be None.
    config.prompt_learning_rate = ml_collections.config_dict.placeholder(float)
    config.prompt_learning_rate = 1e-4
    # PET's auxiliary MLM loss: alpha * cloze + (1 - alpha) * MLM (1 = off; encoders only).
    config.pet_alpha = 1.0
    # "cross_entropy" over candidates, or PET's "hinge" for COPA/ReCoRD.
    config.multiple_choice_loss = "cross_entropy"
    # Multi-token candidates on an encoder: PET's "iterative" fill, or "parallel".
    config.decoding = "iterative"
    config.max_input_length = 256
    config.batch_size = 16
    config.eval_batch_size = 32
    config.num_train_steps = 250
    config.log_every_steps = 25
    config.checkpoint_every_steps = 250
    config.eval_every_steps = 50
    # The loop's evaluators: (name, every_steps (None = eval_every_steps, 0 = only after the
    # last step), kwargs).
    config.evaluators = [("superglue", None, {}), ("held_out_loss", None, {})]
    # Fine-tuning dropout (None = keep the checkpoint's): a float field that may be None.
    config.dropout_rate = ml_collections.config_dict.placeholder(float)
    config.dropout_rate = 0.1
    # The layers as a loop or one nn.scan (rope_jax/scanning.py), None = as the checkpoint was
    # written; the pretrained weights are converted to the other form on load.
    config.scan_layers = ml_collections.config_dict.placeholder(bool)
    # PET / P-tuning few-shot: AdamW, lr 1e-5 for the LM (P-tuning), linear decay.
    config.optimizer = optim.default_optimizer_config()
    config.optimizer.learning_rate = 1e-5
    config.optimizer.warmup_steps = 0
    config.optimizer.schedule = "linear"
    config.optimizer.end_factor = 0.0
    config.optimizer.weight_decay = 0.01
    config.model = common.model_config(
        family="encoder", vocab_size=32000, d_model=768, num_heads=12, head_dim=64, d_ff=3072
    )
    if variant == "tiny":
        config.max_input_length = 128
        config.batch_size = 8
        config.eval_batch_size = 16
        config.num_train_steps = 40
        config.log_every_steps = 10
        config.checkpoint_every_steps = 40
        config.eval_every_steps = 20
        config.measure_matmul_peak = False
        config.optimizer.learning_rate = 1e-3
        config.prompt_learning_rate = 3e-3
        config.model.update(
            {"vocab_size": 512, "d_model": 32, "num_heads": 2, "head_dim": 16, "d_ff": 64,
             "num_layers": 1, "max_length": 128}
        )  # fmt: skip
    common.apply_overrides(config, overrides)
    return config
