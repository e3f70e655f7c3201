"""Metric writing (process 0 only), the progress line, and the matmul peak used for MFU.

MFU here is model FLOPs per second divided by the float32 matrix-multiply rate of the same
machine measured in the same process at start-up (STYLE.md "Measuring": a ratio, never an
absolute, because the rate halves when the machine is shared).
"""

from __future__ import annotations

import json
import logging as std_logging
import math
import os
import sys
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging


class _QuietLibraries(std_logging.Filter):
    """Orbax logs every file it writes at INFO; keep its warnings, drop the chatter."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def quiet_library_logs() -> None:
    """Keep the progress lines readable: drop Orbax's INFO records from absl's handler."""
    logging.get_absl_handler().addFilter(_QuietLibraries())


def measure_matmul_peak(size: int = 1024, repeats: int = 5, dtype=jnp.float32) -> float:
    """Best observed rate (FLOP/s) of a jitted ``size x size`` GEMM on the default device.

    ``2 * size**3`` FLOPs per product; the best of ``repeats`` timed runs after one warm-up,
    so the figure approaches what the machine can do right now.
    """
    key_a, key_b = jax.random.split(jax.random.key(0))
    lhs = jax.random.normal(key_a, (size, size), dtype)
    rhs = jax.random.normal(key_b, (size, size), dtype)
    product = jax.jit(lambda a, b: a @ b)
    product(lhs, rhs).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        product(lhs, rhs).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def total_matmul_peak(per_device_peak: float, devices) -> float:
    """The matmul rate of all ``devices`` together, from the rate measured on one of them.

    Accelerators (GPU, TPU) each compute at the measured rate. The CPU backend's devices
    are slices of one host sharing its cores (a single device's GEMM already uses them
    all), so CPU devices count once per process.
    """
    devices = list(devices)
    if all(device.platform == "cpu" for device in devices):
        return per_device_peak * len({device.process_index for device in devices})
    return per_device_peak * len(devices)


def drop_rows_after(path: str, step: int) -> int:
    """Rewrites a ``metrics.jsonl`` keeping the rows of steps ``<= step`` (and no line cut
    short by a kill); returns how many rows were dropped. The file is replaced atomically."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row_step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                dropped += 1
                continue
            if row_step <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped


def _event_file_suffix(logdir: str) -> str:
    """A suffix that makes this start's TensorBoard event file sort after the earlier ones.

    tensorboardX names a file ``events.out.tfevents.<unix second>.<host><suffix>`` and opens
    it for writing, so a resume within the same second as the previous start (a quick
    failure and retry, or a short run) reused the previous file's name and overwrote its
    events; TensorBoard also reads a directory's files in name order, which the purge
    marker relies on. Numbering the files of the directory keeps every name new and in
    start order.
    """
    existing = len(os.listdir(logdir)) if os.path.isdir(logdir) else 0
    return f".{existing:04d}"


def _summary_writer_class():
    """tensorboardX's ``SummaryWriter``, imported without importing torch.

    tensorboardX's writer module imports torch whenever it is installed (tensorboardX 2.6.5,
    ``writer.py``: ``try: import torch``), only to name ``torch.Tensor`` in type hints; the
    scalars written here never touch it. Where torch is installed (the test extra puts it in
    the same venv) that import cost every ``train.py`` and ``eval.py`` process about 2 s of
    start-up. While tensorboardX loads, ``sys.modules["torch"] = None`` makes ``import torch``
    raise ImportError, tensorboardX's own fallback for a machine without torch; the entry is
    removed afterwards, so torch stays importable. A process that already imported torch
    (or tensorboardX) is left as it is.
    """
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        if sys.modules.get("torch", False) is None:
            del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """Writes scalars to TensorBoard event files and one JSON object per line.

    Only process 0 writes; elsewhere every method is a no-op, so callers need no checks.
    ``metrics.jsonl`` lines look like
    ``{"step": 100, "loss": 5.1, "learning_rate": 0.001, "tokens_per_sec": 812.0, ...}``.

    ``resume_step``: the step a restarted run continues from. Rows of later steps (written
    after the last checkpoint by the run that stopped) are dropped from ``metrics.jsonl``,
    and the new TensorBoard event file starts with tensorboardX's ``purge_step`` marker
    (a ``SessionLog.START`` at ``resume_step + 1``), on which TensorBoard hides the earlier
    files' events from that step on. Each step is then shown once.
    """

    def __init__(
        self, workdir: str, *, enabled: bool | None = None, resume_step: int | None = None
    ):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.workdir = workdir
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self.tensorboard_dir = os.path.join(workdir, "tensorboard")
        self._tb = None
        self._jsonl = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            summary_writer = _summary_writer_class()

            purge_step = None
            if resume_step is not None:
                dropped = drop_rows_after(self.jsonl_path, resume_step)
                if dropped:
                    logging.info(
                        "%s: dropped %d rows after step %d (that part is trained again)",
                        self.jsonl_path,
                        dropped,
                        resume_step,
                    )
                if os.path.isdir(self.tensorboard_dir) and os.listdir(self.tensorboard_dir):
                    purge_step = resume_step + 1
            self._tb = summary_writer(
                self.tensorboard_dir,
                purge_step=purge_step,
                filename_suffix=_event_file_suffix(self.tensorboard_dir),
            )
            self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115

    def write_scalars(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        for name, value in scalars.items():
            value = float(value)
            record[prefix + name] = value if math.isfinite(value) else str(value)
            self._tb.add_scalar(prefix + name, value, int(step))
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def write_text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled:
            self._tb.add_text(tag, text, step)

    def flush(self) -> None:
        if self.enabled:
            self._tb.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
            self.enabled = False


def tensorboard_command(logdir: str) -> str:
    """A command that shows ``logdir`` in TensorBoard from this Python environment: the
    ``tensorboard`` script next to this interpreter (works without activating the venv),
    preceded by its installation when the package is missing (it is not a dependency of
    the main install, which ``make demo`` uses; ``pip install -e '.[tensorboard]'`` or the
    test install bring it)."""
    import importlib.util
    import shlex
    import sys

    script = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    show = f"{shlex.quote(script)} --logdir {shlex.quote(logdir)}"
    if importlib.util.find_spec("tensorboard") is None or not os.path.exists(script):
        return f"{shlex.quote(sys.executable)} -m pip install tensorboard && {show}"
    return show


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_line(
    step: int, num_steps: int, scalars: Mapping[str, float], seconds_per_step: float
) -> str:
    """``step 120/1000  loss 4.812  tok/s 1,204  MFU 41.2%  ETA 3:05``."""
    eta = (num_steps - step) * seconds_per_step
    parts = [f"step {step}/{num_steps}", f"loss {scalars.get('loss', float('nan')):.4f}"]
    if "tokens_per_sec" in scalars:
        parts.append(f"tok/s {scalars['tokens_per_sec']:,.0f}")
    if "mfu" in scalars:
        parts.append(f"MFU {100 * scalars['mfu']:.1f}%")
    parts.append(f"lr {scalars.get('learning_rate', float('nan')):.2e}")
    parts.append(f"ETA {format_duration(eta)}")
    return "  ".join(parts)


def mean_of_step_metrics(step_metrics: list[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Averages per-step scalars fetched from the device over a logging window."""
    if not step_metrics:
        return {}
    names = step_metrics[0].keys()
    return {name: float(np.mean([float(m[name]) for m in step_metrics])) for name in names}


def peak_memory_bytes() -> int | None:
    """Peak bytes in use on device 0 where the backend reports it (GPU/TPU), else host RSS
    high-water mark (CPU backend: arrays live in process memory)."""
    stats = None
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # Some backends raise instead of returning None.
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        logging.info("peak memory not available on this platform")
        return None
