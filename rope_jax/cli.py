"""What ``train.py`` and ``eval.py`` share: flag parsing that reports a config mistake in one
line, the config-kind check, and exit statuses.

Exit statuses: 0 done; 1 an error, printed as the last line (``<program>: error: ...``);
``128 + signum`` for a run stopped by a signal after saving (130 SIGINT, 143 SIGTERM, see
``rope_jax.training.interrupts``), and 130 for a second Ctrl-C that stopped it at once.
``--verbosity=1`` adds the traceback of a reported error.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import os
import re
import signal
import sys
import traceback
from collections.abc import Iterator

from absl import app, flags, logging

EXIT_ERROR = 1
_OVERRIDE = re.compile(r"^--?(?P<flag>\w+)\.(?P<path>[\w.]+)(=.*)?$")


def _program() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "rope_jax"


def fail(message: str, code: int = EXIT_ERROR) -> None:
    """Prints ``<program>: error: message`` as the last line on stderr and exits."""
    logging.flush()
    sys.stderr.flush()
    sys.stderr.write(f"{_program()}: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(code)


def load_config_file(spec: str):
    """The config ``--config=path.py[:arg]`` names, loaded as ml_collections does."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_rope_jax_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def describe_override_error(argv: list[str], config_flag: str = "config") -> str | None:
    """``--config.model.dmodel: config.model has no key 'dmodel'; did you mean d_model?``
    for the first ``--config.<path>`` override whose path is not in the config, or None."""
    spec = next(
        (
            a.split("=", 1)[1]
            for a in argv
            if a.startswith((f"--{config_flag}=", f"-{config_flag}="))
        ),
        None,
    )
    if spec is None:
        return None
    try:
        config = load_config_file(spec)
    except Exception:  # The config file itself fails: its own error is reported instead.
        return None
    for arg in argv:
        match = _OVERRIDE.match(arg)
        if not match or match["flag"] != config_flag:
            continue
        node, walked = config, config_flag
        for part in match["path"].split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                close = difflib.get_close_matches(part, [str(k) for k in keys], n=3, cutoff=0.6)
                hint = f"; did you mean {' or '.join(close)}?" if close else ""
                if not keys:
                    return f"{arg}: {walked} is a value, not a section"
                return f"{arg}: {walked} has no key {part!r}{hint}"
            node, walked = node[part], f"{walked}.{part}"
    return None


def _last_line(error: BaseException | str) -> str:
    """The message of an error (a KeyError's without its quotes), or the last line of a
    text such as a traceback."""
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else str(error)


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """``app.run``'s ``flags_parser``: absl's parsing, but a mistake in a config override or
    a config file ends the program with one line naming it (not a traceback of
    ml_collections' internals)."""
    try:
        return flag_values(argv)
    except flags.Error as err:
        message = str(err)
        marker = ": Error whilst parsing config file"
        if marker in message:
            # ml_collections puts the config file's whole traceback in the message.
            fail(f"{message.split(marker, 1)[0].removeprefix('flag ')}: {_last_line(message)}")
        fail(f"{_last_line(message)} (--helpshort lists the flags)")
    except Exception as err:  # ml_collections raises AttributeError/KeyError for bad paths.
        fail(describe_override_error(argv) or _last_line(err))
    raise AssertionError("unreachable")


def config_value(config_flag):
    """The parsed ``--config`` value; a config file that cannot be loaded ends the program
    with its error instead of a traceback."""
    try:
        config = config_flag.value
        config.keys()  # ml_collections defers a load error until the config is used.
        return config
    except Exception as err:
        fail(f"--config: cannot load the config file: {type(err).__name__}: {_last_line(err)}")


def config_name(config_flag_name: str = "config") -> str:
    """The ``--config`` argument as given (``configs/decoder.py:tiny``), for messages."""
    try:
        from ml_collections import config_flags

        return config_flags.get_config_filename(flags.FLAGS[config_flag_name])
    except Exception:
        return "this config"


@contextlib.contextmanager
def reported_errors(
    expected: tuple[type[BaseException], ...], *, workdir: str = ""
) -> Iterator[None]:
    """Ends the program with one line for ``expected`` errors (config mistakes, refused
    restarts, missing files, damaged checkpoints, NaN stops) and for a second Ctrl-C;
    anything else propagates with its traceback (a bug, not a mistake)."""
    try:
        yield
    except KeyboardInterrupt:
        from rope_jax.training import checkpoint, interrupts

        steps = (
            checkpoint.complete_steps_on_disk(os.path.join(workdir, "checkpoints"))
            if workdir
            else []
        )
        where = f"the last checkpoint is step {steps[-1]}" if steps else "no checkpoint was saved"
        fail(
            f"interrupted: stopped at once, without saving; {where}.",
            interrupts.exit_code(signal.SIGINT),
        )
    except expected as err:
        if logging.get_verbosity() >= logging.DEBUG:
            traceback.print_exc()
        fail(str(err))
    except Exception as err:
        if not _lost_peer(err):
            raise
        if logging.get_verbosity() >= logging.DEBUG:
            traceback.print_exc()
        _fail_without_peers(err, workdir)


def _lost_peer(error: BaseException) -> bool:
    """True for a runtime error of a multi-process run's collectives (a peer process died,
    so gloo/NCCL lost its connection): not a bug of this process."""
    jax = sys.modules.get("jax")
    if jax is None or not isinstance(error, jax.errors.JaxRuntimeError):
        return False
    try:
        return jax.process_count() > 1
    except Exception:
        return False


def _fail_without_peers(error: BaseException, workdir: str) -> None:
    """Ends a process whose peers are gone with one line, at once. A normal exit would
    first wait in jax.distributed's shutdown barrier for the dead process, until its
    heartbeat timeout, and then abort with a stack dump."""
    from rope_jax.training import checkpoint

    where = "checkpoints already written are complete"
    if workdir:
        steps = checkpoint.complete_steps_on_disk(os.path.join(workdir, "checkpoints"))
        where = f"the last complete checkpoint is step {steps[-1]}" if steps else "no checkpoint"
    logging.flush()
    sys.stdout.flush()
    sys.stderr.write(
        f"{_program()}: error: a collective operation with the other processes failed "
        f"({_last_line(str(error).splitlines()[0] if str(error) else error)}): another process "
        f"has probably died or was stopped, see its output. This process stops too ({where}); "
        "start all processes again to resume.\n"
    )
    sys.stderr.flush()
    os._exit(EXIT_ERROR)


def run(main) -> None:
    """``absl.app.run(main)`` with ``parse_flags``."""
    app.run(main, flags_parser=parse_flags)
