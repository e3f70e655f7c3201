"""The cells of the position x attention ablation, each a complete pretraining config.

A cell is a (track, kernel, position) triple. Its training config is ``config.train`` (a
full ``train.py`` config: model, data, tokenizer, optimizer, mesh) with the grid's choices
written into it: ``model.attention``, the position keys of ``POSITION_VARIANTS``,
``model.family`` and ``data.objective`` of the track, ``model.max_length = L`` (a learned
table has exactly the rows trained) and the seed. Nothing else is passed to the trainer, so
each run's ``config.json`` is the config that trained it and
``python train.py --config=configs/recorded.py:<run>/config.json`` trains it again.

Variants that only change evaluation (``TRAINED_AS``) share the run they derive from; their
evaluation model is ``eval_model_config``. Pairs the model rejects (the trainer's own
``build_model`` check: Nystrom has no causal form; linear-family kernels take no additive
bias) are skipped with the model's reason.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from rope_jax.attention.registry import KERNELS

POSITION_VARIANTS: dict[str, dict[str, Any]] = {
    "none": {"position": "none"},
    "sinusoidal": {"position": "sinusoidal"},
    "learned": {"position": "learned"},
    "learned_hierarchical": {"position": "learned_hierarchical"},
    "rope": {"position": "rope", "rope_layout": "interleaved"},
    "rope_half": {"position": "rope", "rope_layout": "half"},
    "rope_interpolation": {"position": "rope", "rope_layout": "interleaved"},
    "t5_bias": {"position": "t5_bias"},
    "alibi": {"position": "alibi"},
}
# Evaluation-only variants train exactly like the variant they name here.
TRAINED_AS = {"learned_hierarchical": "learned", "rope_interpolation": "rope"}


@dataclasses.dataclass(frozen=True)
class Track:
    """One objective of the ablation: the model family it trains and what its loss is."""

    name: str
    family: str
    objective: str
    loss_name: str
    description: str


TRACKS: dict[str, Track] = {
    "causal_lm": Track(
        "causal_lm", "decoder", "causal_lm", "next-token loss", "Decoder-only causal LM"
    ),
    "mlm": Track(
        "mlm", "encoder", "mlm", "masked-token loss", "Bidirectional encoder, BERT masked LM"
    ),
}


@dataclasses.dataclass
class Cell:
    """A grid cell; ``config`` trains it (the seed is set per run by ``seeded``)."""

    track: str
    kernel: str
    position: str
    config: ml_collections.ConfigDict
    skip_reason: str = ""

    @property
    def name(self) -> str:
        return f"{self.kernel}_{self.position}"

    @property
    def train_key(self) -> str:
        """The run this cell's weights come from (shared by evaluation-only variants)."""
        return f"{self.kernel}_{TRAINED_AS.get(self.position, self.position)}"


def train_length(config) -> int:
    return config.train.data.inputs_length


def cell_config(config, track: str, kernel: str, position: str) -> ml_collections.ConfigDict:
    """The complete pretraining config of a cell (of its training run, for the
    evaluation-only variants): ``config.train`` with the grid's choices."""
    variant = TRAINED_AS.get(position, position)
    cell = ml_collections.ConfigDict(config.train.to_dict())
    cell.model.update(POSITION_VARIANTS[variant])
    cell.model.attention = kernel
    cell.model.family = TRACKS[track].family
    # A learned table has exactly L rows: training never sees more, and learned_hierarchical
    # extends this same table at evaluation time.
    cell.model.max_length = train_length(config)
    cell.data.objective = TRACKS[track].objective
    return cell


def seeded(cell: Cell, seed: int) -> ml_collections.ConfigDict:
    """``cell.config`` with ``seed`` (data order, masks, initialisation and dropout)."""
    run = ml_collections.ConfigDict(cell.config.to_dict())
    run.seed = seed
    return run


def seeds(config) -> list[int]:
    """``num_seeds`` consecutive seeds from ``config.train.seed``."""
    if config.num_seeds < 1:
        raise ValueError(f"num_seeds={config.num_seeds}: must be >= 1")
    return [config.train.seed + k for k in range(config.num_seeds)]


def eval_model_dict(cell: Cell, eval_length: int) -> dict[str, Any] | None:
    """The model config that evaluates ``cell`` at ``eval_length``; None when there is no
    such model (a learned table beyond its rows)."""
    length = train_length_of(cell)
    model = cell.config.model.to_dict()
    model.update(POSITION_VARIANTS[cell.position])
    if eval_length > length:
        if cell.position == "learned":
            return None
        if cell.position == "rope_interpolation":
            # Position interpolation (Chen et al. 2023): positions scaled by L / L_eval.
            model["rope_scale"] = length / eval_length
    return model


def train_length_of(cell: Cell) -> int:
    return cell.config.data.inputs_length


def grid(config, track: str = "causal_lm") -> list[Cell]:
    """All (kernel, position) cells of ``track``, with the model's own reason for the
    meaningless ones."""
    from rope_jax import config_fields
    from rope_jax.training import trainer

    if track not in TRACKS:
        raise ValueError(f"unknown track {track!r}; known: {sorted(TRACKS)}")
    L = train_length(config)
    shortest = min(L * m for m in (1, *config.eval_multipliers))
    # A track's own kernels/positions, when given, replace the shared ones.
    kernels = config[track].kernels or config.kernels
    positions = config[track].positions or config.positions
    cells = []
    for kernel in kernels:
        for position in positions:
            if position not in POSITION_VARIANTS:
                raise ValueError(
                    f"unknown position {position!r}; known: {sorted(POSITION_VARIANTS)}"
                )
            cell = Cell(track, kernel, position, cell_config(config, track, kernel, position))
            try:
                trainer.build_model(cell.config)
            except config_fields.ConfigKeyError:
                raise  # a mistyped key is the config's mistake, not the pair's
            except ValueError as err:
                cell.skip_reason = str(err.__cause__ or err)
            spec = KERNELS.get(kernel)
            if spec and spec.check_length and not cell.skip_reason:
                reason = spec.check_length(cell.config.model, shortest)
                if reason:
                    raise ValueError(
                        f"train.model.{reason}: {shortest} is the shortest length trained or "
                        f"evaluated."
                    )
            cells.append(cell)
    return cells
