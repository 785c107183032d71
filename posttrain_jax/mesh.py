"""The device mesh: axes `data`, `fsdp`, `tensor` from config, and multi-host start-up."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "tensor")
log = logging.getLogger(__name__)


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Sizes for (data, fsdp, tensor); one size may be -1 to take the remaining devices."""
    unknown = set(shape) - set(AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {list(AXES)}")
    sizes = [int(shape.get(axis, 1)) for axis in AXES]
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {dict(zip(AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive or -1, got {dict(zip(AXES, sizes))}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if fill:
        if num_devices % known:
            raise ValueError(f"mesh {dict(zip(AXES, sizes))}: the fixed axes ({known} devices) do not divide "
                             f"the {num_devices} available devices; pick sizes whose product divides {num_devices}")
        sizes[fill[0]] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices but "
                         f"{num_devices} are available; make the product of data*fsdp*tensor equal "
                         f"{num_devices}, or set one axis to -1 to fill")
    return tuple(sizes)


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all (or the given) devices; default: all devices on `fsdp`.

    Axes are of the `Auto` type: shardings of intermediate values are left to
    the compiler, guided by the logical constraints the model places.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh_shape(dict(shape or {"fsdp": -1}), len(devices))
    return jax.make_mesh(sizes, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Start JAX's multi-controller runtime when more than one process takes part.

    On TPU VMs `jax.distributed.initialize()` discovers everything itself; elsewhere
    pass the coordinator address, the number of processes and this process's id.
    """
    explicit = coordinator is not None or num_processes is not None or process_id is not None
    if explicit:
        missing = [n for n, v in (("coordinator", coordinator), ("num_processes", num_processes),
                                  ("process_id", process_id)) if v is None]
        if missing:
            raise ValueError(f"multi-process start needs --coordinator, --num-processes and --process-id; "
                             f"missing: {', '.join(missing)}")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    else:
        jax.distributed.initialize()
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
