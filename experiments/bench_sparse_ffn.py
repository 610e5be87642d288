"""Dense vs sparse FFN (``prosparse_jax.inference.sparse_ffn``) for batch-1..4 decoding on CPU.

    python experiments/bench_sparse_ffn.py                       # 4096x11008 and 1536x3840, batch 1 and 4
    python experiments/bench_sparse_ffn.py --shapes=4096x11008 --batches=1 --sparsities=0.88 --reps=10
    python experiments/bench_sparse_ffn.py --crossover            # density sweep for DENSE_CROSSOVER
    python experiments/bench_sparse_ffn.py --implementations=cpu_ffi   # dense and one backend
    python experiments/bench_sparse_ffn.py --checkpoint=runs/miniature/lambda2e-4_seed1   # real activations, per layer
    python experiments/bench_sparse_ffn.py --shapes=4096x11008 --batches=1 --sparsities=0.88 --rank=1024 \
        --predictor_ratio=1.3                                      # + the predictor row (cpu_ffi+predictor)

ReLU FFN, fp32, iid masks with the same active neurons on every batch row, the dense fallback off (``--fallback``
keeps it); ``--checkpoint`` replays a trained model's recorded FFN inputs per layer instead. Prints medians (ms,
speedup over dense, share of the bound 3 / (1 + 2 (1 - s)), tok/s) and min/min. Results: docs/benchmarks.md.

The predictor row (``--rank`` > 0) runs ``cpu_ffi`` with a rank-``--rank`` predictor whose set is the true active set
plus ``--predictor_ratio`` - 1 times as many inactive neurons (iid): random w1, w2 with each column's sign chosen so
that relu(x0 w1) . w2[:, i] is positive iff i is in that set, b2 = 0, threshold 0 (every batch row is a positive
multiple of x0: the same set). About half of relu(x0 w1) is zero, so the kernel reads about half of W2's rows. Its
bound is 3 D F over the bytes it reads: D R + (non-zero hidden units) F + (predicted + 2 active) D.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from prosparse_jax.errors import UsageError
from prosparse_jax.inference.sparse_ffn import (
    DEFAULT_CHUNK,
    LayerPredictor,
    prepare_weights,
    resolve_implementation,
    sparse_ffn,
)


@functools.cache
def _base(D: int, F: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Random fp32 weights and x0 of one shape (drawn once, reused across sparsities)."""
    rng = np.random.default_rng(seed)
    w_gate = rng.standard_normal((D, F), np.float32) / np.float32(np.sqrt(D))
    w_up = rng.standard_normal((D, F), np.float32) / np.float32(np.sqrt(D))
    w_down = rng.standard_normal((F, D), np.float32) / np.float32(np.sqrt(F))
    return w_gate, w_up, w_down, rng.standard_normal(D, np.float32)


def make_inputs(D: int, F: int, B: int, sparsity: float, seed: int = 0) -> tuple:
    """(x_BxD, w_gate_DxF, w_up_DxF, w_down_FxD) with round((1 - s) F) positive gates, the same neurons on every row.

    Random weights and a random x0; the sign of W_gate's column i is flipped where sign(x0 . w_i) disagrees with an
    iid random pattern. The rows are x_b = (1 + b / 4) x0, so every row has the same gate signs (the union density is
    the per-row density) and different values.
    """
    w_gate, w_up, w_down, x0 = _base(D, F, seed)
    on_F = np.zeros(F, bool)
    on_F[np.random.default_rng(seed + 1).permutation(F)[:round((1.0 - sparsity) * F)]] = True
    w_gate = w_gate * np.where(on_F == (x0 @ w_gate > 0), 1.0, -1.0).astype(np.float32)
    x = np.stack([(1.0 + b / 4) * x0 for b in range(B)])
    return tuple(jnp.asarray(a) for a in (x, w_gate, w_up, w_down))


def timed(fn, args, reps: int) -> list[float]:
    """Per-call wall times (ms) after one warm-up call."""
    jax.block_until_ready(fn(*args))
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _sparse_fn(implementation: str, F: int, chunk: int, fallback: bool):
    """The jitted backend with W_up^T passed in; without ``fallback`` one bucket holding F (never the dense FFN)."""
    buckets = None if fallback else (-(-F // chunk) * chunk,)
    return jax.jit(lambda x, wg, wu, wd, wut: sparse_ffn(
        x, wg, wu, wd, activation="relu", w_up_FxD=wut, implementation=implementation, chunk=chunk, buckets=buckets))


PREDICTOR_ROW = "cpu_ffi+predictor"


def make_predictor(x0_D: np.ndarray, on_F: np.ndarray, ratio: float, rank: int, seed: int = 0
                   ) -> tuple[LayerPredictor, np.ndarray, float]:
    """(predictor, its set, the fraction of non-zero hidden units): the set is ``on_F`` plus round((ratio - 1) |on|)
    iid inactive neurons (module doc)."""
    rng = np.random.default_rng(seed + 2)
    D, F = x0_D.shape[0], on_F.shape[0]
    pred_F = on_F.copy()
    off = np.flatnonzero(~on_F)
    pred_F[rng.permutation(off)[:min(len(off), round((ratio - 1.0) * on_F.sum()))]] = True
    w1 = rng.standard_normal((D, rank), np.float32) / np.float32(np.sqrt(D))
    w2 = rng.standard_normal((rank, F), np.float32) / np.float32(np.sqrt(rank))
    h0 = np.maximum(x0_D @ w1, 0.0)
    w2 *= np.where((h0 @ w2 > 0) == pred_F, 1.0, -1.0).astype(np.float32)
    pred = LayerPredictor(jnp.asarray(w1), jnp.asarray(w2), jnp.zeros((F,), jnp.float32), jnp.float32(0.0))
    return pred, pred_F, float(np.mean(h0 > 0))


def bench_one(D: int, F: int, B: int, s: float, reps: int, chunk: int, implementations: list[str],
              fallback: bool = False, rank: int = 0, ratio: float = 1.3) -> list[dict]:
    """Alternating timings of dense and each sparse backend at one shape, batch and sparsity (one row each), and of
    ``cpu_ffi`` with a predictor of rank ``rank`` (> 0) whose set is ``ratio`` times the active one."""
    x, wg, wu, wd = make_inputs(D, F, B, s)
    prep = prepare_weights(wu, wd, wg if rank else None)
    w_up_FxD = jax.block_until_ready(prep["w_up_FxD"])
    dense = jax.jit(lambda x, wg, wu, wd, wut: sparse_ffn(x, wg, wu, wd, activation="relu", implementation="dense"))
    fns = {"dense": dense, **{name: _sparse_fn(name, F, chunk, fallback) for name in implementations}}
    args = {name: (x, wg, wu, wd, w_up_FxD) for name in fns}
    bytes_read: dict[str, float] = {}
    if rank:
        on_F = np.asarray(x[0] @ wg) > 0
        pred, pred_F, hidden = make_predictor(np.asarray(x[0]), on_F, ratio, rank)
        buckets = None if fallback else (-(-F // chunk) * chunk,)
        fns[PREDICTOR_ROW] = jax.jit(lambda x, wg, wu, wd, wut, wgt, pred: sparse_ffn(
            x, wg, wu, wd, activation="relu", w_up_FxD=wut, w_gate_FxD=wgt, predictor=pred, implementation="cpu_ffi",
            buckets=buckets))
        args[PREDICTOR_ROW] = (x, wg, wu, wd, w_up_FxD, jax.block_until_ready(prep["w_gate_FxD"]), pred)
        bytes_read[PREDICTOR_ROW] = D * rank + hidden * rank * F + (pred_F.mean() + 2 * on_F.mean()) * D * F
    outs = {name: fn(*args[name]) for name, fn in fns.items()}
    ref = outs["dense"][0]
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name] += timed(fn, args[name], 1)
    md, best_d = statistics.median(times["dense"]), min(times["dense"])
    rows = []
    for name, (got, count) in outs.items():
        err = float(jnp.max(jnp.abs(ref - got)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30))
        ms = statistics.median(times[name])
        s_real = 1.0 - int(count) / F
        bound = 3.0 / (1.0 + 2.0 * (1.0 - s_real))
        if name in bytes_read:
            bound = 3.0 * D * F / bytes_read[name]
        rows.append(dict(D=D, F=F, B=B, s=s_real, implementation=name, ms=ms, speedup=md / ms, bound=bound,
                         pct_bound=100 * md / ms / bound, tok_s=B * 1e3 / ms, rel_err=err,
                         best=best_d / min(times[name])))  # min/min: robust to other processes on the cores
    return rows


def record_ffn_inputs(path: str, n_tokens: int) -> tuple:
    """(model config, stacked params, {layer: x_NxD}) of a trained model prefilling ``n_tokens`` of stdlib text."""
    import json as json_module
    from pathlib import Path

    from tokenizers import Tokenizer

    from prosparse_jax.inference import decode, generate, score
    from prosparse_jax.model import transformer as model
    from prosparse_jax.training.model_io import load_model

    cfg, params, tok_path = load_model(path)
    if tok_path is None:
        raise SystemExit(f"bench_sparse_ffn: error: {path} has no tokenizer.json")
    cfg = generate.sparse_config(cfg, sparse=True)
    text = (Path(json_module.__file__).parent / "decoder.py").read_text()
    ids = Tokenizer.from_file(str(tok_path)).encode(text).ids[:min(n_tokens, score.context_window(path)[0])]
    seen: dict[int, np.ndarray] = {}

    def recording_ffn(p: dict, c: object):
        dense = decode.dense_ffn(p, c)

        def ffn(layer, x_BxTxD, lp, valid_BxT):
            jax.debug.callback(lambda l, x: seen.__setitem__(int(l), np.asarray(x)[0]), layer, x_BxTxD)
            return dense(layer, x_BxTxD, lp, valid_BxT)
        return ffn

    cache = decode.init_cache(cfg, 1, len(ids), jnp.zeros(1, jnp.int32))
    jax.block_until_ready(decode.prefill(params, jnp.asarray([ids]), cache, cfg, ffn_impl=recording_ffn))
    return cfg, model.stack_layers(params), seen


def bench_trained(path: str, n_tokens: int, chunk: int, implementations: list[str]) -> None:
    """Per layer of a trained model: dense vs each sparse backend over its recorded batch-1 FFN inputs."""
    cfg, params, seen = record_ffn_inputs(path, n_tokens)
    taus = cfg.neuron_thresholds or None
    print(f"{path}: {cfg.activation} (threshold {cfg.activation_threshold}), sparse-mode taus: {taus is not None}, "
          f"{len(seen[0])} tokens")
    print(f"{'layer':>5} {'DxF':>9} {'implementation':>14} {'sparsity':>8} {'dense ms':>9} {'sparse ms':>9} "
          f"{'speedup':>7} {'bound':>6} {'max rel err':>11}")
    for layer in sorted(seen):
        lp = {k: v[layer] for k, v in params["layers"].items()}
        prep = jax.block_until_ready(prepare_weights(lp["w_up_LxDxF"], lp["w_down_LxFxD"]))
        w = (lp["w_gate_LxDxF"], lp["w_up_LxDxF"], lp["w_down_LxFxD"])
        kw = dict(activation=cfg.activation, threshold=cfg.activation_threshold, w_down_norms_F=prep["w_down_norms_F"],
                  taus=None if taus is None else taus[layer])
        dense = jax.jit(functools.partial(sparse_ffn, implementation="dense", **kw))
        xs = [jnp.asarray(x[None]) for x in seen[layer]]
        refs = [dense(x, *w)[0] for x in xs]  # the dense outputs, once per layer
        for name in (n for n in implementations if n != "dense"):
            sparse = jax.jit(lambda x, wg, wu, wd, wut, kw=kw, name=name: sparse_ffn(
                x, wg, wu, wd, w_up_FxD=wut, chunk=chunk, implementation=name, **kw))
            td = ts = 0.0
            counts, err = [], 0.0
            for x, ref in zip(xs, refs, strict=True):
                got, count = sparse(x, *w, prep["w_up_FxD"])
                err = max(err, float(jnp.max(jnp.abs(ref - got)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30)))
                counts.append(int(count))
                td += min(timed(dense, (x, *w), 3))  # timed beside each backend: a side-by-side ratio per token
                ts += min(timed(sparse, (x, *w, prep["w_up_FxD"]), 3))
            F = cfg.d_ff
            s_real = 1.0 - float(np.mean(counts)) / F
            bound = 3.0 / (1.0 + 2.0 * (1.0 - s_real)) if taus is None else 3.0 / (2.0 + (1.0 - s_real))
            print(f"{layer:>5} {cfg.d_model:>4}x{F:<4} {name:>14} {s_real:>8.3f} {td:>9.2f} {ts:>9.2f} "
                  f"{td / ts:>6.2f}x {bound:>5.2f}x {err:>11.1e}", flush=True)


def parse_implementations(text: str) -> list[str]:
    """``dense,cpu_gather,cpu_ffi`` -> the list, dense first (always timed: the reference); unknown names error."""
    try:
        names = [resolve_implementation(n) for n in text.split(",") if n]
    except UsageError as e:
        raise SystemExit(f"bench_sparse_ffn: error: --implementations: {e}") from None
    return ["dense", *dict.fromkeys(n for n in names if n != "dense")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x11008,1536x3840")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--sparsities", default="0,0.5,0.7,0.8,0.88,0.95,0.99")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--chunk", type=int, default=DEFAULT_CHUNK)
    ap.add_argument("--crossover", action="store_true", help="density sweep 30..70%% for DENSE_CROSSOVER")
    ap.add_argument("--fallback", action="store_true", help="default buckets: dense above DENSE_CROSSOVER")
    ap.add_argument("--checkpoint", default="", help="real activations: a trained workdir / HF folder")
    ap.add_argument("--tokens", type=int, default=64, help="with --checkpoint: recorded tokens per layer")
    ap.add_argument("--implementations", default="dense,cpu_gather,cpu_ffi",
                    help="backends of prosparse_jax.inference.sparse_ffn to time (dense: always, the reference)")
    ap.add_argument("--rank", type=int, default=0, help="> 0: add the cpu_ffi row with a predictor of this rank")
    ap.add_argument("--predictor_ratio", type=float, default=1.3,
                    help="the predictor's set over the true active set (>= 1: a superset, iid extra neurons)")
    a = ap.parse_args()
    impls = parse_implementations(a.implementations)
    if a.checkpoint:
        print(f"jax {jax.__version__}, backend {jax.default_backend()}, chunk {a.chunk}")
        bench_trained(a.checkpoint, a.tokens, a.chunk, impls)
        return
    sps = [0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4, 0.3] if a.crossover else [float(v) for v in a.sparsities.split(",")]
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, chunk {a.chunk} (cpu_gather), reps {a.reps}, "
          f"fallback {a.fallback}")
    print(f"{'shape':>11} {'B':>2} {'sparsity':>8} {'implementation':>17} {'ms':>8} {'vs dense':>8} {'bound':>6} "
          f"{'%bound':>6} {'tok/s':>8} {'rel err':>8} {'min/min':>7}")
    for shape in a.shapes.split(","):
        D, F = (int(v) for v in shape.split("x"))
        for B in (int(v) for v in a.batches.split(",")):
            for s in sps:
                for r in bench_one(D, F, B, s, a.reps, a.chunk, impls[1:], a.fallback, a.rank, a.predictor_ratio):
                    print(f"{shape:>11} {B:>2} {r['s']:>8.3f} {r['implementation']:>17} {r['ms']:>8.2f} "
                          f"{r['speedup']:>7.2f}x {r['bound']:>5.2f}x {r['pct_bound']:>5.0f}% {r['tok_s']:>8.1f} "
                          f"{r['rel_err']:>8.1e} {r['best']:>6.2f}x", flush=True)


if __name__ == "__main__":
    main()
