"""Test-wide settings: simulated devices for mesh tests, strict rank promotion."""

import os

# Must be set before JAX initialises its backends; tests that need a mesh use these 8 devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
