"""TPU slices by their Cloud names (`v4-32`, `v5p-16`, `v5e-8`, `v6e-4`): their topology as libtpu
names it, and each chip's published peaks.

A slice's devices come from `jax.experimental.topologies.get_topology_desc`, which needs libtpu but
no TPU: the devices can compile programs, not run them. Planning sees one device per chip, as JAX
does on a real slice: v4 and v5p chips have two TensorCores that JAX drives as one "megacore"
device, so those topologies are asked for with `chip_config_name="megacore"` (without it v4:2x2x4
lists 32 single-core devices, where a v4-32 run sees 16). v5e and v6e chips have one core.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from jax.experimental.topologies import get_topology_desc

from pdpo_jax.errors import PdpoError

GiB = 1024**3


class SliceError(PdpoError):
    """A TPU slice name that cannot be planned for."""


@dataclass(frozen=True)
class Chip:
    """One chip's published peaks: dense bf16 FLOP/s, HBM bandwidth (bytes/s), HBM capacity (bytes)."""

    generation: str
    peak_flops: float
    hbm_bandwidth: float
    hbm_bytes: int
    megacore: bool  # two TensorCores driven as one device


# Google Cloud TPU system-architecture pages, per chip.
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 275e12, 1.2e12, 32 * GiB, megacore=True),
    "v5e": Chip("v5e", 197e12, 819e9, 16 * GiB, megacore=False),
    "v5p": Chip("v5p", 459e12, 2.76e12, 95 * GiB, megacore=True),
    "v6e": Chip("v6e", 918e12, 1.64e12, 32 * GiB, megacore=False),
}
# libtpu's generation name in topology strings ("v5:2x2x1" is a v5p).
TOPOLOGY_PREFIX = {"v4": "v4", "v5e": "v5e", "v5p": "v5", "v6e": "v6e"}
CHIPS_PER_HOST_BOUNDS = (2, 2, 1)

# chips -> chip grid. v4/v5p slices are 3-D tori named by TensorCores (v4-32 = 16 chips); v5e/v6e
# slices are 2-D and named by chips. The grids are those of the Cloud TPU docs (as MaxText's
# accelerator_to_spec_map lists them).
GRIDS_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
            256: (4, 8, 8), 512: (8, 8, 8)}
GRIDS_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}


@dataclass(frozen=True)
class TpuSlice:
    name: str  # "v4-32"
    chip: Chip
    chips: int
    grid: tuple[int, ...]

    @property
    def topology_name(self) -> str:
        return f"{TOPOLOGY_PREFIX[self.chip.generation]}:{'x'.join(map(str, self.grid))}"

    @property
    def chip_config_name(self) -> str:
        return "megacore" if self.chip.megacore else "default"

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        """A host holds a 2x2 block of chips (fewer on a smaller slice)."""
        grid = tuple(self.grid) + (1,) * (3 - len(self.grid))
        return tuple(min(g, b) for g, b in zip(grid, CHIPS_PER_HOST_BOUNDS))

    @property
    def hosts(self) -> int:
        return max(1, self.chips // int(np.prod(self.chips_per_host_bounds)))

    def describe(self) -> str:
        view = "one device per chip (megacore: both TensorCores)" if self.chip.megacore else "one device per chip"
        return (f"{self.name}: {self.chips} {self.chip.generation} chips on {self.hosts} host(s), topology "
                f"{self.topology_name}, {view}, {self.chip.hbm_bytes / GiB:.0f} GiB HBM per chip")


SLICE_NAME = re.compile(r"^(v4|v5p|v5e|v5litepod|v6e)-(\d+)$")


def parse_slice(name: str) -> TpuSlice:
    """`v4-32`, `v5p-16` (TensorCores, two per chip) or `v5e-8`, `v5litepod-8`, `v6e-4` (chips)."""
    match = SLICE_NAME.match(name.strip().lower())
    if not match:
        raise SliceError(f"TPU slice {name!r} is not a name like v4-32, v5p-16, v5e-8 or v6e-4")
    generation, count = match.group(1), int(match.group(2))
    generation = "v5e" if generation == "v5litepod" else generation
    chip = CHIPS[generation]
    chips = count // 2 if chip.megacore else count
    grids = GRIDS_3D if chip.megacore else GRIDS_2D
    if chips not in grids:
        sizes = ", ".join(f"{generation}-{c * 2 if chip.megacore else c}" for c in grids)
        raise SliceError(f"TPU slice {name!r}: no known topology for {chips} chips (known: {sizes})")
    return TpuSlice(name=f"{generation}-{count}", chip=chip, chips=chips, grid=grids[chips])


def slice_of_config_comment(first_line: str) -> str | None:
    """The slice a paper config names in its first comment line ("... TPU slice: v4-32 (16 chips ...")."""
    match = re.search(r"TPU slice:\s*([\w-]+)", first_line)
    return match.group(1) if match else None


def topology_devices(tpu: TpuSlice) -> list[Any]:
    """Compile-only devices of `tpu`, one per chip. Works with JAX_PLATFORMS=cpu: only this call
    loads libtpu, and the variables set here (before it loads) keep its start-up quiet on a
    machine without TPU metadata and let several planning processes run at once (libtpu
    otherwise holds /tmp/libtpu_lockfile for the life of the first)."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", tpu.name)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    try:
        topology = get_topology_desc(platform="tpu", topology_name=tpu.topology_name,
                                     chip_config_name=tpu.chip_config_name,
                                     chips_per_host_bounds=tpu.chips_per_host_bounds, num_slices=1)
    except Exception as err:  # noqa: BLE001 - libtpu missing or refusing the topology
        hint = "" if importlib.util.find_spec("libtpu") else " (pdpo plan needs libtpu: see scripts/setup.sh)"
        raise SliceError(f"cannot describe TPU slice {tpu.name} ({tpu.topology_name}): "
                         f"{' '.join(str(err).split())[:300]}{hint}") from None
    devices = list(topology.devices)
    if len(devices) != tpu.chips:
        raise SliceError(f"TPU slice {tpu.name}: libtpu lists {len(devices)} devices for {tpu.topology_name}, "
                         f"expected one per chip ({tpu.chips})")
    return devices
