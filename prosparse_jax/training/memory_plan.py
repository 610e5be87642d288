"""What a run config costs, without the hardware: size, FLOPs, warm-up and tokens (:func:`describe`), how much of the
parameters an fsdp axis shards (:func:`fsdp_coverage`) and the per-device memory of its train step on a mesh
(:func:`plan`; docs/scaling.md).

:func:`plan` compiles the step as training jits it, from abstract shapes (on abstract XLA:CPU devices when this process
has fewer than the mesh), and reads XLA's ``memory_analysis()``. Temporaries grow linearly with the micro-batch, so two
compiles give the line the suggested ``train.grad_accum`` comes from; one more verifies it.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh

from prosparse_jax.config import ModelConfig, RunConfig, wsd_decay_steps
from prosparse_jax.errors import UsageError
from prosparse_jax.model.transformer import abstract_params
from prosparse_jax.training import optim as optim_lib
from prosparse_jax.training import sharding as shard_lib
from prosparse_jax.training.step import abstract_train_state, jit_train_step

MESH_AXES = ("data", "fsdp")
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
# XLA:CPU without LLVM optimisation and with the classic IR emitters: practically the same buffer assignment, compiled
# much faster
FAST_CPU_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                    "xla_cpu_use_fusion_emitters": False}


# ---------------------------------------------------------------------------------------------------------------
# Size and cost
# ---------------------------------------------------------------------------------------------------------------
def describe(rc: RunConfig) -> dict[str, Any]:
    """Size / cost summary of a resolved run config; parameter counts from ``jax.eval_shape`` of the initialiser."""
    m = rc.model
    shapes = abstract_params(m)
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    embedding = math.prod(shapes["embed_VxD"].shape) + (
        math.prod(shapes["lm_head_DxV"].shape) if "lm_head_DxV" in shapes else 0
    )
    if total != m.params_total:  # the closed form (used by flops) must agree with the real initialiser
        raise AssertionError(f"parameter count mismatch: eval_shape {total} vs formula {m.params_total}")
    seq_len = rc.data.seq_len
    tokens_per_step = rc.train.batch_size * seq_len
    fpt = m.flops_per_token(seq_len)
    return {
        "params_total": total,
        "params_non_embedding": total - embedding,
        "params_embedding": embedding,
        "flops_per_token": fpt,
        "flops_per_token_note": "training: 6*N_matmul (non-embedding matrices + output head) + "
        "causal attention 6*L*n_heads*head_dim*(seq_len+1)",
        "d_model": m.d_model,
        "n_layers": m.n_layers,
        "n_heads": m.n_heads,
        "n_kv_heads": m.n_kv_heads,
        "head_dim": m.head_dim,
        "d_ff": m.d_ff,
        "vocab_size": m.vocab_size,
        "tie_embeddings": m.tie_embeddings,
        "activation": m.activation,
        "activation_threshold": m.activation_threshold,
        "minicpm_scales": {"scale_emb": m.scale_emb, "scale_depth": m.scale_depth,
                           "dim_model_base": m.dim_model_base},
        "dtype": m.dtype,
        "seq_len": seq_len,
        "global_batch": rc.train.batch_size,
        "tokens_per_step": tokens_per_step,
        "train_steps": rc.train.steps,
        "train_tokens": tokens_per_step * rc.train.steps,
        **_schedule_summary(rc, tokens_per_step),
        "train_flops": fpt * tokens_per_step * rc.train.steps,
        "param_bytes_fp32": 4 * total,
        "sparsity_stages": [list(s) for s in rc.sparsity.stages],
    }


def _schedule_summary(rc: RunConfig, tokens_per_step: int) -> dict[str, Any]:
    """Warm-up and, for ``wsd``, the stable phase (the steps a law fit should see) in steps and tokens."""
    o = rc.optim
    out: dict[str, Any] = {"lr_schedule": o.schedule, "warmup_steps": o.warmup_steps,
                           "warmup_tokens": o.warmup_steps * tokens_per_step}
    if o.schedule == "wsd":
        start = rc.train.steps - wsd_decay_steps(rc.train.steps, o.decay_fraction)
        out.update(decay_start_step=start, decay_steps=rc.train.steps - start, pre_decay_tokens=start * tokens_per_step)
    out.update(checkpoint_every=rc.train.checkpoint_every, keep_period=rc.train.keep_period)
    return out


def parse_mesh(text: str, what: str = "mesh") -> dict[str, int]:
    """``"data:2,fsdp:4"`` -> ``{"data": 2, "fsdp": 4}``; an axis left out has size 1. ``what``: the argument the
    text came from, which starts every error message."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen: set[str] = set()
    for part in text.split(","):
        name, sep, size = part.strip().partition(":")
        if name not in MESH_AXES:
            raise UsageError(f"{what}={text}: unknown axis {name!r}; the axes are {', '.join(MESH_AXES)} "
                             "(e.g. data:2,fsdp:4)")
        if not sep or not size.strip().isdigit() or int(size) <= 0:
            raise UsageError(f"{what}={text}: axis {name!r} needs a positive integer size (e.g. {name}:4)")
        if name in seen:
            raise UsageError(f"{what}={text}: axis {name!r} given twice")
        seen.add(name)
        sizes[name] = int(size)
    return sizes


def gb(n: float) -> float:
    """Bytes -> GB (10^9), rounded for printing."""
    return round(n / 1e9, 3)


# ---------------------------------------------------------------------------------------------------------------
# What fsdp shards
# ---------------------------------------------------------------------------------------------------------------
FSDP_MIN_SHARDED = 0.5  # fsdp > 1 sharding less than this fraction of the parameter bytes gets a note and a warning
_FSDP_ALTERNATIVES = range(2, 65)  # fsdp sizes the note may suggest


def _fsdp_split(params: Any, fsdp: int) -> tuple[int, list[tuple[str, tuple[int, ...], int]]]:
    """(sharded bytes, replicated leaves as (name, shape, bytes)) of ``params`` under ``FSDP_RULES`` at ``fsdp``."""
    specs = shard_lib.param_specs(params, fsdp)
    is_sharded = jax.tree.leaves(jax.tree.map(lambda leaf, spec: "fsdp" in tuple(spec), params, specs))
    sharded, replicated = 0, []
    for (path, leaf), split in zip(jax.tree_util.tree_flatten_with_path(params)[0], is_sharded, strict=True):
        nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        if split:
            sharded += nbytes
        else:
            replicated.append((jax.tree_util.keystr(path, simple=True, separator="/"), tuple(leaf.shape), nbytes))
    return sharded, replicated


def _size(n: float) -> str:
    return f"{n / 1e9:.3g} GB" if n >= 1e9 else f"{n / 1e6:.3g} MB"


def fsdp_coverage(model: ModelConfig, fsdp: int) -> dict[str, Any]:
    """How many parameter bytes an fsdp axis of ``fsdp`` devices shards (``sharding.FSDP_RULES``) and how many every
    device holds whole: a leaf is split only where ``fsdp`` divides its rule's dimension; the optimizer state follows
    the parameters. ``note``: one line when fsdp > 1 shards less than :data:`FSDP_MIN_SHARDED` of the bytes, else
    None."""
    params = abstract_params(model)
    sharded, replicated = _fsdp_split(params, fsdp)
    rep_bytes = sum(b for *_, b in replicated)
    total = sharded + rep_bytes
    per_device = sharded // fsdp + rep_bytes
    replicated.sort(key=lambda r: -r[2])
    out: dict[str, Any] = {
        "fsdp": fsdp, "param_bytes": total, "sharded_bytes": sharded, "replicated_bytes": rep_bytes,
        "sharded_fraction": round(sharded / total, 4), "per_device_param_bytes": per_device,
        "replicated_leaves": [f"{name} {list(shape)}" for name, shape, _ in replicated], "note": None}
    if fsdp > 1 and sharded < FSDP_MIN_SHARDED * total:
        better = [(k, _fsdp_split(params, k)[0] / total) for k in _FSDP_ALTERNATIVES if k != fsdp]
        better = sorted((kf for kf in better if kf[1] > sharded / total), key=lambda kf: (-kf[1], kf[0]))[:4]
        biggest = ", ".join(f"{name} {list(shape)}" for name, shape, _ in replicated[:3])
        more = f" and {len(replicated) - 3} more leaves" if len(replicated) > 3 else ""
        out["note"] = (
            f"fsdp={fsdp} shards {sharded / total:.1%} of the parameter bytes ({_size(sharded)} of {_size(total)}); "
            f"each device holds {_size(per_device)} of parameters ({per_device / total:.0%} of the model) and the "
            f"matching optimizer state: {biggest}{more} have no dimension that both FSDP_RULES shards "
            f"(prosparse_jax/training/sharding.py) and {fsdp} divides"
            + ("; fsdp sizes that shard more: " + ", ".join(f"{k} ({f:.1%})" for k, f in better) if better else ""))
    return out


def warn_fsdp_coverage(model: ModelConfig, fsdp: int) -> dict[str, Any]:
    """:func:`fsdp_coverage`, its note (if any) issued as a :class:`UserWarning`: for :func:`plan`, and for a training
    run on its mesh at start-up."""
    cov = fsdp_coverage(model, fsdp)
    if cov["note"]:
        warnings.warn(cov["note"], UserWarning, stacklevel=2)
    return cov


# ---------------------------------------------------------------------------------------------------------------
# Devices and one compiled step
# ---------------------------------------------------------------------------------------------------------------
def plan_devices(n: int) -> list[Any]:
    """``n`` devices to compile for: this process's own when it has that many, else ``n`` abstract devices of a second
    XLA:CPU client (JAX cannot change its device count after start-up; ``jax.experimental.topologies`` needs a TPU/GPU
    PJRT plugin)."""
    if jax.device_count() >= n:
        return jax.devices()[:n]
    try:
        from jax._src.lib import xla_client  # jax 0.10.2: no public way to a CPU client of n devices

        return list(xla_client.make_cpu_client(num_devices=n).devices())
    except (ImportError, AttributeError, TypeError) as e:
        raise UsageError(f"cannot create {n} abstract CPU devices ({e}); rerun with "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={n} JAX_PLATFORMS=cpu") from e


def make_plan_mesh(mesh_shape: dict[str, int]) -> Mesh:
    """The (data, fsdp) mesh of :func:`prosparse_jax.training.sharding.make_mesh`, over :func:`plan_devices`."""
    sizes = tuple(mesh_shape.get(a, 1) for a in MESH_AXES)
    devices = np.asarray(plan_devices(math.prod(sizes))).reshape(sizes)
    return Mesh(devices, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def compile_attention(rc: RunConfig, platform: str) -> RunConfig:
    """``rc`` with an attention backend that compiles on ``platform``: XLA:CPU cannot compile cuDNN or splash
    kernels, so a CPU plan runs ``xla_blocks`` (what ``auto`` is on CPU)."""
    if platform == "cpu" and rc.model.attention not in ("xla_blocks", "xla"):
        return dataclasses.replace(rc, model=dataclasses.replace(rc.model, attention="xla_blocks"))
    return rc


def _attention_line(rc: RunConfig, platform: str) -> str:
    asked, compiled = rc.model.attention, compile_attention(rc, platform).model.attention
    return compiled if asked in (compiled, "auto") else f"{compiled} (model.attention={asked!r} has no XLA:CPU kernel)"


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


def compile_memory(rc: RunConfig, mesh: Mesh, grad_accums: list[int], compiled: dict[tuple[Any, ...], Any],
                   compiler_options: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Per-device memory of the compiled train step for each ``train.grad_accum`` (the global batch kept).

    Lowered one after another (tracing holds the GIL), compiled two at a time. ``compiled`` holds earlier results
    (looked up and extended here), keyed by config, mesh, options and grad_accum."""
    rc = compile_attention(rc, mesh.devices.flat[0].platform)
    key = lambda a: (repr(rc), repr(mesh.devices.tolist()), repr(sorted(compiler_options.items())), a)  # noqa: E731
    todo = [a for a in dict.fromkeys(grad_accums) if key(a) not in compiled]
    tx, lr_fn = optim_lib.make_optimizer(rc.optim, rc.train.steps, rc.model.d_model)
    state = abstract_train_state(rc.model, tx, mesh)
    step_fn = jit_train_step(rc, tx, lr_fn, state, mesh)

    def build(a: int) -> tuple[int, Any, dict[str, Any], float]:
        t = time.perf_counter()
        batch = abstract_batch(rc, a, mesh)
        return a, step_fn.lower(state, batch), batch, t

    def finish(job: tuple[int, Any, dict[str, Any], float]) -> None:
        a, lowered, batch, t = job
        exe = lowered.compile(compiler_options=compiler_options)
        m = exe.memory_analysis()
        out = {"arguments": m.argument_size_in_bytes, "params": sharded_bytes(state["params"]),
               "opt_state": sharded_bytes(state["opt_state"]), "batch": sharded_bytes(batch),
               "outputs": m.output_size_in_bytes, "aliased": m.alias_size_in_bytes,
               "temporaries": m.temp_size_in_bytes, "generated_code": m.generated_code_size_in_bytes}
        # a donated output reuses its argument's buffer: count it once
        out["total"] = (out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
                        + out["generated_code"])
        compiled[key(a)] = {"bytes": out, "not_donated": _not_donated(state, exe.output_shardings[0]),
                            "seconds": round(time.perf_counter() - t, 1)}  # lowering + compile

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(finish, [build(a) for a in todo]))
    return {a: compiled[key(a)] for a in grad_accums}


# ---------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------
def plan(rc: RunConfig, mesh_shape: dict[str, int], device_memory_bytes: int | None = None, *,
         compiled: dict[tuple[Any, ...], Any] | None = None,
         compiler_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per-device memory of ``rc``'s train step on a ``mesh_shape`` mesh (e.g. ``{"data": 2, "fsdp": 4}``), whether
    it fits ``device_memory_bytes`` and the smallest ``train.grad_accum`` (largest per-device micro-batch) that fits.

    Args:
      mesh_shape: axis -> size; an axis left out has size 1.
      device_memory_bytes: the memory of one device to fit; None: no fit and no suggestion.
      compiled: compile results to reuse and extend (a dict the caller keeps across calls); None: a fresh one.
      compiler_options: XLA compiler options; None: :data:`FAST_CPU_COMPILE` on CPU, XLA's defaults elsewhere.

    Raises:
      UsageError: an unknown mesh axis, a non-positive size or memory.
      ConfigError: the micro-batch does not split over the mesh's devices.
    """
    t0 = time.perf_counter()
    if set(mesh_shape) - set(MESH_AXES) or any(not isinstance(v, int) or v <= 0 for v in mesh_shape.values()):
        raise UsageError(f"mesh {mesh_shape}: the axes are {', '.join(MESH_AXES)}, with positive integer sizes")
    if device_memory_bytes is not None and device_memory_bytes <= 0:
        raise UsageError(f"device memory {device_memory_bytes}: must be a positive number of bytes")
    mesh_shape = {a: mesh_shape.get(a, 1) for a in MESH_AXES}
    shard_lib.check_batch_split(rc.train.batch_size, rc.train.grad_accum, mesh_shape)
    mesh = make_plan_mesh(mesh_shape)
    device = mesh.devices.flat[0]
    if compiler_options is None:
        compiler_options = FAST_CPU_COMPILE if device.platform == "cpu" else {}
    compiled = {} if compiled is None else compiled
    n, grad_accum = mesh.devices.size, rc.train.grad_accum
    per_device = rc.train.batch_size // n  # sequences per device and optimizer step, split into grad_accum micro-steps

    def compile_for(micros: list[int]) -> dict[int, dict[str, Any]]:
        """Compile results keyed by per-device micro-batch."""
        out = compile_memory(rc, mesh, [per_device // b for b in micros], compiled, compiler_options)
        return {per_device // a: r for a, r in out.items()}

    candidates = shard_lib.divisors(per_device)  # per-device micro-batches b; grad_accum = per_device / b
    micro = per_device // grad_accum
    probe = [] if device_memory_bytes is None or per_device == 1 else [1 if micro != 1 else candidates[1]]
    by_micro = compile_for([micro, *probe])  # the configured micro-batch, and a probe for the line when fitting
    kind = "abstract XLA:CPU" if device.platform == "cpu" else device.device_kind
    out: dict[str, Any] = {
        "mesh": mesh_shape, "devices": n, "compiled_for": f"{device.platform} ({n} {kind} devices)",
        "attention": _attention_line(rc, device.platform),
        "global_batch": rc.train.batch_size, "grad_accum": grad_accum, "per_device_batch": micro,
        "seq_len": rc.data.seq_len, "per_device_bytes": by_micro[micro]["bytes"],
        "per_device_GB": {k: gb(v) for k, v in by_micro[micro]["bytes"].items()},
        "not_donated": by_micro[micro]["not_donated"],
        "fsdp_sharding": warn_fsdp_coverage(rc.model, mesh_shape["fsdp"]),
    }
    if device_memory_bytes is not None:
        out.update(_fit(rc, n, device_memory_bytes, by_micro, candidates, compile_for))
    out["compiles"] = [{"grad_accum": per_device // b, "per_device_batch": b, "total_GB": gb(r["bytes"]["total"]),
                        "seconds": r["seconds"]} for b, r in sorted(by_micro.items())]
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["note"] = EXACT + (CPU_CAVEATS if device.platform == "cpu" else
                           f"Temporaries are XLA:{device.platform.upper()}'s own buffer assignment. ") + RESERVES
    return out


def _fit(rc: RunConfig, n: int, budget: int, by_micro: dict[int, dict[str, Any]], candidates: list[int],
         compile_for: Any) -> dict[str, Any]:
    """Whether it fits ``budget``; the line total(b) = fixed + per_sequence * b through the compiled per-device
    micro-batches ``by_micro`` (b -> compile result; extended here); the largest b dividing the per-device batch
    that the line says fits, verified by compiling it (stepping down, two compiles at most)."""
    per_device = candidates[-1]
    total = lambda b: by_micro[b]["bytes"]["total"]  # noqa: E731
    out: dict[str, Any] = {"device_memory_bytes": budget, "device_memory_GB": gb(budget),
                           "fits": total(per_device // rc.train.grad_accum) <= budget}
    if len(by_micro) == 2:
        (b1, r1), (b2, r2) = sorted(by_micro.items())
        slope = (r2["bytes"]["total"] - r1["bytes"]["total"]) / (b2 - b1)  # bytes per sequence per device
        fixed = r1["bytes"]["total"] - slope * b1
        out["per_sequence_bytes"] = int(slope)
        out["largest_per_device_batch"] = max(0, int((budget - fixed) // slope)) if slope > 0 else None
    else:  # one sequence per device: nothing to split
        slope, fixed = 0.0, float(total(per_device))
    n_compiled, picks = 0, sorted((b for b in candidates if fixed + slope * b <= budget), reverse=True)
    for b in picks:
        if b not in by_micro:
            if n_compiled == 2:
                return dict(out, suggestion=None, advice=(
                    f"the line's picks did not fit when compiled; try --config.train.grad_accum={per_device // b}"))
            n_compiled += 1
            by_micro.update(compile_for([b]))
        if total(b) <= budget:
            return dict(out, suggestion={"grad_accum": per_device // b, "per_device_batch": b, "micro_batch": b * n,
                                         "total_bytes": total(b), "total_GB": gb(total(b)), "verified_by_compile": True,
                                         "override": f"--config.train.grad_accum={per_device // b}"})
    return dict(out, suggestion=None, advice=(
        f"does not fit even at 1 sequence per device per micro-step ({gb(fixed + slope)} GB, ~{gb(max(fixed, 0))} GB "
        "of it independent of the batch): use a larger fsdp axis or a shorter data.seq_len"
        + ("" if rc.model.remat else ", or set model.remat=True")))
