"""The aggregate of a sweep (``python -m prosparse_jax.main.sweep aggregate``): one table and the law plots.

Writes ``results.csv`` (one row per run), ``results.json`` and, with a law input, ``law_points.csv``, ``law_fit.png``
and ``law_limits.png`` (else ``sparsity_vs_loss.png``). ``cett_ppl`` is the Sparsing Law's A (App. E), cached in
``<out>/law_ratios/``; ``exact_zero`` is 1 - the exact-zero training sparsity. Columns and files: docs/sweeps.md.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from prosparse_jax import files
from prosparse_jax.analysis import law_fit as fit_laws
from prosparse_jax.analysis import law_inputs as law_ratios
from prosparse_jax.errors import UsageError, UserError
from prosparse_jax.model.activations import RELU_FAMILY
from prosparse_jax.sweeps.progress import progress
from prosparse_jax.sweeps.spec import Sweep, SweepRun
from prosparse_jax.training.metrics import read_metrics

OUTPUTS = ("results.csv", "law_points.csv", "law_fit.png", "law_limits.png", "sparsity_vs_loss.png", "results.json",
           "law_ratios")


def law_form(activation: str) -> str:
    """The law's form for ``activation``: ``relu`` for the exact-zero family, else ``silu``."""
    return "relu" if activation in RELU_FAMILY else "silu"


def _read_json(path: Path) -> dict[str, Any]:
    return files.read_json(path, path.name) if path.exists() else {}


def run_row(sweep: Sweep, root: Path, run: SweepRun) -> dict[str, Any]:
    """The CSV row of one run without the law columns."""
    wd = sweep.workdir(root, run)
    m, p = run.rc.model, progress(sweep, root, run)
    step = p.checkpoint
    last = next((e for e in reversed(_train_entries(wd))), {})
    final = _read_json(wd / "final_eval.json") if p.state == "done" else {}
    row: dict[str, Any] = {"index": run.index, "run": run.name, **{f"axis_{a}": v for a, v in run.axes.items()},
                           "overrides": json.dumps(run.overrides), "state": p.state, "activation": m.activation,
                           "params_total": m.params_total, "params_non_embedding": m.params_non_embedding,
                           "d_model": m.d_model, "n_layers": m.n_layers, "d_ff": m.d_ff, "steps": run.steps,
                           "step": step, "tokens": step * run.tokens_per_step,
                           "train_loss": last.get("lm_loss"), "train_sparsity": last.get("sparsity")}
    for k in ("eval_loss", "eval_ppl", "eval_sparsity", "fatrelu_threshold", "fatrelu_eval_loss",
              "fatrelu_eval_sparsity"):
        row[k] = final.get(k)
    row["eval_activation_ratio"] = None if final.get("eval_sparsity") is None else 1.0 - final["eval_sparsity"]
    return row


def _train_entries(wd: Path) -> list[dict[str, Any]]:
    return read_metrics(wd, "train") if (wd / "metrics.jsonl").exists() else []


def _law_settings(sweep: Sweep) -> dict[str, Any]:
    """The CETT-PPL settings of the sweep's analysis section, and its step window (min_step None: each run's
    warm-up; max_step None: no upper cut, ``decay_start``: each run's LR-decay start)."""
    a = sweep.analysis
    min_step = int(a.get("min_step", -1))
    return {"p": float(a.get("p", 1.0)), "n_search": int(a.get("n_search", 5)),
            "num_batches": int(a.get("num_batches", 4)), "batch_size": int(a.get("batch_size", 8)),
            "search_steps": int(a.get("search_steps", 12)), "min_step": None if min_step < 0 else min_step,
            "max_step": a.get("max_step")}


def law_points(sweep: Sweep, root: Path, run: SweepRun, law_input: str, cache_dir: Path,
               echo: Any = lambda line: None) -> tuple[list[dict], Any, fit_laws.StepWindow]:
    """The law inputs of a finished run in its step window (:func:`~prosparse_jax.analysis.law_fit.step_window` of
    the analysis section's min_step / max_step): ([{step, tokens, D, A, ppl_ratio}], CETT target or None, the
    window); ``echo`` gets one line naming the steps used and dropped."""
    wd = sweep.workdir(root, run)
    kw = _law_settings(sweep)
    window = fit_laws.step_window(wd, law_input, kw.pop("min_step"), kw.pop("max_step"))
    if law_input == "exact_zero":
        D, A, steps = fit_laws.exact_zero_points(wd, window, echo=echo)
        return [{"step": s, "tokens": round(d * 1e9), "D": float(d), "A": float(a), "ppl_ratio": None}
                for s, d, a in zip(steps, D, A, strict=True)], None, window
    cache = cache_dir / f"{run.name}.json"
    kw.update(min_step=window.min_step, max_step=window.max_step)
    try:
        res = law_ratios.law_ratios(wd, cache, **kw)
    except law_ratios.StaleOutputError:
        if not cache.exists():
            raise
        res = law_ratios.law_ratios(wd, cache, overwrite=True, **kw)  # our cache, stale (other window, run went on)
    echo(f"{wd}: " + window.describe([r["step"] for r in res["checkpoints"]] + res["dropped_steps"]
                                     + res.get("dropped_after_max_step", [])))
    return [{"step": r["step"], "tokens": r["tokens"], "D": r["D"], "A": r["activation_ratio"],
             "ppl_ratio": r["ppl_ratio"]} for r in res["checkpoints"]], res["cett_target"], window


def fit_law(form: str, points: list[dict]) -> dict[str, Any]:
    """The law fit of ``form`` on the points (:class:`~prosparse_jax.errors.InputError` when there are too few)."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit_laws.FORMS[form][0]([p["D"] for p in points], [p["A"] for p in points])


def _law_columns(form: str, points: list[dict], target: Any, window: fit_laws.StepWindow | None, fit: dict | None,
                 error: str) -> dict[str, Any]:
    cols: dict[str, Any] = {"law_form": form, "law_points": len(points),
                            "law_min_step": window.min_step if window else None,
                            "law_max_step": window.max_step if window else None, "cett_target": target,
                            "A_first": points[0]["A"] if points else None,
                            "A_last": points[-1]["A"] if points else None}
    for name in ("A0", "alpha", "c", "b"):
        cols[f"law_{name}"] = fit["params"].get(name) if fit else None
        cols[f"law_{name}_err"] = fit["stderr"].get(name) if fit else None
    cols["law_rmse"] = fit["rmse"] if fit else None
    cols["law_error"] = error
    return cols


def _csv(rows: list[dict[str, Any]]) -> str:
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if v is None else v for k, v in r.items()})
    return buf.getvalue()


def _scale_key(run: SweepRun, group_by: str) -> str:
    return run.axes.get(group_by, run.name)


def plot_law(sweep: Sweep, runs: list[SweepRun], points: dict[str, list], fits: dict[str, dict], ylabel: str,
             path: Path) -> None:
    """A vs D: one panel per activation, one colour per scale, points and the fitted law of each run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    group_by = sweep.analysis.get("group_by", "scale")
    acts = sorted({r.rc.model.activation for r in runs}, key=lambda a: (law_form(a) != "relu", a)) or ["-"]
    scales = list(dict.fromkeys(_scale_key(r, group_by) for r in sweep.runs))
    fig, axes = plt.subplots(1, len(acts), figsize=(6.5 * len(acts), 4.5), squeeze=False)
    for ax, act in zip(axes[0], acts, strict=True):
        form = law_form(act)
        for r in [r for r in runs if r.rc.model.activation == act]:
            pts, col = points.get(r.name) or [], f"C{scales.index(_scale_key(r, group_by)) % 10}"
            if not pts:
                continue
            D, A = np.array([p["D"] for p in pts]), np.array([p["A"] for p in pts])
            ax.plot(D, A, "o", color=col, ms=5, alpha=0.85)
            fit = fits.get(r.name)
            label = f"{_scale_key(r, group_by)} ({r.rc.model.params_non_embedding:,} non-emb. params)"
            if fit:
                Dg = np.geomspace(D.min(), D.max(), 200)
                with np.errstate(all="ignore"):
                    ax.plot(Dg, fit_laws.FORMS[form][1](Dg, *fit["params"].values()), "-", color=col,
                            label=f"{label}: A0 = {fit['params']['A0']:.4f}")
            else:
                ax.plot([], [], "o", color=col, label=f"{label}: no fit")
        law = "exp(-c D^α + b) + A0" if form == "relu" else "-c D^(-α) + A0"
        ax.set_xscale("log")
        ax.set_title(f"{act}: A(D) = {law}")
        ax.set_xlabel("training tokens D (B)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(f"Sparsing Law: activation ratio vs training tokens ({sweep.name})")
    _save(fig, path)


def plot_limits(sweep: Sweep, runs: list[SweepRun], fits: dict[str, dict], path: Path) -> None:
    """The limit activation ratio A0 (+-1 sigma) vs non-embedding parameters, one line per activation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    group_by = sweep.analysis.get("group_by", "scale")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = 0.0
    for i, act in enumerate(sorted({r.rc.model.activation for r in runs})):
        rs = sorted((r for r in runs if r.rc.model.activation == act and fits.get(r.name)),
                    key=lambda r: r.rc.model.params_non_embedding)
        if not rs:
            continue
        x = [r.rc.model.params_non_embedding for r in rs]
        y = [fits[r.name]["params"]["A0"] for r in rs]
        err = [fits[r.name]["stderr"]["A0"] for r in rs]
        ax.errorbar(x, y, yerr=err, fmt="o-", color=f"C{i}", capsize=3, label=f"{act} ({law_form(act)} form)")
        for r, xi, yi in zip(rs, x, y, strict=True):
            ax.annotate(_scale_key(r, group_by), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
        top = max(top, *[v for v in y if np.isfinite(v)], 0.0)
    if not top:
        ax.text(0.5, 0.5, "no successful law fit", ha="center", transform=ax.transAxes)
    else:
        ax.set_ylim(0.0, min(1.05, 1.3 * top))
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("limit activation ratio A0")
    ax.set_title(f"Limit activation ratio vs scale ({sweep.name})")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    _save(fig, path)


def plot_sparsity_vs_loss(rows: list[dict[str, Any]], path: Path) -> None:
    """Held-out activation sparsity vs held-out loss, one point per finished run (sweeps without a law)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r.get("eval_loss") is None:
            continue
        ax.plot(r["eval_sparsity"], r["eval_loss"], "o")
        ax.annotate(r["run"], (r["eval_sparsity"], r["eval_loss"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    ax.set_xlabel("held-out activation sparsity (exact zeros of x1)")
    ax.set_ylabel("held-out loss")
    ax.set_title("Sparsity vs loss per run")
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _check_out(out: Path, overwrite: bool) -> Path:
    out = files.check_output_path(out, "--out")
    if out.is_dir() and not overwrite:
        other = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS and not p.name.startswith("."))
        if other:
            raise UsageError(f"--out: {out} holds files that are not a sweep aggregate ({', '.join(other[:5])}); "
                                 "choose another --out or pass --overwrite (nothing was written)")
    return out


def aggregate(sweep: Sweep, root: Path, out: Path, *, law_input: str | None = None, overwrite: bool = False,
              echo: Any = print) -> str:
    """Collects every run of the sweep into ``out`` (replacing a previous aggregate); returns the closing line.

    Raises:
      UsageError: ``out`` holds other files and ``overwrite`` is False.
    """
    out = _check_out(Path(out), overwrite)
    law_input = sweep.analysis.get("law_input", "") if law_input is None else law_input
    rows, points, fits, errors = [], {}, {}, []
    for run in sweep.runs:
        row = run_row(sweep, root, run)
        if law_input and row["state"] == "done":
            form, pts, target, window, fit, error = law_form(run.rc.model.activation), [], None, None, None, ""
            try:
                echo(f"law input of {run.name} ({law_input}) ...")
                pts, target, window = law_points(sweep, root, run, law_input, out / "law_ratios", echo)
                fit = fit_law(form, pts)
            except UserError as e:
                error = " ".join(str(e).split())
                errors.append(f"{run.name}: {error}")
            row.update({"law_input": law_input, **_law_columns(form, pts, target, window, fit, error)})
            points[run.name] = pts
            if fit:
                fits[run.name] = fit
        rows.append(row)
    done = [r for r in sweep.runs if r.name in points]
    point_rows = [{"run": name, **p} for name, pts in points.items() for p in pts]
    with files.staged_output(out) as stage:
        (stage / "results.csv").write_text(_csv(rows))
        written = ["results.csv"]
        if law_input:
            (stage / "law_points.csv").write_text(_csv(point_rows) if point_rows else "run,step,tokens,D,A,ppl_ratio\n")
            ylabel = (fit_laws.cett_ppl_label(_law_settings(sweep)["p"]) if law_input == "cett_ppl"
                      else fit_laws.EXACT_ZERO_LABEL)
            plot_law(sweep, done, points, fits, ylabel, stage / "law_fit.png")
            plot_limits(sweep, done, fits, stage / "law_limits.png")
            written += ["law_points.csv", "law_fit.png", "law_limits.png"]
        else:
            plot_sparsity_vs_loss(rows, stage / "sparsity_vs_loss.png")
            written.append("sparsity_vs_loss.png")
        (stage / "results.json").write_text(json.dumps(
            {"sweep": sweep.ref, "base": sweep.base, "law_input": law_input, "rows": rows, "points": points,
             "fits": fits}, indent=2, default=str))
        written.append("results.json")
    states = [r["state"] for r in rows]
    note = f"; law fit failed for {len(errors)}: {' | '.join(errors)}" if errors else ""
    return (f"{len(rows)} runs ({states.count('done')} finished) -> {', '.join(str(out / w) for w in written)}"
            + note)
