"""Pretraining entry point.

    python train.py --config=configs/roformer.py:tiny --workdir=runs/demo
    python train.py --config=configs/mt5.py:small --config.model.attention=performer \\
        --config.model.position=rope \\
        --config.num_train_steps=100000 --workdir=runs/mt5_small_performer

Linear-family kernels (performer, linear, taylor) never form the score matrix, so they take
neither T5's relative bias (mT5's default position) nor a prefix-LM mask; packed rows they
take (through the segment ids). Nystrom needs ``pack=False``. The config check at start says
what does not fit and names the keys to change.

Restarting with the same ``--workdir`` resumes from its latest complete checkpoint, if the
config still describes the same experiment (docs/training.md, "Restarting a run"). Ctrl-C
or SIGTERM saves at the next step boundary and exits with 128 + the signal number (130,
143); a second Ctrl-C stops at once. Errors end the output with ``train.py: error: ...``
and exit 1. Everything else lives in ``rope_jax.training.trainer.train_and_evaluate``.
"""

import jax
from absl import flags, logging
from ml_collections import config_flags

from rope_jax import cli
from rope_jax.data.embedded import TokenizerCacheError
from rope_jax.training import checkpoint, interrupts, metrics, preflight, sharding, trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/roformer.py:tiny.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard logs.")
flags.mark_flags_as_required(["config", "workdir"])

# Mistakes a user can fix; they end the run with one line instead of a traceback.
USER_ERRORS = (
    preflight.ConfigError,
    TokenizerCacheError,
    checkpoint.CheckpointError,
    trainer.NonFiniteLossError,
    FileNotFoundError,
)


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {argv[1:]}")
    config = cli.config_value(_CONFIG)
    with cli.reported_errors(USER_ERRORS, workdir=_WORKDIR.value):
        preflight.check_kind(config, "train.py", cli.config_name())
        preflight.check_pretraining_config(config)
        metrics.quiet_library_logs()
        # Before any device query: multi-host jobs join the cluster first.
        sharding.maybe_initialize_distributed(config)
        logging.info(
            "JAX %s, process %d/%d", jax.__version__, jax.process_index(), jax.process_count()
        )
        logging.info("devices: %s", jax.devices())
        result = trainer.train_and_evaluate(config, _WORKDIR.value)
    if result.stop_signal is not None:
        return interrupts.exit_code(result.stop_signal)
    return 0


if __name__ == "__main__":
    cli.run(main)
