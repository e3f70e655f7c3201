"""The work directory as a contract: a run resumes only the experiment it started.

A work directory holds one experiment. Its first start writes ``config.json``; every start
(the first included) appends a line to ``config_history.jsonl`` with the time, the step it
starts from, the keys that changed since the previous start and the full config. On a
restart, ``plan_resume`` compares the new config with the one recorded last, before anything
is read or written, and sorts every differing key into one of three groups:

* ``RESTART_SAFE``: how long to run, how often to log, evaluate and save, and how the work is
  laid out on devices. Accepted and logged: none of them changes what a step computes.
* ``HYPERPARAMETERS``: batch size and the optimizer. A deliberate change is normal research
  practice (lowering the learning rate after a loss spike), an accidental one silently
  changes the experiment; so they must be named in ``accept_changes``.
* ``EXPERIMENT`` (and any key in no list): the model, the tokenizer, the data source and
  objective, the seed. Refused unless named in ``accept_changes``; changes of parameter
  shapes cannot be resumed at all (the checkpoint restore names the mismatch).

A refused restart raises ``ResumeError`` listing every differing key with both values and
writes nothing. ``accept_changes`` takes comma-separated dotted keys, section names
(``optimizer`` accepts every ``optimizer.*`` key) or ``*``. A directory with a config
record but no complete checkpoint has no trained state to protect: the new config replaces
the record (the tokenizer cache has its own check in ``rope_jax.data.embedded``).
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from absl import logging

from rope_jax.config_boundary import upgrade_record
from rope_jax.training import checkpoint as checkpoint_lib
from rope_jax.training.preflight import ConfigError

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
ACCEPT_KEY = "accept_changes"

# Accepted on restart and logged.
RESTART_SAFE = (
    "num_train_steps",
    "log_every_steps",
    "checkpoint_every_steps",
    "eval_every_steps",
    # Held-out batches per evaluation: what is measured, not what is trained.
    "eval_steps",
    # Rows per prediction batch of a fine-tune's evaluators: a padding choice.
    "eval_batch_size",
    "keep_checkpoints",
    "async_checkpointing",
    "measure_matmul_peak",
    "debug_nan_step",
    "distributed",
    "distributed_timeout_seconds",
    # Device layout: a checkpoint restores into any mesh.
    "mesh",
    "logical_axis_rules",
    # Input workers: the batches are the same for every number (rope_jax.data.pipeline).
    "data.num_threads",
    "data.num_workers",
    # Where the data stops, like num_train_steps.
    "data.num_epochs",
    # Recomputation in the backward pass: memory, not math.
    "model.remat",
    # Layers as a loop or one scan: the same function of the same weights; the checkpoint's
    # state is converted to the other form on restore (rope_jax.training.relayout).
    "model.scan_layers",
    # The same in a fine-tune's config (its model is the checkpoint's).
    "scan_layers",
    # Microbatches: the loss and gradient are token-weighted over the whole batch however
    # it is split (only dropout masks are drawn per microbatch).
    "optimizer.grad_accum_steps",
    ACCEPT_KEY,
)
# Refused unless named in accept_changes: deliberate changes are normal, accidental ones
# silently change the experiment.
HYPERPARAMETERS = (
    "batch_size",
    "optimizer",
    "z_loss",
    "redraw_features_every",
    # Masked positions per row the MLM head scores; more are dropped from the loss.
    "mlm_max_predictions",
)
# Refused unless named in accept_changes; keys in no list are treated the same way.
EXPERIMENT = ("kind", "seed", "prng_impl", "model", "tokenizer", "data")


class ResumeError(ConfigError):
    """A restart whose config differs from the recorded one in keys that must match."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"d_model": 8}}`` -> ``{"model.d_model": 8}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def as_plain_dict(config) -> dict[str, Any]:
    """A ConfigDict (or mapping) as the JSON it is recorded as (tuples become lists)."""
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort(sort_keys=True))
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def _under(key: str, names: Iterable[str]) -> bool:
    return any(name == "*" or key == name or key.startswith(f"{name}.") for name in names)


def accepts(accepted: Iterable[str], key: str) -> bool:
    """True when ``accept_changes`` names ``key``, a section holding it, or ``*``."""
    return _under(key, accepted)


def classify(key: str) -> str:
    """``"restart_safe"``, ``"hyperparameter"`` or ``"experiment"`` for a dotted key."""
    if _under(key, RESTART_SAFE):
        return "restart_safe"
    if _under(key, HYPERPARAMETERS):
        return "hyperparameter"
    return "experiment"


def accepted_names(config_dict: Mapping[str, Any]) -> list[str]:
    """The names in ``accept_changes`` (comma-separated string or list); each must name a
    key or section of the config (a typo would otherwise accept nothing)."""
    raw = config_dict.get(ACCEPT_KEY, "") or ""
    names = raw.split(",") if isinstance(raw, str) else list(raw)
    names = [name.strip() for name in names if name.strip()]
    keys = flatten(config_dict)
    for name in names:
        if name != "*" and not _under_any_key(name, keys):
            close = difflib.get_close_matches(name, _keys_and_sections(keys), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"{ACCEPT_KEY} names {name!r}, which is no config key{hint}")
    return names


def _under_any_key(name: str, keys: Mapping[str, Any]) -> bool:
    return any(key == name or key.startswith(f"{name}.") for key in keys)


def _keys_and_sections(keys: Mapping[str, Any]) -> list[str]:
    sections = {key.rsplit(".", 1)[0] for key in keys if "." in key}
    return sorted(set(keys) | sections)


@dataclasses.dataclass
class Resume:
    """What ``plan_resume`` found; ``record_start`` writes it down once the run starts."""

    workdir: str
    # Latest complete checkpoint (None: the run starts at step 0).
    step: int | None
    config: dict[str, Any]
    # Dotted key -> (recorded value, new value), every key that differs.
    changes: dict[str, tuple[Any, Any]]
    accepted: list[str]
    has_record: bool
    # The config compared with (the last start's), or None for a new directory.
    recorded: dict[str, Any] | None = None

    @property
    def resuming(self) -> bool:
        return self.step is not None


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ResumeError(
            f"cannot read {path} ({err}); restore it from a copy, or use a new workdir"
        ) from err


def recorded_config(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The config the run in ``workdir`` last started with: the last entry of
    ``config_history.jsonl``, else ``config.json``; ``None`` for a new directory. Earlier
    versions' "unset" sentinels read as None (``config_boundary.upgrade_record``)."""
    workdir = os.fspath(workdir)
    history = os.path.join(workdir, HISTORY_FILE)
    if os.path.exists(history):
        last = None
        with open(history, encoding="utf-8") as f:
            for line in f:
                try:
                    last = json.loads(line)["config"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by a kill mid-write
        if last is not None:
            return upgrade_record(last)
    path = os.path.join(workdir, CONFIG_FILE)
    return upgrade_record(_read_json(path)) if os.path.exists(path) else None


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_changes(changes: Mapping[str, tuple[Any, Any]]) -> str:
    return "\n".join(
        f"  {key}: {_short(old)} -> {_short(new)}" for key, (old, new) in sorted(changes.items())
    )


def plan_resume(config, workdir: str | os.PathLike) -> Resume:
    """Compares ``config`` with what ``workdir`` recorded; reads files only.

    Raises ``ResumeError`` when a complete checkpoint exists and an ``EXPERIMENT`` or
    ``HYPERPARAMETERS`` key differs without being named in ``accept_changes``, or when the
    checkpoint's config record is missing.
    """
    workdir = os.fspath(workdir)
    new = as_plain_dict(config)
    accepted = accepted_names(new)
    steps = checkpoint_lib.complete_steps_on_disk(os.path.join(workdir, "checkpoints"))
    step = steps[-1] if steps else None
    recorded = recorded_config(workdir) if os.path.isdir(workdir) else None
    resume = Resume(workdir, step, new, {}, accepted, recorded is not None, recorded)
    if recorded is None:
        if step is not None and "*" not in accepted:
            raise ResumeError(
                f"{workdir} has a checkpoint (step {step}) but no {CONFIG_FILE}, so there is "
                "no way to check that this config is the one it was trained with. Nothing "
                f"was written. Put the run's {CONFIG_FILE} back, use a new --workdir, or "
                f"resume anyway with --config.{ACCEPT_KEY}='*'."
            )
        return resume
    old_flat, new_flat = flatten(recorded), flatten(new)
    for key in sorted(set(old_flat) | set(new_flat)):
        if key not in old_flat or key not in new_flat:
            # Keys added or removed by a newer version of the code, not by the user.
            logging.warning(
                "config key %s is %s the recorded config of %s; assuming it is unchanged",
                key,
                "not in" if key not in old_flat else "no longer in",
                workdir,
            )
        elif old_flat[key] != new_flat[key]:
            resume.changes[key] = (old_flat[key], new_flat[key])
    if step is None:
        if resume.changes:
            logging.info(
                "%s has no checkpoint yet: starting at step 0 with this config, which replaces "
                "the recorded one; changed:\n%s",
                workdir,
                describe_changes(resume.changes),
            )
        return resume
    refused = {
        key: change
        for key, change in resume.changes.items()
        if classify(key) != "restart_safe" and not _under(key, accepted)
    }
    if refused:
        names = ",".join(sorted(refused))
        experiment = sorted(k for k in refused if classify(k) == "experiment")
        kinds = "define the experiment" if experiment else "are training hyper-parameters"
        if experiment and len(experiment) < len(refused):
            kinds = "define the experiment or are training hyper-parameters"
        raise ResumeError(
            f"{workdir} holds a run (checkpoint at step {step}) whose recorded config differs "
            f"from this one in keys that {kinds}:\n{describe_changes(refused)}\nNothing was "
            "written. Resume with the recorded values (see "
            f"{os.path.join(workdir, HISTORY_FILE)}), use a new --workdir for a new "
            f"experiment, or accept the change by name: --config.{ACCEPT_KEY}={names}"
        )
    return resume


def log_accepted_changes(resume: Resume) -> None:
    """One log line per accepted change, louder for keys outside ``RESTART_SAFE``."""
    if not resume.resuming or not resume.changes:
        return
    safe = {
        k: v for k, v in resume.changes.items() if classify(k) == "restart_safe" and k != ACCEPT_KEY
    }
    named = {k: v for k, v in resume.changes.items() if k not in safe}
    if safe:
        logging.info("Restart-safe config changes accepted:\n%s", describe_changes(safe))
    if named:
        logging.warning(
            "Config changes accepted by %s (the experiment differs from step %d on):\n%s",
            ACCEPT_KEY,
            resume.step,
            describe_changes(named),
        )


def record_start(resume: Resume, start_step: int, *, is_primary: bool = True) -> None:
    """Writes ``config.json`` (first start, or no checkpoint yet) and appends this start to
    ``config_history.jsonl``. Call once the run can start (after the restore succeeded)."""
    if not is_primary:
        return
    os.makedirs(resume.workdir, exist_ok=True)
    if not resume.resuming:
        path = os.path.join(resume.workdir, CONFIG_FILE)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(resume.config, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    entry = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "step": int(start_step),
        "changes": {key: {"from": old, "to": new} for key, (old, new) in resume.changes.items()},
        "config": resume.config,
    }
    with open(os.path.join(resume.workdir, HISTORY_FILE), "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")


def schedule_note(resume: Resume) -> str | None:
    """A warning when a changed ``num_train_steps`` moves a schedule that decays until it
    (``optimizer.decay_steps`` None): learning rates from the resumed step on follow the new
    length. ``None`` when the schedule is unaffected."""
    if not resume.resuming or "num_train_steps" not in resume.changes:
        return None
    old_opt = resume.recorded.get("optimizer", {})
    new_opt = resume.config.get("optimizer", {})
    if any(
        opt.get("decay_steps") is not None or opt.get("schedule") not in ("cosine", "linear")
        for opt in (old_opt, new_opt)
    ):
        return None
    from rope_jax.training import optim

    old_steps, new_steps = resume.changes["num_train_steps"]
    # Where the first schedule ends (or this step, if the run is shortened below it).
    at = max(min(old_steps, new_steps), resume.step)
    rates = []
    for opt, decay_steps in ((old_opt, old_steps), (new_opt, new_steps)):
        schedule = optim.learning_rate_schedule(
            learning_rate=opt["learning_rate"],
            schedule=opt["schedule"],
            warmup_steps=opt["warmup_steps"],
            decay_steps=decay_steps,
            end_factor=opt["end_factor"],
        )
        rates.append(float(schedule(at)))
    return (
        f"num_train_steps {old_steps} -> {new_steps} also changes the {new_opt['schedule']} "
        f"learning-rate schedule (optimizer.decay_steps unset decays until num_train_steps): at "
        f"step {at} the rate is now {rates[1]:.3g}, {rates[0]:.3g} under the first schedule. "
        f"To keep the first schedule, add --config.optimizer.decay_steps={old_steps} "
        f"--config.{ACCEPT_KEY}=optimizer.decay_steps."
    )
