"""ProSparse's sparse operators S2 / S3 (§4.3) as Pallas kernels against the dense GEMVs, on a GPU or TPU.

    python experiments/bench_pallas_ffn.py                          # 7B and 13B FFN shapes, 88%, batch 1, bf16
    python experiments/bench_pallas_ffn.py --shapes=4096x11008 --sparsity=0.9 --reps=50
    python experiments/bench_pallas_ffn.py --interpret --shapes=128x352 --reps=1   # CPU smoke run (no timing value)
    python experiments/bench_pallas_ffn.py --tune --shapes=4096x11008    # sweep block_f / block_d / num_warps
    python experiments/bench_pallas_ffn.py --timing=slope    # one method only (cupti, slope, dispatch; comma list)
    python experiments/bench_pallas_ffn.py --implementation=pallas_triton,pallas_compact   # backends side by side

What is timed. Each operator runs on ``--layers`` (L, default 8) independent layers: distinct random weights and
inputs generated on the device with ``jax.random``, each with exactly round((1 - s) F) positive gates (the sign of
the other gate columns flipped), so every layer has its own active set and L layers of active rows overflow the L2
cache (8 x 10.8 MB at 7B, 88%, bf16). Three methods, each figure labelled with the one that produced it:

* ``cupti`` (device time, GPU only): CUPTI kernel times of one jitted function that calls the operator once per
  layer (``jax.experimental.mosaic.gpu.profiler.measure``), median over ``--reps`` iterations, per kernel and summed;
  on a CPU, or when the profiler cannot load, this method is skipped and the reason printed.
* ``slope`` (in-graph time, launch gaps included, as decode sees it): one jitted function that calls the operator K
  times, unrolled in Python over the L layers' separate arrays, timed for K = 16 and 32 (best of ``--runs``); per
  call ``(t32 - t16) / 16`` removes the fixed dispatch and synchronisation. Each call has its own first argument (the
  layer's x or x1 times a power of two: the same active set, but no two calls equal, which XLA would merge), every
  output is returned (none dropped as dead code) and an ``optimization_barrier`` (no kernel) keeps them in order.
* ``dispatch`` (host-visible latency): ``--reps`` jitted calls dispatched back to back from Python over the rotating
  layers, one wait at the end, best of 3.

Ceilings from the same run: the bandwidth of an elementwise copy (read + write) of ``--copy_mib`` MiB and the dense
GEMVs' achieved bandwidth. Speedups are given with the gate (S2 = gate GEMV + kernel vs dense gate + up + multiply)
and without it (S2 minus the gate GEMV vs the up GEMV + multiply on a given gate: ProSparse's "step (2)"), beside
ProSparse's published ratios (their CUDA operators on an A100, gate excluded, host-timed). ``--timing=loop`` (the
former ``fori_loop`` timing) now means ``slope``. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from prosparse_jax import files
from prosparse_jax.inference.sparse_ffn import IMPLEMENTATIONS, kernel_activation, resolve_implementation

RELU = kernel_activation("relu")

#: ProSparse Table 5 (us, batch 1, bf16, A100): (S2 dense, S2 sparse, S3 dense, S3 sparse). Their S2 ("step (2)")
#: excludes the gate GEMV and every number includes launch and sync (host-timed).
PUBLISHED = {"4096x11008": (90.55, 45.38, 82.92, 55.05), "5120x13824": (131.36, 53.78, 113.68, 66.73)}
PUBLISHED_LABEL = "A100, gate excluded, host-timed"
METHODS = ("cupti", "slope", "dispatch")
#: CUPTI failures after which the run stops trying it (one failure may be one operator's, e.g. kernels that differ
#: between iterations).
MAX_CUPTI_FAILURES = 3
#: What each method's figure is, for the table and the JSON.
METHOD_MEANING = {"cupti": "device time (CUPTI kernel sum)", "slope": "in-graph time (slope of K calls)",
                  "dispatch": "host-visible latency (dispatch)"}


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("D", "F", "n_active", "dtype"))
def _make_layer(key: jax.Array, *, D: int, F: int, n_active: int, dtype: str) -> dict[str, jax.Array]:
    """One layer's x, W_gate, W_up, W_down on the device; exactly ``n_active`` gates of x are positive (in float32)."""
    kx, kg, ku, kd, kp = jax.random.split(key, 5)
    x_1xD = jax.random.normal(kx, (1, D), jnp.float32)
    w_gate_DxF = jax.random.normal(kg, (D, F), jnp.float32) / jnp.sqrt(jnp.float32(D))
    on_F = jnp.zeros((F,), bool).at[jax.random.permutation(kp, F)[:n_active]].set(True)
    gate_F = lax.dot(x_1xD, w_gate_DxF, precision=lax.Precision.HIGHEST)[0]
    w_gate_DxF = w_gate_DxF * jnp.where(on_F == (gate_F > 0), 1.0, -1.0)[None, :]
    w_up_FxD = jax.random.normal(ku, (F, D), jnp.float32) / jnp.sqrt(jnp.float32(D))
    w_down_FxD = jax.random.normal(kd, (F, D), jnp.float32) / jnp.sqrt(jnp.float32(F))
    out = {"x_1xD": x_1xD, "w_gate_DxF": w_gate_DxF, "w_up_FxD": w_up_FxD, "w_down_FxD": w_down_FxD}
    return {k: v.astype(dtype) for k, v in out.items()}


def make_layers(D: int, F: int, sparsity: float, dtype: str, n_layers: int,
                seed: int = 0) -> list[dict[str, jax.Array]]:
    """``n_layers`` independent layers generated on the device, each with round((1 - sparsity) F) positive gates.

    Every layer also carries ``gate_1xF`` (the float32 gate pre-activations, as the Triton S2 computes them in XLA)
    and ``x1_1xF`` (the dense S2 output, S3's input), so each layer has its own active set.
    """
    n_active = round((1.0 - sparsity) * F)
    layers = []
    for key in jax.random.split(jax.random.key(seed), n_layers):
        layer = _make_layer(key, D=D, F=F, n_active=n_active, dtype=dtype)
        layer["gate_1xF"] = jax.jit(gate_gemv)(layer["x_1xD"], layer["w_gate_DxF"])
        layer["x1_1xF"] = jax.jit(dense_s2)(layer["x_1xD"], layer["w_gate_DxF"], layer["w_up_FxD"])
        layers.append(layer)
    return layers


# ---------------------------------------------------------------------------------------------------------------
# The dense sides
# ---------------------------------------------------------------------------------------------------------------
def gate_gemv(x_BxD: jax.Array, w_gate_DxF: jax.Array) -> jax.Array:
    """The gate GEMV as the Triton S2 runs it in XLA (float32 result, no TF32)."""
    return lax.dot(x_BxD, w_gate_DxF.astype(x_BxD.dtype), precision=lax.Precision.HIGHEST,
                   preferred_element_type=jnp.float32)


def dense_s2(x_BxD: jax.Array, w_gate_DxF: jax.Array, w_up_FxD: jax.Array) -> jax.Array:
    """Dense S2: relu(x W_gate) * (x W_up)."""
    return (jax.nn.relu(x_BxD @ w_gate_DxF) * (x_BxD @ w_up_FxD.T)).astype(x_BxD.dtype)


def dense_step2(x_BxD: jax.Array, gate_BxF: jax.Array, w_up_FxD: jax.Array) -> jax.Array:
    """ProSparse's dense "step (2)": the up GEMV and the multiply on a given gate (the gate GEMV excluded)."""
    return (jax.nn.relu(gate_BxF) * (x_BxD @ w_up_FxD.T)).astype(x_BxD.dtype)


def dense_s3(x1_BxF: jax.Array, w_down_FxD: jax.Array) -> jax.Array:
    """Dense S3: x1 W_down."""
    return x1_BxF @ w_down_FxD


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------
def scale_factor(j: int) -> float:
    """1, 2, 1/2, 4, 1/4, ...: powers of two, so a scaled input keeps every sign and every zero exactly."""
    return 2.0 ** ((-1) ** (j + 1) * ((j + 1) // 2))


def call_args(layer_args: Sequence[tuple], n_calls: int) -> list[tuple]:
    """Argument tuples of ``n_calls`` calls rotating over the layers, each call with its own first argument.

    Call i uses layer ``i % L``'s arrays with its first argument (x or x1) scaled by ``scale_factor(i // L)``: a
    power of two, so the active set is the layer's, yet no two calls have equal inputs (XLA would merge them: CSE).
    The scaled copies are made here, outside any timed graph.
    """
    out = []
    for i in range(n_calls):
        first, *rest = layer_args[i % len(layer_args)]
        j = i // len(layer_args)
        out.append((first if j == 0 else (first * scale_factor(j)).astype(first.dtype), *rest))
    return out


def chained(op: Callable[..., jax.Array], n_calls: int) -> Callable[[Sequence[tuple]], list[jax.Array]]:
    """A jitted function of ``n_calls`` argument tuples (:func:`call_args`) that calls ``op`` on each, in order.

    Every call's first argument passes through an ``optimization_barrier`` together with the previous call's output
    (no kernel), which keeps the calls in order, and every output is returned, so none is dropped as dead code.
    """
    def run(args_per_call: Sequence[tuple]) -> list[jax.Array]:
        if len(args_per_call) != n_calls:
            raise ValueError(f"{len(args_per_call)} argument tuples for {n_calls} calls")
        outs: list[jax.Array] = []
        for args in args_per_call:
            args = tuple(args)
            if outs:
                args = (lax.optimization_barrier((args[0], outs[-1]))[0], *args[1:])
            outs.append(op(*args))
        return outs
    return jax.jit(run)


def _wall_s(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def slope_us(run_k: Callable[[int], Callable[[], Any]], ks: tuple[int, int] = (16, 32), runs: int = 5) -> dict:
    """Per-call time (us) from the slope of wall time against the number of calls in one graph.

    Args:
      run_k: ``run_k(K)`` returns a thunk that runs a graph of K calls (its result is waited on).
      ks: the two call counts (k1 < k2).
      runs: best of this many timed runs per K, after one untimed run (compilation, warm-up).

    Returns:
      ``{"us": (t_k2 - t_k1) / (k2 - k1) in us, "t_us": {K: best wall time in us}}``.
    """
    k1, k2 = ks
    if not 0 < k1 < k2:
        raise ValueError(f"slope needs two call counts 0 < k1 < k2, got {ks}")
    t_us = {}
    for k in (k1, k2):
        thunk = run_k(k)
        jax.block_until_ready(thunk())
        t_us[k] = min(_wall_s(thunk) for _ in range(max(1, runs))) * 1e6
    return {"us": (t_us[k2] - t_us[k1]) / (k2 - k1), "t_us": t_us}


def dispatch_us(fn: Callable[..., Any], layer_args: Sequence[tuple], reps: int) -> float:
    """Host-visible latency (us): ``reps`` calls dispatched back to back over the rotating layers, best of 3."""
    jax.block_until_ready([fn(*args) for args in layer_args])
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        out = None
        for i in range(reps):
            out = fn(*layer_args[i % len(layer_args)])
        jax.block_until_ready(out)
        runs.append((time.perf_counter() - t0) * 1e6 / reps)
    return min(runs)


def cupti_unavailable() -> str:
    """Why CUPTI device timing cannot run here ("" when it can be tried)."""
    if jax.default_backend() != "gpu":
        return f"no CUDA GPU (backend {jax.default_backend()})"
    try:
        from jax.experimental.mosaic.gpu import profiler
    except Exception as e:  # the Mosaic GPU extension or its dependencies missing from this install
        return f"jax.experimental.mosaic.gpu.profiler does not import: {type(e).__name__}: {e}"
    if getattr(profiler, "mosaic_gpu_lib", None) is None:
        return "jax's Mosaic GPU extension (jax_cuda*_plugin._mosaic_gpu_ext) is not installed"
    return ""


def cupti_us(fn: Callable[..., Any], args: tuple, n_calls: int, iterations: int) -> dict:
    """Device time per call (us) of a function making ``n_calls`` calls, from CUPTI kernel records.

    Returns ``{"us": median over iterations of the kernel sum / n_calls, "kernels": [(name, us per call), ...]}``
    (kernels by total time, largest first). Raises RuntimeError when no kernel was recorded.
    """
    from jax.experimental.mosaic.gpu import profiler
    _, timings = profiler.measure(fn, aggregate=False, iterations=iterations)(*args)
    if not timings:
        raise RuntimeError("CUPTI recorded no kernel")
    per_iter = timings if iterations > 1 else [timings]
    totals_ms = [sum(ms for _, ms in it) for it in per_iter]
    by_name: dict[str, list[float]] = {}
    for it in per_iter:
        sums: dict[str, float] = {}
        for name, ms in it:
            sums[name] = sums.get(name, 0.0) + ms
        for name, ms in sums.items():
            by_name.setdefault(name, []).append(ms)
    kernels = sorted(((n, statistics.median(v) * 1e3 / n_calls) for n, v in by_name.items()), key=lambda r: -r[1])
    return {"us": statistics.median(totals_ms) * 1e3 / n_calls, "kernels": kernels}


class Timer:
    """Times one operator over the layers with the chosen methods; remembers why a method was skipped."""

    def __init__(self, methods: Sequence[str], reps: int, runs: int, ks: tuple[int, int], log: Callable = print):
        self.methods, self.reps, self.runs, self.ks = tuple(methods), reps, runs, ks
        self.skipped: dict[str, str] = {}
        self.cupti_failures, self.last_cupti_error = 0, ""
        if "cupti" in self.methods:
            why = cupti_unavailable()
            if why:
                self.skipped["cupti"] = why
                log(f"cupti: skipped ({why}); device times fall back to the slope method")

    def cupti_failed(self, e: Exception) -> None:
        """Report a failed CUPTI measurement; after ``MAX_CUPTI_FAILURES`` stop trying for the rest of the run."""
        self.cupti_failures += 1
        self.last_cupti_error = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        print(f"cupti: failed ({self.last_cupti_error}); this figure falls back to the slope method")
        if self.cupti_failures >= MAX_CUPTI_FAILURES:
            self.skipped["cupti"] = f"{self.cupti_failures} failures, the last: {self.last_cupti_error}"

    def time(self, op: Callable[..., jax.Array], layer_args: Sequence[tuple]) -> dict:
        """``{method: us per call}`` (plus ``cupti_kernels`` and ``slope_t_us``) for the methods that ran."""
        res: dict[str, Any] = {}
        if "cupti" in self.methods and "cupti" not in self.skipped:
            n = len(layer_args)
            try:
                r = cupti_us(chained(op, n), (call_args(layer_args, n),), n, max(2, self.reps))
                res["cupti"], res["cupti_kernels"] = r["us"], r["kernels"]
            except Exception as e:  # CUPTI in use by another tool, no records, kernels differing between iterations
                self.cupti_failed(e)
                res["cupti_error"] = self.last_cupti_error
        if "slope" in self.methods:
            def run_k(k: int) -> Callable[[], Any]:
                fn, args = chained(op, k), call_args(layer_args, k)
                return lambda: fn(args)
            r = slope_us(run_k, self.ks, self.runs)
            res["slope"], res["slope_t_us"] = r["us"], r["t_us"]
        if "dispatch" in self.methods:
            res["dispatch"] = dispatch_us(jax.jit(op), layer_args, self.reps)
        return res


def primary(times: dict) -> tuple[str, float]:
    """The best method that measured this operator: CUPTI device time, else in-graph slope, else dispatch."""
    for m in METHODS:
        if m in times:
            return m, times[m]
    raise ValueError("no timing method ran")


# ---------------------------------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------------------------------
def copy_ceiling(timer: Timer, mib: int) -> dict:
    """Bandwidth (GB/s, read + write) of an elementwise pass ``a + 1`` over a float32 buffer of ``mib`` MiB.

    CUPTI: the kernel time of one pass. Otherwise the slope over the size: one jitted pass over ``mib`` and over
    ``2 mib`` MiB (best of ``runs`` each), whose difference removes the dispatch (chained passes would be fused).
    """
    n = mib * 2**20 // 4

    def buffer(size: int) -> jax.Array:
        return jax.random.normal(jax.random.key(1), (size,), jnp.float32)

    def add1(a: jax.Array) -> jax.Array:
        return a + 1.0

    res: dict[str, Any] = {"bytes": 2 * 4 * n}
    if "cupti" in timer.methods and "cupti" not in timer.skipped:
        try:
            r = cupti_us(jax.jit(add1), (buffer(n),), 1, max(2, timer.reps))
            res.update(method="cupti", us=r["us"], kernels=[list(k) for k in r["kernels"]])
        except Exception as e:  # as in Timer.time
            timer.cupti_failed(e)
            res["cupti_error"] = timer.last_cupti_error
    if "method" not in res:
        fn, small, big = jax.jit(add1), buffer(n), buffer(2 * n)
        jax.block_until_ready((fn(small), fn(big)))
        t_small = min(_wall_s(lambda: fn(small)) for _ in range(max(1, timer.runs)))
        t_big = min(_wall_s(lambda: fn(big)) for _ in range(max(1, timer.runs)))
        res.update(method="slope", us=(t_big - t_small) * 1e6, detail=f"one pass over {2 * mib} minus {mib} MiB")
    res["gb_s"] = res["bytes"] / (res["us"] * 1e3) if res["us"] > 0 else float("nan")
    return res


def _plain(times: dict) -> dict:
    return {k: ([list(r) for r in v] if k == "cupti_kernels" else v) for k, v in times.items()}


def _op_entry(times: dict, nbytes: float) -> dict:
    method, us = primary(times)
    return {"times": _plain(times), "method": method, "us": us, "bytes": nbytes,
            "gb_s": nbytes / (us * 1e3) if us > 0 else float("nan")}


def bench_shape(impls: dict[str, Any], D: int, F: int, a: argparse.Namespace, timer: Timer) -> list[dict]:
    """Every operator at one shape over the layers, one row per implementation (``{name: kernels module}``): times
    by method, bytes, bandwidth, errors, speedups. The dense sides are timed once and repeated in every row."""
    layers = make_layers(D, F, a.sparsity, a.dtype, a.layers)
    s2_args = [(ly["x_1xD"], ly["w_gate_DxF"], ly["w_up_FxD"]) for ly in layers]
    s3_args = [(ly["x1_1xF"], ly["w_down_FxD"]) for ly in layers]
    item = jnp.dtype(a.dtype).itemsize
    active = [int(jnp.sum(jnp.any(ly["x1_1xF"] != 0, axis=0))) for ly in layers]
    n_act = sum(active) / len(active)
    dense_ops = {"gate": (gate_gemv, [(ly["x_1xD"], ly["w_gate_DxF"]) for ly in layers], D * F * item),
                 "s2_dense": (dense_s2, s2_args, 2 * D * F * item),
                 "step2_dense": (dense_step2, [(ly["x_1xD"], ly["gate_1xF"], ly["w_up_FxD"]) for ly in layers],
                                 D * F * item),
                 "s3_dense": (dense_s3, s3_args, D * F * item)}
    dense = {name: _op_entry(timer.time(op, args), nb) for name, (op, args, nb) in dense_ops.items()}
    rows = []
    for impl, kernels in impls.items():
        gate_kw = {"gate": a.gate} if a.gate else {}

        def sparse_s2(x, wg, wu, kernels=kernels, gate_kw=gate_kw):
            return kernels.s2(x, wg, wu, activation=RELU, interpret=a.interpret, **gate_kw)

        def sparse_s3(x1, wd, kernels=kernels):
            return kernels.s3(x1, wd, interpret=a.interpret)

        row: dict[str, Any] = {"shape": f"{D}x{F}", "implementation": impl, "layers": len(layers),
                               "sparsity": 1.0 - n_act / F, "active_per_layer": active, "ops": dict(dense)}
        row["ops"]["s2_sparse"] = _op_entry(timer.time(sparse_s2, s2_args), (D * F + n_act * D) * item)
        row["ops"]["s3_sparse"] = _op_entry(timer.time(sparse_s3, s3_args), n_act * D * item)
        # S2 minus the gate GEMV: the sparse "step (2)", derived from two figures of the same method
        s2, gate = row["ops"]["s2_sparse"], row["ops"]["gate"]
        step2 = _op_entry({m: s2["times"][m] - gate["times"][m] for m in METHODS
                           if m in s2["times"] and m in gate["times"]}, n_act * D * item)
        step2["derived"] = "s2_sparse - gate, same method"
        row["ops"]["step2_sparse"] = step2

        def speedup(dense_key: str, sparse_key: str, row: dict = row) -> dict:
            d, s = row["ops"][dense_key], row["ops"][sparse_key]
            common = [m for m in METHODS if m in d["times"] and m in s["times"]]
            by = {m: d["times"][m] / s["times"][m] if s["times"][m] > 0 else float("nan") for m in common}
            return {"method": common[0] if common else "", "x": by[common[0]] if common else float("nan"), "by": by}

        row["speedup"] = {"s2_with_gate": speedup("s2_dense", "s2_sparse"),
                          "s2_without_gate": speedup("step2_dense", "step2_sparse"),
                          "s3": speedup("s3_dense", "s3_sparse")}
        if row["shape"] in PUBLISHED:
            p = PUBLISHED[row["shape"]]
            row["prosparse"] = {"label": PUBLISHED_LABEL, "s2_without_gate": p[0] / p[1], "s3": p[2] / p[3]}
        row["s2_rel_err"] = _rel_err(dense_s2, sparse_s2, s2_args[0])
        row["s3_rel_err"] = _rel_err(dense_s3, sparse_s3, s3_args[0])
        rows.append(row)
    return rows


def _rel_err(dense: Callable, sparse: Callable, args: tuple) -> float:
    ref = jax.jit(dense)(*args).astype(jnp.float32)
    got = jax.jit(sparse)(*args).astype(jnp.float32)
    return float(jnp.max(jnp.abs(ref - got)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30))


OP_LABELS = {"gate": "gate GEMV (XLA)", "s2_dense": "S2 dense (gate+up+mul)", "s2_sparse": "S2 Pallas (with gate)",
             "step2_dense": "up GEMV + mul (dense step 2)", "step2_sparse": "S2 Pallas - gate (derived)",
             "s3_dense": "S3 dense GEMV", "s3_sparse": "S3 Pallas"}


def print_row(row: dict, methods: Sequence[str]) -> None:
    """The per-shape table: one line per operator, one column per method, then the speedups."""
    print(f"\n{row['shape']}, {row['implementation']}: {row['layers']} layers, measured sparsity "
          f"{row['sparsity']:.3f}")
    cols = "".join(f" {m + ' us':>12}" for m in methods)
    print(f"  {'operator':<30}{cols} {'GB/s':>8} {'(by)':<9}")
    for name, label in OP_LABELS.items():
        op = row["ops"][name]
        vals = "".join(f" {op['times'][m]:>12.2f}" if m in op["times"] else f" {'-':>12}" for m in methods)
        print(f"  {label:<30}{vals} {op['gb_s']:>8.1f} {op['method']:<9}")
        for kname, us in op["times"].get("cupti_kernels", [])[:3]:
            print(f"  {'':<4}kernel {kname[:60]:<60} {us:>8.2f} us (cupti)")
    pro = row.get("prosparse", {})
    for key, label in (("s2_with_gate", "S2 with gate"), ("s2_without_gate", "S2 without gate"), ("s3", "S3")):
        s = row["speedup"][key]
        others = ", ".join(f"{m} {v:.2f}x" for m, v in s["by"].items() if m != s["method"])
        pub = f"; ProSparse {pro[key]:.2f}x ({pro['label']})" if key in pro else ""
        print(f"  speedup {label:<16} {s['x']:>6.2f}x ({s['method']})" + (f" [{others}]" if others else "") + pub)
    print(f"  rel err vs dense: S2 {row['s2_rel_err']:.1e}, S3 {row['s3_rel_err']:.1e}", flush=True)


def tune(kernels: Any, D: int, F: int, a: argparse.Namespace, timer: Timer) -> list[dict]:
    """Every (block_f, block_d, num_warps) of S2 and S3 at one shape: time per call, fastest first per operator."""
    layers = make_layers(D, F, a.sparsity, a.dtype, a.layers)
    s2_args = [(ly["x_1xD"], ly["w_gate_DxF"], ly["w_up_FxD"]) for ly in layers]
    s3_args = [(ly["x1_1xF"], ly["w_down_FxD"]) for ly in layers]
    rows = []
    for op_name, blocks_f in (("s2", (16, 32, 64)), ("s3", (32, 64, 128))):
        for bf, bd, nw in itertools.product(blocks_f, (64, 128, 256), (2, 4, 8)):
            kw = {"block_f": bf, "block_d": bd, "num_warps": nw, "interpret": a.interpret}
            if op_name == "s2":
                s2_kw = {**kw, **({"gate": a.gate} if a.gate else {})}
                op, args = (lambda x, wg, wu, kw=s2_kw: kernels.s2(x, wg, wu, activation=RELU, **kw)), s2_args
            else:
                op, args = (lambda x1, wd, kw=kw: kernels.s3(x1, wd, **kw)), s3_args
            try:
                method, us = primary(timer.time(op, args))
            except Exception as e:  # a config the compiler refuses (registers, shared memory): report, go on
                method, us = "", float("nan")
                print(f"  {op_name} {kw}: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
            rows.append({"op": op_name, "shape": f"{D}x{F}", "block_f": bf, "block_d": bd, "num_warps": nw,
                         "us": us, "method": method})
            if not a.interpret:  # one line per config as it goes: a time-boxed run keeps what it measured
                print(f"  {op_name} block_f={bf} block_d={bd} num_warps={nw}: {us:.2f} us ({method})", flush=True)
    for op_name in ("s2", "s3"):
        best = sorted((r for r in rows if r["op"] == op_name and r["us"] == r["us"]), key=lambda r: r["us"])
        for r in best[:5]:
            print(f"{op_name} {r['shape']} block_f={r['block_f']:>3} block_d={r['block_d']:>3} "
                  f"num_warps={r['num_warps']}: {r['us']:.2f} us ({r['method']})")
    return rows


def parse_methods(timing: str) -> list[str]:
    """``--timing``: "all" or a comma list of cupti / slope / dispatch ("loop" is the former name of slope)."""
    if timing == "all":
        return list(METHODS)
    out = []
    for m in timing.split(","):
        m = {"loop": "slope"}.get(m.strip(), m.strip())
        if m not in METHODS:
            raise SystemExit(f"bench_pallas_ffn: error: --timing={timing!r}: use 'all' or a comma list of "
                             f"{', '.join(METHODS)}")
        out.append(m)
    return [m for m in METHODS if m in out]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x11008,5120x13824")
    ap.add_argument("--sparsity", type=float, default=0.88)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--layers", type=int, default=0,
                    help="independent layers the calls rotate over (defeats L2 reuse); default 8, 2 with --interpret")
    ap.add_argument("--reps", type=int, default=20, help="CUPTI iterations and dispatched calls per run")
    ap.add_argument("--runs", type=int, default=0,
                    help="slope: best of this many runs of each K-call graph; default 5, 2 with --interpret")
    ap.add_argument("--slope_k", default="", help="slope: the two call counts, default 16,32 (1,2 with --interpret)")
    ap.add_argument("--copy_mib", type=int, default=0, help="copy ceiling buffer (MiB); default 1024, 4 on CPU")
    ap.add_argument("--implementation", default="auto",
                    help="auto (the platform's Pallas backend) or a comma list of sparse_ffn's pallas_* backends, "
                         "e.g. pallas_triton,pallas_compact: each gets its rows against the same dense timings")
    ap.add_argument("--interpret", action="store_true", help="run the kernels in interpret mode (CPU smoke run)")
    ap.add_argument("--timing", default="all",
                    help="all (default) or a comma list of cupti (device time), slope (in-graph time), dispatch "
                         "(host-visible latency); loop = slope")
    ap.add_argument("--gate", default="", choices=("", "xla", "fused"),
                    help="Triton S2: gate GEMV in XLA or fused in the kernel (default: the module's DEFAULT_GATE)")
    ap.add_argument("--tune", action="store_true", help="sweep block_f / block_d / num_warps (Triton) per shape")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    a = ap.parse_args(argv)
    platform = jax.default_backend()
    if platform == "cpu" and not a.interpret:
        print("bench_pallas_ffn: error: no GPU or TPU here; the CPU sparse FFN is experiments/bench_sparse_ffn.py "
              "(or pass --interpret for a smoke run of the kernels, whose times mean nothing)", file=sys.stderr)
        return 1
    methods = parse_methods(a.timing)
    a.layers = a.layers or (2 if a.interpret else 8)
    a.runs = a.runs or (2 if a.interpret else 5)
    ks = tuple(int(k) for k in a.slope_k.split(",")) if a.slope_k else ((1, 2) if a.interpret else (16, 32))
    if len(ks) != 2 or not 0 < ks[0] < ks[1]:
        print(f"bench_pallas_ffn: error: --slope_k={a.slope_k!r}: give two call counts k1 < k2, e.g. 16,32",
              file=sys.stderr)
        return 1
    copy_mib = a.copy_mib or (4 if platform == "cpu" else 1024)
    pallas = [k for k in IMPLEMENTATIONS if k.startswith("pallas_")]
    names = [n.strip() for n in a.implementation.split(",") if n.strip()]
    if names == ["auto"]:
        auto = resolve_implementation("auto", platform)
        names = [auto if auto in pallas else "pallas_triton"]
    bad = [n for n in names if n not in pallas]
    if bad or not names:
        print(f"bench_pallas_ffn: error: --implementation={a.implementation!r}: use 'auto' or a comma list of "
              f"{', '.join(pallas)}", file=sys.stderr)
        return 1
    impls = {n: importlib.import_module(f"pallas_kernels.sparse_ffn_{n.removeprefix('pallas_')}") for n in names}
    triton_like = [n for n, mod in impls.items() if "num_warps" in inspect.signature(mod.s2).parameters]
    if (a.tune and (len(names) != 1 or triton_like != names)) or (a.gate and triton_like != names):
        print("bench_pallas_ffn: error: --tune and --gate are options of the Triton-lowered kernels (block_f / "
              f"block_d / num_warps / gate: {', '.join(n for n in pallas if n != 'pallas_mosaic')}); --tune takes "
              "one --implementation; use --implementation=pallas_triton on a GPU", file=sys.stderr)
        return 1
    impl = ",".join(names)
    if a.tune:  # one method per config: CUPTI on a GPU, else the slope (dispatch alone if asked)
        usable = [m for m in methods if m != "cupti" or not cupti_unavailable()] or ["slope"]
        methods = [m for m in usable if m != "dispatch"][:1] or usable[:1]
        if a.interpret:  # times mean nothing in the interpreter: the cheapest method, to check that every config runs
            methods = ["dispatch"]
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {impl}, {a.dtype}, batch 1, {a.layers} layers, "
          f"sparsity {a.sparsity}" + (f", gate {a.gate}" if a.gate else "") + (", interpret" if a.interpret else ""))
    timer = Timer(methods, a.reps, a.runs, ks)
    for m in methods:
        detail = {"cupti": f"median of {max(2, a.reps)} iterations of one call per layer",
                  "slope": f"(t{ks[1]} - t{ks[0]}) / {ks[1] - ks[0]}, best of {a.runs}",
                  "dispatch": f"{a.reps} calls, best of 3"}[m]
        print(f"  {m}: {METHOD_MEANING[m]}, {detail}" + (f" -- skipped: {timer.skipped[m]}" if m in timer.skipped
                                                          else ""))
    result: dict[str, Any] = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "implementation": impl,
                              "dtype": a.dtype, "sparsity_target": a.sparsity, "layers": a.layers,
                              "methods": {m: METHOD_MEANING[m] for m in methods}, "slope_k": list(ks),
                              "skipped": timer.skipped, "rows": []}
    if not a.interpret:  # GPU clocks ramp up under load: a second of dense GEMVs first, so no row is timed cold
        D0, F0 = (int(v) for v in a.shapes.split(",")[0].split("x"))
        ly = make_layers(D0, F0, a.sparsity, a.dtype, 1)[0]
        gemv, t_end = jax.jit(lambda x, wg: x @ wg), time.perf_counter() + 1.0
        while time.perf_counter() < t_end:
            jax.block_until_ready([gemv(ly["x_1xD"], ly["w_gate_DxF"]) for _ in range(20)])
    if a.interpret:
        print("  (interpret: the kernels run in the Pallas interpreter on the host; the times mean nothing)")
    if not a.tune:
        c = copy_ceiling(timer, copy_mib)
        result["copy_ceiling"] = c
        print(f"\nceiling: elementwise copy of {copy_mib} MiB (read + write) {c['gb_s']:.1f} GB/s ({c['method']})")
    for shape in a.shapes.split(","):
        D, F = (int(v) for v in shape.split("x"))
        if a.tune:
            result["rows"] += tune(impls[names[0]], D, F, a, timer)
        else:
            for row in bench_shape(impls, D, F, a, timer):
                result["rows"].append(row)
                print_row(row, [m for m in methods if m not in timer.skipped])
        if a.out:  # partial results after every shape
            files.write_text_atomic(a.out, json.dumps(result, indent=2))
    if not a.tune:
        print("\nProSparse published (" + PUBLISHED_LABEL + "): " + "; ".join(
            f"{shape} S2 {p[0] / p[1]:.2f}x, S3 {p[2] / p[3]:.2f}x" for shape, p in PUBLISHED.items())
            + " -- compare with 'S2 without gate' and 'S3'")
    result["skipped"] = timer.skipped
    if a.out:
        files.write_text_atomic(a.out, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
