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


class StopAgreement:
    """All processes of a multi-process run stop at the same step, on any one's signal.

    A preemption notice reaches one host; if it saved alone, the others would wait for it
    in their next collective. So every step each process votes its stop signal (0 for
    none) into a maximum over the mesh, a few bytes of all-reduce dispatched after the
    train step. The vote is read one step later, when the host waits for that step's
    metrics anyway, so it adds no wait of its own: each process reads the same maximum
    after the same step and they all save that step together (``loop.run_steps``). It
    is the loop's own version of ``multihost_utils.reached_preemption_sync_point``, which
    only sees the SIGTERM that the coordination service's handler catches (not Ctrl-C,
    nor a signal handled in Python) and blocks on the coordination service every step.
    """

    def __init__(self, mesh):
        import jax
        import jax.numpy as jnp
        import numpy as np
        from jax.sharding import NamedSharding, PartitionSpec

        self._sharding = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
        self._num_local = sum(
            1 for d in mesh.devices.flat if d.process_index == jax.process_index()
        )
        self._size = mesh.size
        self._max = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))
        self._np = np
        self._pending = None

    def _dispatch(self, signum: int | None):
        import jax

        votes = self._np.full(self._num_local, int(signum or 0), self._np.int32)
        return self._max(
            jax.make_array_from_process_local_data(self._sharding, votes, (self._size,))
        )

    def _read(self, vote) -> int | None:
        value = int(self._np.asarray(vote.addressable_data(0)))
        return value or None

    def exchange(self, signum: int | None) -> int | None:
        """Votes ``signum`` for this step; returns the agreed signal of the previous vote
        (``None``: nobody asked to stop), the same on every process."""
        previous, self._pending = self._pending, self._dispatch(signum)
        return None if previous is None else self._read(previous)

    def finish(self, signum: int | None) -> int | None:
        """Last vote, read at once: the agreed signal of it and of the vote still pending."""
        previous = self.exchange(signum)
        last, self._pending = self._read(self._pending), None
        return previous or last
