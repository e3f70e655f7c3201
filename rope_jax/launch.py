"""Runs one command as N JAX processes on this machine, the way a cluster runs one per host.

    python -m rope_jax.launch --num_processes=2 -- train.py --config=configs/decoder.py:tiny \\
        --workdir=runs/two

Each process gets ``JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>``, ``JAX_NUM_PROCESSES``
and ``JAX_PROCESS_ID`` (what ``train.py`` and ``eval.py`` read through
``distributed=auto``, ``training.sharding.maybe_initialize_distributed``), and its own
process group. Their output is printed line by line, each line prefixed with ``[<process
index>]``. A command that names a ``.py`` file runs with this Python.

The group lives and dies together:

* SIGINT (Ctrl-C) and SIGTERM sent to the launcher go to every process: the first one
  saves a checkpoint at the same step on all of them (``interrupts.StopAgreement``), a
  second Ctrl-C stops them at once.
* When a process exits with a non-zero code (an error, a kill, or a stop after a signal),
  the others get ``--grace_seconds`` to end on their own: after a signal they are saving
  the same step; after a failure they stop with an error of their own once the failed
  peer is missed (``--config.distributed_timeout_seconds``). Whatever still runs then is
  killed with its process group (grain worker processes included).

The launcher exits with the code of the first process that failed (a process killed by
signal ``s`` counts as ``128 + s``, as in a shell), or 0 when all succeeded, so a job
script sees one status for the group: 143 after a coordinated SIGTERM stop, for example.
This module imports no JAX: starting it costs nothing.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

__all__ = ["free_port", "launch", "main"]

COORDINATOR_HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((COORDINATOR_HOST, 0))
        return sock.getsockname()[1]


def exit_status(returncode: int) -> int:
    """A ``Popen.returncode`` as a shell reports it: ``-s`` (killed by signal ``s``) is
    ``128 + s``."""
    return 128 - returncode if returncode < 0 else returncode


def _describe(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name} (status {exit_status(returncode)})"
    return f"exit code {returncode}"


def _command(argv: list[str]) -> list[str]:
    if not argv:
        raise SystemExit("launch: give the command after --, e.g. -- train.py --config=...")
    return [sys.executable, *argv] if argv[0].endswith(".py") else list(argv)


class _Printer:
    """Copies the processes' output to ours, a whole line at a time, prefixed."""

    def __init__(self, stream):
        self._stream, self._lock = stream, threading.Lock()

    def line(self, prefix: str, text: str) -> None:
        with self._lock:
            self._stream.write(f"{prefix} {text}" if text.endswith("\n") else f"{prefix} {text}\n")
            self._stream.flush()

    def pump(self, prefix: str, pipe) -> None:
        for raw in iter(pipe.readline, b""):
            self.line(prefix, raw.decode("utf-8", errors="replace"))
        pipe.close()


def launch(
    argv: list[str],
    *,
    num_processes: int,
    port: int | None = None,
    grace_seconds: float = 30.0,
    env: dict[str, str] | None = None,
    stream=None,
) -> int:
    """Runs ``argv`` as ``num_processes`` processes (module docstring); returns the group's
    exit status."""
    if num_processes < 1:
        raise SystemExit(f"launch: --num_processes={num_processes}; give 1 or more")
    printer = _Printer(sys.stdout if stream is None else stream)
    command = _command(argv)
    port = free_port() if port is None else port
    base_env = dict(os.environ if env is None else env)
    base_env.update(
        JAX_COORDINATOR_ADDRESS=f"{COORDINATOR_HOST}:{port}",
        JAX_NUM_PROCESSES=str(num_processes),
        PYTHONUNBUFFERED="1",
    )
    processes: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    for index in range(num_processes):
        process = subprocess.Popen(
            command,
            env={**base_env, "JAX_PROCESS_ID": str(index)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: killed with its worker processes
        )
        processes.append(process)
        printer.line("[launch]", f"process {index}: pid {process.pid}")
        pump = threading.Thread(
            target=printer.pump, args=(f"[{index}]", process.stdout), daemon=True
        )
        pump.start()
        pumps.append(pump)

    def forward(signum, frame):
        del frame
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    previous = {
        signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    first_failure: tuple[int, int] | None = None  # (process index, returncode)
    deadline = None
    try:
        while any(process.poll() is None for process in processes):
            if first_failure is None and any(process.poll() for process in processes):
                first_failure = _first_failure(processes)
                deadline = time.monotonic() + grace_seconds
                index, code = first_failure
                printer.line(
                    "[launch]",
                    f"process {index} ended ({_describe(code)}); the others have "
                    f"{grace_seconds:g} s to end on their own",
                )
            if deadline is not None and time.monotonic() > deadline:
                for index, process in enumerate(processes):
                    if process.poll() is None:
                        printer.line(
                            "[launch]",
                            f"process {index} still runs {grace_seconds:g} s after process "
                            f"{first_failure[0]} ended: killing its process group",
                        )
                        try:
                            os.killpg(process.pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                for process in processes:
                    process.wait()
                break
            time.sleep(0.1)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    for pump in pumps:
        pump.join(timeout=5)
    codes = [process.returncode for process in processes]
    if first_failure is None:
        failed = [(i, c) for i, c in enumerate(codes) if c != 0]
        first_failure = failed[0] if failed else None
    summary = ", ".join(f"process {i}: {_describe(c)}" for i, c in enumerate(codes))
    printer.line("[launch]", summary)
    return 0 if first_failure is None else exit_status(first_failure[1])


def _first_failure(processes) -> tuple[int, int]:
    """(index, returncode) of the process whose failure the launch reports.

    Called once a poll has seen a failure, it polls every process again: a process that a
    peer's death stops (its collectives fail) ends after that peer, but a sweep of polls can
    see it first when the launcher is descheduled between two polls. So among the processes
    seen ended now, one killed by a signal, the usual first cause, is preferred, then the
    lowest index.
    """
    failed = [(i, p.poll()) for i, p in enumerate(processes) if p.poll() not in (None, 0)]
    return min(failed, key=lambda failure: (failure[1] >= 0, failure[0]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        split = argv.index("--")
        own, command = argv[:split], argv[split + 1 :]
    else:
        own, command = argv, []
    parser = argparse.ArgumentParser(
        prog="python -m rope_jax.launch",
        description="Run a command as N JAX processes on this machine (127.0.0.1).",
        epilog="Example: python -m rope_jax.launch --num_processes=2 -- train.py "
        "--config=configs/decoder.py:tiny --workdir=runs/two",
    )
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    parser.add_argument(
        "--grace_seconds",
        type=float,
        default=30.0,
        help="after one process fails, how long the others may take to end on their own",
    )
    args = parser.parse_args(own)
    return launch(
        command,
        num_processes=args.num_processes,
        port=args.port,
        grace_seconds=args.grace_seconds,
    )


if __name__ == "__main__":
    sys.exit(main())
