"""The device mesh: axes `data`, `fsdp`, `tensor` from config, and multi-host start-up.

On several hosts every process runs this same code over all global devices.
The device order matters beyond speed: the data pipeline gives process `h`
the `h`-th block of each global batch, and `shard_batch` places a process's
rows on that process's devices, so each process's devices must form the
`h`-th contiguous block of the data-parallel (`data` x `fsdp`) positions for
the global batch to be the same whatever the number of hosts. `make_mesh`
builds such an order (ICI-aware within a slice on TPU, slices over DCN).
"""

from __future__ import annotations

import logging
import os
import urllib.request
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from posttrain_jax.sharding import DEFAULT_RULES, Rules, normalize_rules

AXES = ("data", "fsdp", "tensor")
DCN_PREFIX = "dcn_"  # mesh.dcn_data = 2: the `data` axis spans 2 slices (multi-slice, over DCN)
log = logging.getLogger(__name__)


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Sizes for (data, fsdp, tensor); one size may be -1 to take the remaining devices."""
    unknown = set(shape) - set(AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {list(AXES)} "
                         f"(and {', '.join(DCN_PREFIX + a for a in AXES)} for multi-slice runs)")
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


def resolve_dcn_shape(dcn: Mapping[str, int], sizes: Sequence[int], num_slices: int) -> tuple[int, ...]:
    """How many slices each axis spans; default (none given, or all 1): all slices on `data`."""
    unknown = set(dcn) - set(AXES)
    if unknown:
        raise ValueError(f"unknown mesh keys {sorted(DCN_PREFIX + a for a in unknown)}; "
                         f"valid: {', '.join(DCN_PREFIX + a for a in AXES)}")
    dcn_sizes = [int(dcn.get(axis, 1)) for axis in AXES]
    if int(np.prod(dcn_sizes)) == 1:  # pure data parallelism over DCN: the least DCN traffic
        dcn_sizes = [num_slices, 1, 1]
    where = ", ".join(f"{DCN_PREFIX}{a}={d}" for a, d in zip(AXES, dcn_sizes))
    if int(np.prod(dcn_sizes)) != num_slices or min(dcn_sizes) < 1:
        raise ValueError(f"mesh {where} spans {int(np.prod(dcn_sizes))} slices but the devices form "
                         f"{num_slices}; make the product of the mesh.{DCN_PREFIX}* sizes equal {num_slices}")
    for axis, size, d in zip(AXES, sizes, dcn_sizes):
        if size % d:
            raise ValueError(f"mesh {axis}={size} cannot span {DCN_PREFIX}{axis}={d} slices: {d} must divide "
                             f"{size} (mesh sizes are global; each slice holds {axis}/{DCN_PREFIX}{axis})")
    return tuple(dcn_sizes)


def _num_slices(devices) -> int:
    return len({getattr(d, "slice_index", 0) for d in devices})


def _allow_split(devices) -> bool:
    # What jax.make_mesh does: v5e slices (2D, no wraparound) may split physical axes.
    return devices[0].device_kind in ("TPU v5 lite", "TPU v5e")


def processes_contiguous(grid: np.ndarray) -> bool:
    """True when process `h` owns exactly the `h`-th block of the data-parallel positions.

    `grid` is a (data, fsdp, tensor) array of devices; the batch is split over
    (data, fsdp) in row-major order, which is the order the data pipeline and
    `jax.make_array_from_process_local_data` assume.
    """
    rows = grid.reshape(grid.shape[0] * grid.shape[1], -1)
    processes = sorted({d.process_index for d in grid.flat})
    if len(rows) % len(processes):
        return False
    block = len(rows) // len(processes)
    return all({d.process_index for d in row} == {processes[i // block]} for i, row in enumerate(rows))


def _process_major_grid(sizes: Sequence[int], devices) -> np.ndarray:
    """Each process's devices as one block of data-parallel rows, in process order.

    Within a process the (rows, tensor) block is laid out ICI-aware when the
    platform knows how (TPU); `tensor` must fit inside one process.
    """
    by_process: dict[int, list] = {}
    for d in devices:
        by_process.setdefault(d.process_index, []).append(d)
    tensor = sizes[2]
    local = len(devices) // len(by_process)
    if any(len(v) != local for v in by_process.values()) or local % tensor:
        counts = {p: len(v) for p, v in sorted(by_process.items())}
        raise ValueError(f"mesh {dict(zip(AXES, sizes))}: the tensor axis ({tensor}) must divide the devices of "
                         f"each process ({counts}) so that every process holds whole data-parallel shards; "
                         f"lower mesh.tensor")
    blocks = []
    for process in sorted(by_process):
        mine = sorted(by_process[process], key=lambda d: d.id)
        try:
            block = mesh_utils.create_device_mesh((local // tensor, tensor), mine,
                                                  allow_split_physical_axes=_allow_split(mine))
        except (ValueError, NotImplementedError, AssertionError):  # a layout the topology code does not handle
            block = np.asarray(mine, dtype=object).reshape(local // tensor, tensor)
        blocks.append(block)
    return np.concatenate(blocks).reshape(sizes)


def _slice_grid(sizes: Sequence[int], devices) -> np.ndarray:
    """One slice: the topology-aware layout if it keeps processes contiguous, else process-major."""
    if len({d.process_index for d in devices}) == 1:
        return mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=_allow_split(devices))
    try:
        grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=_allow_split(devices))
        if processes_contiguous(grid):
            return grid
    except (ValueError, NotImplementedError, AssertionError) as error:
        log.info("no topology-aware layout for mesh %s (%s); using process order", sizes, error)
    return _process_major_grid(sizes, devices)


def device_grid(shape: Mapping[str, int] | None, devices: Sequence) -> np.ndarray:
    """The (data, fsdp, tensor) array of devices for a mesh config (see `make_mesh`)."""
    shape = dict(shape or {"fsdp": -1})
    dcn = {k[len(DCN_PREFIX):]: v for k, v in shape.items() if k.startswith(DCN_PREFIX)}
    sizes = resolve_mesh_shape({k: v for k, v in shape.items() if not k.startswith(DCN_PREFIX)}, len(devices))
    num_slices = _num_slices(devices)
    if num_slices == 1:
        if dcn and int(np.prod(list(dcn.values()))) != 1:
            raise ValueError(f"mesh {shape} asks for several slices (mesh.{DCN_PREFIX}*) but all "
                             f"{len(devices)} devices are in one slice; drop the {DCN_PREFIX}* keys")
        return _slice_grid(sizes, devices)
    dcn_sizes = resolve_dcn_shape(dcn, sizes, num_slices)
    ici_sizes = tuple(s // d for s, d in zip(sizes, dcn_sizes))
    grid = mesh_utils.create_hybrid_device_mesh(ici_sizes, dcn_sizes, devices,
                                                allow_split_physical_axes=_allow_split(devices))
    if len({d.process_index for d in devices}) > 1 and not processes_contiguous(grid):
        # Same blocks as create_hybrid_device_mesh, each slice laid out process-major.
        slices = sorted({d.slice_index for d in devices})
        per_slice = [_slice_grid(ici_sizes, [d for d in devices if d.slice_index == s]) for s in slices]
        order = np.arange(num_slices).reshape(dcn_sizes)
        grid = np.block(np.vectorize(lambda i: per_slice[i], otypes=[object])(order).tolist())
    return grid


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all (or the given) devices; default: all devices on `fsdp`.

    `shape` maps `data`/`fsdp`/`tensor` to global sizes (one may be -1 to fill).
    Multi-slice (devices with several `slice_index`es): `dcn_data`/`dcn_fsdp`/
    `dcn_tensor` say how many slices each axis spans (default: all on `data`);
    the slices are joined with `mesh_utils.create_hybrid_device_mesh`. With
    several processes each process's devices form one contiguous block of the
    data-parallel positions, in process order (see the module docstring); a
    mesh that cannot keep that order is logged as a warning, since batches are
    then placed in another (still valid) row order.

    Axes are of the `Auto` type: shardings of intermediate values are left to
    the compiler, guided by the logical constraints the model places.
    """
    devices = list(devices if devices is not None else jax.devices())
    if len({d.process_index for d in devices}) > 1:
        devices.sort(key=lambda d: (getattr(d, "slice_index", 0), d.process_index, d.id))
    grid = device_grid(shape, devices)
    if len({d.process_index for d in devices}) > 1 and not processes_contiguous(grid):
        log.warning("mesh %s: processes do not own contiguous blocks of the data-parallel axes; global batches "
                    "hold the same rows in another order than on one host", dict(zip(AXES, grid.shape)))
    _warn_concurrent_cpu_collectives(devices)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def mesh_and_rules(config) -> tuple[Mesh, Rules]:
    """(mesh, logical-axis rules) from a run config's `mesh` and `sharding_rules` sections.

    `mesh.num_devices` > 0 builds the mesh over this process's first devices only (one process;
    e.g. the ablation's 1- vs 2-device cells in a process that has 8); the `sharding_rules`
    pairs take precedence over `DEFAULT_RULES`. Raises ValueError when num_devices cannot be met.
    """
    shape = dict(config.mesh)
    num_devices = int(shape.pop("num_devices", 0) or 0)
    devices = None
    if num_devices:
        if jax.process_count() > 1 or num_devices > jax.device_count():
            raise ValueError(f"mesh.num_devices={num_devices}: needs one process with at least that many devices "
                             f"(this is process {jax.process_index()} of {jax.process_count()} with "
                             f"{jax.device_count()} devices); set it to 0 to use every device")
        devices = jax.devices()[:num_devices]
    mesh = make_mesh(shape, devices=devices)
    rules = normalize_rules(tuple(tuple(r) for r in config.sharding_rules)) + DEFAULT_RULES
    return mesh, rules


def _warn_concurrent_cpu_collectives(devices: Sequence[jax.Device]) -> None:
    """Several CPU devices in one process without SERIAL_COLLECTIVES can abort in a collective rendezvous."""
    from posttrain_jax.cpu_devices import SERIAL_COLLECTIVES
    local = [d for d in devices if d.process_index == jax.process_index()]
    if (len(local) > 1 and local[0].platform == "cpu"
            and "xla_cpu_enable_concurrency_optimized_scheduler" not in os.environ.get("XLA_FLAGS", "")):
        log.warning("%d CPU devices in this process: set XLA_FLAGS='... %s' before jax starts, or scanned layers "
                    "may abort in an XLA:CPU collective rendezvous (see posttrain_jax/cpu_devices.py)",
                    len(local), SERIAL_COLLECTIVES)


def _metadata(key: str, timeout_s: float = 2.0) -> str | None:
    """A GCE instance attribute (as JAX's Cloud TPU cluster reads it), or None when unreachable."""
    host = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
    request = urllib.request.Request(f"http://{host}/computeMetadata/v1/instance/attributes/{key}",
                                     headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.read().decode()
    except (OSError, ValueError):
        return None


def _on_cloud_tpu_vm() -> bool:
    # Set by jax's import-time Cloud TPU set-up when libtpu and TPU chips are present.
    from jax._src import cloud_tpu_init
    return bool(cloud_tpu_init.running_in_cloud_tpu_vm)


def _tpu_env_value(text: str | None, key: str) -> str | None:
    for line in (text or "").splitlines():  # lines like "MEGASCALE_NUM_SLICES: '2'"
        name, sep, value = line.partition(":")
        if sep and name.strip() == key:
            return value.strip().strip("'\"")
    return None


def cloud_tpu_process_count(environ: Mapping[str, str] | None = None, *, on_tpu_vm: bool | None = None,
                            metadata=_metadata) -> int:
    """Processes of this Cloud TPU job (hosts per slice x slices); 1 off TPU or on a one-host slice.

    Reads what JAX's own Cloud TPU cluster detection reads: `TPU_PROCESS_ADDRESSES`
    / `TPU_WORKER_HOSTNAMES` (GKE) or the VM's `worker-network-endpoints`
    metadata (TPU VMs made with gcloud), and `MEGASCALE_NUM_SLICES` (multi-slice,
    from the environment or the `tpu-env` metadata). Off a Cloud TPU VM (where
    JAX's detection would not run either) this is 1 without asking anything.
    """
    env = os.environ if environ is None else environ
    if not (_on_cloud_tpu_vm() if on_tpu_vm is None else on_tpu_vm):
        return 1  # JAX's Cloud TPU cluster detection needs a TPU VM too
    ask_metadata = not env.get("TPU_SKIP_MDS_QUERY")
    slices = env.get("MEGASCALE_NUM_SLICES")
    if slices is None and ask_metadata:
        slices = _tpu_env_value(metadata("tpu-env"), "MEGASCALE_NUM_SLICES")
    hostnames = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
    if hostnames is None and ask_metadata:
        hostnames = metadata("worker-network-endpoints")
    hosts = len([h for h in (hostnames or "").split(",") if h.strip()]) or 1
    return hosts * max(int(slices or 1), 1)


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, environ: Mapping[str, str] | None = None) -> bool:
    """Start JAX's multi-controller runtime when this run spans several processes; True if started.

    Where the process layout comes from, first match wins:
    1. the arguments (`--coordinator host:port --num-processes N --process-id I`; all three);
    2. `JAX_COORDINATOR_ADDRESS` (+ `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`) in the environment;
    3. a multi-host Cloud TPU slice or a multi-slice job (`cloud_tpu_process_count` > 1):
       `jax.distributed.initialize()` then discovers coordinator and ids itself.
    A single host (or `num_processes` 1) starts nothing. Call before anything touches a device.
    """
    env = os.environ if environ is None else environ
    if jax.distributed.is_initialized():
        return True
    if coordinator is not None or num_processes is not None or process_id is not None:
        if num_processes == 1 and not process_id:
            return False  # one process needs no coordinator
        missing = [n for n, v in (("--coordinator", coordinator), ("--num-processes", num_processes),
                                  ("--process-id", process_id)) if v is None]
        if missing:
            raise ValueError(f"multi-process start needs --coordinator, --num-processes and --process-id; "
                             f"missing: {', '.join(missing)}")
        source = "flags"
    elif env.get("JAX_COORDINATOR_ADDRESS"):
        coordinator = env["JAX_COORDINATOR_ADDRESS"]
        num_processes = int(env["JAX_NUM_PROCESSES"]) if env.get("JAX_NUM_PROCESSES") else None
        process_id = int(env["JAX_PROCESS_ID"]) if env.get("JAX_PROCESS_ID") else None
        source = "JAX_COORDINATOR_ADDRESS"
    else:
        count = cloud_tpu_process_count(env)
        if count <= 1:
            return False
        source = f"Cloud TPU environment ({count} processes)"
    if num_processes is not None:
        if num_processes < 1 or process_id is None or not 0 <= process_id < num_processes:
            raise ValueError(f"process id {process_id} of {num_processes} processes (from {source}): "
                             f"need num_processes >= 1 and 0 <= process_id < num_processes")
        if num_processes == 1:
            return False
    if coordinator is not None and ":" not in coordinator:
        raise ValueError(f"coordinator {coordinator!r} (from {source}) must be host:port, e.g. 10.0.0.2:8476")
    jax.distributed.initialize(coordinator, num_processes, process_id)
    log.info("jax.distributed from %s: process %d of %d, %d local / %d global devices", source,
             jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def local_mesh() -> Mesh:
    """This process's devices as one FSDP mesh: for models each process runs on its own (a reward model
    scoring this process's completions), with no collective across processes."""
    return make_mesh({"fsdp": -1}, devices=jax.local_devices())
