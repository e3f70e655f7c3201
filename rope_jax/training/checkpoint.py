"""Orbax checkpoints of the train state together with the input-iterator state.

Each step directory holds two items written in one commit: ``state`` (params, optimizer
state, step, RNG key data, random features; sharded arrays, OCDBT) and ``data`` (the
iterator state as JSON). Orbax writes a JSON item from the primary host only, so a
multi-process run gathers every process's iterator state and merges them into one
(``row_streams.merge_process_states``: the document pipeline's row streams are disjoint
and keyed by global row, states that depend on the step alone are equal). That item is the
same for any number of processes, and every process restores from it, so a run resumes its
input exactly on another number of hosts. Inputs whose per-process states do not merge
are kept as a list, one entry per process, which only the same number of processes can
resume.

Orbax writes into ``<step>.orbax-checkpoint-tmp-*`` and renames the directory only after a
``commit_success.txt`` marker is written, so a process killed during a save leaves a
temporary directory, never a step directory. On top of that, this module only
treats a step as restorable when its commit markers and metadata files are all present, so a
step directory damaged afterwards (e.g. a copy that stopped half way) is skipped with a
warning instead of being restored.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

STATE = "state"
DATA = "data"
_COMMIT_FILE = "commit_success.txt"
# The data item of a multi-process run: {PER_PROCESS: [state of process 0, 1, ...]}.
PER_PROCESS = "iterator_state_per_process"


class CheckpointError(RuntimeError):
    """A checkpoint that was asked for is missing or cannot be restored."""


def is_complete(step_dir: epath.Path) -> bool:
    """True when every marker of a committed two-item step is present."""
    required = (
        step_dir / _COMMIT_FILE,
        step_dir / "_CHECKPOINT_METADATA",
        step_dir / STATE / _COMMIT_FILE,
        step_dir / STATE / "_METADATA",
        step_dir / DATA / _COMMIT_FILE,
        step_dir / DATA / "metadata",
    )
    return all(path.exists() for path in required)


def complete_steps_on_disk(directory: str | os.PathLike) -> list[int]:
    """Committed steps in ``directory``, oldest first, found without opening a manager: a
    ``Checkpointer`` cleans up temporary and damaged step directories when it starts, and a
    restart that is refused must leave the work directory as it was."""
    directory = epath.Path(absolute_path(directory))
    if not directory.is_dir():
        return []
    return sorted(
        int(step_dir.name)
        for step_dir in directory.iterdir()
        if step_dir.name.isdigit() and step_dir.is_dir() and is_complete(step_dir)
    )


def path_tokens(path) -> tuple[str, ...]:
    """``("params", "decoder", "layers_0", "mlp", "kernel")`` for a pytree key path
    (attribute, dict key or index), the same for a train state and Orbax's metadata tree
    of it."""
    parts = []
    for entry in path:
        for field in ("key", "name", "idx"):
            if hasattr(entry, field):
                parts.append(str(getattr(entry, field)))
                break
        else:
            parts.append(str(entry))
    return tuple(parts)


def _path_name(path) -> str:
    """'params/decoder/layers_0/mlp/kernel' (:func:`path_tokens` joined by '/')."""
    return "/".join(path_tokens(path))


def saved_shapes(step_dir: epath.Path) -> dict[str, tuple[int, ...]] | None:
    """Array shapes of a step's train state from its metadata (no array is read), or None
    when the metadata cannot be read."""
    handler = ocp.StandardCheckpointHandler()
    try:
        tree = handler.metadata(step_dir / STATE)
    except Exception:  # The restore itself will say what is wrong with the files.
        return None
    finally:
        handler.close()
    leaves = jax.tree_util.tree_leaves_with_path(getattr(tree, "item_metadata", tree))
    return {_path_name(path): tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, "shape")}


def _check_shapes(step_dir: epath.Path, abstract_state: Any) -> None:
    """Raises ``CheckpointError`` naming the arrays whose saved shape differs from the
    model's, before any array is read: a restore that fails half way leaves TensorStore
    callbacks running into a closed event loop, which print tracebacks after the error."""
    saved = saved_shapes(step_dir)
    if not saved:
        return
    wanted = {
        _path_name(path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state)
    }
    differ = sorted(
        (name for name in wanted.keys() & saved.keys() if wanted[name] != saved[name]),
        key=lambda name: (not name.startswith("params/"), name),  # parameters first
    )
    if differ:
        name = differ[0]
        more = f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
        raise CheckpointError(
            f"Cannot restore checkpoint {step_dir}: {name} has shape {saved[name]} there and "
            f"{wanted[name]} in this model{more}. The model's sizes differ from the run that "
            "wrote it: use the recorded model config, or a new workdir."
        )


def _first_line(error: BaseException, limit: int = 400) -> str:
    """An Orbax/TensorStore error in one line: some embed a many-line spec dump after the
    sentence that says what is wrong (the whole error stays in ``__cause__``)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _process_index_and_count() -> tuple[int, int]:
    return jax.process_index(), jax.process_count()


def gather_data_states(data_state: Any) -> list:
    """Every process's JSON-serialisable iterator state, in process order (a collective:
    all processes must call it)."""
    from jax.experimental import multihost_utils

    encoded = np.frombuffer(json.dumps(data_state).encode("utf-8"), np.uint8)
    lengths = multihost_utils.process_allgather(np.int32(encoded.size)).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: encoded.size] = encoded
    rows = multihost_utils.process_allgather(padded).reshape(len(lengths), -1)
    return [
        json.loads(bytes(row[:length]).decode("utf-8"))
        for row, length in zip(rows, lengths, strict=True)
    ]


def merged_data_state(states: list) -> Any:
    """The data item for the processes' iterator states (see the module docstring)."""
    from rope_jax.data import row_streams

    merged = row_streams.merge_process_states(states)
    return {PER_PROCESS: states} if merged is None else merged


def select_data_state(saved: Any, process_index: int, process_count: int) -> Any:
    """This process's iterator state from a restored data item: the merged state itself,
    or its own entry of a per-process list; ``None`` (with a warning) when that list was
    written by another number of processes, so no saved position applies."""
    if not (isinstance(saved, dict) and PER_PROCESS in saved):
        return saved
    states = saved[PER_PROCESS]
    if len(states) != process_count:
        logging.warning(
            "The checkpoint's input position was saved by %d process(es) as separate "
            "positions, this run has %d; the model and optimizer resume, the input starts "
            "again from the beginning.",
            len(states),
            process_count,
        )
        return None
    return states[process_index]


def absolute_path(path: str | os.PathLike) -> str:
    """``path`` made absolute when it is local (Orbax refuses relative paths: a workdir like
    ``runs/demo`` failed at the first save); ``gs://...`` and other URLs pass unchanged."""
    path = os.fspath(path)
    return path if "://" in path else os.path.abspath(path)


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` for (train state, iterator state) pairs.

    Args:
      directory: where step directories live (``<workdir>/checkpoints``).
      keep: number of most recent checkpoints kept (older ones are deleted after a save).
      async_save: write in a background thread; the train loop continues meanwhile.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"checkpoint keep must be >= 1, got {keep}.")
        self.directory = epath.Path(absolute_path(directory))
        self._set_aside_incomplete_steps()
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            enable_async_checkpointing=async_save,
            # Leftovers of a killed save are removed when the next run starts.
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=(STATE, DATA), options=options
        )

    def _set_aside_incomplete_steps(self) -> None:
        """Renames damaged step directories to ``<step>.incomplete`` so they are neither
        restored nor block a new save of the same step; their files stay for inspection."""
        if jax.process_index() == 0 and self.directory.exists():
            for step_dir in self.directory.iterdir():
                if step_dir.name.isdigit() and step_dir.is_dir() and not is_complete(step_dir):
                    target = step_dir.parent / f"{step_dir.name}.incomplete"
                    suffix = 0
                    while target.exists():
                        suffix += 1
                        target = step_dir.parent / f"{step_dir.name}.incomplete{suffix}"
                    logging.warning(
                        "Checkpoint %s is incomplete (interrupted or damaged write); "
                        "renamed to %s and not restored.",
                        step_dir,
                        target.name,
                    )
                    step_dir.rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("rope_jax_checkpoint_set_aside")

    def complete_steps(self) -> list[int]:
        """Committed steps, oldest first; incomplete step directories are skipped loudly."""
        steps = []
        self._manager.reload()
        for step in self._manager.all_steps():
            if is_complete(self.directory / str(step)):
                steps.append(step)
            else:
                logging.warning(
                    "Skipping checkpoint %s: commit markers or metadata files are missing "
                    "(interrupted or damaged write).",
                    self.directory / str(step),
                )
        return sorted(steps)

    def latest_step(self) -> int | None:
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
        """Starts writing ``state`` and ``data_state`` as ``step`` (async unless disabled)."""
        try:
            json.dumps(data_state)
        except TypeError as err:
            raise CheckpointError(f"data-iterator state is not JSON-serialisable: {err}") from err
        if step in self._manager.all_steps():
            return False
        if _process_index_and_count()[1] > 1:
            data_state = merged_data_state(gather_data_states(data_state))
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                **{STATE: ocp.args.StandardSave(state), DATA: ocp.args.JsonSave(data_state)}
            ),
            force=force,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any]:
        """Restores ``step`` into the shapes, dtypes and shardings of ``abstract_state``.

        Returns ``(state, data_state)``: the iterator state for this process, or ``None``
        when the checkpoint holds separate positions of another number of processes (see
        ``select_data_state``).

        Raises ``CheckpointError`` naming the directory when the step is missing, incomplete
        or unreadable (shape/structure mismatch with the current config, damaged files).
        """
        step_dir = self.directory / str(step)
        if not step_dir.exists():
            available = self.complete_steps()
            raise CheckpointError(
                f"No checkpoint for step {step} in {self.directory}; complete steps: "
                f"{available or 'none'}."
            )
        if not is_complete(step_dir):
            raise CheckpointError(
                f"Checkpoint {step_dir} is incomplete (missing commit markers or metadata); "
                "move it aside to resume from an earlier step."
            )
        _check_shapes(step_dir, abstract_state)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        STATE: ocp.args.StandardRestore(abstract_state),
                        DATA: ocp.args.JsonRestore(),
                    }
                ),
            )
        except Exception as err:  # Orbax raises many types; the user needs the path.
            raise CheckpointError(
                f"Cannot restore checkpoint {step_dir}: {type(err).__name__}: "
                f"{_first_line(err)}. If the config changed since it was written (model size, "
                "optimizer, prng_impl), use a new workdir; if the files are damaged, move this "
                "step directory aside."
            ) from err
        return restored[STATE], select_data_state(restored[DATA], *_process_index_and_count())

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings, for ``Checkpointer.restore``."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        tree,
        shardings,
    )
