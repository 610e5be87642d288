r"""Measures the activation sparsity of a checkpoint and finds sparse-mode thresholds.

    python -m prosparse_jax.main.analyze --checkpoint=<workdir or HF folder> --data=stdlib --metric=pplp --value=1 \
        --out=<dir> [--step=N --seq_len=256 --batch_size=8 --num_batches=4 --data_dir=... --topk_mode=token] \
        [--predictor=<dir>]

Metrics and their --value: exact (value ignored), topk (k in (0, 1]), fat (eps >= 0), cett (target CETT in [0, 1]),
pplp (p >= 0, percent). --data is one source or several separated by commas. Writes ``<out>/sparsity.json``, the
plots and, for cett / pplp, ``<out>/sparse_mode.json``; prints the summary as one JSON line (the activation ratio
counted in the metric's sparse forward, the dense forward's count, dead neurons per layer in tiers) and, for cett /
pplp, the ``--config.model.neuron_thresholds`` override that runs the model in sparse mode. ``--predictor`` (an
activation predictor folder, docs/predictors.md) adds its recall, predicted sparsity, predicted/true ratio and PPL
ratio in the loop on the same batches (``predictor`` in sparsity.json and the summary). Details:
:mod:`prosparse_jax.analysis.analyze`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import flags

from prosparse_jax.analysis import neurons, sparsity
from prosparse_jax.analysis.analyze import analyze
from prosparse_jax.main import common

SUMMARY_KEYS = ("metric", "value", "activation_ratio", "sparsity", "dense_forward_activation_ratio", "dense_loss",
                "sparse_loss", "ppl_ratio", "dead_neuron_fraction", "tokens_measured", "distinct_tokens",
                "forward_passes")


def _flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_string("checkpoint", None, "Workdir or HF model folder.", flag_values=fv)
    flags.DEFINE_string("data", "stdlib", "Data source(s), comma-separated: stdlib | files:<glob> | tfds:<name>.",
                        flag_values=fv)
    flags.DEFINE_string("metric", "exact", f"One of: {', '.join(sparsity.METRICS)}.", flag_values=fv)
    flags.DEFINE_float("value", None, "Metric parameter: topk k, fat eps, cett target, pplp p (percent).",
                       flag_values=fv)
    flags.DEFINE_string("out", None, "Output directory.", flag_values=fv)
    flags.DEFINE_integer("step", None, "Checkpoint step of a workdir; default: the latest.", flag_values=fv)
    flags.DEFINE_integer("seq_len", None, "Tokens per sequence; default: the run's data.seq_len, else 256.",
                         flag_values=fv)
    flags.DEFINE_integer("batch_size", 8, "Sequences per eval batch.", flag_values=fv)
    flags.DEFINE_integer("num_batches", 4, "Eval batches per data source.", flag_values=fv)
    flags.DEFINE_string("data_dir", None, "TFDS data dir; default: the run's data.data_dir.", flag_values=fv)
    flags.DEFINE_string("topk_mode", "token", "topk: 'token' (k neurons per layer per token, the Sparsing Law "
                        "paper's definition, Sec. 4.1) or 'global' (per layer over batch x tokens x d_ff, the public "
                        "code's rule).", flag_values=fv)
    flags.DEFINE_integer("pplp_steps", 12, "pplp: bisection steps on the shared CETT target.", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace an existing <out>/sparsity.json.", flag_values=fv)
    flags.DEFINE_bool("progress", True, "Show a progress bar.", flag_values=fv)
    flags.DEFINE_string("predictor", None, "Activation predictor folder to measure on the same batches.",
                        flag_values=fv)
    flags.mark_flags_as_required(["checkpoint", "out"], flag_values=fv)
    return fv


def main(argv: list[str] | None = None) -> int:
    """Runs :func:`prosparse_jax.analysis.analyze.analyze`; returns the exit code."""
    fv = _flags()

    def body() -> str:
        res = analyze(fv.checkpoint, fv.data, fv.metric, fv.value, fv.out, step=fv.step, seq_len=fv.seq_len,
                      batch_size=fv.batch_size, num_batches=fv.num_batches, data_dir=fv.data_dir,
                      topk_mode=fv.topk_mode, pplp_steps=fv.pplp_steps, overwrite=fv.overwrite, progress=fv.progress,
                      predictor=fv.predictor)
        for w in res.get("warnings", []):
            print(f"analyze: warning: {w}", file=sys.stderr)
        summary = {k: res[k] for k in SUMMARY_KEYS}
        summary["dead_neurons_per_layer"] = neurons.tier_counts(res["dead_neuron_tiers"])
        if "predictor" in res:
            p = res["predictor"]
            summary["predictor"] = {"rank": p["rank"], **{k: p["mean"][k] for k in (
                "recall", "predicted_sparsity", "ratio", "true_sparsity")}, "ppl_ratio": p["ppl_ratio"]}
        lines = [json.dumps(summary)]
        if "sparse_mode" in res:
            taus = ", ".join(repr(t) for t in res["sparse_mode"]["model.neuron_thresholds"])
            where = Path(fv.out) / "sparse_mode.json"
            lines.append(f"sparse mode: --config.model.neuron_thresholds='({taus},)'  (also in {where})")
        return "\n".join(lines)

    return common.run("analyze", fv, argv, body, __doc__)


if __name__ == "__main__":
    sys.exit(main())
