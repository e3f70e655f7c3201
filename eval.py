"""Evaluation entry point: SuperGLUE fine-tuning or the position x attention ablation.

  python eval.py --config=configs/superglue.py:tiny --config.task=CB \
      --config.data_dir=... --config.init_checkpoint=... --workdir=runs/cb
  python eval.py --config=configs/ablation.py:tiny --workdir=runs/ablation

A pretraining config (``configs/mt5.py`` ...) belongs to train.py and is refused at start;
a mistyped override names the key and its close matches. Errors end the output with
``eval.py: error: ...`` and exit 1.
"""

import jax
from absl import flags, logging
from ml_collections import config_flags

from rope_jax import cli
from rope_jax.data.embedded import TokenizerCacheError
from rope_jax.training import checkpoint, interrupts, preflight
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
    logging.info("JAX devices: %s", jax.devices())
    if config.kind == "ablation":
        from rope_jax.experiments import ablation

        # Each grid cell is a pretraining run in <workdir>/runs/...: its restart checks,
        # signals and errors are the trainer's.
        errors = (preflight.ConfigError, TokenizerCacheError, checkpoint.CheckpointError)
        try:
            with cli.reported_errors(errors):
                ablation.run_ablation(config, _WORKDIR.value)
        except interrupts.StoppedBySignal as stopped:
            logging.info("Ablation %s; run the same command to resume.", stopped)
            return interrupts.exit_code(stopped.signum)
    else:
        from rope_jax.evaluation import finetune, readers

        # Missing or malformed data, a missing checkpoint or tokenizer: one line, no traceback.
        errors = (
            preflight.ConfigError,
            FileNotFoundError,
            readers.SuperGlueFormatError,
            TokenizerCacheError,
            checkpoint.CheckpointError,
        )
        with cli.reported_errors(errors):
            finetune.finetune_and_evaluate(config, _WORKDIR.value)
    return 0


if __name__ == "__main__":
    cli.run(main)
