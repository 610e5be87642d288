"""The ``analyze`` pipeline: activation sparsity of a checkpoint on held-out data, and sparse-mode thresholds.

One jitted dense forward with capture per eval batch feeds the metric's object (:mod:`prosparse_jax.analysis.metrics`),
which then runs the sparse forwards for the sparse loss; the headline activation ratio is counted inside the metric's
sparse forward (Sparsing Law public code), the dense forward's count is kept beside it. The outputs are written all
or none; metrics, values and outputs: docs/analysis.md.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from prosparse_jax import files
from prosparse_jax.analysis import measure, neurons, sparsity
from prosparse_jax.analysis.measure import Batch, LossSums
from prosparse_jax.analysis.metrics import METRIC_CLASSES, Measurement, Metric, Outcome, Stats
from prosparse_jax.config import ModelConfig
from prosparse_jax.errors import InputError, OutputError, UsageError
from prosparse_jax.model.transformer import Params, ppl_ratio
from prosparse_jax.predictor import io as predictor_io
from prosparse_jax.predictor import measure as predictor_measure
from prosparse_jax.training import model_io
from prosparse_jax.training.model_io import load_model

METRIC_VALUE_RULES = {
    "topk": ("k in (0, 1]", lambda v: 0.0 < v <= 1.0),
    "fat": ("eps >= 0", lambda v: v >= 0.0),
    "cett": ("target CETT in [0, 1]", lambda v: 0.0 <= v <= 1.0),
    "pplp": ("p >= 0 (percent)", lambda v: v >= 0.0),
}


def validate_args(metric: str, value: float | None, topk_mode: str, batch_size: int, num_batches: int,
                  pplp_steps: int) -> float:
    """Checks the metric arguments; returns the value (0 for 'exact'). Raises UsageError naming the argument."""
    if metric not in sparsity.METRICS:
        raise UsageError(f"metric: unknown metric {metric!r}; choose one of: {', '.join(sparsity.METRICS)}")
    if topk_mode not in sparsity.TOPK_MODES:
        raise UsageError(f"topk_mode: {topk_mode!r}; choose one of: {', '.join(sparsity.TOPK_MODES)}")
    for name, v in (("batch_size", batch_size), ("num_batches", num_batches), ("pplp_steps", pplp_steps)):
        if v <= 0:
            raise UsageError(f"{name}: must be a positive integer, got {v}")
    if metric == "exact":
        return 0.0 if value is None else float(value)
    rule, ok = METRIC_VALUE_RULES[metric]
    if value is None or not math.isfinite(value) or not ok(float(value)):
        raise UsageError(f"value: metric {metric!r} needs {rule}, got {value}")
    return float(value)


# ---------------------------------------------------------------------------------------------------------------
# Steps of analyze()
# ---------------------------------------------------------------------------------------------------------------
def _sources_and_out(data: str, out: str | Path, overwrite: bool, checkpoint: str | Path) -> tuple[list[str], Path]:
    """The data sources and the out directory, checked before any work (no source, unusable or existing out, missing
    checkpoint or corrupt config.json raise)."""
    sources = [s.strip() for s in str(data).split(",") if s.strip()]
    if not sources:
        raise UsageError("data: give at least one source (stdlib, files:<glob>, tfds:<name>)")
    out = files.check_output_path(out, "out")
    files.check_model_path(checkpoint, "checkpoint")
    if (out / "sparsity.json").exists() and not overwrite:
        raise OutputError(f"out: {out / 'sparsity.json'} already exists; set overwrite to replace it or choose "
                          "another out (nothing was written)")
    return sources, out


def _load(checkpoint: str | Path, step: int | None, sources: list[str], seq_len: int | None, data_dir: str | None,
          batch_size: int, num_batches: int) -> tuple[ModelConfig, Params, dict[str, list[Batch]], dict[str, int]]:
    """(dense model config, params on device, held-out batches per source, distinct held-out token positions per
    source) of a checkpoint."""
    mcfg, params, tok_path = load_model(checkpoint, step)
    if tok_path is None:
        raise InputError(f"checkpoint: {checkpoint} has no tokenizer.json next to config.json")
    run_data = measure.run_data_section(files.read_json(Path(checkpoint) / "config.json", "config.json"))
    cfg = mcfg.replace(neuron_thresholds=())  # dense baseline even for a model saved in sparse mode
    params = jax.device_put(params)
    by_src, distinct = measure.load_eval(sources, tok_path, run_data, seq_len, data_dir, batch_size, num_batches,
                                         cfg.vocab_size)
    return cfg, params, by_src, distinct


def _load_predictor(path: str | Path, cfg: ModelConfig) -> tuple[Any, ModelConfig, Path]:
    """(predictor, the model config it predicts for, its folder): ``cfg`` with the sparse mode the predictor was
    trained on (its ``neuron_thresholds``), refused for another model or when damaged (before any measurement)."""
    pred, meta = predictor_io.load_predictor(Path(path), cfg)
    taus = meta.get("neuron_thresholds") or ()
    return pred, cfg.replace(neuron_thresholds=tuple(float(t) for t in taus)), Path(path)


def _capture_pass(meas: Measurement, meter: Metric) -> None:
    """One jitted dense forward with capture per batch: the dense loss sums, and every batch to the metric."""
    capture = measure.make_capture(meas.cfg)
    for src, batches in meas.by_src.items():
        for b in batches:
            nll, w, x1_LxBxTxF, act_LxBxTxF = capture(meas.params, b)
            meas.passes["capture"] += 1
            meas.pbar.update(1)
            meas.dense[src].add(nll, w)
            meter.observe(src, b, x1_LxBxTxF, act_LxBxTxF)
            del x1_LxBxTxF, act_LxBxTxF


COUNTED_IN = {
    "dense": "dense forward (no thresholds: the dense run is the metric's run)",
    "sparse": "sparse forward: the metric's thresholds applied layer by layer, so upstream masking changes downstream "
              "activations; the forward whose loss is sparse_loss (as the Sparsing Law public code counts)",
}


def _summary(srcs: list[str], stats: dict[str, Stats | None], meas: Measurement, sparse: dict[str, LossSums] | None
             ) -> dict[str, Any]:
    """Activation ratios (headline: counted in the metric's own run; also the dense forward's count), dead-neuron
    tiers, heatmap, token counts, dense / sparse loss and PPL ratio of the sources ``srcs`` pooled."""
    parts, d_ff = [stats[x] for x in srcs], meas.cfg.d_ff
    dense_count = sparsity.summarize_stats({k: sum(p[k] for p in parts) for k in parts[0]}, d_ff)
    dense_loss = LossSums.pool(meas.dense[x] for x in srcs).loss
    if sparse is None:
        run, sparse_loss = dense_count, dense_loss
    else:
        pooled = LossSums.pool(sparse[x] for x in srcs)
        run, sparse_loss = sparsity.summarize_stats(pooled.stats, d_ff), pooled.loss
    freq_LxF = run.pop("freq_LxF")
    tiers = neurons.dead_neuron_tiers(freq_LxF, run["tokens_measured"])
    dead = tiers[neurons.DEAD_TIERS[-1][0]]
    return {
        **run, "distinct_tokens": sum(meas.distinct[x] for x in srcs),
        "dense_forward_activation_ratio_per_layer": dense_count["activation_ratio_per_layer"],
        "dense_forward_activation_ratio": dense_count["activation_ratio"],
        "dead_neuron_fraction_per_layer": dead["fraction_per_layer"], "dead_neuron_fraction": dead["fraction"],
        "dead_neuron_tiers": tiers,
        "dense_loss": dense_loss, "sparse_loss": sparse_loss, "ppl_ratio": ppl_ratio(sparse_loss, dense_loss),
    }


def _result(header: dict[str, Any], sources: list[str], meter: Metric, meas: Measurement, outcome: Outcome
            ) -> tuple[dict[str, Any], np.ndarray]:
    """(the sparsity.json dict, the pooled heatmap_LxT)."""
    def summary(srcs: list[str]) -> dict[str, Any]:
        return _summary(srcs, meter.stats, meas, outcome.sparse)

    total = summary(sources)
    heat_LxT = total.pop("heatmap_LxT")
    res: dict[str, Any] = {
        **header, **_token_counts_first(total), "thresholds_per_layer": outcome.thresholds, **outcome.fields,
        "forward_passes": meas.passes["capture"] + meas.passes["sparse"], "forward_passes_detail": meas.passes,
        "activation_definition": "x1_i non-zero after the metric's sparsification",
        "activation_counted_in": COUNTED_IN["dense" if outcome.sparse is None else "sparse"],
        "dense_forward_definition": "dense_forward_activation_ratio*: the metric's rule applied to the dense "
                                    "forward's activations (no masking upstream)",
    }
    if len(sources) > 1:
        res["per_dataset"] = {s: {k: v for k, v in summary([s]).items() if k != "heatmap_LxT"} for s in sources}
    if outcome.sparse_mode:
        res["sparse_mode"] = model_io.sparse_mode_record(outcome.thresholds)
    if res["tokens_measured"] > res["distinct_tokens"]:
        res["warnings"] = [
            f"the held-out split was cycled: {res['tokens_measured']} tokens measured, only {res['distinct_tokens']} "
            "distinct held-out token positions (the eval batches repeat rows of a small split); lower batch_size / "
            "num_batches or hold out more text (data.eval_fraction)"]
    return res, heat_LxT


def _token_counts_first(summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` with distinct_tokens right after tokens_measured."""
    out = {}
    for k, v in summary.items():
        if k != "distinct_tokens":
            out[k] = v
        if k == "tokens_measured":
            out["distinct_tokens"] = summary["distinct_tokens"]
    return out


def write_outputs(out: Path, res: dict[str, Any], heat_LxT: np.ndarray) -> None:
    """sparsity.json, sparse_mode.json (cett / pplp) and the plots, staged and moved into ``out`` together: a failure
    (disk full) leaves the previous outputs untouched; a stale sparse_mode.json is removed when this run has none."""
    def clean(d: Path) -> None:
        if "sparse_mode" not in res:
            (d / model_io.SPARSE_MODE_FILE).unlink(missing_ok=True)

    with files.staged_output(out, replace=clean) as stage:
        (stage / "sparsity.json").write_text(json.dumps(res, indent=2))
        if "sparse_mode" in res:
            (stage / model_io.SPARSE_MODE_FILE).write_text(json.dumps(res["sparse_mode"], indent=2))
        write_plots(stage, heat_LxT, res)


def write_plots(out: Path, heat_LxT: np.ndarray, res: dict[str, Any]) -> None:
    """Writes ``<out>/heatmap.png`` and ``<out>/per_layer.png`` for the sparsity.json dict ``res``."""
    import matplotlib

    matplotlib.use("Agg")
    title = f"{res['metric']} {res['value']:g}" + (f" ({res['topk_mode']})" if res["topk_mode"] else "")
    _heatmap(out / "heatmap.png", heat_LxT, title)
    _per_layer(out / "per_layer.png", res, title)


def _heatmap(path: Path, heat_LxT: np.ndarray, title: str) -> None:
    """Activation ratio per layer x token position (within the document); NaN where no token was measured."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.35 * heat_LxT.shape[0] + 2))
    im = ax.imshow(np.ma.masked_invalid(heat_LxT), aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel("token position (within document)")
    ax.set_ylabel("layer")
    ax.set_yticks(range(heat_LxT.shape[0]))
    ax.set_title(f"activation ratio per layer x position — {title}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _per_layer(path: Path, res: dict[str, Any], title: str) -> None:
    """Activation ratio and dead-neuron fraction per layer, with the mean ratio and PPL ratio in the title."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ratios = res["activation_ratio_per_layer"]
    fig, ax = plt.subplots(figsize=(max(5, 0.3 * len(ratios) + 2), 3.5))
    ax.bar(range(len(ratios)), ratios, label="activation ratio")
    ax.bar(range(len(ratios)), res["dead_neuron_fraction_per_layer"], alpha=0.6,
           label=f"dead-neuron fraction (< {neurons.DEAD_FREQ:g} of tokens)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction")
    ax.set_title(f"{title}: mean activation ratio {res['activation_ratio']:.4f}, PPL ratio {res['ppl_ratio']:.4f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def analyze(checkpoint: str | Path, data: str, metric: str, value: float | None, out: str | Path, *,
            step: int | None = None, seq_len: int | None = None, batch_size: int = 8, num_batches: int = 4,
            data_dir: str | None = None, topk_mode: str = "token", pplp_steps: int = 12, overwrite: bool = False,
            progress: bool = True, predictor: str | Path | None = None) -> dict[str, Any]:
    """Measures ``metric`` on held-out batches of ``data`` and writes the results to ``out``.

    Args:
      checkpoint: workdir or HF model folder (with tokenizer.json).
      data: DataConfig.source string(s), comma-separated.
      value: k (topk), eps (fat), target CETT (cett), p in percent (pplp); ignored by exact.
      out: output directory; an existing sparsity.json there is an error unless ``overwrite``.
      step: checkpoint step (workdirs); None = latest.
      seq_len: None = the run's data.seq_len (else 256).
      batch_size, num_batches: eval batches per source.
      data_dir: TFDS data dir; None = the run's.
      topk_mode: 'token' (the paper's per-token rule) or 'global' (the public code's per-layer rule).
      pplp_steps: bisection steps on the shared CETT target (pplp).
      predictor: an activation predictor folder (``python -m prosparse_jax.main.predictor train``): its recall,
        predicted sparsity, ratio and PPL ratio in the loop on the same batches go to ``predictor`` in the result.

    Returns:
      The dict written to sparsity.json.
    """
    from tqdm import tqdm

    value = validate_args(metric, value, topk_mode, batch_size, num_batches, pplp_steps)
    sources, out = _sources_and_out(data, out, overwrite, checkpoint)
    cfg, params, by_src, distinct = _load(checkpoint, step, sources, seq_len, data_dir, batch_size, num_batches)
    pred = _load_predictor(predictor, cfg) if predictor else None
    meter = METRIC_CLASSES[metric](value, sources, topk_mode, pplp_steps)
    n_batches = sum(len(b) for b in by_src.values())
    pbar = tqdm(total=n_batches * (1 + meter.sweeps + (pred is not None)), desc=f"analyze {metric}",
                disable=not progress, file=sys.stderr)
    meas = Measurement(cfg, params, by_src, pbar, dense={s: LossSums() for s in sources}, distinct=distinct)
    _capture_pass(meas, meter)
    outcome = meter.finish(meas)
    pred_res = None
    if pred is not None:
        p, pcfg, pdir = pred
        batches = [b for bs in by_src.values() for b in bs]
        pred_res = {"predictor": str(pdir), **predictor_measure.report(p, params, pcfg, batches, pbar.update),
                    "model_sparse_mode": bool(pcfg.neuron_thresholds),
                    "definition": "recall, predicted_sparsity, ratio (predicted / truly active), true_sparsity per "
                                  "layer and their mean over layers; loss / ppl_ratio: the model as the predictor was "
                                  "trained for, without and with the predictor in the loop (docs/predictors.md)"}
    pbar.close()
    header = {"metric": metric, "value": value, "topk_mode": meter.topk_mode_field, "checkpoint": str(checkpoint),
              "step": step, "data": sources, "model_activation": cfg.activation,
              "seq_len": int(next(iter(by_src.values()))[0]["inputs"].shape[1]), "batch_size": batch_size,
              "num_batches": num_batches}
    res, heat_LxT = _result(header, sources, meter, meas, outcome)
    if pred_res is not None:
        res["predictor"] = pred_res
    write_outputs(out, res, heat_LxT)
    return res
