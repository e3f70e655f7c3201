"""Driver side of the same-run comparison with Hugging Face: worker processes and ABAB timing.

One persistent worker process per side (``ours_worker.py`` in this interpreter's virtualenv,
``hf_worker.py`` in ``.venv-hf``) builds and compiles once; the driver then asks them for
one timed call at a time, alternating ours, theirs, ours, theirs, ... so that a change in
the machine's load hits both sides alike. Each side's figure is the median of its calls;
the ratio is HF's median time over ours (above 1: rope_jax is faster). A worker's peak
resident memory (``ru_maxrss``) covers only what that worker did, since it starts fresh
for each measured setting.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import peer_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(ROOT, "benchmarks")
HF_PYTHON = os.environ.get("HF_PYTHON", os.path.join(ROOT, ".venv-hf", "bin", "python"))


class WorkerError(RuntimeError):
    pass


class Worker:
    """A worker process answering one JSON request per line."""

    def __init__(self, side: str):
        python = sys.executable if side == "ours" else HF_PYTHON
        if not os.path.exists(python):
            raise WorkerError(
                f"{python} does not exist: the Hugging Face reference needs its own "
                f"virtualenv; create it with `make hf-venv` (or point HF_PYTHON at one with "
                f"the versions of benchmarks/requirements-hf.txt)."
            )
        script = os.path.join(BENCH_DIR, f"{side}_worker.py")
        env = dict(os.environ)
        if side == "ours":
            env["PYTHONPATH"] = os.pathsep.join([ROOT, BENCH_DIR, env.get("PYTHONPATH", "")])
        else:
            # The HF side must not see this project (or its jax) on its path.
            env.pop("PYTHONPATH", None)
            env["PYTHONPATH"] = BENCH_DIR
        self.side = side
        self.process = subprocess.Popen(
            [python, script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
            env=env,
            cwd=ROOT,
        )

    def request(self, op: str, **fields) -> dict:
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise WorkerError(f"{self.side} worker exited during {op!r} (see its stderr above)")
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise WorkerError(f"{self.side} worker failed in {op!r}: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.request("exit")
            except (WorkerError, BrokenPipeError):
                pass
            self.process.wait(timeout=60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.process.poll() is None and exc[0] is not None:
            self.process.kill()
            self.process.wait()
        self.close()


def alternate(
    workers: dict[str, Worker], op: str, repeats: int, **fields
) -> tuple[dict[str, list], dict[str, list]]:
    """``repeats`` rounds of ``op`` on every worker in turn (ours first, then hf, ...).

    Returns (wall seconds, CPU seconds) per side, one entry per round.
    """
    wall: dict[str, list] = {side: [] for side in workers}
    cpu: dict[str, list] = {side: [] for side in workers}
    for _ in range(repeats):
        for side, worker in workers.items():
            reply = worker.request(op, **fields)
            wall[side].append(reply["seconds"])
            cpu[side].append(reply["cpu_seconds"])
    return wall, cpu


def load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    return f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average {load_average()}"


median = peer_shapes.median
