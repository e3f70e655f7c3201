"""The best checkpoint of a run by one evaluated metric: T5 (Raffel et al. 2020) reports
each fine-tuning task at its best validation checkpoint. It lives in its own directory, so
the latest-N policy of the run's checkpoints never deletes it.

``BestCheckpoint(directory, metric)`` is offered the scalars of every evaluation; when
``metric`` beats the best so far (strictly: on a tie the earlier step stays, as the first
best of an uninterrupted run would) it saves the params and random features of that step
(synchronously, one Orbax step kept) and then writes ``best.json`` (step, value, every
scalar of that evaluation). A resumed run reads ``best.json`` back, so an interrupted and
resumed fine-tune keeps the same best step as an uninterrupted one. A fine-tune resumed
with the other ``scan_layers`` restores a best step saved in the first form converted to
the second (``training.relayout``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
from absl import logging

from rope_jax.training import checkpoint as checkpoint_lib
from rope_jax.training import relayout

RECORD = "best.json"


class BestCheckpoint:
    def __init__(self, directory: str, metric: str, *, mode: str = "max"):
        if mode not in ("max", "min"):
            raise ValueError(f"best checkpoint mode must be 'max' or 'min', got {mode!r}")
        self.directory = checkpoint_lib.absolute_path(directory)
        self.metric, self.mode = metric, mode
        self.step: int | None = None
        self.value: float | None = None
        self.scalars: dict[str, float] = {}
        self._checkpointer: checkpoint_lib.Checkpointer | None = None

    @property
    def record_path(self) -> str:
        return os.path.join(self.directory, RECORD)

    def _manager(self) -> checkpoint_lib.Checkpointer:
        if self._checkpointer is None:
            self._checkpointer = checkpoint_lib.Checkpointer(
                self.directory, keep=1, async_save=False
            )
        return self._checkpointer

    def resume(self, start_step: int) -> None:
        """Reads ``best.json`` of an earlier start (nothing for a fresh run)."""
        del start_step  # A record past it was saved by the same steps the resumed run redoes.
        if not os.path.exists(self.record_path):
            return
        with open(self.record_path, encoding="utf-8") as f:
            record = json.load(f)
        if record.get("metric") != self.metric:
            raise ValueError(
                f"{self.record_path} ranks by {record.get('metric')!r}, this run by "
                f"{self.metric!r}; use a new workdir"
            )
        self.step, self.value = int(record["step"]), float(record["value"])
        self.scalars = dict(record.get("scalars", {}))

    def better(self, value: float) -> bool:
        if self.value is None:
            return True
        return value > self.value if self.mode == "max" else value < self.value

    def update(self, step: int, state, scalars: Mapping[str, float]) -> bool:
        """Saves ``state``'s params as the best when ``scalars[metric]`` beats the best."""
        if self.metric not in scalars:
            raise KeyError(
                f"the best checkpoint ranks by {self.metric!r}, which no evaluator reported; "
                f"reported: {sorted(scalars)}"
            )
        value = float(scalars[self.metric])
        if step == self.step or not self.better(value):
            return False
        saved = {"params": state.params, "random_features": state.random_features}
        manager = self._manager()
        manager.save(step, saved, {"step": int(step)}, force=True)
        manager.wait()
        self.step, self.value = int(step), value
        self.scalars = {k: float(v) for k, v in scalars.items()}
        if jax.process_index() == 0:
            tmp = f"{self.record_path}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                record = {"metric": self.metric, "step": self.step, "value": self.value}
                json.dump({**record, "scalars": self.scalars}, f, indent=2, sort_keys=True)
            os.replace(tmp, self.record_path)
        logging.info("best %s so far: %.4f at step %d (saved)", self.metric, value, step)
        return True

    def restore(self, abstract_params: Any, abstract_features: Any) -> tuple[Any, Any]:
        """``(params, random_features)`` of the best step, in the given shapes/shardings."""
        if self.step is None:
            raise checkpoint_lib.CheckpointError(
                f"no best checkpoint in {self.directory}: no evaluation has run"
            )
        target = {"params": abstract_params, "random_features": abstract_features}
        # Saved in the other scan_layers form by an earlier start: converted (relayout).
        restored, _ = relayout.restore(self._manager(), self.step, target, setting="scan_layers")
        return restored["params"], restored["random_features"]

    def describe(self) -> str | None:
        if self.step is None:
            return None
        return f"{self.metric} {self.value:.4f} at step {self.step}"

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
