"""Fits the Sparsing Law curves of activation ratio versus training tokens (arXiv 2411.02335), one per run.

    python -m prosparse_jax.main.fit_laws --form=relu|silu --out=fit.png [--p=1 --n_search=5 --num_batches=4 \
        --batch_size=8 --min_step=N --max_step=N|decay_start --overwrite] <workdir> [<workdir> ...]
    python -m prosparse_jax.main.fit_laws --input=exact_zero --form=relu|silu --out=fit.png <workdir> [...]
    python -m prosparse_jax.main.fit_laws --selftest [--out=selftest.png]

``cett_ppl`` (default) measures the paper's A of every kept checkpoint into ``<workdir>/law_ratios.json`` (or reads
it when its settings match): a run needs at least (law parameters + 1) kept checkpoints after the warm-up, so train
with ``train.keep_period`` = ``train.checkpoint_every``. The fit uses the steps in (``--min_step``, ``--max_step``]:
by default every one after the warm-up; each run's line names the steps used and dropped, and those inside a ``wsd``
LR decay (``--max_step=decay_start`` leaves them out). The forms, inputs and self-test:
:mod:`prosparse_jax.analysis.law_fit`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from prosparse_jax import files
from prosparse_jax.analysis import law_fit
from prosparse_jax.errors import UsageError
from prosparse_jax.main import common


def _parser() -> common.ArgumentParser:
    ap = common.ArgumentParser(prog="fit_laws", description=__doc__.split("\n\n")[0])
    ap.add_argument("workdirs", nargs="*", help="training workdirs (checkpoints/ + config.json, or metrics.jsonl)")
    ap.add_argument("--form", choices=sorted(law_fit.FORMS), help="law to fit: relu or silu")
    ap.add_argument("--out", help="PNG to write")
    ap.add_argument("--input", choices=law_fit.INPUTS, default="cett_ppl",
                    help="cett_ppl (default): the paper's CETT-PPL-p%% ratio per checkpoint (App. E); exact_zero: "
                         "1 - exact-zero training sparsity from metrics.jsonl (not the paper's A)")
    ap.add_argument("--min_tokens", type=float, default=0.0, help="ignore points with training tokens <= this")
    ap.add_argument("--p", type=float, default=1.0, help="cett_ppl: PPL budget in percent (PPL ratio <= 1 + p/100)")
    ap.add_argument("--n_search", type=int, default=5, help="cett_ppl: the CETT target is searched on this many "
                    "last kept checkpoints")
    ap.add_argument("--num_batches", type=int, default=4, help="cett_ppl: validation batches")
    ap.add_argument("--batch_size", type=int, default=8, help="cett_ppl: sequences per validation batch")
    ap.add_argument("--min_step", type=int, default=None, help="drop the warm-up: steps <= this (default: the "
                    "run's optim.warmup_steps)")
    ap.add_argument("--max_step", type=_max_step, default=None, help="drop steps > this: a step, or "
                    f"{law_fit.DECAY_START!r} = each run's own wsd LR-decay start (describe prints it as "
                    "decay_start_step); default: no cut, the used steps inside the decay named")
    ap.add_argument("--search_steps", type=int, default=12, help="cett_ppl: bisection steps on the CETT target")
    ap.add_argument("--overwrite", action="store_true", help="cett_ppl: recompute a law_ratios.json computed with "
                    "other settings")
    ap.add_argument("--selftest", action="store_true", help="recover the published coefficients from noisy samples")
    ap.add_argument("--noise", type=float, default=0.005, help="selftest: relative noise")
    return ap


def _max_step(text: str) -> int | str:
    if text == law_fit.DECAY_START:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a step number or {law_fit.DECAY_START!r}, got {text!r}") from None


def _run(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.out:
        files.check_output_file(args.out, "--out")  # before any measurement
    if args.selftest:
        failures = law_fit.selftest(args.noise, out=args.out)
        print("selftest: " + ("ok" if not failures else f"FAILED {failures}"))
        return 1 if failures else 0
    if not args.form:
        raise UsageError("--form is required (relu or silu)")
    if not args.workdirs or not args.out:
        raise UsageError("give --out=<png> and at least one workdir")
    law_kw = {} if args.input != "cett_ppl" else dict(
        p=args.p, n_search=args.n_search, num_batches=args.num_batches, batch_size=args.batch_size,
        search_steps=args.search_steps, overwrite=args.overwrite)
    curves = law_fit.fit_runs(args.workdirs, args.form, args.input, min_step=args.min_step, max_step=args.max_step,
                              min_tokens=args.min_tokens, **law_kw)
    if args.input == "cett_ppl":
        ylabel, title = law_fit.cett_ppl_label(args.p), f"Sparsing Law fit ({args.form}), CETT-PPL-{args.p:g}%"
    else:
        ylabel = law_fit.EXACT_ZERO_LABEL
        title = f"Sparsing Law fit ({args.form}) of {law_fit.EXACT_ZERO_LABEL}"
    with files.atomic_file(args.out) as tmp:
        law_fit.plot_fits(curves, args.form, tmp, ylabel=ylabel, title=title)
    print(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (1 with one error line on stderr for bad input; --verbose: traceback)."""
    return common.call("fit_laws", None if argv is None else list(argv), lambda: _run(argv))


if __name__ == "__main__":
    sys.exit(main())
