"""Device mesh, parameter partition rules and multi-host helpers.

The mesh has axes ("data", "fsdp", "tensor"). Parameters are sharded as data: each model family
names the axes of its parameters by what they hold (`embed`, `heads`, `mlp`, `vocab`, ...; see
`pdpo_jax.model.family`) and declares them here, and one rules table, `SHARDING_RULES`, says which
mesh axis splits each logical axis. A batch is split over data and fsdp together.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pdpo_jax.errors import RunFailed

AXES = ("data", "fsdp", "tensor")
# The module name of a scanned layer stack (model.scan_layers): its parameters have a leading
# [num_layers] axis, the logical axis `layers`. The decoder names its module by this.
STACKED_LAYERS = "stacked"
# Where a parameter path template has the layer index: "model/layers/{i}/mlp/up_proj/kernel".
LAYER_INDEX = "{i}"
BATCH_AXES = ("data", "fsdp")


@dataclass(frozen=True)
class ShardingRules:
    """The mesh axis that splits each logical axis of a parameter; None: never split."""

    layers: str | None = None  # the leading axis of a scanned layer stack
    vocab: str | None = "tensor"  # token embedding rows, lm_head columns
    embed: str | None = "fsdp"  # the hidden size
    positions: str | None = None  # rows of a learned position table (GPT-2's wpe)
    heads: str | None = "tensor"  # query heads x head_dim
    kv_heads: str | None = "tensor"  # key/value heads x head_dim
    qkv: str | None = "tensor"  # q, k and v of all heads side by side (GPT-2's fused c_attn)
    mlp: str | None = "tensor"  # the MLP's inner size

    def spec(self, axes: Sequence[str | None]) -> P:
        return P(*(None if axis is None else getattr(self, axis) for axis in axes))


SHARDING_RULES = ShardingRules()
LOGICAL_AXES = tuple(field.name for field in dataclasses.fields(ShardingRules))

# Parameter path template -> logical axes, one entry per parameter a model family declares
# (`declare_param_axes`). () is a parameter that is never split: norms and biases, small.
_PARAM_AXES: dict[str, tuple[str | None, ...]] = {}


def declare_param_axes(template: str, axes: Sequence[str | None]) -> None:
    """Names the axes of the parameter at `template` ("/"-joined, `{i}` for the layer index)."""
    axes = tuple(axes)
    unknown = [axis for axis in axes if axis is not None and axis not in LOGICAL_AXES]
    if unknown:
        raise ValueError(f"parameter {template!r}: logical axis {unknown[0]!r} is not one of {LOGICAL_AXES}")
    if _PARAM_AXES.get(template, axes) != axes:
        raise ValueError(f"parameter {template!r} is declared with axes {_PARAM_AXES[template]} and {axes}")
    _PARAM_AXES[template] = axes


def param_axes(path: str) -> tuple[str | None, ...]:
    """The logical axes of the parameter at `path`, found by its longest declared suffix, so a
    model held under a prefix (PPO's `policy/...`) is split like the model; a scanned stack's
    parameters get the leading `layers` axis. A parameter no family declares is replicated."""
    parts = path.split("/")
    stacked = STACKED_LAYERS in parts
    parts = [LAYER_INDEX if part.isdigit() or part == STACKED_LAYERS else part for part in parts]
    axes: tuple[str | None, ...] = ()
    for start in range(len(parts)):
        suffix = "/".join(parts[start:])
        if suffix in _PARAM_AXES:
            axes = _PARAM_AXES[suffix]
            break
    return ("layers", *axes) if stacked else axes


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh; -1 on one axis takes whatever devices are left."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"make_mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"make_mesh: {len(devices)} devices do not split into fsdp*tensor*... = {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"make_mesh: data*fsdp*tensor = {int(np.prod(sizes))} but there are {len(devices)} devices")
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(sizes, devices)
    except (AssertionError, ValueError, NotImplementedError):
        grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, AXES)


def _axis_size(mesh: Mesh, axis: Any) -> int:
    names = axis if isinstance(axis, tuple) else (axis,)
    return int(np.prod([mesh.shape[n] for n in names]))


def fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh | None) -> P:
    """Drops spec entries beyond the array's rank, and (with a mesh) any axis that does not divide
    its dimension: such a dimension is replicated rather than unevenly split."""
    entries = list(spec)[: len(shape)]
    if mesh is not None:
        entries = [a if a is None or shape[d] % _axis_size(mesh, a) == 0 else None for d, a in enumerate(entries)]
    return P(*entries)


def spec_for_path(path: str, shape: tuple[int, ...], rules: ShardingRules = SHARDING_RULES,
                  mesh: Mesh | None = None) -> P:
    return fit_spec(rules.spec(param_axes(path)), shape, mesh)


def partition_specs_for_shapes(shapes: Mapping[str, tuple[int, ...]], rules: ShardingRules = SHARDING_RULES,
                               mesh: Mesh | None = None) -> dict[str, P]:
    return {path: spec_for_path(path, tuple(shape), rules, mesh) for path, shape in shapes.items()}


def param_partition_specs(params: Any, rules: ShardingRules = SHARDING_RULES, mesh: Mesh | None = None) -> Any:
    """A tree of PartitionSpecs like `params` (arrays or ShapeDtypeStructs). With `mesh`, a dimension
    not divisible by its mesh axis size falls back to replication on that dimension."""
    flat = traverse_util.flatten_dict(params, sep="/")
    specs = {path: spec_for_path(path, tuple(np.shape(leaf)), rules, mesh) for path, leaf in flat.items()}
    return traverse_util.unflatten_dict(specs, sep="/")


def param_shardings(params: Any, mesh: Mesh, rules: ShardingRules = SHARDING_RULES) -> Any:
    specs = param_partition_specs(params, rules, mesh)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


def shard_params(params: Any, mesh: Mesh, rules: ShardingRules = SHARDING_RULES) -> Any:
    return jax.device_put(params, param_shardings(params, mesh, rules))


def on_mesh(params: Any, mesh: Mesh) -> bool:
    """Whether every leaf of `params` already lives on `mesh` (loaded onto it, or sharded before)."""
    return all(isinstance(getattr(leaf, "sharding", None), NamedSharding) and leaf.sharding.mesh == mesh
               for leaf in jax.tree.leaves(params))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch dim split over ("data", "fsdp"), everything else replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def rows_for_mesh(rows: int, mesh: Mesh | None) -> int:
    """`rows` rounded up to a multiple of the mesh's batch shards, so a batch splits evenly."""
    if mesh is None:
        return rows
    shards = _axis_size(mesh, BATCH_AXES)
    return -(-rows // shards) * shards


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


TRUTHY = ("1", "true", "yes", "on")


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _env_says_multiprocess(env: Mapping[str, str]) -> bool:
    if env.get("PDPO_DISTRIBUTED", "").strip().lower() in TRUTHY:
        return True
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    return any((_env_int(env, count) or 1) > 1 for count in ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


def distributed_settings_from_env(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Arguments of jax.distributed.initialize() that the environment states explicitly.

    JAX reads JAX_COORDINATOR_ADDRESS itself but not the process count and index, which a
    hand-launched cluster (several machines or processes without TPU/SLURM/MPI metadata) has to
    give: JAX_NUM_PROCESSES and JAX_PROCESS_ID. Whatever is missing JAX detects on TPU VMs,
    SLURM, Open MPI and Kubernetes.
    """
    env = os.environ if env is None else env
    settings: dict[str, Any] = {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        settings["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
    for key, name in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        value = _env_int(env, name)
        if value is not None:
            settings[key] = value
    timeout = _env_int(env, "PDPO_DISTRIBUTED_TIMEOUT")
    if timeout is not None:
        settings["initialization_timeout"] = timeout
    return settings


def initialize_distributed(force: bool | None = None, **kwargs: Any) -> bool:
    """Calls jax.distributed.initialize() when the environment describes several processes: a TPU
    pod slice, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES, or PDPO_DISTRIBUTED=1
    (set by tpu/launch.sh). Settings come from `distributed_settings_from_env`, overridden by
    `kwargs`. Must run before any other JAX call; calling it again is harmless. Returns whether
    this process is part of an initialized multi-process run."""
    if jax.distributed.is_initialized():
        return True
    wanted = _env_says_multiprocess(os.environ) if force is None else force
    if not wanted:
        return False
    jax.distributed.initialize(**(distributed_settings_from_env() | kwargs))
    return True


def _batch_sharding_at(mesh: Mesh, batch_axis: int) -> NamedSharding:
    return NamedSharding(mesh, P(*([None] * batch_axis), BATCH_AXES))


def process_batch_indices(mesh: Mesh, global_batch_size: int, batch_axis: int = 0) -> np.ndarray:
    """The rows of a global batch this process feeds, in the order `place_batch(..., rows="local")` expects.

    With the mesh of `make_mesh` process p usually holds the contiguous block p, but a device
    order that interleaves hosts gives other rows; asking the sharding keeps a host's rows and the
    global array in step either way.
    """
    sharding = _batch_sharding_at(mesh, batch_axis)
    shape = (1,) * batch_axis + (global_batch_size,)
    rows: list[int] = []
    for index in sorted({idx[batch_axis].indices(global_batch_size) for idx in sharding.addressable_devices_indices_map(shape).values()}):
        rows.extend(range(*index))
    return np.asarray(rows, dtype=np.int64)


def host_rows(mesh: Mesh | None) -> Any:
    """`n -> indices` of the rows of an n-long batch axis this process feeds on `mesh`, or None
    when one process feeds everything."""
    if mesh is None or jax.process_count() == 1:
        return None
    # Asked for every array of every step, for a handful of lengths: each is worked out once.
    return functools.lru_cache(maxsize=None)(lambda n: process_batch_indices(mesh, n))


def place_batch(arrays: Any, mesh: Mesh | None, *, batch_axis: int = 0, rows: str = "global") -> Any:
    """Host arrays onto devices, axis `batch_axis` split over the mesh's batch axes.

    Without a mesh, onto this process's default device. `rows="global"`: every process passes
    the whole batch and each device takes its rows; `rows="local"`: each process passes only its
    own rows (`process_batch_indices`), as the training loop feeds a pod slice.
    """
    if mesh is None:
        return jax.device_put(arrays)
    sharding = _batch_sharding_at(mesh, batch_axis)
    if rows == "global":
        return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda index, x=x: np.asarray(x)[index]),
                            arrays)
    if rows != "local":
        raise ValueError(f"rows must be 'global' or 'local', not {rows!r}")
    if jax.process_count() == 1:
        return jax.device_put(arrays, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), arrays)


# ----------------------------------------------------------------------------- one run on several hosts
#
# Every host runs the same program over the same global batches; files are written by process 0
# alone (the run directory is one folder every host sees), and what decides the course of a run
# (which shards are missing, whether a stage already finished) is process 0's view, agreed on by all.


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0; the only one on one machine)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (nothing on one machine)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def agree(value: Any) -> Any:
    """Process 0's `value` (anything JSON can hold) on every process."""
    if jax.process_count() == 1:
        return value
    data = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_primary() else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int64(data.size)))
    padded = np.zeros(size, np.uint8)
    padded[: data.size] = data[:size]
    return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(padded))).decode())


def primary_decides(decide: Any, *args: Any, **kwargs: Any) -> Any:
    """`decide(...)` run on process 0 alone (it may read and write the run's files); every process
    returns its result, or raises: process 0 the error itself, the others RunFailed naming it."""
    if jax.process_count() == 1:
        return decide(*args, **kwargs)
    outcome: dict[str, Any] = {}
    failure = None
    if is_primary():
        try:
            outcome = {"value": decide(*args, **kwargs)}
        except Exception as error:  # every process must leave the collective below together
            failure = error
            outcome = {"error": f"{type(error).__name__}: {error}"}
    outcome = agree(outcome)
    if failure is not None:
        raise failure
    if "error" in outcome:
        raise RunFailed(f"process 0 stopped the run: {outcome['error']}")
    return outcome["value"]


def to_host(x: Any) -> np.ndarray:
    """A numpy copy of `x`; a global array spread over several hosts is gathered (a collective:
    every process calls it for the same array)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)
