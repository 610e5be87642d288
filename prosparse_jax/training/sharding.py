"""Device mesh, parameter / batch shardings and host <-> global-array transfers, in one place.

Mesh axes ``data`` x ``fsdp``; the batch is split over both, parameters and optimizer state over ``fsdp`` by
``FSDP_RULES`` (the first regex matching the leaf path names the dimension; no match or no divisor: replicated). With
several processes the mesh spans all their devices and each process puts its own rows of a batch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from prosparse_jax.errors import ConfigError

# (regex on the '/'-joined leaf path, dimension to shard over 'fsdp'); stacked layer params have L first.
FSDP_RULES: tuple[tuple[str, int], ...] = (
    (r"embed_VxD$", 0),
    (r"lm_head_DxV$", 1),
    (r"w[qkv]_LxDx.xH$", 1),
    (r"wo_LxNxHxD$", 3),
    (r"w_(gate|up)_LxDxF$", 2),
    (r"w_down_LxFxD$", 1),
)


def divisors(n: int) -> list[int]:
    """The divisors of ``n``, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


def make_mesh(data: int = -1, fsdp: int = 1) -> Mesh:
    """A (data, fsdp) mesh over all devices (of all processes); ``data=-1`` takes what fsdp leaves.

    Raises:
      ConfigError: the axes do not multiply to the device count; the message lists the sizes that do.
    """
    n = jax.device_count()
    if fsdp <= 0 or n % fsdp:
        raise ConfigError(f"train.mesh_fsdp={fsdp} must divide the {n} devices; choose one of "
                          f"{', '.join(map(str, divisors(n)))}")
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise ConfigError(f"train.mesh_data * train.mesh_fsdp = {data}*{fsdp} must equal the {n} devices; set "
                          f"train.mesh_data={n // fsdp} (or -1: what mesh_fsdp leaves)")
    devices = np.asarray(jax.devices()).reshape(data, fsdp)  # process-major: a process's devices are neighbours
    return Mesh(devices, ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto))


def _path_str(path: tuple[Any, ...]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def param_specs(params: Any, fsdp_size: int) -> Any:
    """PartitionSpecs for a params (or same-structured) pytree from ``FSDP_RULES``."""

    def spec(path: tuple[Any, ...], leaf: Any) -> PartitionSpec:
        name = _path_str(path)
        shape = getattr(leaf, "shape", ())
        for pattern, dim in FSDP_RULES:
            if re.search(pattern, name) and dim < len(shape) and shape[dim] % fsdp_size == 0 and fsdp_size > 1:
                axes: list[str | None] = [None] * len(shape)
                axes[dim] = "fsdp"
                return PartitionSpec(*axes)
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec, params)


def shardings_like(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for any pytree (e.g. optimizer state): leaves shaped like a param get its spec."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(tree, fsdp))


def check_batch_split(batch_size: int, grad_accum: int, mesh_shape: Mapping[str, int]) -> None:
    """The micro-batch (``batch_size / grad_accum`` sequences) must split evenly over the mesh's data x fsdp devices.

    Raises:
      ConfigError: naming the numbers and the batch sizes that split.
    """
    n, micro = math.prod(mesh_shape.values()), batch_size // grad_accum
    if micro % n:
        mesh = ",".join(f"{k}:{v}" for k, v in mesh_shape.items())
        raise ConfigError(f"train.batch_size / train.grad_accum = {batch_size}/{grad_accum} = {micro} sequences per "
                          f"micro-step do not split over the {n} devices of the mesh {mesh}; set train.batch_size to "
                          f"a multiple of {n * grad_accum} (or use a mesh whose data x fsdp divides {micro})")


def accum_batch_sharding(mesh: Mesh) -> NamedSharding:
    """[grad_accum, micro_batch, ...] arrays: the micro-batch dimension split over data x fsdp."""
    return NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp")))


def batch_sharding(mesh: Mesh, n_rows: int) -> NamedSharding:
    """[rows, ...] arrays: rows split over data x fsdp when they divide, else replicated."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")) if n_rows % n == 0 else PartitionSpec())


def host_batch_to_global(tree: Any, sharding: NamedSharding) -> Any:
    """This process's rows (numpy) -> global arrays whose rows are every process's rows, in process order."""
    return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding, v), tree)


def replicated_batch_to_global(tree: Any, mesh: Mesh) -> Any:
    """The same numpy batch on every process (eval batches) -> global arrays, rows split over the mesh
    (:func:`batch_sharding`); each device receives only its rows."""

    def put(v: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(v.shape, batch_sharding(mesh, v.shape[0]), lambda idx: v[idx])

    return jax.tree.map(put, tree)


def to_host(tree: Any) -> Any:
    """numpy values of a pytree of (possibly multi-process) arrays: replicated ones are read from a local copy, others
    gathered from every process (all processes must call it then)."""

    def get(x: Any) -> Any:
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)
