"""The environment tests give the entry points they run as separate processes.

One CPU device (not the 8 the in-process mesh tests simulate), this checkout first on the
path, LLVM optimisation level 0 as in-process (see conftest.py), and the run's compilation
cache inherited from conftest.py, so a second process with the same program compiles nothing.
"""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_device() -> dict[str, str]:
    environment = dict(os.environ)
    environment.update(
        XLA_FLAGS="--xla_backend_optimization_level=0",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT + os.pathsep + environment.get("PYTHONPATH", ""),
    )
    return environment
