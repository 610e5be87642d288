"""Ahead-of-time memory plan of the train step for a mesh, without the hardware.

    python -m prosparse_jax.main.describe --config=configs/sparsing_law.py:1.2b-relu --mesh=data:2,fsdp:4 \\
        --device_memory=80GB

:func:`plan` compiles exactly what :mod:`prosparse_jax.training.train` compiles -- ``jax.jit(make_train_step(...),
donate_argnums=0)`` on the FSDP-sharded params / optimizer state and a ``[grad_accum, micro_batch, seq_len]`` batch
sharded like :func:`prosparse_jax.training.sharding.accum_batch_sharding` -- from abstract shapes only (nothing is allocated),
and reads XLA's per-device ``memory_analysis()``. When this process has fewer devices than the mesh (a laptop, a
one-GPU box), it compiles for that many abstract XLA:CPU devices. Argument bytes (params, optimizer state, batch)
are exact; temporaries are XLA:CPU's buffer assignment, an estimate of a GPU's or TPU's (see ``CPU_CAVEATS``).

The suggestion keeps the global batch and picks the smallest ``train.grad_accum`` (the largest per-device micro-batch)
that fits: temporaries grow linearly with the micro-batch, so two compiles give the line, and one more verifies the
pick.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from prosparse_jax.config import ConfigError, RunConfig
from prosparse_jax.model.transformer import abstract_params, unstack_layers
from prosparse_jax.training import optim as optim_lib
from prosparse_jax.training import schedules
from prosparse_jax.training import sharding as shard_lib
from prosparse_jax.training.step import make_train_step

MESH_AXES = ("data", "fsdp")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
BATCH_KEYS = (("inputs", jnp.int32), ("targets", jnp.int32), ("segment_ids", jnp.int32),
              ("positions", jnp.int32), ("weights", jnp.float32))  # prosparse_jax.data.pipeline's features
EXACT = "argument bytes (params, optimizer state, batch) are exact on any backend: shapes x dtype / sharding. "
RESERVES = ("Not included: runtime reserves (JAX on GPU preallocates 75% of the card by default, "
            "XLA_PYTHON_CLIENT_MEM_FRACTION: pass the usable memory, e.g. --device_memory=60GB on an 80GB card) and "
            "allocator fragmentation; keep ~10-20% headroom.")
CPU_CAVEATS = ("Temporaries are XLA:CPU's buffer assignment, an estimate for GPU/TPU, where XLA fuses and "
               "rematerialises differently, pads TPU layouts to (8,128) tiles, adds cuDNN workspaces, collective "
               "(NCCL) buffers and memory-space assignment; attention compiles as xla_blocks, while model.attention="
               "'auto' runs cuDNN flash (GPU) or splash (TPU) attention, whose O(T) memory is lower. ")
# XLA:CPU code generation without LLVM optimisation and with the classic IR emitters: the same buffer assignment
# (within a few hundred bytes), a ~3x faster compile (tests/test_memory_plan.py compares the two)
FAST_CPU_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                    "xla_cpu_use_fusion_emitters": False}


class PlanError(ValueError):
    """A ``--mesh`` or ``--device_memory`` that cannot be read; the message names the flag and the valid form."""


# ---------------------------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------------------------
def parse_mesh(text: str) -> dict[str, int]:
    """``"data:2,fsdp:4"`` -> ``{"data": 2, "fsdp": 4}``; an axis left out has size 1."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen: set[str] = set()
    for part in text.split(","):
        name, sep, size = part.strip().partition(":")
        if name not in MESH_AXES:
            raise PlanError(f"--mesh={text}: unknown axis {name!r}; the axes are {', '.join(MESH_AXES)} "
                            "(e.g. --mesh=data:2,fsdp:4)")
        if not sep or not size.strip().isdigit() or int(size) <= 0:
            raise PlanError(f"--mesh={text}: axis {name!r} needs a positive integer size (e.g. {name}:4)")
        if name in seen:
            raise PlanError(f"--mesh={text}: axis {name!r} given twice")
        seen.add(name)
        sizes[name] = int(size)
    return sizes


def parse_bytes(text: str) -> int:
    """``"80GB"`` (10^9 bytes) / ``"80GiB"`` (2^30) / ``"512MB"`` / ``"512MiB"`` -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]i?B|B)\s*", text, flags=re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise PlanError(f"--device_memory={text}: expected a positive size with a unit, e.g. 80GB, 80GiB or "
                        "512MB (GB = 10^9 bytes, GiB = 2^30)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def gb(n: float) -> float:
    """Bytes -> GB (10^9), rounded for printing."""
    return round(n / 1e9, 3)


# ---------------------------------------------------------------------------------------------------------------
# Devices, abstract state and one compiled step
# ---------------------------------------------------------------------------------------------------------------
def plan_devices(n: int) -> list[Any]:
    """``n`` devices to compile for: this process's own when it has that many (a real 8-GPU host: exact for it),
    else ``n`` abstract devices of a second XLA:CPU client (nothing runs on them; JAX cannot change its own device
    count after start-up, and ``jax.experimental.topologies`` needs a TPU/GPU PJRT plugin)."""
    if jax.device_count() >= n:
        return jax.devices()[:n]
    try:
        from jax._src.lib import xla_client  # jax 0.10.2: no public way to a CPU client of n devices

        return list(xla_client.make_cpu_client(num_devices=n).devices())
    except (ImportError, AttributeError, TypeError) as e:
        raise PlanError(f"cannot create {n} abstract CPU devices ({e}); rerun with "
                        f"XLA_FLAGS=--xla_force_host_platform_device_count={n} JAX_PLATFORMS=cpu") from e


def make_plan_mesh(mesh_shape: dict[str, int]) -> Mesh:
    """The (data, fsdp) mesh of :func:`prosparse_jax.training.sharding.make_mesh`, over :func:`plan_devices`."""
    sizes = tuple(mesh_shape.get(a, 1) for a in MESH_AXES)
    devices = np.asarray(plan_devices(math.prod(sizes))).reshape(sizes)
    return Mesh(devices, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def check_batch(rc: RunConfig, mesh_shape: dict[str, int]) -> None:
    """The micro-batch must split evenly over the mesh's data x fsdp devices (train's start-up requires it)."""
    n = math.prod(mesh_shape.values())
    B, A = rc.train.batch_size, rc.train.grad_accum
    if (B // A) % n:
        mesh = ",".join(f"{k}:{v}" for k, v in mesh_shape.items())
        raise ConfigError(f"train.batch_size / train.grad_accum = {B}/{A} = {B // A} sequences per micro-step do not "
                          f"split over the {n} devices of --mesh={mesh}; choose a mesh whose data x fsdp divides "
                          f"{B // A}, or set --config.train.batch_size (and --config.train.grad_accum) so that "
                          f"batch_size / grad_accum is a multiple of {n}")


def compile_attention(rc: RunConfig, platform: str) -> RunConfig:
    """``rc`` with an attention backend that compiles on ``platform``: XLA:CPU cannot compile cuDNN or splash
    kernels, so a CPU plan runs ``xla_blocks`` (what ``auto`` is on CPU)."""
    if platform == "cpu" and getattr(rc.model, "attention", "xla_blocks") not in ("xla_blocks", "xla"):
        return dataclasses.replace(rc, model=dataclasses.replace(rc.model, attention="xla_blocks"))
    return rc


def _attention_line(rc: RunConfig, platform: str) -> str:
    asked, compiled = (getattr(x.model, "attention", "xla_blocks") for x in (rc, compile_attention(rc, platform)))
    return compiled if asked in (compiled, "auto") else f"{compiled} (model.attention={asked!r} has no XLA:CPU kernel)"


def abstract_state(rc: RunConfig, tx: Any, mesh: Mesh) -> dict[str, Any]:
    """The train state as the jitted step receives it (train's ``_init_state`` + ``step.place_state``):
    ShapeDtypeStructs carrying the FSDP shardings of :func:`prosparse_jax.training.sharding.shardings_like`."""
    params = abstract_params(rc.model)
    tree = (params, jax.eval_shape(tx.init, params))
    if not rc.model.scan_layers:  # the per-layer training layout (step.to_per_layer)
        tree = jax.eval_shape(unstack_layers, tree)
    with_sh = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
    params, opt_state = jax.tree.map(with_sh, tree, shard_lib.shardings_like(tree, mesh))
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))
    return {"params": params, "opt_state": opt_state, "step": step}


def abstract_batch(rc: RunConfig, grad_accum: int, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The ``[grad_accum, micro_batch, seq_len]`` batch of train's ``to_device``, sharded over data x fsdp."""
    shape = (grad_accum, rc.train.batch_size // grad_accum, rc.data.seq_len)
    sh = shard_lib.accum_batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(shape, dt, sharding=sh) for k, dt in BATCH_KEYS}


def sharded_bytes(tree: Any) -> int:
    """Per-device bytes of a pytree of sharded ShapeDtypeStructs (shard shape x itemsize, summed)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _not_donated(state: dict[str, Any], out_state: Any) -> list[str]:
    """State leaves the step returns with another sharding than it received: their donation fails (both copies
    live), and the next step compiles again for the new sharding."""
    names = []
    for (path, a), o in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(out_state), strict=True):
        if not o.is_equivalent_to(a.sharding, len(a.shape)):
            names.append(jax.tree_util.keystr(path, simple=True, separator="/"))
    return names


_COMPILED: dict[tuple[Any, ...], dict[str, Any]] = {}  # (rc, mesh, grad_accum) -> compile_memory's result


def compile_memory(rc: RunConfig, mesh: Mesh, grad_accums: list[int]) -> dict[int, dict[str, Any]]:
    """Per-device memory of the compiled train step for each ``train.grad_accum`` (the global batch kept).

    Lowered one after another (tracing holds the GIL), compiled two at a time; cached per process."""
    rc = compile_attention(rc, mesh.devices.flat[0].platform)
    key = lambda a: (repr(rc), repr(mesh.devices.tolist()), a)  # noqa: E731
    todo = [a for a in dict.fromkeys(grad_accums) if key(a) not in _COMPILED]
    tx, lr_fn = optim_lib.make_optimizer(rc.optim, rc.train.steps, rc.model.d_model)
    state = abstract_state(rc, tx, mesh)
    # as train jits it: the state keeps its shardings (donation holds), metrics replicated
    out_sh = (jax.tree.map(lambda x: x.sharding, state), NamedSharding(mesh, PartitionSpec()))
    step_fn = jax.jit(make_train_step(rc, tx, lr_fn, schedules.reg_factor_schedule(rc.sparsity.stages)),
                      donate_argnums=(0,), out_shardings=out_sh)
    opts = FAST_CPU_COMPILE if mesh.devices.flat[0].platform == "cpu" else {}

    def build(a: int) -> tuple[int, Any, dict[str, Any], float]:
        t = time.perf_counter()
        batch = abstract_batch(rc, a, mesh)
        return a, step_fn.lower(state, batch), batch, t

    def finish(job: tuple[int, Any, dict[str, Any], float]) -> None:
        a, lowered, batch, t = job
        compiled = lowered.compile(compiler_options=opts)
        m = compiled.memory_analysis()
        out = {"arguments": m.argument_size_in_bytes, "params": sharded_bytes(state["params"]),
               "opt_state": sharded_bytes(state["opt_state"]), "batch": sharded_bytes(batch),
               "outputs": m.output_size_in_bytes, "aliased": m.alias_size_in_bytes,
               "temporaries": m.temp_size_in_bytes, "generated_code": m.generated_code_size_in_bytes}
        # a donated output reuses its argument's buffer: count it once
        out["total"] = (out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
                        + out["generated_code"])
        _COMPILED[key(a)] = {"bytes": out, "not_donated": _not_donated(state, compiled.output_shardings[0]),
                             "seconds": round(time.perf_counter() - t, 1)}  # lowering + compile

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(finish, [build(a) for a in todo]))
    return {a: _COMPILED[key(a)] for a in grad_accums}


# ---------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan(rc: RunConfig, mesh_shape: dict[str, int], device_memory_bytes: int | None = None) -> dict[str, Any]:
    """Per-device memory of ``rc``'s train step on a ``mesh_shape`` mesh (e.g. ``{"data": 2, "fsdp": 4}``), whether
    it fits ``device_memory_bytes`` and the smallest ``train.grad_accum`` (largest per-device micro-batch) that fits.

    Raises:
      PlanError: an unknown mesh axis or a non-positive size.
      ConfigError: the micro-batch does not split over the mesh's devices.
    """
    t0 = time.perf_counter()
    if set(mesh_shape) - set(MESH_AXES) or any(not isinstance(v, int) or v <= 0 for v in mesh_shape.values()):
        raise PlanError(f"mesh {mesh_shape}: the axes are {', '.join(MESH_AXES)}, with positive integer sizes")
    if device_memory_bytes is not None and device_memory_bytes <= 0:
        raise PlanError(f"device memory {device_memory_bytes}: must be a positive number of bytes")
    mesh_shape = {a: mesh_shape.get(a, 1) for a in MESH_AXES}
    check_batch(rc, mesh_shape)
    mesh = make_plan_mesh(mesh_shape)
    n, A0, device = mesh.devices.size, rc.train.grad_accum, mesh.devices.flat[0]
    per_device = rc.train.batch_size // n  # sequences per device and optimizer step, split into grad_accum micro-steps
    candidates = _divisors(per_device)  # per-device micro-batches b; grad_accum = per_device / b
    b0 = per_device // A0
    probe = [] if device_memory_bytes is None or per_device == 1 else [1 if b0 != 1 else candidates[1]]
    # per-device micro-batch b -> its compile (the configured one, and a probe for the line when fitting)
    runs = {per_device // a: r for a, r in compile_memory(rc, mesh, [A0] + [per_device // b for b in probe]).items()}
    kind = "abstract XLA:CPU" if device.platform == "cpu" else device.device_kind
    out: dict[str, Any] = {
        "mesh": mesh_shape, "devices": n, "compiled_for": f"{device.platform} ({n} {kind} devices)",
        "attention": _attention_line(rc, device.platform),
        "global_batch": rc.train.batch_size, "grad_accum": A0, "per_device_batch": b0, "seq_len": rc.data.seq_len,
        "per_device_bytes": runs[b0]["bytes"], "per_device_GB": {k: gb(v) for k, v in runs[b0]["bytes"].items()},
        "not_donated": runs[b0]["not_donated"],
    }
    if device_memory_bytes is not None:
        out.update(_fit(rc, mesh, device_memory_bytes, runs, candidates))
    out["compiles"] = [{"grad_accum": per_device // b, "per_device_batch": b, "total_GB": gb(r["bytes"]["total"]),
                        "seconds": r["seconds"]} for b, r in sorted(runs.items())]
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["note"] = EXACT + (CPU_CAVEATS if device.platform == "cpu" else
                           f"Temporaries are XLA:{device.platform.upper()}'s own buffer assignment. ") + RESERVES
    return out


def _fit(rc: RunConfig, mesh: Mesh, budget: int, runs: dict[int, dict[str, Any]], candidates: list[int]
         ) -> dict[str, Any]:
    """Whether it fits ``budget``; the line total(b) = fixed + per_sequence * b through the compiled per-device
    micro-batches ``runs`` (b -> compile_memory's result; extended here); the largest b dividing the per-device batch
    that the line says fits, verified by compiling it (stepping down, two compiles at most)."""
    per_device, n = candidates[-1], mesh.devices.size
    total = lambda b: runs[b]["bytes"]["total"]  # noqa: E731
    out: dict[str, Any] = {"device_memory_bytes": budget, "device_memory_GB": gb(budget),
                           "fits": total(per_device // rc.train.grad_accum) <= budget}
    if len(runs) == 2:
        (b1, r1), (b2, r2) = sorted(runs.items())
        slope = (r2["bytes"]["total"] - r1["bytes"]["total"]) / (b2 - b1)  # bytes per sequence per device
        fixed = r1["bytes"]["total"] - slope * b1
        out["per_sequence_bytes"] = int(slope)
        out["largest_per_device_batch"] = max(0, int((budget - fixed) // slope)) if slope > 0 else None
    else:  # one sequence per device: nothing to split
        slope, fixed = 0.0, float(total(per_device))
    compiled, picks = 0, sorted((b for b in candidates if fixed + slope * b <= budget), reverse=True)
    for b in picks:
        if b not in runs:
            if compiled == 2:
                return dict(out, suggestion=None, advice=(
                    f"the line's picks did not fit when compiled; try --config.train.grad_accum={per_device // b}"))
            compiled += 1
            runs[b] = compile_memory(rc, mesh, [per_device // b])[per_device // b]
        if total(b) <= budget:
            return dict(out, suggestion={"grad_accum": per_device // b, "per_device_batch": b, "micro_batch": b * n,
                                         "total_bytes": total(b), "total_GB": gb(total(b)), "verified_by_compile": True,
                                         "override": f"--config.train.grad_accum={per_device // b}"})
    return dict(out, suggestion=None, advice=(
        f"does not fit even at 1 sequence per device per micro-step ({gb(fixed + slope)} GB, ~{gb(max(fixed, 0))} GB "
        "of it independent of the batch): use a larger fsdp axis or a shorter data.seq_len"
        + ("" if rc.model.remat else ", or set model.remat=True")))
