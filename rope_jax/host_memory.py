"""The host allocator policy for XLA's CPU runtime (glibc ``malloc`` settings).

XLA's CPU runtime allocates every temporary buffer of a jitted call through ``malloc`` and
frees it when the call returns. glibc serves large requests (above its mmap threshold, at
most 32 MB) with fresh ``mmap`` pages and gives them back with ``munmap`` on free, and each
thread of XLA's pool gets its own arena, whose free memory is returned to the kernel too.
So every call touches its buffers as new pages: one minor page fault, and the kernel zeroing
4 KiB, per page, at every step. For T5 v1.1-small's decoding (8 x 512 -> 64 tokens) that was
~70,000 page faults (~280 MB) per ``generate`` call; a ``[4096, 4096]`` matmul feeding a
reduction faulted a million times per call and ran in 2.0 s instead of 1.1 s.

:func:`configure` keeps freed memory in the process instead (``mallopt``):

- ``M_ARENA_MAX = 1``: one arena for all threads, so a buffer freed by one of XLA's threads
  is reused by the next call on any thread;
- ``M_MMAP_MAX = 0``: no request is served by ``mmap``, all come from that arena;
- ``M_TRIM_THRESHOLD = 2 GiB``: the arena is not shrunk until 2 GiB at its top are free.

A steady loop (train steps, decoding calls) then reuses the same memory with no page
faults. The cost: memory freed after the peak stays mapped to the process (its resident
size does not shrink back); peak memory itself was lower in the train-step benchmark
(``benchmarks/train_step.py``), as pages are reused instead of newly mapped.

It has to run before JAX starts its backend: each thread picks its arena at its first
``malloc``, and XLA's pool threads start with the backend. ``rope_jax.cli.run`` (``train.py``,
``eval.py``) calls it first thing; scripts and notebooks call ``rope_jax.host_memory.configure()``
before their first JAX computation. ``ROPE_JAX_MALLOC=system`` leaves the allocator alone,
as do ``MALLOC_*`` environment variables of the user's (glibc's own tunables win) and an
``LD_PRELOAD``-ed allocator (tcmalloc, jemalloc). Other C libraries (macOS, musl) are left
alone: the settings are glibc's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

from absl import logging

ENV = "ROPE_JAX_MALLOC"

# glibc <malloc.h> mallopt parameters.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int: 2 GiB is its largest value

_applied: str | None = None


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge

        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # a JAX without the query: assume it has not
        return False


def skip_reason(environ=None) -> str | None:
    """Why :func:`configure` leaves the allocator alone here, or None if it applies."""
    environ = os.environ if environ is None else environ
    setting = environ.get(ENV, "").strip().lower()
    if setting in ("system", "0", "off", "false", "no"):
        return f"{ENV}={environ[ENV]}"
    if setting not in ("", "1", "on", "true", "yes", "retain"):
        raise ValueError(
            f"{ENV}={environ[ENV]!r}: expected 'retain' (the default) or 'system' (leave "
            f"the C library's allocator as it is)."
        )
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return f"not Linux with glibc ({platform.system()}, {platform.libc_ver()[0] or '?'})"
    user_tunables = sorted(k for k in environ if k.startswith("MALLOC_") and k.endswith("_"))
    user_tunables += [k for k in ("MALLOC_ARENA_MAX", "MALLOC_ARENA_TEST") if k in environ]
    if "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        user_tunables.append("GLIBC_TUNABLES")
    if user_tunables:
        return f"the environment sets {', '.join(user_tunables)}"
    preload = environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("tcmalloc", "jemalloc", "mimalloc")):
        return f"LD_PRELOAD={preload}"
    return None


def configure(log: bool = True) -> str:
    """Applies the policy above once per process; returns what was done, in a line (logged
    at INFO unless ``log=False``, for callers that log it once flags are parsed).

    Safe to call more than once and on any platform (a no-op where it does not apply).
    Called after JAX's backend started, it still applies but warns: XLA's threads keep their
    own arenas, so most of the page faults remain.
    """
    global _applied
    if _applied is not None:
        return _applied
    reason = skip_reason()
    if reason is not None:
        _applied = f"host allocator left as is: {reason}"
        if log:
            logging.info(_applied)
        return _applied
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    settings = (
        ("M_ARENA_MAX", M_ARENA_MAX, 1),
        ("M_MMAP_MAX", M_MMAP_MAX, 0),
        ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
    )
    failed = [name for name, param, value in settings if libc.mallopt(param, value) != 1]
    if failed:
        _applied = f"host allocator: mallopt refused {', '.join(failed)}; the other settings apply"
        logging.warning(_applied)
        return _applied
    _applied = (
        "host allocator: freed memory is kept for reuse (one arena, no mmap; "
        f"{ENV}=system turns this off)"
    )
    if _backend_started():
        logging.warning(
            "%s, but JAX's backend had already started, so XLA's threads keep their own "
            "arenas; call rope_jax.host_memory.configure() before the first JAX computation.",
            _applied,
        )
    elif log:
        logging.info(_applied)
    return _applied
