"""Fits the Sparsing Law curves of activation ratio versus training tokens (arXiv 2411.02335).

    python experiments/fit_laws.py --form=relu|silu --out=fit.png [--p=1 --n_search=5 --num_batches=4 \
        --batch_size=8 --min_step=N --overwrite] <workdir> [<workdir> ...]
    python experiments/fit_laws.py --input=exact_zero --form=relu|silu --out=fit.png <workdir> [...]
    python experiments/fit_laws.py --selftest [--out=selftest.png]

Input (``--input``):

- ``cett_ppl`` (default): the paper's A(D) (App. E): the CETT-PPL-p% activation ratio of every kept checkpoint on
  the run's validation data, warmup checkpoints dropped (step <= optim.warmup_steps, or --min_step), ONE CETT target
  searched on the last --n_search checkpoints (the worst PPL ratio over them <= 1 + p/100) and applied to all; D =
  step * train.batch_size * data.seq_len / 1e9. Computed by :mod:`prosparse_jax.analysis.law_inputs` into
  ``<workdir>/law_ratios.json``, or read from it when its settings match (a file with other settings is an error
  unless --overwrite). A fit needs at least (law parameters + 1) kept checkpoints: train with
  ``train.keep_period`` = ``train.checkpoint_every`` (configs/sparsing_law.py does).
- ``exact_zero``: D = tokens_seen / 1e9 and 1 - sparsity (exact zeros of x1 in the training batches) from the
  ``train`` entries of metrics.jsonl. Not the paper's A: constant 1 for SiLU, and above the CETT-PPL-1% ratio for ReLU.

Each workdir is fitted on its own (one curve per run) and all are drawn on one plot.

- ReLU: A(D) = exp(-c * D^alpha + b) + A0
- SiLU: A(D) = -c * D^(-alpha) + A0

Fits use ``scipy.optimize.least_squares(method='lm')`` (Levenberg-Marquardt) started from the best of a small grid
over alpha, where the other coefficients enter linearly (SiLU) or log-linearly (ReLU) and are solved in closed form.
1-sigma uncertainties come from the covariance s^2 (J^T J)^-1 at the optimum, s^2 = residual sum of squares / dof.

--selftest samples both forms at the five published scales at 200 points evenly spaced in log D on D in [5, 250]
(an assumed token range like the paper's curves; checkpoints logged often) with 0.5% multiplicative Gaussian noise and
checks, for every scale: the truth lies within 4 sigma of the fit for A0 and alpha (the reported uncertainties are
calibrated); the fitted curve is within 1% of the true one over the range; SiLU A0 within 2% and alpha within 20%;
ReLU A0 within 10%. Measured over 20 noise seeds (worst case): SiLU A0 <= 1.0%, alpha <= 17% at 0.1B and <= 8% above;
ReLU A0 <= 4% (0.1B-0.8B) and 6.4% (1.2B, whose tail has not reached A0 by 250B tokens), alpha <= 10% from 0.2B up,
while at 0.1B (alpha = 0.1) the form is nearly degenerate (exp(b - c) * D^(-c * alpha)) and alpha, b, c are not
identifiable (alpha off by up to 85%); truth within 3.4 sigma throughout.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import least_squares

#: Published coefficients (the paper's fits, 0.1B-1.2B): scale -> (alpha, b, c, A0) ReLU, (alpha, c, A0) SiLU.
PUBLISHED_RELU = {
    "0.1B": (0.101, -0.0151, 3.20, 0.0614), "0.2B": (0.449, -3.05, 0.286, 0.0674),
    "0.4B": (0.683, -3.46, 0.0790, 0.0690), "0.8B": (1.01, -3.49, 7.97e-3, 0.0721),
    "1.2B": (1.33, -3.89, 9.03e-4, 0.0782),
}
PUBLISHED_SILU = {
    "0.1B": (0.479, 0.102, 0.409), "0.2B": (0.844, 0.208, 0.390), "0.4B": (1.03, 0.420, 0.385),
    "0.8B": (0.995, 0.562, 0.383), "1.2B": (0.967, 0.538, 0.382),
}
RELU_PARAMS = ("c", "alpha", "b", "A0")
SILU_PARAMS = ("c", "alpha", "A0")
_ALPHA_GRID = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.3, 1.7, 2.2)


def relu_law(D: np.ndarray, c: float, alpha: float, b: float, A0: float) -> np.ndarray:
    """A(D) = exp(-c * D^alpha + b) + A0."""
    return np.exp(-c * np.power(D, alpha) + b) + A0


def silu_law(D: np.ndarray, c: float, alpha: float, A0: float) -> np.ndarray:
    """A(D) = -c * D^(-alpha) + A0."""
    return -c * np.power(D, -alpha) + A0


def _finish(res: Any, names: Sequence[str], n: int) -> dict[str, Any]:
    J = res.jac
    dof = max(n - len(names), 1)
    s2 = 2.0 * res.cost / dof
    try:
        cov = np.linalg.inv(J.T @ J) * s2
        err = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    except np.linalg.LinAlgError:
        err = np.full(len(names), np.nan)
    return {"params": dict(zip(names, map(float, res.x), strict=True)),
            "stderr": dict(zip(names, map(float, err), strict=True)),
            "rmse": float(np.sqrt(2.0 * res.cost / n)), "n": int(n), "success": bool(res.success)}


def _check(D: np.ndarray, A: np.ndarray, n_params: int) -> tuple[np.ndarray, np.ndarray]:
    D, A = np.asarray(D, np.float64).ravel(), np.asarray(A, np.float64).ravel()
    if D.shape != A.shape or D.size <= n_params:
        raise ValueError(f"need more than {n_params} (D, A) points of equal length, got {D.size} and {A.size}")
    if np.any(D <= 0) or not np.all(np.isfinite(A)):
        raise ValueError("D must be > 0 and A finite")
    return D, A


def fit_silu_law(D: Sequence[float], A: Sequence[float]) -> dict[str, Any]:
    """Fits A(D) = -c * D^(-alpha) + A0 (Levenberg-Marquardt).

    Returns:
      {"params": {c, alpha, A0}, "stderr": {...} (1 sigma), "rmse", "n", "success"}.
    """
    D, A = _check(D, A, 3)
    best = None
    for a in _ALPHA_GRID:  # for fixed alpha, A = A0 - c * D^-alpha is linear in (A0, c)
        X = np.stack([np.ones_like(D), -np.power(D, -a)], axis=1)
        (a0, c), *_ = np.linalg.lstsq(X, A, rcond=None)
        sse = float(np.sum((X @ np.array([a0, c]) - A) ** 2))
        if best is None or sse < best[0]:
            best = (sse, np.array([c, a, a0]))
    res = least_squares(lambda p: silu_law(D, *p) - A, best[1], method="lm", x_scale="jac", max_nfev=20000)
    return _finish(res, SILU_PARAMS, D.size)


def fit_relu_law(D: Sequence[float], A: Sequence[float]) -> dict[str, Any]:
    """Fits A(D) = exp(-c * D^alpha + b) + A0 (Levenberg-Marquardt), from the best of a grid over (alpha, A0).

    Returns:
      {"params": {c, alpha, b, A0}, "stderr": {...} (1 sigma), "rmse", "n", "success"}.
    """
    D, A = _check(D, A, 4)
    amin, span = float(A.min()), float(A.max() - A.min())
    best = None
    for frac in (0.5, 0.8, 0.9, 0.95, 0.99):  # A0 just below the lowest point
        a0 = amin - (1.0 - frac) * max(span, 1e-6) - 1e-9
        y = np.log(A - a0)
        for a in _ALPHA_GRID:  # log(A - A0) = b - c * D^alpha: linear in (b, c)
            X = np.stack([np.ones_like(D), -np.power(D, a)], axis=1)
            (b, c), *_ = np.linalg.lstsq(X, y, rcond=None)
            p = np.array([c, a, b, a0])
            sse = float(np.sum((relu_law(D, *p) - A) ** 2))
            if np.isfinite(sse) and (best is None or sse < best[0]):
                best = (sse, p)
    with np.errstate(over="ignore", invalid="ignore"):
        res = least_squares(lambda p: relu_law(D, *p) - A, best[1], method="lm", x_scale="jac", max_nfev=20000)
    return _finish(res, RELU_PARAMS, D.size)


FORMS: dict[str, tuple[Callable[..., dict[str, Any]], Callable[..., np.ndarray], tuple[str, ...]]] = {
    "relu": (fit_relu_law, relu_law, RELU_PARAMS),
    "silu": (fit_silu_law, silu_law, SILU_PARAMS),
}


def load_run(workdir: str | Path, min_tokens: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(D in billions of tokens, activation ratio) from the train entries of ``<workdir>/metrics.jsonl``."""
    from prosparse_jax.training.metrics import read_metrics

    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass training workdirs")
    D, A = [], []
    for r in read_metrics(workdir):  # a line cut by a crash is skipped; a corrupt one is an error naming the file
        is_train = r.get("kind", "train") == "train" and "tokens_seen" in r and "sparsity" in r
        if is_train and r["tokens_seen"] > min_tokens:
            D.append(r["tokens_seen"] / 1e9)
            A.append(1.0 - r["sparsity"])
    return np.asarray(D), np.asarray(A)


def format_fit(name: str, fit: dict[str, Any]) -> str:
    """One line: coefficient +- 1 sigma for each parameter."""
    parts = [f"{k} = {v:.4g} ± {fit['stderr'][k]:.2g}" for k, v in fit["params"].items()]
    return f"{name}: " + ", ".join(parts) + f"  (rmse {fit['rmse']:.3g}, n {fit['n']})"


def plot_fits(curves: list[tuple[str, np.ndarray, np.ndarray, dict[str, Any]]], form: str, out: str | Path, *,
              ylabel: str = "activation ratio A", title: str | None = None) -> None:
    """Data points and fitted curves (one colour per run) to a PNG; ``title`` defaults to "Sparsing Law fit (form)"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    law = FORMS[form][1]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, D, A, fit) in enumerate(curves):
        col = f"C{i % 10}"
        ax.plot(D, A, ".", color=col, ms=3 if len(D) > 50 else 8, alpha=0.5 if len(D) > 50 else 0.9)
        Dg = np.geomspace(D.min(), D.max(), 200)
        ax.plot(Dg, law(Dg, *fit["params"].values()), "-", color=col,
                label=f"{name}: A0={fit['params']['A0']:.4f}±{fit['stderr']['A0']:.1g}")
    ax.set_xlabel("training tokens D (B)")
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"Sparsing Law fit ({form})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def sample_published(form: str, scale: str, *, D_range: tuple[float, float] = (5.0, 250.0), n: int = 200,
                     noise: float = 0.005, seed: int = 0) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Samples a published curve with multiplicative Gaussian noise; returns (D, A, true params in fit order)."""
    rng = np.random.default_rng(seed)
    D = np.geomspace(*D_range, n)
    if form == "relu":
        alpha, b, c, a0 = PUBLISHED_RELU[scale]
        true = (c, alpha, b, a0)
    else:
        alpha, c, a0 = PUBLISHED_SILU[scale]
        true = (c, alpha, a0)
    A = FORMS[form][1](D, *true)
    return D, A * (1.0 + noise * rng.standard_normal(n)), true


def selftest(noise: float = 0.005, seed: int = 0, out: str | Path | None = None, verbose: bool = True) -> list[str]:
    """Recovers the published coefficients of all scales and both forms; returns the failures (empty = pass)."""
    failures = []
    for form, table in (("relu", PUBLISHED_RELU), ("silu", PUBLISHED_SILU)):
        curves = []
        for scale in table:
            D, A, true = sample_published(form, scale, noise=noise, seed=seed)
            fit = FORMS[form][0](D, A)
            names = FORMS[form][2]
            got = fit["params"]
            t = dict(zip(names, true, strict=True))
            Dg = np.geomspace(D.min(), D.max(), 200)
            rel = np.max(np.abs(FORMS[form][1](Dg, *got.values()) / FORMS[form][1](Dg, *true) - 1))
            checks = {"curve": rel <= 0.01, "A0": abs(got["A0"] / t["A0"] - 1) <= (0.02 if form == "silu" else 0.10)}
            if form == "silu":
                checks["alpha"] = abs(got["alpha"] / t["alpha"] - 1) <= 0.20
            for k in ("A0", "alpha"):
                checks[f"{k} within 4 sigma"] = abs(got[k] - t[k]) <= 4 * fit["stderr"][k]
            bad = [k for k, ok in checks.items() if not ok]
            if verbose:
                truth = ", ".join(f"{k}={v:.4g}" for k, v in t.items())
                print(format_fit(f"{form} {scale}", fit) + f"\n    true: {truth}; max curve error {rel:.2%}"
                      + (f"  FAIL {bad}" if bad else "  ok"))
            failures += [f"{form} {scale}: {k}" for k in bad]
            curves.append((f"{scale} ({form})", D, A, fit))
        if out is not None:
            plot_fits(curves, form, Path(out).with_name(f"{Path(out).stem}_{form}{Path(out).suffix or '.png'}"))
    return failures


INPUTS = ("cett_ppl", "exact_zero")
EXACT_ZERO_LABEL = "1 - exact-zero training sparsity (not the paper's A)"


def cett_ppl_label(p: float) -> str:
    """Axis label of the paper's A: the CETT-PPL-p% activation ratio on validation data."""
    return f"activation ratio A (CETT-PPL-{p:g}%, validation)"


class TooFewCheckpointsError(ValueError):
    """A run has fewer kept checkpoints than the law has parameters + 1."""


def check_enough_checkpoints(workdir: str | Path, form: str, min_step: int | None) -> None:
    """Raises :class:`TooFewCheckpointsError` (one line, with the fix) before any measurement if a fit cannot work."""
    from prosparse_jax.analysis import law_inputs as law_ratios

    plan = law_ratios.plan_checkpoints(workdir, min_step)
    need = len(FORMS[form][2]) + 1
    if len(plan.kept_steps) < need:
        raise TooFewCheckpointsError(
            f"{workdir}: {len(plan.kept_steps)} checkpoint(s) after the warmup cut (step > {plan.min_step}; kept "
            f"{list(plan.kept_steps)}, dropped {list(plan.dropped_steps)}), the {form} law needs at least {need}; "
            "train with --config.train.keep_period=<train.checkpoint_every> so every checkpoint is kept "
            "(or lower --min_step)")


def format_table(res: dict[str, Any]) -> str:
    """The per-checkpoint table of a law_ratios result: step, D, A, PPL ratio."""
    lines = [f"{'step':>9} {'D (B tokens)':>13} {'A':>9} {'PPL ratio':>10}"]
    for r in res["checkpoints"]:
        lines.append(f"{r['step']:>9d} {r['D']:>13.6g} {r['activation_ratio']:>9.5f} {r['ppl_ratio']:>10.5f}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    from prosparse_jax.main import common as cli

    ap = cli.ArgumentParser(prog="fit_laws", description=__doc__.split("\n\n")[0])
    ap.add_argument("workdirs", nargs="*", help="training workdirs (checkpoints/ + config.json, or metrics.jsonl)")
    ap.add_argument("--form", choices=sorted(FORMS), help="law to fit: relu or silu")
    ap.add_argument("--out", help="PNG to write")
    ap.add_argument("--input", choices=INPUTS, default="cett_ppl",
                    help="cett_ppl (default): the paper's CETT-PPL-p%% ratio per checkpoint (App. E); exact_zero: "
                         "1 - exact-zero training sparsity from metrics.jsonl (not the paper's A)")
    ap.add_argument("--min_tokens", type=float, default=0.0, help="ignore points with training tokens <= this")
    ap.add_argument("--p", type=float, default=1.0, help="cett_ppl: PPL budget in percent (PPL ratio <= 1 + p/100)")
    ap.add_argument("--n_search", type=int, default=5, help="cett_ppl: the CETT target is searched on this many "
                    "last kept checkpoints")
    ap.add_argument("--num_batches", type=int, default=4, help="cett_ppl: validation batches")
    ap.add_argument("--batch_size", type=int, default=8, help="cett_ppl: sequences per validation batch")
    ap.add_argument("--min_step", type=int, default=None, help="cett_ppl: drop checkpoints with step <= this "
                    "(default: the run's optim.warmup_steps)")
    ap.add_argument("--search_steps", type=int, default=12, help="cett_ppl: bisection steps on the CETT target")
    ap.add_argument("--overwrite", action="store_true", help="cett_ppl: recompute a law_ratios.json computed with "
                    "other settings")
    ap.add_argument("--selftest", action="store_true", help="recover the published coefficients from noisy samples")
    ap.add_argument("--noise", type=float, default=0.005, help="selftest: relative noise")
    return ap


def _cett_ppl_points(wd: str, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """(D, A) of one run from law_ratios (computed, or read from its law_ratios.json), with the table printed."""
    from prosparse_jax.analysis import law_inputs as law_ratios
    from prosparse_jax.main import common as cli

    target = Path(wd) / law_ratios.DEFAULT_FILE
    try:
        res = law_ratios.law_ratios(
            wd, overwrite=args.overwrite, p=args.p, n_search=args.n_search, num_batches=args.num_batches,
            batch_size=args.batch_size, min_step=args.min_step, search_steps=args.search_steps, verbose=True)
    except OSError as e:  # law_ratios writes through a temp file + rename: the previous file is intact
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise cli.write_error(target, e, f"the previous {target.name} (if any) was not touched") from e
        raise
    print(f"{wd}: A = CETT-PPL-{args.p:g}% activation ratio on validation data (Sparsing Law App. E; "
          f"{'read from' if res['reused'] else 'written to'} {target}): CETT target {res['cett_target']:.6g} "
          f"searched on steps {res['search_checkpoints']}, dropped warmup steps {res['dropped_steps']}, "
          f"{res['eval_tokens']} eval tokens")
    print(format_table(res))
    rows = [r for r in res["checkpoints"] if r["tokens"] > args.min_tokens]
    return np.array([r["D"] for r in rows]), np.array([r["activation_ratio"] for r in rows])


def _check_workdirs(args: argparse.Namespace) -> None:
    """Cheap checks of every run before any is measured: it exists, its JSON files parse (errors name the file) and,
    for cett_ppl, it has enough kept checkpoints."""
    from prosparse_jax.analysis import law_inputs as law_ratios
    from prosparse_jax.main import common as cli

    for wd in args.workdirs:
        if not Path(wd).is_dir():
            raise cli.UsageError(f"{wd}: not a directory; pass training workdirs")
        if args.input == "cett_ppl":
            for name in ("config.json", law_ratios.DEFAULT_FILE):
                if (Path(wd) / name).exists():
                    cli.read_json(Path(wd) / name, name)
            check_enough_checkpoints(wd, args.form, args.min_step)


def _fit_all(args: argparse.Namespace) -> list[tuple[str, np.ndarray, np.ndarray, dict[str, Any]]]:
    """One fit per workdir (every run checked before any is measured)."""
    _check_workdirs(args)
    curves = []
    for wd in args.workdirs:
        if args.input == "cett_ppl":
            D, A = _cett_ppl_points(wd, args)
        else:
            D, A = load_run(wd, args.min_tokens)
            print(f"{wd}: A = {EXACT_ZERO_LABEL}, {len(D)} metrics.jsonl train entries")
        try:
            fit = FORMS[args.form][0](D, A)
        except ValueError as e:
            raise ValueError(f"{wd}: {e}") from e
        print(format_fit(str(wd), fit))
        curves.append((Path(wd).name, D, A, fit))
    return curves


def _run(argv: Sequence[str] | None) -> int:
    from prosparse_jax.main import common as cli

    args = _parser().parse_args(argv)
    if args.out:
        cli.check_output_file(args.out, "--out")  # before any measurement
    if args.selftest:
        failures = selftest(args.noise, out=args.out)
        print("selftest: " + ("ok" if not failures else f"FAILED {failures}"))
        return 1 if failures else 0
    if not args.form:
        raise cli.UsageError("--form is required (relu or silu)")
    if not args.workdirs or not args.out:
        raise cli.UsageError("give --out=<png> and at least one workdir")
    curves = _fit_all(args)
    if args.input == "cett_ppl":
        ylabel, title = cett_ppl_label(args.p), f"Sparsing Law fit ({args.form}), CETT-PPL-{args.p:g}%"
    else:
        ylabel, title = EXACT_ZERO_LABEL, f"Sparsing Law fit ({args.form}) of {EXACT_ZERO_LABEL}"
    with cli.atomic_file(args.out) as tmp:
        plot_fits(curves, args.form, tmp, ylabel=ylabel, title=title)
    print(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (1 with one error line on stderr for bad input; --verbose: traceback)."""
    from prosparse_jax.data import pipeline as data_lib
    from prosparse_jax.main import common as cli
    from prosparse_jax.training import checkpoint as ckpt
    from prosparse_jax.training.metrics import MetricsFileError

    errors = (OSError, ValueError, ckpt.CheckpointError, data_lib.DataError, MetricsFileError)
    return cli.call("fit_laws", None if argv is None else list(argv), lambda: _run(argv), errors)


if __name__ == "__main__":
    sys.exit(main())
