"""Main job: a miniature of ProSparse's Table 1 on the built-in corpus (Python stdlib sources), on 2 CPU cores.

    python experiments/prosparse_miniature.py --workdir=runs/miniature

Pretrains a tiny SiLU model, then continues it at equal tokens as SiLU (control), (a) ReLU only and (b) ProSparse
(ReLU + progressive L1); (c) is (b) with FATReLU thresholds (no retraining). Each row gets held-out sparsity, loss,
dead neurons and the CETT-PPL-1% ratio (Sparsing Law §4.1). Writes ``<workdir>/results.{json,md}`` and plots; each
run is an ordinary workdir, so a rerun resumes. Results: docs/results/miniature.md.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import flags, logging

from configs import prosparse as prosparse_configs  # noqa: E402
from prosparse_jax import files
from prosparse_jax.analysis import analyze as analyze_lib
from prosparse_jax.config import DataConfig, build_section
from prosparse_jax.data import corpus as corpus_lib
from prosparse_jax.data import pipeline as data_lib
from prosparse_jax.errors import UsageError
from prosparse_jax.main import common as cli
from prosparse_jax.model.transformer import forward
from prosparse_jax.training import checkpoint as ckpt
from prosparse_jax.training.metrics import read_metrics
from prosparse_jax.training.step import make_evaluate
from prosparse_jax.training.train import train

FLAGS = flags.FlagValues()  # own flag set, parsed by prosparse_jax.main.common.run (one-line errors, --verbose)
_WORKDIR = flags.DEFINE_string("workdir", "runs/miniature", "Output directory (one sub-workdir per run).",
                               flag_values=FLAGS)
_PRETRAIN = flags.DEFINE_integer("pretrain_steps", 180, "SiLU pretraining steps (warm-up, then constant LR).",
                                 flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("steps", 90, "Steps of each continued run (control, (a) and (b)): the config's WSD "
                              "schedule, the LR decaying over the last 40%.", flag_values=FLAGS)
_REL_THRESHOLDS = flags.DEFINE_list(
    "relative_thresholds", ["0.25", "1", "2", "4", "8"],
    "FATReLU thresholds for (c) as fractions of (b)'s mean positive gate pre-activation.", flag_values=FLAGS)
_ABS_THRESHOLD = flags.DEFINE_float("fatrelu_threshold", 0.01, "Absolute FATReLU threshold of the (c) row (paper).",
                                    flag_values=FLAGS)
_FAT_BATCHES = flags.DEFINE_integer("fatrelu_batches", 8, "Held-out batches of the FATReLU threshold table.",
                                    flag_values=FLAGS)
_PPLP_BATCHES = flags.DEFINE_integer("pplp_batches", 2, "Held-out batches of the CETT-PPL-1% search.",
                                     flag_values=FLAGS)
_QUICK = flags.DEFINE_boolean("quick", False, "CI smoke version: a few steps of each run, tiny eval.",
                              flag_values=FLAGS)

RUNS = ("silu", "control_silu", "a_relu", "b_prosparse")
LABELS = {
    "silu": "SiLU pretrained (start of every continued run)",
    "control_silu": "control: SiLU continued (dense baseline)",
    "a_relu": "(a) ReLU substitution (lambda = 0)",
    "b_prosparse": "(b) ProSparse (progressive L1)",
}


def run_config(activation: str, steps: int, stages: list[list[float]] | None, quick: bool):
    """The tiny config for one run of the job (equal schedule for every continued run)."""
    c = prosparse_configs.get_config("tiny")
    c.model.activation = activation
    c.train.steps = steps
    c.train.eval_every = 0
    c.train.checkpoint_every = steps
    c.train.log_every = max(min(10, steps // 4), 1)
    c.sparsity.stages = stages if stages is not None else [[0.0, steps]]
    c.sparsity.final_threshold = 0.0  # FATReLU is measured here, on every threshold of the table
    if quick:
        c.train.eval_batches = 2
        c.train.progress_bar = False
        c.optim.warmup_steps = 1
    return c


def run(name: str, c, workdir: Path) -> dict[str, Any]:
    t0 = time.time()
    print(f"\n=== {name}: activation={c.model.activation} steps={c.train.steps} lr={c.optim.lr} "
          f"init_from={c.init_from or '-'}", flush=True)
    res = train(c, workdir / name)
    final = res.final_eval or json.loads((workdir / name / "final_eval.json").read_text())
    print(f"=== {name} done in {time.time() - t0:.0f}s: eval_loss={final['eval_loss']:.4f} "
          f"sparsity={final['eval_sparsity']:.4f}", flush=True)
    return final


def train_loss(workdir: Path) -> float:
    """Mean training LM loss of the last logged interval (the logged entries are interval means)."""
    return float(read_metrics(workdir, "train")[-1]["lm_loss"])


def sparsity_measures(workdir: Path, out: Path, pplp_batches: int, quick: bool) -> dict[str, float]:
    """Dead-neuron fraction and CETT-PPL-1% activation ratio of a run's final checkpoint."""
    kw = dict(batch_size=8, progress=False, overwrite=True)
    exact = analyze_lib.analyze(workdir, "stdlib", "exact", None, out / "exact",
                                num_batches=2 if quick else 4, **kw)
    pplp = analyze_lib.analyze(workdir, "stdlib", "pplp", 1.0, out / "pplp_1",
                               num_batches=1 if quick else pplp_batches, pplp_steps=3 if quick else 8, **kw)
    return {"dead_neurons": exact["dead_neuron_fraction"], "cett_ppl1_ratio": pplp["activation_ratio"],
            "cett_ppl1_ppl_ratio": pplp["ppl_ratio"]}


def gate_scale(params: Any, cfg: Any, batches: list[dict[str, np.ndarray]]) -> float:
    """Mean positive gate pre-activation of a ReLU model on held-out batches (its activation scale)."""
    fwd = jax.jit(lambda p, b: forward(p, b["inputs"], cfg, segment_ids_BxT=b["segment_ids"],
                                       positions_BxT=b["positions"], capture=True)[1].act_gate)
    total, count = 0.0, 0
    for b in batches:
        act = np.asarray(fwd(params, b), np.float64)
        total += float(act[act > 0].sum())
        count += int((act > 0).sum())
    return total / max(count, 1)


class FinishedRun:
    """A finished run's model and its held-out batches, loaded once for every measurement made on it."""

    def __init__(self, workdir: Path) -> None:
        self.cfg, self.params, tok_path = ckpt.load_model(workdir)
        self.run_config = json.loads((workdir / "config.json").read_text())
        self._data = build_section(DataConfig, "data", self.run_config["data"])
        self._corpus = corpus_lib.open_corpus(self._data)
        self._tokenizer = corpus_lib.load_tokenizer(tok_path)

    def eval_batches(self, num_batches: int) -> list[dict[str, np.ndarray]]:
        return data_lib.make_eval_batches(self._corpus, self._tokenizer, seq_len=self._data.seq_len, batch_size=8,
                                          num_batches=num_batches)


def threshold_table(run: FinishedRun, abs_t: float, rel: list[float], n_batches: int, quick: bool) -> dict[str, Any]:
    """FATReLU threshold shifting of a ReLU run (no retraining): sparsity and held-out loss per threshold."""
    mcfg, params = run.cfg, run.params
    batches = run.eval_batches(1 if quick else n_batches)
    scale = gate_scale(params, mcfg, batches)
    rows = [{"threshold": 0.0, "relative": 0.0, **make_evaluate(mcfg)(params, batches)}]
    for t, r in [(abs_t, abs_t / scale)] + [(f * scale, f) for f in rel]:
        cfg = mcfg.replace(activation="fatrelu", activation_threshold=float(t))
        rows.append({"threshold": float(t), "relative": float(r), **make_evaluate(cfg)(params, batches)})
    return {"gate_scale": scale, "eval_tokens": rows[0]["eval_tokens"], "rows": rows}


def plot(workdir: Path, results: dict[str, Any], pretrain_steps: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for i, name in enumerate(RUNS):
        rows = read_metrics(workdir / name, "train")
        offset = 0 if name == "silu" else pretrain_steps
        steps = [r["step"] + offset for r in rows]
        col = f"C{i}"
        axes[0].plot(steps, [r["lm_loss"] for r in rows], color=col, lw=1, label=f"{name} train")
        r = results["rows"][name]
        axes[0].plot([offset + r["steps"]], [r["eval_loss"]], "o", color=col, ms=7, mec="k",
                     label=f"{name} held-out")
        axes[1].plot(steps, [r["reg_factor"] for r in rows], color=col, label=name)
        axes[2].plot(steps, [r["sparsity"] for r in rows], color=col, label=name)
    losses = [r["lm_loss"] for n in RUNS for r in read_metrics(workdir / n, "train")]
    losses += [r["eval_loss"] for r in results["rows"].values()]
    axes[0].set_ylim(min(losses) - 0.1, min(losses) + 2.5)
    for ax, title in zip(axes, ["LM loss: training (lines), held-out (dots)", "lambda (reg factor)",
                                "activation sparsity (training batches)"], strict=True):
        ax.set_title(title)
        ax.set_xlabel("step (continued runs start after the SiLU pretraining)")
        ax.axvline(pretrain_steps, color="0.7", ls=":", lw=1)
    axes[0].legend(fontsize=7, ncol=2, loc="upper right")
    axes[1].legend(fontsize=8, loc="upper left")
    axes[2].legend(fontsize=8, loc="center right")
    p1 = _save(fig, workdir / "curves.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    shown = [r for k, r in results["rows"].items() if k != "silu"]
    width = 0.8 / len(shown)
    for i, r in enumerate(shown):
        per_layer = r["per_layer"]
        ax.bar([x + (i - (len(shown) - 1) / 2) * width for x in range(len(per_layer))], per_layer, width,
               label=r["label"])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("sparsity (fraction of zeros in x1)")
    ax.set_ylim(0, 1.0)
    ax.set_title("Activation sparsity per layer (held-out)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return [p1, _save(fig, workdir / "sparsity_per_layer.png")]


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with files.atomic_file(path) as tmp:  # a failed write (disk full) keeps the previous plot
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path


def table(results: dict[str, Any]) -> str:
    """The results as markdown: the main table and the FATReLU threshold table."""
    lines = ["| setting | steps | activation sparsity | train loss | held-out loss | held-out PPL | dead neurons "
             "| CETT-PPL-1% activation ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"].values():
        lines.append(
            f"| {r['label']} | {r['steps_total']} | {100 * r['sparsity']:.2f}% | "
            + (f"{r['train_loss']:.4f}" if r.get("train_loss") is not None else "–")
            + f" | {r['eval_loss']:.4f} | {r['ppl']:.2f} | "
            + (f"{100 * r['dead_neurons']:.1f}%" if r.get("dead_neurons") is not None else "–") + " | "
            + (f"{100 * r['cett_ppl1_ratio']:.2f}%" if r.get("cett_ppl1_ratio") is not None else "–") + " |")
    fat = results["fatrelu"]
    lines += ["", f"FATReLU threshold shifting of (b), no retraining ({fat['eval_tokens']} held-out tokens; "
              f"activation scale = mean positive gate pre-activation = {fat['gate_scale']:.4f}):", "",
              "| threshold t | t / scale | activation sparsity | held-out loss | Δ loss vs t = 0 |",
              "|---|---|---|---|---|"]
    base = fat["rows"][0]["eval_loss"]
    for r in fat["rows"]:
        lines.append(f"| {r['threshold']:.4g} | {r['relative']:.3g} | {100 * r['eval_sparsity']:.2f}% | "
                     f"{r['eval_loss']:.4f} | {r['eval_loss'] - base:+.4f} |")
    return "\n".join(lines)


def train_runs(workdir: Path, pre_steps: int, steps: int, quick: bool) -> dict[str, dict[str, Any]]:
    """Pretrains the SiLU model, then the three continued runs from it; their final evaluations by run name."""
    finals: dict[str, dict[str, Any]] = {}
    pre = run_config("silu", pre_steps, None, quick)
    pre.optim.schedule = "constant"  # the stable phase; every continued run then decays the LR the same way
    pre.optim.warmup_steps = 1 if quick else 20
    finals["silu"] = run("silu", pre, workdir)
    tiny_stages = [list(s) for s in prosparse_configs.TINY_STAGES]
    for name, act, stages in (("control_silu", "silu", None), ("a_relu", "relu", None),
                              ("b_prosparse", "relu", tiny_stages)):
        c = run_config(act, steps, stages, quick)
        c.init_from = str(workdir / "silu")
        c.data.seed = 1  # fresh training rows, not a replay of the pretraining's (the same for every continued run)
        if name != "b_prosparse":  # keep 6 checkpoints: inputs of the Sparsing Law fit (prosparse_jax.main.fit_laws)
            c.train.checkpoint_every = c.train.keep_period = max(steps // 6, 1)
        finals[name] = run(name, c, workdir)
    return finals


def _run() -> str:
    """The job (flags parsed); returns the closing line."""
    logging.set_verbosity(logging.WARNING)  # orbax / tfds INFO lines would drown the progress bars
    workdir = files.check_output_path(_WORKDIR.value, "--workdir")  # a file in the way: refused before any training
    for holder in (_PRETRAIN, _STEPS, _FAT_BATCHES, _PPLP_BATCHES):
        if holder.value <= 0:
            raise UsageError(f"--{holder.name}: must be a positive integer, got {holder.value}")
    try:
        rel = [float(x) for x in _REL_THRESHOLDS.value]
    except ValueError:
        raise UsageError(f"--relative_thresholds: numbers expected, got {_REL_THRESHOLDS.value}") from None
    quick = _QUICK.value
    pre_steps, steps = (6, 6) if quick else (_PRETRAIN.value, _STEPS.value)
    t_start = time.time()
    finals = train_runs(workdir, pre_steps, steps, quick)
    t_train = time.time() - t_start

    print("\n=== measuring: dead neurons, CETT-PPL-1% activation ratio, FATReLU thresholds", flush=True)
    rows: dict[str, dict[str, Any]] = {}
    for name in RUNS:
        f = finals[name]
        rows[name] = {"label": LABELS[name], "steps": pre_steps if name == "silu" else steps,
                      "steps_total": pre_steps + (0 if name == "silu" else steps),
                      "sparsity": f["eval_sparsity"], "eval_loss": f["eval_loss"], "ppl": f["eval_ppl"],
                      "per_layer": f["eval_sparsity_per_layer"], "train_loss": train_loss(workdir / name),
                      "eval_tokens": f["eval_tokens"]}
        if name != "silu":  # the pretrained start point is not a row of the comparison: spare its analysis
            rows[name].update(sparsity_measures(workdir / name, workdir / "analysis" / name, _PPLP_BATCHES.value,
                                                quick))
    b_run = FinishedRun(workdir / "b_prosparse")
    fat = threshold_table(b_run, _ABS_THRESHOLD.value, rel, _FAT_BATCHES.value, quick)
    b_cfg, b_params = b_run.cfg, b_run.params
    eval_b = b_run.eval_batches(b_run.run_config["train"]["eval_batches"])
    # (c) on the full held-out set: the paper's absolute threshold (the relative ones are in the threshold table)
    picks = [(f"(c) (b) + FATReLU t = {_ABS_THRESHOLD.value:g} (paper's)", _ABS_THRESHOLD.value)]
    for i, (label, t) in enumerate(picks):
        e = make_evaluate(b_cfg.replace(activation="fatrelu", activation_threshold=float(t)))(b_params, eval_b)
        rows[f"c{i}"] = {"label": label, "steps": steps, "steps_total": pre_steps + steps, "threshold": t,
                         "sparsity": e["eval_sparsity"], "eval_loss": e["eval_loss"], "ppl": e["eval_ppl"],
                         "per_layer": e["eval_sparsity_per_layer"], "eval_tokens": e["eval_tokens"]}
    results = {"rows": rows, "fatrelu": fat, "pretrain_steps": pre_steps, "steps": steps,
               "train_seconds": t_train, "total_seconds": time.time() - t_start,
               "stages": prosparse_configs.TINY_STAGES, "quick": quick}
    md = table(results)
    print("\n" + md)
    plots = plot(workdir, results, pre_steps)
    results["total_seconds"] = time.time() - t_start
    files.write_text_atomic(workdir / "results.json", json.dumps(results, indent=2))
    files.write_text_atomic(workdir / "results.md", md + "\n")
    return (f"\nresults: {workdir / 'results.json'}, {workdir / 'results.md'}; plots: "
            f"{', '.join(str(p) for p in plots)}; training {t_train:.0f}s, total {results['total_seconds']:.0f}s")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (1 with one error line on stderr for bad input; --verbose: traceback)."""
    return cli.run("prosparse_miniature", FLAGS, argv, _run, __doc__)


if __name__ == "__main__":
    sys.exit(main())
