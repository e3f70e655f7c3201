"""Pretraining entry point.

    python train.py --config=configs/roformer.py:tiny --workdir=runs/demo
    python train.py --config=configs/mt5.py:small --config.model.attention=performer \\
        --config.model.position=rope \\
        --config.num_train_steps=100000 --workdir=runs/mt5_small_performer

Linear-family kernels (performer, linear, taylor) never form the score matrix, so they take
neither T5's relative bias (mT5's default position) nor a prefix-LM mask; packed rows they
take (through the segment ids). Nystrom needs ``pack=False``. The config check at start says
what does not fit and names the keys to change.

Restarting with the same ``--workdir`` resumes from its latest complete checkpoint.
Everything else lives in ``rope_jax.training.trainer.train_and_evaluate``.
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from rope_jax.training import metrics, sharding, trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/roformer.py:tiny.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard logs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    metrics.quiet_library_logs()
    # Before any device query: multi-host jobs join the cluster first.
    sharding.maybe_initialize_distributed(_CONFIG.value)
    logging.info("JAX %s, process %d/%d", jax.__version__, jax.process_index(), jax.process_count())
    logging.info("devices: %s", jax.devices())
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
