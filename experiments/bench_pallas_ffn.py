"""ProSparse's sparse operators S2 / S3 (§4.3) as Pallas kernels against the dense bf16 GEMVs, on a GPU or TPU.

    python experiments/bench_pallas_ffn.py                          # 7B and 13B FFN shapes, 88%, batch 1, bf16
    python experiments/bench_pallas_ffn.py --shapes=4096x11008 --sparsity=0.9 --reps=200
    python experiments/bench_pallas_ffn.py --interpret --shapes=128x352 --reps=1   # CPU smoke run (no timing value)
    python experiments/bench_pallas_ffn.py --tune --shapes=4096x11008    # sweep block_f / block_d / num_warps
    python experiments/bench_pallas_ffn.py --timing=loop    # device time per call, without the host's dispatch

Random weights with a chosen fraction of positive gates (as bench_sparse_ffn.py), padded to the kernels' blocks
outside the timing; the platform's backend unless ``--implementation``. Prints the mean per-call time (us) of each
side next to ProSparse's Table 5 (A100, their CUDA operators). Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import sparse_ffn_mosaic, sparse_ffn_triton
from prosparse_jax import files
from prosparse_jax.inference.sparse_ffn import kernel_activation, resolve_implementation

RELU = kernel_activation("relu")

#: ProSparse Table 5 (us, batch 1, bf16, A100): (S2 dense, S2 sparse, S3 dense, S3 sparse).
PUBLISHED = {"4096x11008": (90.55, 45.38, 82.92, 55.05), "5120x13824": (131.36, 53.78, 113.68, 66.73)}


def make_inputs(D: int, F: int, sparsity: float, dtype: str, seed: int = 0) -> tuple[jax.Array, ...]:
    """(x_1xD, w_gate_DxF, w_up_FxD, w_down_FxD) with round((1 - s) F) positive gates."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, D), np.float32)
    w_gate = rng.standard_normal((D, F), np.float32) / np.float32(np.sqrt(D))
    on_F = np.zeros(F, bool)
    on_F[rng.permutation(F)[:round((1.0 - sparsity) * F)]] = True
    w_gate *= np.where(on_F == (x @ w_gate > 0)[0], 1.0, -1.0).astype(np.float32)
    w_up = rng.standard_normal((F, D), np.float32) / np.float32(np.sqrt(D))
    w_down = rng.standard_normal((F, D), np.float32) / np.float32(np.sqrt(F))
    return tuple(jnp.asarray(a, dtype) for a in (x, w_gate, w_up, w_down))


def per_call_us(fn, args: tuple, reps: int, timing: str = "dispatch") -> float:
    """Mean time of one call (us), best of 3 runs of ``reps`` calls after a warm-up.

    ``timing="dispatch"``: jitted calls dispatched back to back, one wait at the end (includes the host's dispatch).
    ``timing="loop"``: the calls inside one jitted ``lax.fori_loop``, each input depending on the previous output (so
    no call is hoisted or dropped): device time without dispatch.
    """
    if timing == "loop":
        def looped(*xs):
            def body(_, carry):
                x, out = jax.lax.optimization_barrier((carry, fn(carry, *xs[1:])))
                # x * 1 + 0 * out[first]: a real data dependency (XLA keeps float x * 0), so no call is dropped
                return x + (jnp.ravel(out)[0] * 0).astype(x.dtype)
            return jax.lax.fori_loop(0, reps, body, xs[0])
        looped_fn = jax.jit(looped)
        jax.block_until_ready(looped_fn(*args))
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            jax.block_until_ready(looped_fn(*args))
            runs.append((time.perf_counter() - t0) * 1e6 / reps)
        return min(runs)
    jax.block_until_ready(fn(*args))
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        out = None
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        runs.append((time.perf_counter() - t0) * 1e6 / reps)
    return min(runs)


def tune(kernels, D: int, F: int, a: argparse.Namespace) -> list[dict]:
    """Every (block_f, block_d, num_warps) of S2 and S3 at one shape: time per call, fastest first per operator."""
    x, w_gate, w_up_FxD, w_down = make_inputs(D, F, a.sparsity, a.dtype)
    x1 = jax.jit(lambda x, wg, wu: (jax.nn.relu(x @ wg) * (x @ wu.T)).astype(x.dtype))(x, w_gate, w_up_FxD)
    rows = []
    for op, blocks_f in (("s2", (16, 32, 64)), ("s3", (32, 64, 128))):
        for bf, bd, nw in itertools.product(blocks_f, (64, 128, 256), (2, 4, 8)):
            kw = {"block_f": bf, "block_d": bd, "num_warps": nw, "interpret": a.interpret}
            if op == "s2":
                s2_kw = {**kw, **({"gate": a.gate} if a.gate else {})}
                fn, args = jax.jit(lambda x, wg, wu, kw=s2_kw: kernels.s2(x, wg, wu, activation=RELU, **kw)), \
                    (x, w_gate, w_up_FxD)
            else:
                fn, args = jax.jit(lambda x1, wd, kw=kw: kernels.s3(x1, wd, **kw)), (x1, w_down)
            try:
                us = per_call_us(fn, args, a.reps, a.timing)
            except Exception as e:  # a config the compiler refuses (registers, shared memory): report, go on
                us = float("nan")
                print(f"  {op} {kw}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            rows.append({"op": op, "shape": f"{D}x{F}", "block_f": bf, "block_d": bd, "num_warps": nw, "us": us})
    for op in ("s2", "s3"):
        best = sorted((r for r in rows if r["op"] == op and r["us"] == r["us"]), key=lambda r: r["us"])
        for r in best[:5]:
            print(f"{op} {r['shape']} block_f={r['block_f']:>3} block_d={r['block_d']:>3} "
                  f"num_warps={r['num_warps']}: {r['us']:.1f} us")
    return rows


def bench_shape(kernels, D: int, F: int, a: argparse.Namespace) -> dict:
    """S2 / S3 dense and sparse at one shape, and the errors of the sparse results against the dense ones."""
    x, w_gate, w_up_FxD, w_down = make_inputs(D, F, a.sparsity, a.dtype)
    interpret = a.interpret
    gate_kw = {"gate": a.gate} if a.gate else {}

    def dense_s2(x, wg, wu):
        return (jax.nn.relu(x @ wg) * (x @ wu.T)).astype(x.dtype)

    def sparse_s2(x, wg, wu):
        return kernels.s2(x, wg, wu, activation=RELU, interpret=interpret, **gate_kw)

    def sparse_s3(x1, wd):
        return kernels.s3(x1, wd, interpret=interpret)

    fns = {"s2_dense": jax.jit(dense_s2), "s2_sparse": jax.jit(sparse_s2),
           "s3_dense": jax.jit(lambda x1, wd: x1 @ wd), "s3_sparse": jax.jit(sparse_s3)}
    x1 = fns["s2_dense"](x, w_gate, w_up_FxD)
    args = {"s2_dense": (x, w_gate, w_up_FxD), "s2_sparse": (x, w_gate, w_up_FxD),
            "s3_dense": (x1, w_down), "s3_sparse": (x1, w_down)}
    us = {k: per_call_us(fns[k], args[k], a.reps, a.timing) for k in fns}

    def rel_err(dense_key: str, sparse_key: str) -> float:
        ref = fns[dense_key](*args[dense_key]).astype(jnp.float32)
        got = fns[sparse_key](*args[sparse_key]).astype(jnp.float32)
        return float(jnp.max(jnp.abs(ref - got)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30))

    s_real = float(jnp.mean(jnp.all(x1 == 0, axis=0)))
    row = {"shape": f"{D}x{F}", "sparsity": s_real, **{f"{k}_us": v for k, v in us.items()},
           "s2_speedup": us["s2_dense"] / us["s2_sparse"], "s3_speedup": us["s3_dense"] / us["s3_sparse"],
           "s2_rel_err": rel_err("s2_dense", "s2_sparse"), "s3_rel_err": rel_err("s3_dense", "s3_sparse")}
    if row["shape"] in PUBLISHED:
        p = PUBLISHED[row["shape"]]
        row["prosparse_s2_speedup"], row["prosparse_s3_speedup"] = p[0] / p[1], p[2] / p[3]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x11008,5120x13824")
    ap.add_argument("--sparsity", type=float, default=0.88)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--implementation", default="auto", choices=("auto", "pallas_triton", "pallas_mosaic"))
    ap.add_argument("--interpret", action="store_true", help="run the kernels in interpret mode (CPU smoke run)")
    ap.add_argument("--timing", default="dispatch", choices=("dispatch", "loop"),
                    help="dispatch: back-to-back jitted calls from Python; loop: the calls inside one jitted loop "
                         "(device time without the host's dispatch)")
    ap.add_argument("--gate", default="", choices=("", "xla", "fused"),
                    help="Triton S2: gate GEMV in XLA or fused in the kernel (default: the module's DEFAULT_GATE)")
    ap.add_argument("--tune", action="store_true", help="sweep block_f / block_d / num_warps (Triton) per shape")
    ap.add_argument("--out", default="", help="write the rows as JSON here")
    a = ap.parse_args(argv)
    platform = jax.default_backend()
    if platform == "cpu" and not a.interpret:
        print("bench_pallas_ffn: error: no GPU or TPU here; the CPU sparse FFN is experiments/bench_sparse_ffn.py "
              "(or pass --interpret for a smoke run of the kernels, whose times mean nothing)", file=sys.stderr)
        return 1
    impl = a.implementation
    if impl == "auto":
        impl = resolve_implementation("auto", platform)
        impl = "pallas_triton" if impl not in ("pallas_triton", "pallas_mosaic") else impl
    kernels = {"pallas_triton": sparse_ffn_triton, "pallas_mosaic": sparse_ffn_mosaic}[impl]
    if (a.tune or a.gate) and impl != "pallas_triton":
        print("bench_pallas_ffn: error: --tune and --gate are options of the Triton kernels (block_f / block_d / "
              "num_warps / gate); use --implementation=pallas_triton on a GPU", file=sys.stderr)
        return 1
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {impl}, {a.dtype}, batch 1, reps {a.reps}"
          + (f", gate {a.gate}" if a.gate else "") + f", timing {a.timing}")
    if not a.tune:
        print(f"{'shape':>11} {'sparsity':>8} {'S2 dense':>9} {'S2 ours':>8} {'S2 x':>6} {'ProSp.':>6} {'S3 dense':>9} "
              f"{'S3 ours':>8} {'S3 x':>6} {'ProSp.':>6}  (us)")
    rows = []
    if not a.interpret:  # GPU clocks ramp up under load: a second of dense GEMVs first, so no row is timed cold
        x, wg, _, _ = make_inputs(*(int(v) for v in a.shapes.split(",")[0].split("x")), a.sparsity, a.dtype)
        gemv, t_end = jax.jit(lambda x, wg: x @ wg), time.perf_counter() + 1.0
        while time.perf_counter() < t_end:
            jax.block_until_ready([gemv(x, wg) for _ in range(20)])
    for shape in a.shapes.split(","):
        D, F = (int(v) for v in shape.split("x"))
        if a.tune:
            rows += tune(kernels, D, F, a)
            continue
        r = bench_shape(kernels, D, F, a)
        rows.append(r)
        print(f"{shape:>11} {r['sparsity']:>8.3f} {r['s2_dense_us']:>9.1f} {r['s2_sparse_us']:>8.1f} "
              f"{r['s2_speedup']:>5.2f}x {r.get('prosparse_s2_speedup', float('nan')):>5.2f}x "
              f"{r['s3_dense_us']:>9.1f} {r['s3_sparse_us']:>8.1f} {r['s3_speedup']:>5.2f}x "
              f"{r.get('prosparse_s3_speedup', float('nan')):>5.2f}x   rel err S2 {r['s2_rel_err']:.1e} "
              f"S3 {r['s3_rel_err']:.1e}", flush=True)
    if a.out:
        files.write_text_atomic(a.out, json.dumps({"device": jax.devices()[0].device_kind, "implementation": impl,
                                             "dtype": a.dtype, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
