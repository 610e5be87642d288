r"""Trains, calibrates and measures a model's activation predictors (one low-rank network per layer that predicts
from the FFN input which neurons the FFN will compute).

    python -m prosparse_jax.main.predictor train --checkpoint=<workdir or HF folder> [--out=<dir>] [--rank=R] \
        [--steps=N] [--batch_size=B] [--lr=LR] [--pos_weight=W] [--target_recall=0.99] [--calib_batches=N] \
        [--eval_batch_size=B] [--checkpoint_every=N] [--thresholds=<sparse_mode.json>] [--data=<source>] \
        [--step=N] [--seed=S] [--overwrite] [--noprogress_bar]
    python -m prosparse_jax.main.predictor eval --checkpoint=<workdir or HF folder> [--predictor=<dir>] \
        [--out=<eval.json>] [--freq_batches=N] [--overwrite]

``train`` learns each layer's predictor on the run's training split (the frozen model's FFN inputs and active sets,
collected batch by batch), calibrates each layer's threshold on held-out data for ``--target_recall`` and saves the
predictor with digests into ``--out`` (default ``<checkpoint>/predictor``); an interrupted ``train`` resumes when
rerun with the same flags. What it predicts is what the model computes: ``x1 != 0`` (ReLU, FATReLU, ReLU², dReLU),
or, for a model in the CETT sparse mode (``model.neuron_thresholds``, or ``--thresholds``: the sparse_mode.json of
``analyze --metric=pplp``), the neurons that mode keeps. ``eval`` measures the predictor on held-out rows disjoint
from the calibration's: recall, predicted sparsity and predicted/true active ratio per layer, the model's loss and
PPL ratio with the predictor in the loop, and the frequency baseline; it writes ``<predictor>/eval.json`` and prints
a one-line summary. Details: docs/predictors.md, :mod:`prosparse_jax.predictor.train`.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from prosparse_jax.errors import UsageError
from prosparse_jax.main import common
from prosparse_jax.predictor.train import Settings, evaluate, train_predictor
from prosparse_jax.training import model_io

COMMANDS = ("train", "eval")


def _flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    d = Settings()
    flags.DEFINE_string("checkpoint", None, "Workdir or HF model folder.", flag_values=fv)
    flags.DEFINE_integer("step", None, "Checkpoint step of a workdir; default: the latest.", flag_values=fv)
    flags.DEFINE_string("out", None, "train: the predictor folder (default <checkpoint>/predictor); eval: the eval "
                        "JSON (default <predictor>/eval.json).", flag_values=fv)
    flags.DEFINE_string("predictor", None, "eval: the predictor folder; default <checkpoint>/predictor.",
                        flag_values=fv)
    flags.DEFINE_integer("rank", d.rank, "Predictor rank r; 0 = d_model // 4 (at least 8).", flag_values=fv)
    flags.DEFINE_integer("steps", d.steps, "Training steps (one training batch each).", flag_values=fv)
    flags.DEFINE_integer("batch_size", d.batch_size, "Training sequences per step.", flag_values=fv)
    flags.DEFINE_float("lr", d.lr, "Peak Adam learning rate.", flag_values=fv)
    flags.DEFINE_float("pos_weight", d.pos_weight, "Weight of the active class in the loss; 0 = balanced per batch "
                       "and layer.", flag_values=fv)
    flags.DEFINE_float("target_recall", d.target_recall, "Per-layer recall the thresholds are calibrated for.",
                       flag_values=fv)
    flags.DEFINE_integer("calib_batches", d.calib_batches, "Held-out batches to calibrate on (as many others are "
                         "measured by eval).", flag_values=fv)
    flags.DEFINE_integer("eval_batch_size", d.eval_batch_size, "Sequences per held-out batch.", flag_values=fv)
    flags.DEFINE_integer("checkpoint_every", d.checkpoint_every, "Steps between training-state checkpoints.",
                         flag_values=fv)
    flags.DEFINE_integer("seed", d.seed, "Init and data-order seed.", flag_values=fv)
    flags.DEFINE_string("thresholds", None, "train: the sparse_mode.json written by analyze (or its folder) for a "
                        "model in the CETT sparse mode; replaces model.neuron_thresholds.", flag_values=fv)
    flags.DEFINE_string("data", None, "Data source; default: the run's data.source.", flag_values=fv)
    flags.DEFINE_string("data_dir", None, "TFDS data dir; default: the run's.", flag_values=fv)
    flags.DEFINE_integer("freq_batches", 8, "eval: training batches counted for the frequency baseline.",
                         flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "train: replace a predictor in --out (and restart its training); eval: "
                      "replace --out.", flag_values=fv)
    flags.DEFINE_bool("progress_bar", True, "Show a progress bar on stderr.", flag_values=fv)
    flags.mark_flags_as_required(["checkpoint"], flag_values=fv)
    return fv


def _summary(res: dict) -> dict:
    p, b = res["predictor_metrics"]["mean"], res["frequency_baseline"]["mean"]
    return {"rank": res["rank"], "recall": p["recall"], "predicted_sparsity": p["predicted_sparsity"],
            "ratio": p["ratio"], "true_sparsity": p["true_sparsity"], "ppl_ratio": res["ppl_ratio"]["predictor"],
            "baseline_recall": b["recall"], "baseline_ppl_ratio": res["ppl_ratio"]["frequency_baseline"]}


def main(argv: list[str] | None = None) -> int:
    """Runs ``train`` or ``eval`` (the first argument); returns the exit code."""
    args = list(sys.argv if argv is None else argv)
    command = args[1] if len(args) > 1 and not args[1].startswith("-") else None
    rest = [args[0], *args[2:]] if command is not None else args
    fv = _flags()

    def body() -> str:
        if command not in COMMANDS:
            got = f"got {command!r}" if command else "none given"
            raise UsageError(f"command: expected one of {', '.join(COMMANDS)} as the first argument ({got}), e.g. "
                             "`python -m prosparse_jax.main.predictor train --checkpoint=<workdir>`")
        if command == "train":
            taus = model_io.read_thresholds(fv.thresholds) if fv.thresholds else None
            settings = Settings(rank=fv.rank, steps=fv.steps, batch_size=fv.batch_size, lr=fv.lr, seed=fv.seed,
                                pos_weight=fv.pos_weight, checkpoint_every=fv.checkpoint_every,
                                target_recall=fv.target_recall, calib_batches=fv.calib_batches,
                                eval_batch_size=fv.eval_batch_size)
            out, _, meta = train_predictor(fv.checkpoint, fv.out, settings, step=fv.step, data=fv.data,
                                           data_dir=fv.data_dir, neuron_thresholds=taus, overwrite=fv.overwrite,
                                           progress_bar=fv.progress_bar)
            return json.dumps({"predictor": str(out), "rank": meta["rank"], "target_recall": meta["target_recall"],
                               "threshold_L": meta["calibration"]["threshold_L"],
                               "final_loss_L": meta["final_loss_L"]})
        out, res = evaluate(fv.checkpoint, fv.predictor, fv.out, step=fv.step, data=fv.data, data_dir=fv.data_dir,
                            freq_batches=fv.freq_batches, overwrite=fv.overwrite, progress_bar=fv.progress_bar)
        return json.dumps({"eval": str(out), **_summary(res)})

    return common.run("predictor", fv, rest, body, __doc__)


if __name__ == "__main__":
    sys.exit(main())
