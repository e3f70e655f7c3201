"""The one place a run's ``ConfigDict`` becomes typed values.

Config files (``configs/*.py``) are ``ml_collections`` dicts users override from the command
line; the code under them never reads a section from a ConfigDict: the trainer converts
each section here, once, into its frozen dataclass (``config_fields.from_mapping``: an
unknown key or a wrong type is an error naming ``<section>.<key>``); every loop,
pretraining and fine-tuning, gets its mesh and optimizer through
``training.runner.loop_setup``:

* ``model`` -> ``model_config.ModelConfig`` (validated: ``validate_model_config``);
* ``data`` (+ top-level ``batch_size`` and ``seed``) -> ``data.pipeline.DataConfig``;
* ``optimizer`` -> ``training.optim.OptimizerConfig``;
* ``mesh`` -> ``training.sharding.MeshConfig``.

"Unset" is ``None`` everywhere (derived or off, as the field says), never -1 or 0. Configs
recorded by earlier versions wrote those sentinels; ``upgrade_record`` reads them as None
(``workdir.recorded_config`` applies it), so an old run still resumes and still compares
equal to the config that started it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rope_jax import config_fields, scanning
from rope_jax.data.pipeline import DataConfig
from rope_jax.model_config import ModelConfig, model_config_from_dict
from rope_jax.training.optim import OptimizerConfig
from rope_jax.training.sharding import MeshConfig

ConfigKeyError = config_fields.ConfigKeyError

# Dotted key -> the value earlier versions recorded for "unset" (now None).
LEGACY_UNSET = {
    "data.targets_length": -1,
    "data.num_epochs": 0,
    "model.num_decoder_layers": 0,
    "optimizer.decay_steps": 0,
    "optimizer.rsqrt_timescale": 0,
    "mlm_max_predictions": -1,
    "debug_nan_step": -1,
    # SuperGLUE fine-tuning: keep the checkpoint's dropout.
    "dropout_rate": -1,
    # Few-shot (configs/fewshot.py): the method's first pattern; the optimizer's rate.
    "pattern_id": -1,
    "prompt_learning_rate": 0,
}


@dataclasses.dataclass(frozen=True)
class Sections:
    """Every typed section of a pretraining config."""

    model: ModelConfig
    data: DataConfig
    optimizer: OptimizerConfig
    mesh: MeshConfig


def model_section(config) -> ModelConfig:
    return model_config_from_dict(config.model)


def data_section(config) -> DataConfig:
    """``config.data`` with the top-level batch size and seed (one global batch, one seed for
    data order and initialisation)."""
    values = config.data.to_dict()
    for key in ("batch_size", "seed"):
        if key in values:
            raise ConfigKeyError(
                f"data.{key} is not a config key; the top-level {key} is the data's "
                f"(--config.{key}=...)."
            )
    values.update(batch_size=config.batch_size, seed=config.seed)
    return config_fields.from_mapping(DataConfig, values, "data")


def optimizer_section(config) -> OptimizerConfig:
    return config_fields.from_mapping(OptimizerConfig, config.optimizer, "optimizer")


def mesh_section(config) -> MeshConfig:
    return config_fields.from_mapping(MeshConfig, config.mesh, "mesh")


def sections(config) -> Sections:
    """All sections, each converted and checked; the first bad key raises."""
    return Sections(
        model=model_section(config),
        data=data_section(config),
        optimizer=optimizer_section(config),
        mesh=mesh_section(config),
    )


def upgrade_record(tree: dict[str, Any]) -> dict[str, Any]:
    """A recorded config with earlier versions' unset sentinels (``LEGACY_UNSET``, and an
    evaluator period of 0 for "every eval_every_steps") as None; a boolean ``model.remat``
    as its policy name (True: full, False: none) and a missing ``model.scan_layers`` as False
    (the layer loop every earlier run had)."""
    for dotted, legacy in LEGACY_UNSET.items():
        *parents, leaf = dotted.split(".")
        node = tree
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and _is(node[leaf], legacy):
            node[leaf] = None
    model = tree.get("model")
    if isinstance(model, dict) and "family" in model:
        # remat was a boolean before the named policies (rope_jax.scanning), and layers were
        # always a loop before scan_layers.
        if isinstance(model.get("remat"), bool):
            model["remat"] = scanning.remat_name(model["remat"])
        model.setdefault("scan_layers", False)
    evaluators = tree.get("evaluators")
    if isinstance(evaluators, list):
        tree["evaluators"] = [
            [spec[0], None, *spec[2:]]
            if isinstance(spec, list) and len(spec) == 3 and _is(spec[1], 0)
            else spec
            for spec in evaluators
        ]
    return tree


def _is(value, legacy) -> bool:
    """``value`` is the number ``legacy`` (``False`` is not 0)."""
    return not isinstance(value, bool) and value == legacy
