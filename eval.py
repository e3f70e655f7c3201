"""Evaluation entry point: SuperGLUE or summarization fine-tuning, few-shot cloze runs
(PET / P-tuning), or the position x attention ablation.

  python eval.py --config=configs/superglue.py:tiny --config.task=CB \
      --config.data_dir=... --config.init_checkpoint=... --workdir=runs/cb
  python eval.py --config=configs/summarization.py:tiny --config.train_path=... \
      --config.eval_path=... --config.init_checkpoint=... --workdir=runs/csl
  python eval.py --config=configs/fewshot.py:tiny --config.method=ptuning --config.task=RTE \
      --config.data_dir=<FewGLUE> --config.init_checkpoint=... --workdir=runs/rte
  python eval.py --config=configs/ablation.py:tiny --workdir=runs/ablation

A pretraining config (``configs/mt5.py`` ...) belongs to train.py and is refused at start;
a mistyped override names the key and its close matches. Errors end the output with
``eval.py: error: ...`` and exit 1. The first SIGINT/SIGTERM saves a checkpoint and exits
with 128 + signal (130, 143); the same command again resumes.
"""

import jax
from absl import flags, logging
from ml_collections import config_flags

from rope_jax import cli
from rope_jax.data.embedded import TokenizerCacheError
from rope_jax.training import checkpoint, interrupts, preflight, sharding
from rope_jax.training.metrics import quiet_library_logs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {argv[1:]}")
    config = cli.config_value(_CONFIG)
    with cli.reported_errors((preflight.ConfigError,)):
        preflight.check_kind(config, "eval.py", cli.config_name())
    quiet_library_logs()
    # Before any device query: multi-host jobs join the cluster first.
    with cli.reported_errors((ValueError,)):
        sharding.maybe_initialize_distributed(config)
    logging.info("JAX devices: %s", jax.devices())
    # Grid cells and fine-tunes are runs of the trainer: its restart checks, signals and
    # errors are theirs.
    errors = (preflight.ConfigError, TokenizerCacheError, checkpoint.CheckpointError)
    if config.kind == "ablation":
        from rope_jax.experiments import ablation

        run, what = ablation.run_ablation, "Ablation"
    elif config.kind == "summarization":
        from rope_jax.evaluation import summarization, summary_finetune

        run, what = summary_finetune.finetune_and_evaluate, "Fine-tuning"
        # Missing or malformed data, a missing checkpoint or tokenizer: one line, no traceback.
        errors += (FileNotFoundError, summarization.SummaryFormatError)
    else:
        from rope_jax.evaluation import fewshot, finetune, readers

        run, what = finetune.finetune_and_evaluate, "Fine-tuning"
        if config.kind == "fewshot":
            run, what = fewshot.run_fewshot, "Few-shot run"
        # Missing or malformed data, a missing checkpoint or tokenizer: one line, no traceback.
        errors += (FileNotFoundError, readers.SuperGlueFormatError)
    try:
        with cli.reported_errors(errors):
            run(config, _WORKDIR.value)
    except interrupts.StoppedBySignal as stopped:
        logging.info("%s %s; run the same command to resume.", what, stopped)
        return interrupts.exit_code(stopped.signum)
    return 0


if __name__ == "__main__":
    cli.run(main)
