"""Named TPU slices (`v5p-16`, `v6e-16`, `v5e-4`, ...) as compile-only devices.

Names follow Cloud TPU's accelerator types: the number counts TensorCores, so
a v4/v5p slice `vX-N` has N/2 chips (two cores per chip, run as one megacore
device) and a v5e/v6e slice has N chips. libtpu (the `tpu-compile` extra)
provides the compiler; no TPU is needed. HBM per chip is the capacity JAX
reports as `bytes_limit` on that chip; peak bf16 FLOP/s from Cloud TPU's
published specifications.
"""

from __future__ import annotations

import dataclasses
import os
import re

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    generation: str  # libtpu's topology prefix
    cores_per_chip: int
    hbm_bytes: int
    peak_bf16_flops: float
    dims: int  # 3: v4/v5p torus; 2: v5e/v6e


CHIPS = {
    "v4": ChipSpec("v4", 2, 32 * GiB, 275e12, 3),
    "v5p": ChipSpec("v5", 2, int(95.74 * GiB), 459e12, 3),
    "v5e": ChipSpec("v5e", 1, 16 * GiB, 197e12, 2),
    "v6e": ChipSpec("v6e", 1, int(31.25 * GiB), 918e12, 2),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # e.g. "v5p-16"
    chip: ChipSpec
    chips: int
    shape: tuple[int, ...]  # chips along each torus / mesh dimension

    @property
    def libtpu_name(self) -> str:
        return f"{self.chip.generation}:" + "x".join(str(s) for s in self.shape)


def _grid(chips: int, dims: int) -> tuple[int, ...]:
    """Cloud TPU's slice shapes: powers of two, as square as possible (4 -> 2x2, 8 -> 2x4 or 2x2x2)."""
    if chips & (chips - 1):
        raise ValueError(f"{chips} chips: only power-of-two slices are supported here; name one with a power-of-two "
                         f"chip count (e.g. v5p-16 = 8 chips, v6e-16 = 16 chips)")
    shape = [1] * dims
    i = 0
    while chips > 1:
        shape[i % dims] *= 2
        chips //= 2
        i += 1
    return tuple(sorted(shape))


def parse_topology(name: str) -> Topology:
    """`v5p-16` -> 8 chips as v5:2x2x2; `v6e-16` -> v6e:4x4; `v5e-4` -> v5e:2x2; also `v5p:2x2x4` style."""
    match = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name.strip().lower().replace("v5litepod", "v5e"))
    if match:
        chip = CHIPS[match.group(1)]
        cores = int(match.group(2))
        if cores % chip.cores_per_chip:
            raise ValueError(f"--topology {name}: a {match.group(1)} slice counts {chip.cores_per_chip} cores per "
                             f"chip, so the number must be a multiple of {chip.cores_per_chip}")
        chips = cores // chip.cores_per_chip
        shape = _grid(chips, chip.dims)
        if chip.dims == 3 and chips < 8:  # v4-8 / v5p-8: one host, 2x2x1
            shape = tuple(sorted(shape, reverse=True))
        return Topology(name, chip, chips, shape)
    match = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+)+)", name.strip().lower())
    if match:
        chip = CHIPS[match.group(1)]
        shape = tuple(int(s) for s in match.group(2).split("x"))
        if len(shape) != chip.dims:
            raise ValueError(f"--topology {name}: {match.group(1)} slices have {chip.dims} dimensions")
        chips = 1
        for s in shape:
            chips *= s
        return Topology(name, chip, chips, shape)
    raise ValueError(f"unknown --topology {name!r}; use a Cloud TPU accelerator type such as v5p-16, v6e-16, v5e-4, "
                     f"v4-8 (or generation:AxBxC, e.g. v5p:2x2x4)")


def prepare_environment() -> None:
    """Environment for a compile-only libtpu on a host without TPUs; call before jax is imported.

    JAX itself runs on CPU (no TPU backend is started), and libtpu may be
    loaded next to another process that uses it (a training job on this TPU VM).
    """
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server lookups on a non-TPU host


def compile_devices(topology: Topology):
    """The slice's devices, compile-only (they run nothing); needs libtpu (`pip install posttrain_jax[tpu-compile]`)."""
    import importlib.util

    from jax.experimental import topologies
    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError("compiling for a TPU topology needs libtpu: pip install 'posttrain_jax[tpu-compile]' "
                           "(jax[tpu] at the installed jax version)")
    per_host = (2, 2, 1) if topology.chips >= 4 else ((2, 1, 1) if topology.chips == 2 else (1, 1, 1))
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topology.libtpu_name,
        chip_config_name="megacore" if topology.chip.cores_per_chip == 2 else "default",
        chips_per_host_bounds=per_host, num_slices=1)
    devices = list(desc.devices)
    if len(devices) != topology.chips:
        raise RuntimeError(f"libtpu made {len(devices)} devices for {topology.libtpu_name}, expected {topology.chips}")
    return devices
