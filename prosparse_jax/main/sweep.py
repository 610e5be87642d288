"""Sweeps: many training runs of one base config, run locally or as a SLURM array, watched and aggregated.

    python -m prosparse_jax.main.sweep plan      --sweep=configs/sweeps/sparsing_law.py:tiny [--root=runs/law_tiny]
    python -m prosparse_jax.main.sweep run       --sweep=... --root=runs/law_tiny [--parallel=2 --interval=10]
    python -m prosparse_jax.main.sweep status    --sweep=... --root=...
    python -m prosparse_jax.main.sweep slurm     --sweep=... --root=... --out=sweep.sbatch [--overwrite
                                                 --max_parallel=K --sbatch=--time=24:00:00 --sbatch=--gres=gpu:8]
    python -m prosparse_jax.main.sweep task      --sweep=... --root=... --index=I [--dry_run]
    python -m prosparse_jax.main.sweep aggregate --sweep=... --root=... [--out=<root>/results --input=exact_zero]

Every subcommand first checks every run as the train command will parse it. ``run`` keeps ``--parallel`` runs going,
skips finished ones, resumes the others and prints a progress table; ``slurm`` writes an array script whose task i is
``task --index=i``; ``aggregate`` writes results.csv and the law plots. Format and outputs: docs/sweeps.md.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from prosparse_jax import files
from prosparse_jax.errors import UsageError
from prosparse_jax.main import common
from prosparse_jax.sweeps import aggregate, launch, progress
from prosparse_jax.sweeps.spec import load_sweep


def parse_train_config(base: str, args: Sequence[str]) -> ml_collections.ConfigDict:
    """The ConfigDict of ``python -m prosparse_jax.main.train --config=<base> <args>``, parsed by the same flags."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True, flag_values=fv)
    try:
        common.parse_flags(fv, ["train", f"--config={base}", *args])
    except flags.Error as e:
        raise UsageError(common.error_line(e)) from e
    return common.load_config(fv)


def _parser() -> common.ArgumentParser:
    ap = common.ArgumentParser(prog="sweep", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str, root: bool = True) -> Any:
        p = sub.add_parser(name, help=help_)  # a common.ArgumentParser too: --verbose, one-line errors
        p.add_argument("--sweep", required=True, help="sweep config, file.py:arg (e.g. configs/sweeps/"
                       "sparsing_law.py:tiny)")
        p.add_argument("--root", required=root, help="sweep directory: one workdir per run, logs/, sweep.json")
        return p

    add("plan", "validate the sweep, list its runs (and their commands with --root)", root=False)
    p = add("run", "run the unfinished runs locally, --parallel at a time, with a progress table")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (each a train process)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between progress tables")
    add("status", "print the progress table once")
    p = add("slurm", "write a SLURM array script (one run per task)")
    p.add_argument("--out", required=True, help="the sbatch file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--max_parallel", type=int, default=0, help="array throttle (%%K); 0 = none")
    p.add_argument("--sbatch", action="append", default=[], help="an extra #SBATCH option, e.g. --time=24:00:00")
    p = add("task", "run (or resume) one run by index in the foreground: a SLURM array task")
    p.add_argument("--index", type=int, required=True, help="the run's index (SLURM_ARRAY_TASK_ID)")
    p.add_argument("--dry_run", action="store_true", help="print the train command instead of running it")
    p = add("aggregate", "collect every run into results.csv and draw the law plots")
    p.add_argument("--out", help="output directory (default <root>/results)")
    p.add_argument("--input", choices=("cett_ppl", "exact_zero"), help="law input; default: the sweep's "
                   "analysis.law_input")
    p.add_argument("--overwrite", action="store_true", help="write into an --out that is not a previous aggregate")
    return ap


def _body(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    for name in ("parallel", "interval"):
        if getattr(args, name, 1) <= 0:
            raise UsageError(f"--{name}: must be positive, got {getattr(args, name)}")
    if getattr(args, "max_parallel", 0) < 0:
        raise UsageError(f"--max_parallel: must be >= 0, got {args.max_parallel}")
    if args.command == "slurm":  # refused before any work
        out = files.check_output_file(args.out, "--out")  # a directory first: --overwrite would not help
        if out.exists() and not args.overwrite:
            raise UsageError(f"--out: {out} exists; pass --overwrite to replace it (nothing was written)")
    root = files.check_output_path(args.root, "--root") if args.root else None
    sweep = load_sweep(args.sweep, parse_train_config)
    if args.command == "plan":
        print(launch.plan(sweep, root))
    elif args.command == "status":
        print(progress.status_table(sweep, root))
    elif args.command == "run":
        return launch.run_sweep(sweep, root, args.parallel, args.interval)
    elif args.command == "task":
        return launch.run_task(sweep, root, args.index, args.dry_run)
    elif args.command == "slurm":
        launch.write_slurm_script(sweep, root, Path(args.out), args.max_parallel, args.sbatch)
        print(f"wrote {args.out}: {len(sweep.runs)} array tasks (0-{len(sweep.runs) - 1}); submit with: "
              f"sbatch {args.out}")
    else:
        print(aggregate.aggregate(sweep, root, Path(args.out) if args.out else root / "results",
                                  law_input=args.input, overwrite=args.overwrite))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (1 with one error line on stderr for bad input; --verbose: traceback)."""
    return common.call("sweep", None if argv is None else list(argv), lambda: _body(argv))


if __name__ == "__main__":
    sys.exit(main())
