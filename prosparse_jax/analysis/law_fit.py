"""The Sparsing Law fit (arXiv 2411.02335): activation ratio A versus training tokens D (billions), one fit per run.

ReLU: A(D) = exp(-c * D^alpha + b) + A0; SiLU: A(D) = -c * D^(-alpha) + A0. Levenberg-Marquardt from the best of a
grid over alpha (the other coefficients solved in closed form); 1-sigma errors from s^2 (J^T J)^-1 at the optimum.
Inputs, protocol and the self-test's tolerances: docs/analysis.md.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import least_squares

from prosparse_jax import files
from prosparse_jax.analysis import law_inputs
from prosparse_jax.config import wsd_decay_steps
from prosparse_jax.errors import CheckpointError, InputError, UsageError
from prosparse_jax.training.metrics import read_metrics

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
        raise InputError(f"need more than {n_params} (D, A) points of equal length, got {D.size} and {A.size}")
    if np.any(D <= 0) or not np.all(np.isfinite(A)):
        raise InputError("D must be > 0 and A finite")
    return D, A


def fit_silu_law(D: Sequence[float], A: Sequence[float]) -> dict[str, Any]:
    """Fits A(D) = -c * D^(-alpha) + A0: {"params": {c, alpha, A0}, "stderr" (1 sigma), "rmse", "n", "success"}."""
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
    """Fits A(D) = exp(-c * D^alpha + b) + A0 from the best of a grid over (alpha, A0); result as
    :func:`fit_silu_law`'s, with b."""
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


def _metrics_points(workdir: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(step, training tokens, 1 - exact-zero sparsity) of the train entries of ``<workdir>/metrics.jsonl``."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise InputError(f"{path} not found: pass training workdirs")
    rows = [(int(r.get("step", 0)), float(r["tokens_seen"]), 1.0 - r["sparsity"])
            for r in read_metrics(workdir)  # a line cut by a crash is skipped; a corrupt one is an error naming it
            if r.get("kind", "train") == "train" and "tokens_seen" in r and "sparsity" in r]
    steps, tokens, A = zip(*rows, strict=True) if rows else ((), (), ())
    return np.asarray(steps, np.int64), np.asarray(tokens, np.float64), np.asarray(A, np.float64)


def load_run(workdir: str | Path, min_tokens: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(D in billions of tokens, activation ratio) from the train entries of ``<workdir>/metrics.jsonl``."""
    _, tokens, A = _metrics_points(workdir)
    keep = tokens > min_tokens
    return tokens[keep] / 1e9, A[keep]


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
    """Recovers the published coefficients of all scales and both forms; returns the failures (empty = pass).

    Tolerances (and why ReLU's alpha is only checked to 4 sigma): docs/analysis.md, "Self-test".
    """
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


def format_table(res: dict[str, Any]) -> str:
    """The per-checkpoint table of a law_ratios result: step, D, A, PPL ratio."""
    lines = [f"{'step':>9} {'D (B tokens)':>13} {'A':>9} {'PPL ratio':>10}"]
    for r in res["checkpoints"]:
        lines.append(f"{r['step']:>9d} {r['D']:>13.6g} {r['activation_ratio']:>9.5f} {r['ppl_ratio']:>10.5f}")
    return "\n".join(lines)




# ---------------------------------------------------------------------------------------------------------------
# Which steps a fit uses
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StepWindow:
    """The steps of a run a fit uses: ``min_step < step <= max_step`` (``max_step`` None: no upper cut). The warm-up
    is dropped by default (Sparsing Law App. E); the LR decay only with ``max_step`` (the public code's law checkpoints
    all precede the decay stage). ``min_source`` says where min_step came from; ``decay_start``: the step after which
    a ``wsd`` run decays its LR (None: no such phase)."""

    min_step: int
    max_step: int | None
    min_source: str
    decay_start: int | None = None

    def split(self, steps: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
        """(used, dropped as warm-up, dropped after max_step), each ascending (:func:`law_inputs.split_steps`)."""
        return law_inputs.split_steps(steps, self.min_step, self.max_step)

    def describe(self, steps: Sequence[int], what: str = "checkpoints") -> str:
        """One line naming the steps used and those dropped, and any used step inside the LR decay."""
        used, warm, late = self.split(steps)
        line = (f"fit on {len(used)} {what}, steps {_steps_text(used)}; dropped: warm-up (step <= {self.min_step}, "
                f"{self.min_source}) {_steps_text(warm)}")
        if self.max_step is not None:
            line += f", after --max_step={self.max_step} {_steps_text(late)}"
        in_decay = [s for s in used if self.decay_start is not None and s > self.decay_start]
        if in_decay:
            line += (f"; steps {_steps_text(in_decay)} are in the run's LR decay (wsd, after step {self.decay_start}): "
                     f"--max_step={self.decay_start} fits the stable phase only")
        return line


def _steps_text(steps: Sequence[int]) -> str:
    steps = list(steps)
    if len(steps) <= 12:
        return str(steps)
    return "[" + ", ".join(map(str, steps[:5])) + ", ..., " + ", ".join(map(str, steps[-5:])) + "]"


def _run_config(workdir: str | Path, law_input: str) -> dict[str, Any] | None:
    """The run's config.json (required for ``cett_ppl``; None for an ``exact_zero`` workdir without one)."""
    if law_input == "cett_ppl":
        return law_inputs.RunInfo.read(workdir).config
    path = Path(workdir) / "config.json"
    return files.read_json(path, "config.json") if path.exists() else None


#: ``max_step`` value meaning each run's own LR-decay start (wsd; describe's ``decay_start_step``): the stable phase.
DECAY_START = "decay_start"


def step_window(workdir: str | Path, law_input: str = "cett_ppl", min_step: int | None = None,
                max_step: int | str | None = None) -> StepWindow:
    """The :class:`StepWindow` of a run: ``min_step`` None = the run's optim.warmup_steps (0 without one),
    ``max_step`` None = no upper cut, :data:`DECAY_START` = the run's decay start; the decay start is read from the
    run's config.json when it has one.

    Raises:
      UsageError: a negative min_step, max_step <= min_step, or max_step :data:`DECAY_START` for a run without a wsd
        LR decay.
    """
    config = _run_config(workdir, law_input) or {}
    optim_cfg, train_steps = config.get("optim") or {}, (config.get("train") or {}).get("steps")
    min_source = "min_step"
    if min_step is None:
        min_step = int(optim_cfg.get("warmup_steps", 0))
        min_source = "the run's optim.warmup_steps" if "warmup_steps" in optim_cfg else "no optim.warmup_steps"
    decay_start = None
    if optim_cfg.get("schedule") == "wsd" and train_steps is not None:
        decay = wsd_decay_steps(int(train_steps), float(optim_cfg.get("decay_fraction", 0.0)))
        decay_start = int(train_steps) - decay if decay > 0 else None
    if max_step == DECAY_START:
        if decay_start is None:
            raise UsageError(
                f"{workdir}: max_step {DECAY_START!r} needs a run with a wsd LR decay (this run: optim.schedule "
                f"{optim_cfg.get('schedule')!r}, decay_fraction {optim_cfg.get('decay_fraction')!r}); give a step "
                "number or no max_step")
        max_step = decay_start
    elif isinstance(max_step, (str, bool)):
        raise UsageError(f"{workdir}: max_step must be a step number, None or {DECAY_START!r}, got {max_step!r}")
    law_inputs.check_window(int(min_step), max_step, str(workdir))
    return StepWindow(int(min_step), None if max_step is None else int(max_step), min_source, decay_start)


def check_enough_checkpoints(workdir: str | Path, form: str, window: StepWindow) -> None:
    """Raises :class:`CheckpointError` (one line, with the fix) before any measurement if a fit cannot work."""
    used, warm, late = window.split(law_inputs.checkpoint_steps(workdir))
    need = len(FORMS[form][2]) + 1
    if len(used) < need:
        bounds = f"step > {window.min_step}" + ("" if window.max_step is None else f" and <= {window.max_step}")
        raise CheckpointError(
            f"{workdir}: {len(used)} checkpoint(s) in the fit window ({bounds}; kept {used}, dropped {warm + late}), "
            f"the {form} law needs at least {need}; train with --config.train.keep_period=<train.checkpoint_every> so "
            "every checkpoint is kept (or lower --min_step" + (", raise --max_step)" if late else ")"))


def cett_ppl_points(workdir: str | Path, window: StepWindow, *, min_tokens: float = 0.0,
                    echo: Callable[[str], None] = print, **law_kw: Any) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(D, A, steps) of one run's checkpoints in ``window`` from :func:`~prosparse_jax.analysis.law_inputs.law_ratios`
    (computed on the window's checkpoints, the CETT target searched on its last ones, or read from the run's
    law_ratios.json; ``law_kw``: its other settings), with the per-checkpoint table and the steps used echoed."""
    target = Path(workdir) / law_inputs.DEFAULT_FILE
    try:
        res = law_inputs.law_ratios(workdir, verbose=True, min_step=window.min_step, max_step=window.max_step,
                                    **law_kw)
    except OSError as e:  # law_ratios writes through a temp file + rename: the previous file is intact
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise files.write_error(target, e, f"the previous {target.name} (if any) was not touched") from e
        raise
    p = law_kw.get("p", 1.0)
    echo(f"{workdir}: A = CETT-PPL-{p:g}% activation ratio on validation data (Sparsing Law App. E; "
         f"{'read from' if res['reused'] else 'written to'} {target}): CETT target {res['cett_target']:.6g} "
         f"searched on steps {res['search_checkpoints']}, {res['eval_tokens']} eval tokens")
    echo(format_table(res))
    rows = [r for r in res["checkpoints"] if r["tokens"] > min_tokens]  # all in the window (law_ratios' max_step)
    echo(f"{workdir}: " + window.describe([r["step"] for r in rows] + res["dropped_steps"]
                                          + res.get("dropped_after_max_step", []))
         + ("" if len(rows) == len(res["checkpoints"]) else f" (and {len(res['checkpoints']) - len(rows)} at "
            f"<= --min_tokens={min_tokens:g})"))
    return (np.array([r["D"] for r in rows]), np.array([r["activation_ratio"] for r in rows]),
            [r["step"] for r in rows])


def exact_zero_points(workdir: str | Path, window: StepWindow, *, min_tokens: float = 0.0,
                      echo: Callable[[str], None] = print) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(D, A, steps) of one run's metrics.jsonl train entries in ``window`` (A = 1 - exact-zero sparsity)."""
    steps, tokens, A = _metrics_points(workdir)
    keep = tokens > min_tokens
    used = np.isin(steps, window.split(steps[keep])[0]) & keep
    echo(f"{workdir}: A = {EXACT_ZERO_LABEL}; " + window.describe(steps[keep].tolist(), "metrics.jsonl train entries"))
    return tokens[used] / 1e9, A[used], steps[used].tolist()


def check_workdirs(workdirs: Sequence[str | Path], form: str, law_input: str, min_step: int | None = None,
                   max_step: int | None = None) -> dict[str, StepWindow]:
    """Cheap checks of every run before any is measured: it exists, its JSON files parse (errors name the file) and,
    for ``cett_ppl``, it has enough checkpoints in its window. Returns each workdir's :class:`StepWindow`."""
    windows = {}
    for wd in workdirs:
        if not Path(wd).is_dir():
            raise InputError(f"{wd}: not a directory; pass training workdirs")
        for name in ("config.json", law_inputs.DEFAULT_FILE):
            if (Path(wd) / name).exists():
                files.read_json(Path(wd) / name, name)
        windows[str(wd)] = window = step_window(wd, law_input, min_step, max_step)
        if law_input == "cett_ppl":
            check_enough_checkpoints(wd, form, window)
    return windows


def fit_runs(workdirs: Sequence[str | Path], form: str, law_input: str = "cett_ppl", *, min_step: int | None = None,
             max_step: int | None = None, min_tokens: float = 0.0, echo: Callable[[str], None] = print,
             **law_kw: Any) -> list[tuple[str, np.ndarray, np.ndarray, dict[str, Any]]]:
    """One fit of ``form`` per workdir, every run checked before any is measured: ``[(name, D, A, fit)]``; ``fit``
    carries the ``steps`` it used.

    Args:
      form: ``relu`` or ``silu`` (:data:`FORMS`).
      law_input: ``cett_ppl``, the paper's A (App. E, :mod:`prosparse_jax.analysis.law_inputs`), or
        ``exact_zero``, 1 - exact-zero training sparsity from metrics.jsonl (not the paper's A: constant 1 for SiLU).
      min_step, max_step: the fit uses min_step < step <= max_step; None: the run's warm-up, and no upper cut
        (:func:`step_window`; the output names the steps used inside a wsd LR decay).
      min_tokens: ignore points with training tokens <= this.
      echo: where the per-run tables, the steps used and the fits are written.
      **law_kw: other ``cett_ppl`` settings of :func:`~prosparse_jax.analysis.law_inputs.law_ratios` (p, n_search,
        num_batches, batch_size, search_steps, overwrite).
    """
    windows = check_workdirs(workdirs, form, law_input, min_step, max_step)
    curves = []
    for wd in workdirs:
        if law_input == "cett_ppl":
            D, A, steps = cett_ppl_points(wd, windows[str(wd)], min_tokens=min_tokens, echo=echo, **law_kw)
        else:
            D, A, steps = exact_zero_points(wd, windows[str(wd)], min_tokens=min_tokens, echo=echo)
        try:
            fit = FORMS[form][0](D, A)
        except InputError as e:
            raise InputError(f"{wd}: {e}") from e
        fit["steps"] = steps
        echo(format_fit(str(wd), fit))
        curves.append((Path(wd).name, D, A, fit))
    return curves
