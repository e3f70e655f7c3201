"""Stopping a run on a signal: save at the next step boundary, then exit non-zero.

The first SIGINT (Ctrl-C) or SIGTERM (the usual preemption notice of Kubernetes, SLURM and
cloud VMs) only records the signal; the loop checks ``StopRequest.signum`` after each step,
saves a checkpoint and returns. A second SIGINT stops at once (``KeyboardInterrupt``, no
save; checkpoints already written stay complete, a save in flight is finished or never
becomes a checkpoint). A repeated SIGTERM is only logged: schedulers resend it before
their final SIGKILL, and the save should finish meanwhile.

Exit codes: a run stopped by signal ``s`` exits with ``128 + s`` (130 for SIGINT, 143 for
SIGTERM), the status a shell and every batch scheduler already report for a process killed
by that signal. So a job script or scheduler treats a clean stop exactly like a kill it
knows how to handle (requeue, or stop a loop on Ctrl-C), and ``$?`` tells which signal it
was. A finished run exits 0.
"""

from __future__ import annotations

import signal
import threading

from absl import logging

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code(signum: int) -> int:
    """``128 + signum``: the shell's status of a process ended by that signal."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StoppedBySignal(Exception):
    """Raised by callers that run several trainings (the ablation grid) when one of them
    stopped on a signal after saving: the rest of the work stops too."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal_name(signum)} (checkpoint saved)")
        self.signum = signum


class StopRequest:
    """Context manager that turns SIGINT/SIGTERM into a stop request (see module doc).

    Handlers are installed only in the main thread (Python delivers signals there); in other
    threads the context does nothing and signals keep their previous behaviour.
    """

    def __init__(self, signals=STOP_SIGNALS):
        self.signum: int | None = None
        self._signals = tuple(signals)
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in self._signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        del frame
        if self.signum is None:
            self.signum = signum
            hint = ""
            if signum == signal.SIGINT:
                hint = " (Ctrl-C again stops at once, without saving)"
            logging.warning(
                "Received %s: saving a checkpoint after this step, then stopping%s.",
                signal_name(signum),
                hint,
            )
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            logging.warning("Received %s again: still saving.", signal_name(signum))

    def __exit__(self, *exc) -> bool:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        return False
