"""Measures activation sparsity of a checkpoint (ProSparse / Sparsing Law metrics) and finds sparse-mode thresholds.

    python -m prosparse_jax.analyze --checkpoint=<workdir or HF folder> --data=stdlib --metric=pplp --value=1 \
        --out=<dir> [--step=N --seq_len=256 --batch_size=8 --num_batches=4 --data_dir=... --topk_mode=token]

Metrics and their --value (definitions in :mod:`prosparse_jax.sparsity`): exact (value ignored), topk (k in (0, 1]),
fat (eps >= 0), cett (target CETT in [0, 1]), pplp (p >= 0, percent). --data is one DataConfig.source or several
separated by commas (thresholds are found on all of them pooled, then reported per dataset). The held-out split of
each source is used, tokenized with the checkpoint's tokenizer.json; data_dir / eval_fraction / text_key / seq_len
default to the checkpoint's run config when it has one.

Cost: one jitted forward with capture per eval batch measures everything; cett bisects tau on the captured x1 (no
extra forward passes) and then runs one sparse forward per batch for the sparse loss; pplp runs one sparse forward
per batch per bisection step on the shared CETT target. ``forward_passes`` counts batch forwards.

Writes ``<out>/sparsity.json``, ``<out>/heatmap.png`` (activation ratio per layer x token position),
``<out>/per_layer.png`` and, for cett / pplp, ``<out>/sparse_mode.json`` = {"model.neuron_thresholds": [...]}: run
the model in sparse mode with ``--config.model.neuron_thresholds='(t1, t2, ...)'`` (or set ``neuron_thresholds`` in
the model section of a config; ``ModelConfig.neuron_thresholds`` makes ``model.forward`` apply it).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from prosparse_jax import checkpoint as ckpt
from prosparse_jax import cli, model, sparsity
from prosparse_jax import data as data_lib
from prosparse_jax.config import ConfigError, ModelConfig
from prosparse_jax.model import Params

FLAGS = flags.FlagValues()  # own flag set: the CLI modules can be imported together (tests)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir or HF model folder.", flag_values=FLAGS)
_DATA = flags.DEFINE_string("data", "stdlib", "Data source(s), comma-separated: stdlib | files:<glob> | tfds:<name>.",
                            flag_values=FLAGS)
_METRIC = flags.DEFINE_string("metric", "exact", f"One of: {', '.join(sparsity.METRICS)}.", flag_values=FLAGS)
_VALUE = flags.DEFINE_float("value", None, "Metric parameter: topk k, fat eps, cett target, pplp p (percent).",
                            flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "Output directory.", flag_values=FLAGS)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of a workdir; default: the latest.", flag_values=FLAGS)
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Tokens per sequence; default: the run's data.seq_len, else 256.",
                                flag_values=FLAGS)
_BATCH = flags.DEFINE_integer("batch_size", 8, "Sequences per eval batch.", flag_values=FLAGS)
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 4, "Eval batches per data source.", flag_values=FLAGS)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir; default: the run's data.data_dir.",
                                flag_values=FLAGS)
_TOPK_MODE = flags.DEFINE_string("topk_mode", "token", "topk: 'token' (k neurons per layer per token, the Sparsing "
                                 "Law paper's definition, Sec. 4.1) or 'global' (per layer over batch x tokens x d_ff, "
                                 "the public code's rule).", flag_values=FLAGS)
_PPLP_STEPS = flags.DEFINE_integer("pplp_steps", 12, "pplp: bisection steps on the shared CETT target.",
                                   flag_values=FLAGS)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing <out>/sparsity.json.", flag_values=FLAGS)
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.", flag_values=FLAGS)

METRIC_VALUE_RULES = {
    "topk": ("k in (0, 1]", lambda v: 0.0 < v <= 1.0),
    "fat": ("eps >= 0", lambda v: v >= 0.0),
    "cett": ("target CETT in [0, 1]", lambda v: 0.0 <= v <= 1.0),
    "pplp": ("p >= 0 (percent)", lambda v: v >= 0.0),
}


class AnalyzeError(ValueError):
    """Bad analyze arguments or inputs; the message names the flag."""


def validate_args(metric: str, value: float | None, topk_mode: str, batch_size: int, num_batches: int,
                  pplp_steps: int) -> float:
    """Checks the metric arguments; returns the value (0 for 'exact'). Raises AnalyzeError naming the flag."""
    if metric not in sparsity.METRICS:
        raise AnalyzeError(f"--metric: unknown metric {metric!r}; choose one of: {', '.join(sparsity.METRICS)}")
    if topk_mode not in sparsity.TOPK_MODES:
        raise AnalyzeError(f"--topk_mode: {topk_mode!r}; choose one of: {', '.join(sparsity.TOPK_MODES)}")
    for name, v in (("batch_size", batch_size), ("num_batches", num_batches), ("pplp_steps", pplp_steps)):
        if v <= 0:
            raise AnalyzeError(f"--{name}: must be a positive integer, got {v}")
    if metric == "exact":
        return 0.0 if value is None else float(value)
    rule, ok = METRIC_VALUE_RULES[metric]
    if value is None or not math.isfinite(value) or not ok(float(value)):
        raise AnalyzeError(f"--value: metric {metric!r} needs {rule}, got {value}")
    return float(value)


# ---------------------------------------------------------------------------------------------------------------
# Jitted per-batch functions
# ---------------------------------------------------------------------------------------------------------------
def _nll(logits_BxTxV: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    w_BxT = batch["weights"]
    return model.cross_entropy(logits_BxTxV, batch["targets"], w_BxT) * jnp.maximum(w_BxT.sum(), 1.0), w_BxT.sum()


def make_capture(cfg: ModelConfig):
    """Jitted dense forward with capture: (params, batch) -> (nll sum, weight sum, x1_LxBxTxF, act_gate_LxBxTxF)."""

    def f(params: Params, batch: dict[str, jax.Array]) -> tuple[jax.Array, ...]:
        logits, st = model.forward(params, batch["inputs"], cfg, segment_ids_BxT=batch["segment_ids"],
                                   positions_BxT=batch["positions"], capture=True)
        return (*_nll(logits, batch), st.x1, st.act_gate)

    return jax.jit(f)


def make_tau_forward(cfg: ModelConfig):
    """Sparse loss with per-layer CETT taus through the model's own sparse-mode hook (what sparse mode runs).

    Returns a jitted (params, batch, taus_L) -> (nll sum, weight sum, sparse-run activation ratio per layer [L]).
    """

    def f(params: Params, batch: dict[str, jax.Array], taus_L: jax.Array) -> tuple[jax.Array, ...]:
        logits, st = model.forward(params, batch["inputs"], cfg, segment_ids_BxT=batch["segment_ids"],
                                   positions_BxT=batch["positions"], x1_mask=model.neuron_norm_mask(params, taus_L))
        return (*_nll(logits, batch), 1.0 - st.zero_frac)

    return jax.jit(f)


def _make_gate_forward(cfg: ModelConfig, metric: str, topk_mode: str):
    def f(params: Params, batch: dict[str, jax.Array], p_L: jax.Array) -> tuple[jax.Array, ...]:
        mask = sparsity.fat_x1_mask(p_L) if metric == "fat" else sparsity.topk_x1_mask(p_L, topk_mode)
        logits, st = model.forward(params, batch["inputs"], cfg, segment_ids_BxT=batch["segment_ids"],
                                   positions_BxT=batch["positions"], x1_mask=mask)
        return (*_nll(logits, batch), 1.0 - st.zero_frac)

    return jax.jit(f)


@jax.jit
def _active_exact(x1_LxBxTxF: jax.Array) -> jax.Array:
    return sparsity.exact_mask(x1_LxBxTxF)


@jax.jit
def _active_fat(x1_LxBxTxF: jax.Array, act_LxBxTxF: jax.Array, eps: jax.Array) -> jax.Array:
    return sparsity.fat_mask(act_LxBxTxF, eps) & (x1_LxBxTxF != 0)


def _make_active_topk(mode: str):
    def f(x1_LxBxTxF: jax.Array, act_LxBxTxF: jax.Array, k: jax.Array, valid_BxT: jax.Array):
        keep = jax.vmap(lambda a: sparsity.topk_mask(a, k, mode, valid_BxT))(act_LxBxTxF)
        thr_L = jax.vmap(lambda a, m: sparsity.topk_threshold(a, m, mode, valid_BxT))(act_LxBxTxF, keep)
        return keep & (x1_LxBxTxF != 0), thr_L

    return jax.jit(f)


@jax.jit
def active_tau(x1_LxBxTxF: jax.Array, norms_LxF: jax.Array, taus_L: jax.Array) -> jax.Array:
    """CETT activity: neuron output norm |x1_i| * ||W_down[:, i]|| > tau of its layer, [L, B, T, F] bool."""
    n = jnp.abs(x1_LxBxTxF.astype(jnp.float32)) * norms_LxF[:, None, None, :]
    return n > taus_L[:, None, None, None]


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------
def load_batches(sources: list[str], tok_path: Path, run_data: dict[str, Any], seq_len: int | None,
                 data_dir: str | None, batch_size: int, num_batches: int, vocab: int
                 ) -> dict[str, list[dict[str, jax.Array]]]:
    """Held-out eval batches (device arrays) of each source, tokenized with ``tok_path``; {source: [batch, ...]}.

    data_dir / text_key / seq_len / eval_fraction default to the run's ``data`` section (``run_data``).
    """
    out = {}
    for src in sources:
        try:
            dcfg = data_lib.DataConfig(
                source=src, data_dir=data_dir if data_dir is not None else run_data.get("data_dir", ""),
                text_key=run_data.get("text_key", "text"), tokenizer=str(tok_path),
                seq_len=seq_len or run_data.get("seq_len", 256),
                eval_fraction=float(run_data.get("eval_fraction", data_lib.DataConfig.eval_fraction)))
        except ConfigError as e:
            raise AnalyzeError(f"--data / --seq_len: {e}") from e
        tok = data_lib.get_tokenizer(dcfg, cache_dir=tok_path.parent)
        if tok.get_vocab_size() > vocab:
            raise AnalyzeError(f"--checkpoint: tokenizer has {tok.get_vocab_size()} tokens > model vocab {vocab}")
        batches = data_lib.make_eval_batches(dcfg, tok, batch_size=batch_size, num_batches=num_batches)
        out[src] = [{k: jnp.asarray(v) for k, v in b.items()} for b in batches]
    return out


def _finish(nll: float, w: float) -> float:
    return nll / max(w, 1.0)


def _ratio(sparse_loss: float, dense_loss: float) -> float:
    return float(math.exp(min(sparse_loss - dense_loss, 50.0)))


def analyze(checkpoint: str | Path, data: str, metric: str, value: float | None, out: str | Path, *,
            step: int | None = None, seq_len: int | None = None, batch_size: int = 8, num_batches: int = 4,
            data_dir: str | None = None, topk_mode: str = "token", pplp_steps: int = 12, overwrite: bool = False,
            progress: bool = True) -> dict[str, Any]:
    """Measures ``metric`` on held-out batches of ``data`` and writes the results to ``out``.

    Args:
      checkpoint: workdir or HF model folder (with tokenizer.json).
      data: DataConfig.source string(s), comma-separated.
      metric: one of :data:`prosparse_jax.sparsity.METRICS`.
      value: k (topk), eps (fat), target CETT (cett), p in percent (pplp); ignored by exact.
      out: output directory; an existing sparsity.json there is an error unless ``overwrite``.
      step: checkpoint step (workdirs); None = latest.
      seq_len: tokens per sequence; None = the run's data.seq_len (else 256).
      batch_size, num_batches: eval batches per source.
      data_dir: TFDS data dir; None = the run's.
      topk_mode: 'token' (the paper's per-token rule, default) or 'global' (the public code's per-layer rule).
      pplp_steps: bisection steps on the shared CETT target (pplp).
      overwrite: replace an existing sparsity.json.
      progress: tqdm progress bar.

    Returns:
      The dict written to sparsity.json.
    """
    from tqdm import tqdm

    value = validate_args(metric, value, topk_mode, batch_size, num_batches, pplp_steps)
    sources = [s.strip() for s in str(data).split(",") if s.strip()]
    if not sources:
        raise AnalyzeError("--data: give at least one source (stdlib, files:<glob>, tfds:<name>)")
    out = Path(out)
    if (out / "sparsity.json").exists() and not overwrite:
        raise AnalyzeError(f"--out: {out / 'sparsity.json'} already exists; pass --overwrite to replace it "
                           "or choose another --out (nothing was written)")
    try:
        mcfg, params, tok_path = ckpt.load_model(checkpoint, step)
    except ckpt.CheckpointError as e:
        raise AnalyzeError(f"--checkpoint: {e}") from e
    if tok_path is None:
        raise AnalyzeError(f"--checkpoint: {checkpoint} has no tokenizer.json next to config.json")
    run_cfg = json.loads((Path(checkpoint) / "config.json").read_text())
    run_data = run_cfg.get("data", {}) if isinstance(run_cfg.get("data"), dict) else {}
    cfg = mcfg.replace(neuron_thresholds=())  # dense baseline even for a model saved in sparse mode
    params = jax.device_put(params)
    by_src = load_batches(sources, tok_path, run_data, seq_len, data_dir, batch_size, num_batches, cfg.vocab_size)
    L, F = cfg.n_layers, cfg.d_ff
    n_batches = sum(len(b) for b in by_src.values())

    sweeps = {"exact": 0, "pplp": pplp_steps}.get(metric, 1)
    pbar = tqdm(total=n_batches * (1 + sweeps), desc=f"analyze {metric}", disable=not progress,
                file=sys.stderr)
    fwd = {"capture": 0, "sparse": 0}

    # ---- 1. dense forward with capture: dense loss and (for every metric but cett/pplp) the measurement ----
    capture = make_capture(cfg)
    active_topk = _make_active_topk(topk_mode) if metric == "topk" else None
    dense = {s: [0.0, 0.0] for s in sources}
    stats: dict[str, dict[str, np.ndarray] | None] = {s: None for s in sources}
    thr_sum_L, thr_n = np.zeros(L), 0
    cached: list[tuple[str, jax.Array, jax.Array, jax.Array]] = []  # (source, x1, valid, positions) for cett/pplp
    for src, batches in by_src.items():
        for b in batches:
            nll, w, x1, act = capture(params, b)
            fwd["capture"] += 1
            pbar.update(1)
            dense[src][0] += float(nll)
            dense[src][1] += float(w)
            valid = b["segment_ids"] != 0
            if metric in ("cett", "pplp"):
                cached.append((src, x1, valid, b["positions"]))
                continue
            if metric == "exact":
                active = _active_exact(x1)
            elif metric == "fat":
                active = _active_fat(x1, act, jnp.float32(value))
            else:
                active, thr_L = active_topk(x1, act, jnp.float32(value), valid)
                thr_sum_L += np.asarray(thr_L, np.float64)
                thr_n += 1
            stats[src] = sparsity.add_stats(stats[src], sparsity.mask_stats(active, valid, b["positions"]))
            del x1, act, active
    dense_loss_all = _finish(sum(v[0] for v in dense.values()), sum(v[1] for v in dense.values()))

    # ---- 2. thresholds and sparse loss ----
    sparse = {s: [0.0, 0.0, np.zeros(L)] for s in sources}  # nll, weight, sum over batches of sparse-run ratio * n
    result: dict[str, Any] = {}
    taus_L: np.ndarray | None = None

    def run_sparse(fn, p_L: np.ndarray) -> dict[str, list]:
        acc = {s: [0.0, 0.0, np.zeros(L), 0] for s in sources}
        p = jnp.asarray(np.asarray(p_L, np.float32))
        for src, batches in by_src.items():
            for b in batches:
                nll, w, act_L = fn(params, b, p)
                fwd["sparse"] += 1
                pbar.update(1)
                acc[src][0] += float(nll)
                acc[src][1] += float(w)
                acc[src][2] += np.asarray(act_L, np.float64)
                acc[src][3] += 1
        return acc

    if metric == "exact":
        sparse = None
        thresholds = [0.0] * L
        result["threshold_kind"] = "none (exact zeros of x1)"
    elif metric in ("topk", "fat"):
        p_L = np.full(L, value)
        sparse = run_sparse(_make_gate_forward(cfg, metric, topk_mode), p_L)
        if metric == "fat":
            thresholds = [float(value)] * L
            result["threshold_kind"] = "|act(gate)| >= eps kept"
        else:
            thresholds = [float(x) for x in thr_sum_L / max(thr_n, 1)]
            result["threshold_kind"] = (
                "smallest kept |act(gate)| per layer, mean over batches" if topk_mode == "global"
                else "smallest kept |act(gate)| per token, mean over tokens and batches")
    else:
        w_down = params["layers"]["w_down_LxFxD"]
        cache = sparsity.CETTCache(w_down, [(x1, v) for _, x1, v, _ in cached])
        tau_fwd = make_tau_forward(cfg)
        if metric == "cett":
            taus_L, cett_L = cache.bisect(value)
            sparse = run_sparse(tau_fwd, taus_L)
            target = value
        else:
            limit = 1.0 + value / 100.0
            lo, hi = 0.0, 1.0
            best: tuple[np.ndarray, np.ndarray, dict] | None = None
            search = []
            for _ in range(pplp_steps):
                mid = (lo + hi) / 2
                t_L, c_L = cache.bisect(mid)
                acc = run_sparse(tau_fwd, t_L)
                sl = _finish(sum(a[0] for a in acc.values()), sum(a[1] for a in acc.values()))
                r = _ratio(sl, dense_loss_all)
                ok = r <= limit
                search.append({"cett_target": mid, "ppl_ratio": r, "sparse_loss": sl, "feasible": bool(ok),
                               "mean_tau": float(np.mean(t_L))})
                if ok:
                    lo, best = mid, (t_L, c_L, acc)
                else:
                    hi = mid
            if best is None:  # no step was feasible: the target 0 (tau = 0, only exact zeros truncated)
                pbar.total += n_batches
                t_L, c_L = cache.bisect(0.0)
                best = (t_L, c_L, run_sparse(tau_fwd, t_L))
            taus_L, cett_L, sparse = best
            target = lo
            result["pplp_search"] = search
        thresholds = [float(t) for t in np.asarray(taus_L, np.float32)]
        result["threshold_kind"] = "tau on the neuron output norm |x1_i| * ||W_down[:, i]|| (n_i <= tau truncated)"
        result["cett_target"] = float(target)
        result["cett_achieved_per_layer"] = [float(c) for c in cett_L]
        norms = cache.norms_LxF
        t_dev = jnp.asarray(np.asarray(taus_L, np.float32))
        for src, x1, valid, pos in cached:
            active = active_tau(x1, norms, t_dev)
            stats[src] = sparsity.add_stats(stats[src], sparsity.mask_stats(active, valid, pos))
        del cache, cached
    pbar.close()

    # ---- 3. summaries ----
    def combine(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return {k: sum(p[k] for p in parts) for k in parts[0]}

    def summary(srcs: list[str]) -> dict[str, Any]:
        s = sparsity.summarize_stats(combine([stats[x] for x in srcs]), F)
        dl = _finish(sum(dense[x][0] for x in srcs), sum(dense[x][1] for x in srcs))
        if sparse is None:
            sl, run_ratio = dl, np.asarray(s["activation_ratio_per_layer"])
        else:
            sl = _finish(sum(sparse[x][0] for x in srcs), sum(sparse[x][1] for x in srcs))
            run_ratio = sum(sparse[x][2] for x in srcs) / max(sum(sparse[x][3] for x in srcs), 1)
        s.update(dense_loss=dl, sparse_loss=sl, ppl_ratio=_ratio(sl, dl),
                 sparse_run_activation_ratio_per_layer=[float(x) for x in run_ratio],
                 sparse_run_activation_ratio=float(np.mean(run_ratio)))
        return s

    total = summary(sources)
    heat_LxT = total.pop("heatmap_LxT")
    res: dict[str, Any] = {
        "metric": metric, "value": value, "topk_mode": topk_mode if metric == "topk" else None,
        "checkpoint": str(checkpoint), "step": step, "data": sources, "model_activation": cfg.activation,
        "seq_len": int(next(iter(by_src.values()))[0]["inputs"].shape[1]), "batch_size": batch_size,
        "num_batches": num_batches, **total, "thresholds_per_layer": thresholds, **result,
        "forward_passes": fwd["capture"] + fwd["sparse"], "forward_passes_detail": fwd,
        "activation_definition": "x1_i non-zero after the metric's sparsification, on the dense run's activations",
        "dead_neuron_rule": f"active on < {sparsity.DEAD_NEURON_FREQ:.1%} of measured tokens",
    }
    if len(sources) > 1:
        res["per_dataset"] = {}
        for s in sources:
            d = summary([s])
            d.pop("heatmap_LxT")
            res["per_dataset"][s] = d
    if metric in ("cett", "pplp"):
        res["sparse_mode"] = {"model.neuron_thresholds": thresholds}

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "sparsity.json.tmp"
    tmp.write_text(json.dumps(res, indent=2))
    tmp.replace(out / "sparsity.json")
    if metric in ("cett", "pplp"):
        (out / "sparse_mode.json").write_text(json.dumps(res["sparse_mode"], indent=2))
    _plots(out, heat_LxT, res)
    return res


def _plots(out: Path, heat_LxT: np.ndarray, res: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    title = f"{res['metric']} {res['value']:g}" + (f" ({res['topk_mode']})" if res["topk_mode"] else "")
    fig, ax = plt.subplots(figsize=(8, 0.35 * heat_LxT.shape[0] + 2))
    im = ax.imshow(np.ma.masked_invalid(heat_LxT), aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel("token position (within document)")
    ax.set_ylabel("layer")
    ax.set_yticks(range(heat_LxT.shape[0]))
    ax.set_title(f"activation ratio per layer x position — {title}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "heatmap.png", dpi=100)
    plt.close(fig)

    ratios = res["activation_ratio_per_layer"]
    fig, ax = plt.subplots(figsize=(max(5, 0.3 * len(ratios) + 2), 3.5))
    ax.bar(range(len(ratios)), ratios, label="activation ratio")
    ax.bar(range(len(ratios)), res["dead_neuron_fraction_per_layer"], alpha=0.6, label="dead-neuron fraction")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction")
    ax.set_title(f"{title}: mean activation ratio {res['activation_ratio']:.4f}, PPL ratio {res['ppl_ratio']:.4f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "per_layer.png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: parses ``argv`` (default ``sys.argv``), runs :func:`analyze`; returns the exit code."""
    def body() -> str:
        if not _CHECKPOINT.value:
            raise AnalyzeError("--checkpoint: required (a workdir or HF model folder)")
        if not _OUT.value:
            raise AnalyzeError("--out: required (a directory for sparsity.json and the plots)")
        res = analyze(_CHECKPOINT.value, _DATA.value, _METRIC.value, _VALUE.value, _OUT.value, step=_STEP.value,
                      seq_len=_SEQ_LEN.value, batch_size=_BATCH.value, num_batches=_NUM_BATCHES.value,
                      data_dir=_DATA_DIR.value, topk_mode=_TOPK_MODE.value, pplp_steps=_PPLP_STEPS.value,
                      overwrite=_OVERWRITE.value, progress=_PROGRESS.value)
        keys = ("metric", "value", "activation_ratio", "sparsity", "dense_loss", "sparse_loss", "ppl_ratio",
                "dead_neuron_fraction", "tokens_measured", "forward_passes")
        lines = [json.dumps({k: res[k] for k in keys})]
        if "sparse_mode" in res:
            taus = ", ".join(repr(t) for t in res["sparse_mode"]["model.neuron_thresholds"])
            where = Path(_OUT.value) / "sparse_mode.json"
            lines.append(f"sparse mode: --config.model.neuron_thresholds='({taus},)'  (also in {where})")
        return "\n".join(lines)

    return cli.run("analyze", FLAGS, argv, body,
                   (AnalyzeError, ConfigError, ckpt.CheckpointError, data_lib.DataError, OSError))


if __name__ == "__main__":
    sys.exit(main())
