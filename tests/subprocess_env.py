"""The environment tests give the entry points they run as separate processes.

One CPU device (not the 8 the in-process mesh tests simulate), this checkout first on the
path, the suite's compiler flags as in-process (see conftest.py), and the run's compilation
cache inherited from conftest.py, so a second process with the same program compiles nothing.
"""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The test programs are tiny, so compiling is nearly all of their time. Both flags shorten
# XLA's CPU compile and change no operation's meaning; the library's own runs and the
# benchmarks keep XLA's defaults. LLVM's backend optimisation level 0 compiles about a fifth
# faster. The older code generator for fused elementwise loops (XLA's elemental emitter
# instead of its newer MLIR fusion emitters) compiles a tiny T5 train step about 30 % faster
# on this CPU (5.5-7.8 s -> 3.7-4.7 s, same loss to the last digit). Every process of the
# suite uses the same flags: they are part of the compilation cache's key.
COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def one_device() -> dict[str, str]:
    environment = dict(os.environ)
    environment.update(
        XLA_FLAGS=COMPILE_FLAGS,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT + os.pathsep + environment.get("PYTHONPATH", ""),
    )
    return environment
