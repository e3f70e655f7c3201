"""Device mesh, logical-axis rules and shardings for params, optimizer state and batches.

Models name the axes of their weights and key activations with a small vocabulary
(``batch, length, embed, heads, kv, mlp, vocab, relpos_buckets, layers``); the config's
``logical_axis_rules`` map those names to the mesh axes ``data, fsdp, tensor``. Data
parallel, FSDP (ZeRO-3 style weight sharding) and tensor parallel are therefore mesh sizes
and rules in the config, not code. Rules are tried in order and a mesh axis is used at most
once per array (flax's ``logical_to_mesh_axes``), so ``batch -> (data, fsdp)`` placed before
``embed -> fsdp`` shards activations by batch and weights by their embed dimension.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("relpos_buckets", None),
    ("layers", None),
)


# jax.distributed's heartbeat timeout: a process silent this long counts as dead, and the
# coordination service ends the others with an error (jax's default is 100 s).
DEFAULT_DISTRIBUTED_TIMEOUT = 100


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """Calls ``jax.distributed.initialize()`` for multi-process runs (one process per host).

    ``config.distributed``: "on" always initialises (TPU pod slices, where jax finds the
    other hosts through the TPU metadata server), "off" never, "auto" initialises when the
    environment describes a multi-process job: SLURM (``srun``), Open MPI (``mpirun``), or
    ``JAX_COORDINATOR_ADDRESS=host:port`` with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
    set by hand. Must run before anything touches a device; a second call is a no-op.
    """
    mode = config.distributed
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed={mode!r}; choose 'auto', 'on' or 'off'.")
    if mode == "off" or jax.distributed.is_initialized():
        return
    env = os.environ
    multi_process_env = (
        int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or "JAX_COORDINATOR_ADDRESS" in env
    )
    if mode == "auto" and not multi_process_env:
        return
    # CPU processes exchange collectives over TCP with gloo (jax 0.10's default; earlier
    # versions had none, and a multi-process CPU step failed). GPUs and TPUs ignore it.
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in env:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeout = int(config.get("distributed_timeout_seconds", DEFAULT_DISTRIBUTED_TIMEOUT))
    if timeout < 1:
        raise ValueError(
            f"distributed_timeout_seconds={timeout}; give the seconds after which a silent "
            f"process counts as dead (default {DEFAULT_DISTRIBUTED_TIMEOUT})"
        )
    kwargs = {"heartbeat_timeout_seconds": timeout}
    if "JAX_NUM_PROCESSES" in env:
        kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if "JAX_PROCESS_ID" in env:
        kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves one ``-1`` size (fill with the remaining devices) and checks the product."""
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh has unknown axes {sorted(unknown)}; axes are {MESH_AXES}.")
    values = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
    fills = [axis for axis, v in zip(MESH_AXES, values, strict=True) if v == -1]
    if len(fills) > 1:
        raise ValueError(f"mesh: only one axis may be -1 (fill), got {fills}.")
    if any(v == 0 or v < -1 for v in values):
        raise ValueError(
            f"mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, values, strict=True))}."
        )
    known = math.prod(v for v in values if v != -1)
    if fills:
        if num_devices % known:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, values, strict=True))}: {num_devices} devices are not "
                f"divisible by {known}."
            )
        values = [num_devices // known if v == -1 else v for v in values]
    if math.prod(values) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, values, strict=True))} needs {math.prod(values)} devices, "
            f"{num_devices} are available."
        )
    return tuple(values)


def make_mesh(
    mesh_config: MeshConfig | ml_collections.ConfigDict, devices: Sequence | None = None
) -> Mesh:
    """Mesh with axes ``(data, fsdp, tensor)`` from ``config.mesh`` (e.g. ``data=-1``).

    Axis types stay "auto" (sharding propagated by the compiler from the in/out shardings),
    which is why this does not use ``jax.make_mesh`` (explicit axes by default in jax 0.10).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = (
        dataclasses.asdict(mesh_config)
        if dataclasses.is_dataclass(mesh_config)
        else dict(mesh_config)
    )
    shape = mesh_shape(sizes, len(devices))
    try:
        # Topology-aware order on TPU/GPU: the last axis (tensor) gets the fastest links.
        device_grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (AssertionError, NotImplementedError, ValueError) as err:
        # No topology-aware layout for these devices (CPU devices, a device kind or count
        # mesh_utils has no rule for: it raises one of these three): the devices fill the
        # mesh in their listed order. On CPU any order is as good; on accelerators the
        # listed order may put the tensor axis on slow links, so the run says so.
        if devices[0].platform != "cpu":
            logging.warning(
                "No topology-aware device order for mesh %s on %d %s devices (%s); using "
                "the listed order, which may put the tensor axis on slower links. A mesh "
                "shape that matches the slice (config.mesh) avoids this.",
                dict(zip(MESH_AXES, shape, strict=True)),
                len(devices),
                devices[0].device_kind,
                err,
            )
        device_grid = np.asarray(devices).reshape(shape)
    return Mesh(device_grid, MESH_AXES)


def rules_from_config(rules) -> tuple[tuple[str, object], ...]:
    """Normalises the config's rule list (lists from overrides become tuples)."""
    out = []
    for rule in rules:
        if len(rule) != 2:
            raise ValueError(f"logical_axis_rules entry {rule!r} must be (name, mesh_axes).")
        name, axes = rule
        if isinstance(axes, list):
            axes = tuple(axes)
        for axis in axes if isinstance(axes, tuple) else (axes,):
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(
                    f"logical_axis_rules: {name!r} -> {axis!r} is not a mesh axis {MESH_AXES}."
                )
        out.append((name, axes))
    return tuple(out)


def logical_shardings(abstract_boxed_tree, mesh: Mesh, rules):
    """NamedShardings for a tree carrying flax logical partition metadata.

    Leaves without metadata are replicated.
    """
    logical_specs = nn.get_partition_spec(abstract_boxed_tree)
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Sharding of a ``[batch, ...]`` array: the batch axis over what ``batch`` maps to."""
    axes = nn.logical_to_mesh_axes(("batch",), rules)
    return NamedSharding(mesh, PartitionSpec(*axes))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _path_keys(path) -> tuple:
    return tuple(getattr(e, "key", getattr(e, "name", getattr(e, "idx", e))) for e in path)


def opt_state_shardings(abstract_opt_state, abstract_params, param_shardings, mesh: Mesh):
    """Shardings for an optax state: a leaf whose key path ends with a param's path and has
    that param's shape gets the param's sharding (Adam's mu/nu); everything else (counts,
    Adafactor's factored row/column statistics, which are small) is replicated."""
    by_path = {}
    for (path, leaf), sharding in zip(
        jax.tree_util.tree_flatten_with_path(abstract_params)[0],
        jax.tree.leaves(param_shardings),
        strict=True,
    ):
        by_path[_path_keys(path)] = (tuple(leaf.shape), sharding)

    def choose(path, leaf):
        keys = _path_keys(path)
        for start in range(len(keys)):
            match = by_path.get(keys[start:])
            if match is not None and match[0] == tuple(leaf.shape):
                return match[1]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(choose, abstract_opt_state)


def host_local_to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict:
    """Each process feeds its own rows; returns global arrays sharded along the batch axis."""
    return {
        name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for name, value in batch.items()
    }


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes (``config.mesh``). -1 is a size, not an unset value: that axis gets
    the devices the others leave (MaxText's ``ici_*_parallelism`` convention)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


def default_mesh_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dataclasses.asdict(MeshConfig()))


def describe(mesh: Mesh) -> str:
    return ", ".join(f"{axis}={size}" for axis, size in mesh.shape.items())
