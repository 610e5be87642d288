"""Device mesh, parameter / batch shardings and multi-host start-up, in one place.

Mesh axes: ``data`` (pure data parallelism) x ``fsdp`` (data parallelism whose parameters and optimizer state are
sharded). The batch is split over both axes. Parameter sharding is a short rule table: the first matching regex
on the leaf path gives the dimension sharded over ``fsdp`` (if it divides); everything else is replicated.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# (regex on the '/'-joined leaf path, dimension to shard over 'fsdp'); stacked layer params have L first.
FSDP_RULES: tuple[tuple[str, int], ...] = (
    (r"embed_VxD$", 0),
    (r"lm_head_DxV$", 1),
    (r"w[qkv]_LxDx.xH$", 1),
    (r"wo_LxNxHxD$", 3),
    (r"w_(gate|up)_LxDxF$", 2),
    (r"w_down_LxFxD$", 1),
)


def maybe_initialize_distributed() -> None:
    """Calls ``jax.distributed.initialize()`` when the environment describes a multi-process job.

    Set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or run under a cluster JAX auto-detects,
    e.g. SLURM / TPU pods with PROSPARSE_DISTRIBUTED=1).
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif os.environ.get("PROSPARSE_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def make_mesh(data: int = -1, fsdp: int = 1) -> Mesh:
    """A (data, fsdp) mesh over all devices; ``data=-1`` takes what fsdp leaves."""
    n = jax.device_count()
    if fsdp <= 0 or n % fsdp:
        raise ValueError(f"train.mesh_fsdp={fsdp} must be a positive divisor of the device count {n}")
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"train.mesh_data * train.mesh_fsdp = {data}*{fsdp} must equal the device count {n}")
    devices = np.asarray(jax.devices()).reshape(data, fsdp)
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


def accum_batch_sharding(mesh: Mesh) -> NamedSharding:
    """[grad_accum, micro_batch, ...] arrays: the micro-batch dimension split over data x fsdp."""
    return NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp")))

