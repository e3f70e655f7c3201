"""Test-wide settings: simulated devices for mesh tests, strict rank promotion, and one XLA
compilation cache for the whole run."""

import os
import shutil
import tempfile

from subprocess_env import COMPILE_FLAGS

# Must be set before JAX initialises its backends; tests that need a mesh use these 8 devices.
# The compiler flags that shorten compiling are described in subprocess_env.py.
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {COMPILE_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Compiling is most of this suite's time on CPU, and many tests compile the same tiny programs
# (a model's init, a train step): one persistent cache for the run, made by the first process
# (pytest itself, or the xdist controller) and inherited through the environment by the xdist
# workers and by the processes tests start. Deleted at the end of the run, so every run starts
# cold, as on CI. A cache the user set (JAX_COMPILATION_CACHE_DIR) is left to the user.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="rope_jax_test_xla_cache_")
    os.environ.update(
        JAX_COMPILATION_CACHE_DIR=_OWN_CACHE,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
