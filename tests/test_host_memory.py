"""rope_jax.host_memory: the host allocator policy that keeps XLA's freed buffers for reuse.

The policy is process-wide, so it is tried in fresh processes: a jitted call whose 64 MB
temporary is above glibc's largest mmap threshold (32 MB) page-faults all of it at every
call with glibc's defaults, and not once the memory is kept.
"""

import os
import platform
import subprocess
import sys

import pytest
from subprocess_env import one_device

from rope_jax import host_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

PROBE = """
import resource, sys
from rope_jax import host_memory
import jax, jax.numpy as jnp
x = jnp.ones((4096, 16), jnp.float32)
f = jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x.T)))  # a [4096, 4096] float32 temporary
if sys.argv[1] == "late":
    f(x).block_until_ready()
print("APPLIED", host_memory.configure())
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print("FAULTS", *faults)
"""


def _clean_environment(**extra) -> dict:
    env = {
        k: v
        for k, v in one_device().items()
        if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", host_memory.ENV))
    }
    env.pop("LD_PRELOAD", None)
    env.update(extra)
    return env


def _probe(mode: str, **extra) -> tuple[str, list[int], str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        env=_clean_environment(**extra),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    applied = next(line for line in lines if line.startswith("APPLIED"))
    faults = next(line for line in lines if line.startswith("FAULTS")).split()[1:]
    return applied, [int(n) for n in faults], done.stderr


@pytest.mark.skipif(not GLIBC, reason="the policy is glibc's mallopt")
def test_kept_memory_ends_the_page_faults_of_repeated_calls():
    pages = 4096 * 4096 * 4 // 4096  # the temporary, in 4 KiB pages
    applied, faults, _ = _probe("early")
    assert "freed memory is kept" in applied
    assert max(faults[1:]) < pages // 20, faults
    # glibc's defaults, in the same program: every call faults the temporary in again.
    applied, faults, _ = _probe("early", **{host_memory.ENV: "system"})
    assert "left as is" in applied
    assert min(faults[1:]) > pages // 2, faults


@pytest.mark.skipif(not GLIBC, reason="the policy is glibc's mallopt")
def test_configuring_after_the_backend_started_warns():
    applied, _, stderr = _probe("late")
    assert "freed memory is kept" in applied
    assert "JAX's backend had already started" in stderr
    assert "rope_jax.host_memory.configure() before the first JAX computation" in stderr


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({host_memory.ENV: "system"}, "ROPE_JAX_MALLOC=system"),
        ({"MALLOC_ARENA_MAX": "4"}, "the environment sets MALLOC_ARENA_MAX"),
        ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "the environment sets MALLOC_MMAP_THRESHOLD_"),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "the environment sets GLIBC_TUNABLES"),
        ({"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}, "LD_PRELOAD=/usr/lib/libtcmalloc.so.4"),
    ],
)
def test_the_users_own_allocator_settings_win(environ, expected, monkeypatch):
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
    assert host_memory.skip_reason(environ) == expected


def test_where_the_policy_applies(monkeypatch):
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
    assert host_memory.skip_reason({}) is None
    assert host_memory.skip_reason({host_memory.ENV: "retain"}) is None
    # Tunables of other glibc parts are not the allocator's.
    assert host_memory.skip_reason({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"}) is None
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert host_memory.skip_reason({}).startswith("not Linux with glibc (Darwin")


def test_an_unknown_setting_is_an_error_naming_the_choices():
    with pytest.raises(ValueError, match=r"ROPE_JAX_MALLOC='keep'.*'retain'.*'system'"):
        host_memory.skip_reason({host_memory.ENV: "keep"})


def test_the_benchmark_peer_gets_the_same_settings():
    """benchmarks/peers.py gives HF's worker the policy as glibc's environment variables
    (that process does not import rope_jax): they must be the values ``configure`` sets."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    import peers

    assert peers.RETAIN_ENV == {
        "MALLOC_ARENA_MAX": "1",
        "MALLOC_MMAP_MAX_": "0",
        "MALLOC_TRIM_THRESHOLD_": str(host_memory.TRIM_THRESHOLD_BYTES),
    }
