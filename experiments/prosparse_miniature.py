"""Main job: a miniature of ProSparse's Table 1 on the built-in corpus (Python stdlib sources), on 2 CPU cores.

    python experiments/prosparse_miniature.py --workdir=runs/miniature

1. pretrain a tiny SiLU model (the dense baseline);
2. from it, (a) ReLU substitution only (lambda = 0 throughout);
3. from it, (b) ProSparse: ReLU + progressive L1 regularisation (the tiny stage table of configs/prosparse.py);
4. (c) = (b) evaluated with FATReLU threshold shifting (no retraining).
Prints a table of activation sparsity and held-out loss / perplexity, writes ``<workdir>/results.json`` and plots
(loss, lambda and sparsity vs step; sparsity per layer). Every run is an ordinary ``prosparse_jax.train`` run in
its own sub-workdir, so re-running resumes / reuses finished runs.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from absl import app, flags

from prosparse_jax.metrics import read_metrics
from prosparse_jax.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs import prosparse as prosparse_configs  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "runs/miniature", "Output directory (one sub-workdir per run).")
_PRETRAIN = flags.DEFINE_integer("pretrain_steps", 450, "SiLU pretraining steps.")
_STEPS = flags.DEFINE_integer("steps", 300, "Steps of each continued run ((a) and (b)).")
_THRESHOLD = flags.DEFINE_float("fatrelu_threshold", -1.0, "FATReLU threshold for (c); -1 = the config's.")
_QUICK = flags.DEFINE_boolean("quick", False, "CI smoke version: a few steps of each run, tiny eval.")


def tiny_config(activation: str, steps: int, stages: list[list[float]] | None, quick: bool):
    c = prosparse_configs.get_config("tiny")
    c.model.activation = activation
    c.train.steps = steps
    c.train.eval_every = 0
    c.train.checkpoint_every = max(steps // 2, 1)
    c.train.log_every = max(min(10, steps // 4), 1)
    c.sparsity.stages = stages if stages is not None else [[0.0, steps]]
    if quick:
        c.train.eval_batches = 2
        c.train.progress_bar = False
    return c


def run(name: str, c, workdir: Path) -> dict:
    t0 = time.time()
    print(f"\n=== {name}: activation={c.model.activation} steps={c.train.steps} init_from={c.init_from or '-'}",
          flush=True)
    res = train(c, workdir / name)
    final = res.final_eval or json.loads((workdir / name / "final_eval.json").read_text())
    print(f"=== {name} done in {time.time() - t0:.0f}s: eval_loss={final['eval_loss']:.4f} "
          f"sparsity={final['eval_sparsity']:.4f}", flush=True)
    return final


def plot(workdir: Path, names: list[str], results: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name in names:
        rows = read_metrics(workdir / name, "train")
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["lm_loss"] for r in rows], label=name)
        axes[1].plot(steps, [r["reg_factor"] for r in rows], label=name)
        axes[2].plot(steps, [r["sparsity"] for r in rows], label=name)
    for ax, title in zip(axes, ["LM loss (train)", "lambda (reg factor)", "activation sparsity (train)"],
                         strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    p1 = _save(fig, workdir / "curves.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(results)
    for i, (name, r) in enumerate(results.items()):
        per_layer = r["per_layer"]
        ax.bar([x + i * width for x in range(len(per_layer))], per_layer, width, label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("sparsity (fraction of zeros in x1)")
    ax.set_title("Activation sparsity per layer (held-out)")
    ax.legend()
    return [p1, _save(fig, workdir / "sparsity_per_layer.png")]


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str]) -> None:
    del argv
    workdir = Path(_WORKDIR.value)
    quick = _QUICK.value
    pre_steps, steps = (6, 6) if quick else (_PRETRAIN.value, _STEPS.value)
    t_start = time.time()

    silu = run("silu", tiny_config("silu", pre_steps, None, quick), workdir)

    a_cfg = tiny_config("relu", steps, None, quick)
    a_cfg.init_from = str(workdir / "silu")
    relu = run("a_relu", a_cfg, workdir)

    b_cfg = tiny_config("relu", steps, [list(s) for s in prosparse_configs.TINY_STAGES], quick)
    b_cfg.init_from = str(workdir / "silu")
    if _THRESHOLD.value >= 0:
        b_cfg.sparsity.final_threshold = _THRESHOLD.value
    prosparse = run("b_prosparse", b_cfg, workdir)

    def row(final: dict, prefix: str = "") -> dict:
        return {"sparsity": final[f"{prefix}eval_sparsity"], "eval_loss": final[f"{prefix}eval_loss"],
                "ppl": final[f"{prefix}eval_ppl"], "per_layer": final[f"{prefix}eval_sparsity_per_layer"]}

    results = {"SiLU (dense baseline)": row(silu), "(a) ReLU substitution": row(relu),
               "(b) ProSparse (progressive L1)": row(prosparse)}
    if "fatrelu_eval_loss" in prosparse:
        results[f"(c) (b) + FATReLU t={prosparse['fatrelu_threshold']}"] = row(prosparse, "fatrelu_")

    print("\n| setting | activation sparsity | eval loss | eval ppl |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {100 * r['sparsity']:.2f}% | {r['eval_loss']:.4f} | {r['ppl']:.2f} |")
    plots = plot(workdir, ["a_relu", "b_prosparse"], results)
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nresults: {workdir / 'results.json'}; plots: {', '.join(str(p) for p in plots)}; "
          f"total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    app.run(main)
