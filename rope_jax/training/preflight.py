"""Checks that run before the first step, so a mistake costs seconds, not a run.

Each check raises ``ConfigError`` naming the config key, the value and the fix. The
pretraining loop calls ``check_pretraining_config`` first thing (no file is read),
``check_held_out_split`` once the corpus is indexed (before a tokenizer is trained on it),
and wraps the builders that validate their own arguments (model, mesh, optimizer, data) in
``config_errors`` so their messages reach the user the same way. Entry points check with
``check_kind`` that a config belongs to them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

# What each entry point runs, by ``config.kind``.
ENTRY_POINT_KINDS = {
    "train.py": ("pretrain",),
    "eval.py": ("superglue", "summarization", "fewshot", "ablation"),
}
# The config file that trains each model family, for messages.
FAMILY_CONFIGS = {
    "encoder": "configs/roformer.py",
    "encoder_decoder": "configs/mt5.py (or pegasus.py, t5_pegasus.py)",
    "decoder": "configs/decoder.py",
}


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


@contextlib.contextmanager
def config_errors(context: str = "") -> Iterator[None]:
    """Re-raises ``ValueError``/``KeyError`` of config-driven builders as ``ConfigError``
    (the original stays as ``__cause__``), so entry points print them without a traceback."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise ConfigError(f"{context}{message}") from err


def check_kind(config, entry_point: str, config_name: str = "this config") -> None:
    """The config's ``kind`` is one that ``entry_point`` runs; else name the right one."""
    kind = config.get("kind", None) if hasattr(config, "get") else None
    allowed = ENTRY_POINT_KINDS[entry_point]
    if kind in allowed:
        return
    owner = next((name for name, kinds in ENTRY_POINT_KINDS.items() if kind in kinds), None)
    if owner is not None:
        raise ConfigError(
            f"{config_name} is a {kind} config, which {owner} runs, not {entry_point}: "
            f"python {owner} --config={config_name} --workdir=..."
        )
    raise ConfigError(
        f"{config_name} has kind={kind!r}; {entry_point} runs configs of kind "
        f"{' or '.join(allowed)} (e.g. "
        f"{'configs/decoder.py:tiny' if entry_point == 'train.py' else 'configs/superglue.py'})"
    )


def _require(ok: bool, key: str, value, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {rule}; set --config.{key}=<value> accordingly.")


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_optimizer(optimizer, prefix: str = "optimizer") -> None:
    """Values of ``config.optimizer`` (an ``optim.OptimizerConfig``, or a ConfigDict of its
    keys) in their ranges."""
    from rope_jax.training import optim

    def key(name):
        return f"{prefix}.{name}"

    _require(
        optimizer.name in optim.OPTIMIZERS,
        key("name"),
        optimizer.name,
        f"choose one of {optim.OPTIMIZERS}",
    )
    _require(
        optimizer.schedule in optim.SCHEDULES,
        key("schedule"),
        optimizer.schedule,
        f"choose one of {optim.SCHEDULES}",
    )
    lr = optimizer.learning_rate
    _require(_number(lr) and lr > 0, key("learning_rate"), lr, "must be a finite number > 0")
    _require(optimizer.warmup_steps >= 0, key("warmup_steps"), optimizer.warmup_steps, ">= 0")
    for name in ("decay_steps", "rsqrt_timescale"):
        value = getattr(optimizer, name)
        _require(value is None or value >= 1, key(name), value, "must be >= 1 (None = derived)")
    _require(
        _number(optimizer.end_factor) and optimizer.end_factor >= 0,
        key("end_factor"),
        optimizer.end_factor,
        "must be >= 0 (the final rate is learning_rate x end_factor)",
    )
    _require(
        _number(optimizer.weight_decay) and optimizer.weight_decay >= 0,
        key("weight_decay"),
        optimizer.weight_decay,
        "must be >= 0",
    )
    _require(
        _number(optimizer.grad_clip_norm) and optimizer.grad_clip_norm >= 0,
        key("grad_clip_norm"),
        optimizer.grad_clip_norm,
        "must be >= 0 (0 = no clipping)",
    )
    _require(
        optimizer.grad_accum_steps >= 1,
        key("grad_accum_steps"),
        optimizer.grad_accum_steps,
        "must be >= 1",
    )
    if optimizer.name == "adamw":
        for name in ("b1", "b2"):
            value = getattr(optimizer, name)
            _require(_number(value) and 0 <= value < 1, key(name), value, "must be in [0, 1)")
        _require(
            _number(optimizer.eps) and optimizer.eps > 0, key("eps"), optimizer.eps, "must be > 0"
        )
    else:
        _require(
            0 < optimizer.decay_rate <= 1,
            key("decay_rate"),
            optimizer.decay_rate,
            "must be in (0, 1]",
        )
        _require(
            optimizer.clipping_threshold >= 0,
            key("clipping_threshold"),
            optimizer.clipping_threshold,
            "must be >= 0 (0 = no update clipping)",
        )
        _require(
            0 <= optimizer.momentum < 1,
            key("momentum"),
            optimizer.momentum,
            "must be in [0, 1) (0 = no momentum)",
        )


def check_loop(config) -> None:
    """Step counts and periods of the pretraining loop."""
    _require(config.num_train_steps >= 1, "num_train_steps", config.num_train_steps, "must be >= 1")
    _require(config.batch_size >= 1, "batch_size", config.batch_size, "must be >= 1")
    for name in ("log_every_steps", "checkpoint_every_steps", "eval_every_steps", "eval_steps"):
        _require(config[name] >= 0, name, config[name], "must be >= 0 (0 = at the end, or never)")
    _require(
        config.keep_checkpoints >= 1, "keep_checkpoints", config.keep_checkpoints, "must be >= 1"
    )
    _require(
        _number(config.z_loss) and config.z_loss >= 0,
        "z_loss",
        config.z_loss,
        "must be >= 0 (0 = off)",
    )
    _require(
        config.redraw_features_every >= 0,
        "redraw_features_every",
        config.redraw_features_every,
        "must be >= 0 (0 = keep the first draw)",
    )
    _require(
        config.data.eval_every >= 0,
        "data.eval_every",
        config.data.eval_every,
        "must be >= 0 (0 = no held-out split)",
    )


def check_objective_matches_family(config) -> None:
    """``data.objective`` makes batches for the family ``model.family`` builds."""
    from rope_jax.data.examples import DECODER, ENCODER, ENCODER_DECODER, OBJECTIVES, model_kind

    objective, family = config.data.objective, config.model.family
    _require(objective in OBJECTIVES, "data.objective", objective, f"choose one of {OBJECTIVES}")
    kind = model_kind(objective)
    if kind == family:
        return
    fitting = {"encoder": ENCODER, "encoder_decoder": ENCODER_DECODER, "decoder": DECODER}
    raise ConfigError(
        f"data.objective={objective!r} makes {kind} batches, but model.family={family!r}: "
        f"give the model an objective of its family (--config.data.objective="
        f"{'|'.join(fitting.get(family, ()))}), or train {objective!r} with a config of the "
        f"{kind} family ({FAMILY_CONFIGS[kind]})."
    )


def check_pretraining_config(config, *, model_given: bool = False) -> None:
    """Every check of a ``train.py`` config that needs no file: loop values, optimizer
    values and, unless the caller brings its own model, the objective against the family."""
    from rope_jax import config_boundary

    check_loop(config)
    with config_errors():
        check_optimizer(config_boundary.optimizer_section(config))
    if not model_given:
        check_objective_matches_family(config)


def check_held_out_split(
    num_documents: int,
    *,
    eval_every: int,
    evaluates: bool,
    process_count: int,
    source: str,
    first_eval_step: int = 0,
) -> None:
    """Enough documents on each side of the held-out split for every process.

    Document ``i`` is held out when ``i % eval_every == eval_every - 1`` (see
    ``rope_jax.data.pipeline``), so ``n`` documents hold out ``n // eval_every``.
    """
    split = eval_every > 1
    held_out = num_documents // eval_every if split else num_documents
    training = num_documents - held_out if split else num_documents
    if training < process_count:
        raise ConfigError(
            f"{source} has {num_documents} documents; after holding out every "
            f"{eval_every}th (data.eval_every) {training} are left to train on, fewer than the "
            f"{process_count} processes that each need one. Add documents, or lower "
            "data.eval_every (0 = no held-out split)."
        )
    if not evaluates or held_out >= process_count:
        return
    when = f" at step {first_eval_step}" if first_eval_step else ""
    largest = num_documents // process_count
    fix = (
        f"--config.data.eval_every={largest} (holds out {num_documents // largest})"
        if largest >= 2
        else "a larger corpus"
    )
    raise ConfigError(
        f"data.eval_every={eval_every} holds out every {eval_every}th document of {source}: "
        f"{held_out} of {num_documents}, but evaluation needs at least {process_count} "
        f"(one per process), so the first evaluation{when} would fail. Set {fix}, or "
        "--config.eval_steps=0 to train without held-out evaluation."
    )
