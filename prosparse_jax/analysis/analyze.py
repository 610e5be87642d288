r"""Measures activation sparsity of a checkpoint (ProSparse / Sparsing Law metrics) and finds sparse-mode thresholds.

    python -m prosparse_jax.analysis.analyze --checkpoint=<workdir or HF folder> --data=stdlib --metric=pplp --value=1 \
        --out=<dir> [--step=N --seq_len=256 --batch_size=8 --num_batches=4 --data_dir=... --topk_mode=token]

Metrics and their --value (definitions in :mod:`prosparse_jax.analysis.sparsity`; exact zeros: ProSparse arXiv 2402.13516;
the others: Sparsing Law arXiv 2411.02335 §4.1): exact (value ignored), topk (k in (0, 1]), fat (eps >= 0), cett
(target CETT in [0, 1]), pplp (p >= 0, percent). --data is one DataConfig.source or several separated by commas
(thresholds are found on all of them pooled, then reported per dataset). The held-out split of each source is used,
tokenized with the checkpoint's tokenizer.json; data_dir / eval_fraction / text_key / seq_len default to the
checkpoint's run config when it has one.

Cost: one jitted forward with capture per eval batch measures everything; cett bisects tau on the captured x1 (no
extra forward passes) and then runs one sparse forward per batch for the sparse loss; pplp runs one sparse forward
per batch per bisection step on the shared CETT target (and one more sweep at target 0 -- tau = 0, only exact zeros
truncated -- when no step was feasible). ``forward_passes`` counts batch forwards.

Steps of :func:`analyze`: check the arguments, load the checkpoint and its held-out batches, one dense capture pass
that feeds every batch to the metric's object (one class per metric: ``observe`` per captured batch, ``finish`` for
the thresholds and the sparse run: :mod:`prosparse_jax.analysis.metrics`; the shared passes:
:mod:`prosparse_jax.analysis.measure`), the summaries, the outputs (plots: :mod:`prosparse_jax.analysis.plots`).

Writes ``<out>/sparsity.json``, ``<out>/heatmap.png`` (activation ratio per layer x token position),
``<out>/per_layer.png`` and, for cett / pplp, ``<out>/sparse_mode.json`` = {"model.neuron_thresholds": [...]}: run
the model in sparse mode with ``--config.model.neuron_thresholds='(t1, t2, ...)'`` (or set ``neuron_thresholds`` in
the model section of a config; ``ModelConfig.neuron_thresholds`` makes ``model.forward`` apply it). The files are
written to a staging folder and moved into ``<out>`` together: a failure (disk full) leaves the previous outputs as
they were. ``--out`` (a file in the way) and ``--checkpoint`` (missing, corrupt config.json) are checked first.

Token counts: ``tokens_measured`` counts the measured (row, position) pairs; ``distinct_tokens`` the distinct
positions of the held-out token stream among them. The eval rows are windows spread over the held-out split
(``data.make_eval_batches``); a split with fewer windows than batch_size x num_batches is cycled, and then
distinct_tokens < tokens_measured: a warning on stderr and in ``warnings`` of sparsity.json says so.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import flags

from prosparse_jax.analysis import measure, sparsity
from prosparse_jax.analysis import plots as analyze_plots
from prosparse_jax.analysis.measure import Batch, LossSums
from prosparse_jax.analysis.metrics import METRIC_CLASSES, Metric, Outcome, Run, Stats
from prosparse_jax.config import ConfigError, ModelConfig
from prosparse_jax.data import pipeline as data_lib
from prosparse_jax.hf.config import HFConversionError
from prosparse_jax.main import common as cli
from prosparse_jax.model.transformer import Params
from prosparse_jax.training import checkpoint as ckpt

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
# Steps of analyze()
# ---------------------------------------------------------------------------------------------------------------
def _sources_and_out(data: str, out: str | Path, overwrite: bool, checkpoint: str | Path) -> tuple[list[str], Path]:
    """The --data sources and the --out directory, checked before any work: raises when there is no source, out is
    a file (or cannot be created) or would be overwritten, or the checkpoint does not exist / has a corrupt
    config.json."""
    sources = [s.strip() for s in str(data).split(",") if s.strip()]
    if not sources:
        raise AnalyzeError("--data: give at least one source (stdlib, files:<glob>, tfds:<name>)")
    try:
        out = cli.check_output_dir(out, "--out")
        cli.check_model_path(checkpoint, "--checkpoint")
    except (cli.UsageError, cli.InputError) as e:
        raise AnalyzeError(str(e) if str(e).startswith("--") else f"--checkpoint: {e}") from None
    if (out / "sparsity.json").exists() and not overwrite:
        raise AnalyzeError(f"--out: {out / 'sparsity.json'} already exists; pass --overwrite to replace it "
                           "or choose another --out (nothing was written)")
    return sources, out


def _load(checkpoint: str | Path, step: int | None, sources: list[str], seq_len: int | None, data_dir: str | None,
          batch_size: int, num_batches: int) -> tuple[ModelConfig, Params, dict[str, list[Batch]], dict[str, int]]:
    """(dense model config, params on device, held-out batches per source, distinct held-out token positions per
    source) of a checkpoint."""
    try:
        mcfg, params, tok_path = ckpt.load_model(checkpoint, step)
    except (ckpt.CheckpointError, HFConversionError) as e:
        raise AnalyzeError(f"--checkpoint: {e}") from e
    if tok_path is None:
        raise AnalyzeError(f"--checkpoint: {checkpoint} has no tokenizer.json next to config.json")
    run_data = measure.run_data_section(cli.read_json(Path(checkpoint) / "config.json", "config.json"))
    cfg = mcfg.replace(neuron_thresholds=())  # dense baseline even for a model saved in sparse mode
    params = jax.device_put(params)
    try:
        by_src, distinct = measure.load_eval(sources, tok_path, run_data, seq_len, data_dir, batch_size,
                                             num_batches, cfg.vocab_size)
    except measure.MeasureError as e:
        raise AnalyzeError(str(e)) from e
    return cfg, params, by_src, distinct


def _capture_pass(run: Run, meter: Metric) -> None:
    """One jitted dense forward with capture per batch: the dense loss sums, and every batch to the metric."""
    capture = measure.make_capture(run.cfg)
    for src, batches in run.by_src.items():
        for b in batches:
            nll, w, x1_LxBxTxF, act_LxBxTxF = capture(run.params, b)
            run.passes["capture"] += 1
            run.pbar.update(1)
            run.dense[src].add(nll, w)
            meter.observe(src, b, x1_LxBxTxF, act_LxBxTxF)
            del x1_LxBxTxF, act_LxBxTxF


def _summary(srcs: list[str], stats: dict[str, Stats | None], run: Run, sparse: dict[str, LossSums] | None
             ) -> dict[str, Any]:
    """Activation ratios, dead neurons, heatmap, token counts, dense / sparse loss and PPL ratio of the sources
    ``srcs`` pooled."""
    parts, dense = [stats[x] for x in srcs], run.dense
    s = sparsity.summarize_stats({k: sum(p[k] for p in parts) for k in parts[0]}, run.cfg.d_ff)
    s["distinct_tokens"] = sum(run.distinct[x] for x in srcs)
    dense_loss = LossSums.pool(dense[x] for x in srcs).loss
    if sparse is None:
        sparse_loss, run_ratio_L = dense_loss, np.asarray(s["activation_ratio_per_layer"])
    else:
        pooled = LossSums.pool(sparse[x] for x in srcs)
        sparse_loss, run_ratio_L = pooled.loss, pooled.ratio_sum_L / max(pooled.batches, 1)
    s.update(dense_loss=dense_loss, sparse_loss=sparse_loss, ppl_ratio=measure.ppl_ratio(sparse_loss, dense_loss),
             sparse_run_activation_ratio_per_layer=[float(x) for x in run_ratio_L],
             sparse_run_activation_ratio=float(np.mean(run_ratio_L)))
    return s


def _result(header: dict[str, Any], sources: list[str], meter: Metric, run: Run, outcome: Outcome
            ) -> tuple[dict[str, Any], np.ndarray]:
    """(the sparsity.json dict, the pooled heatmap_LxT)."""
    def summary(srcs: list[str]) -> dict[str, Any]:
        return _summary(srcs, meter.stats, run, outcome.sparse)

    total = summary(sources)
    heat_LxT = total.pop("heatmap_LxT")
    res: dict[str, Any] = {
        **header, **_token_counts_first(total), "thresholds_per_layer": outcome.thresholds, **outcome.fields,
        "forward_passes": run.passes["capture"] + run.passes["sparse"], "forward_passes_detail": run.passes,
        "activation_definition": "x1_i non-zero after the metric's sparsification, on the dense run's activations",
        "dead_neuron_rule": f"active on < {sparsity.DEAD_NEURON_FREQ:.1%} of measured tokens",
    }
    if len(sources) > 1:
        res["per_dataset"] = {s: {k: v for k, v in summary([s]).items() if k != "heatmap_LxT"} for s in sources}
    if outcome.sparse_mode:
        res["sparse_mode"] = {"model.neuron_thresholds": outcome.thresholds}
    if res["tokens_measured"] > res["distinct_tokens"]:
        res["warnings"] = [
            f"the held-out split was cycled: {res['tokens_measured']} tokens measured, only {res['distinct_tokens']} "
            "distinct held-out token positions (the eval batches repeat rows of a small split); lower --batch_size / "
            "--num_batches or hold out more text (data.eval_fraction)"]
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


def _write(out: Path, res: dict[str, Any], heat_LxT: np.ndarray) -> None:
    """sparsity.json, sparse_mode.json (cett / pplp) and the plots, written to a staging folder and moved into
    ``out`` together once all are written: a failure (disk full) leaves the previous outputs untouched (a stale
    sparse_mode.json of an earlier cett / pplp run is removed when the new run has none)."""
    def clean(d: Path) -> None:
        if "sparse_mode" not in res:
            (d / "sparse_mode.json").unlink(missing_ok=True)

    with cli.staged_output(out, replace=clean) as stage:
        (stage / "sparsity.json").write_text(json.dumps(res, indent=2))
        if "sparse_mode" in res:
            (stage / "sparse_mode.json").write_text(json.dumps(res["sparse_mode"], indent=2))
        analyze_plots.write_plots(stage, heat_LxT, res)


def analyze(checkpoint: str | Path, data: str, metric: str, value: float | None, out: str | Path, *,
            step: int | None = None, seq_len: int | None = None, batch_size: int = 8, num_batches: int = 4,
            data_dir: str | None = None, topk_mode: str = "token", pplp_steps: int = 12, overwrite: bool = False,
            progress: bool = True) -> dict[str, Any]:
    """Measures ``metric`` on held-out batches of ``data`` and writes the results to ``out``.

    Args:
      checkpoint: workdir or HF model folder (with tokenizer.json).
      data: DataConfig.source string(s), comma-separated.
      metric: one of :data:`prosparse_jax.analysis.sparsity.METRICS`.
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
    sources, out = _sources_and_out(data, out, overwrite, checkpoint)
    cfg, params, by_src, distinct = _load(checkpoint, step, sources, seq_len, data_dir, batch_size, num_batches)
    meter = METRIC_CLASSES[metric](value, sources, topk_mode, pplp_steps)
    n_batches = sum(len(b) for b in by_src.values())
    pbar = tqdm(total=n_batches * (1 + meter.sweeps), desc=f"analyze {metric}", disable=not progress,
                file=sys.stderr)
    run = Run(cfg, params, by_src, pbar, dense={s: LossSums() for s in sources}, distinct=distinct)
    _capture_pass(run, meter)
    outcome = meter.finish(run)
    pbar.close()
    header = {"metric": metric, "value": value, "topk_mode": meter.topk_mode_field, "checkpoint": str(checkpoint),
              "step": step, "data": sources, "model_activation": cfg.activation,
              "seq_len": int(next(iter(by_src.values()))[0]["inputs"].shape[1]), "batch_size": batch_size,
              "num_batches": num_batches}
    res, heat_LxT = _result(header, sources, meter, run, outcome)
    _write(out, res, heat_LxT)
    return res


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
                "dead_neuron_fraction", "tokens_measured", "distinct_tokens", "forward_passes")
        for w in res.get("warnings", []):
            print(f"analyze: warning: {w}", file=sys.stderr)
        lines = [json.dumps({k: res[k] for k in keys})]
        if "sparse_mode" in res:
            taus = ", ".join(repr(t) for t in res["sparse_mode"]["model.neuron_thresholds"])
            where = Path(_OUT.value) / "sparse_mode.json"
            lines.append(f"sparse mode: --config.model.neuron_thresholds='({taus},)'  (also in {where})")
        return "\n".join(lines)

    return cli.run("analyze", FLAGS, argv, body,
                   (AnalyzeError, ConfigError, ckpt.CheckpointError, data_lib.DataError, OSError), __doc__)


if __name__ == "__main__":
    sys.exit(main())
