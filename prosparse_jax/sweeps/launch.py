"""Sweeps: many training runs of one base config, run locally or as a SLURM array, watched and aggregated.

    python experiments/sweep.py plan      --sweep=configs/sweeps/sparsing_law.py:tiny [--root=runs/sweeps/law_tiny]
    python experiments/sweep.py run       --sweep=... --root=runs/sweeps/law_tiny [--parallel=2 --interval=10]
    python experiments/sweep.py status    --sweep=... --root=...
    python experiments/sweep.py slurm     --sweep=... --root=... --out=sweep.sbatch [--overwrite --max_parallel=K
                                          --sbatch=--time=24:00:00 --sbatch=--gres=gpu:8]
    python experiments/sweep.py task      --sweep=... --root=... --index=I [--dry_run]
    python experiments/sweep.py aggregate --sweep=... --root=... [--out=<root>/results --input=exact_zero]

A sweep (``configs/sweeps/``, see its ``__init__``) is a base experiment config (``file.py:arg``) and a list of runs,
each a name and dotted-field overrides. Every subcommand first checks every run: each override must be a field of
the base config (else one error naming the run, the field and the nearest valid name) and each run's config must
resolve (values checked as ``prosparse_jax.training.train`` checks them), exactly as the train command will parse it -- before
anything is created or trained.

Run ``i`` is ``python -m prosparse_jax.training.train --config=<base> --workdir=<root>/<name> --config.<field>=<value> ...``
(``plan`` prints the commands). ``run`` keeps ``--parallel`` of them going, each writing ``<root>/logs/<name>.log``,
and prints a progress table every ``--interval`` seconds (state, step / total, training loss, tokens/s and ETA from
the tail of each workdir's metrics.jsonl); ``status`` prints it once. A run is finished when its latest checkpoint is
at ``train.steps`` and ``final_eval.json`` exists: ``run`` and ``task`` skip finished runs and re-invoke train for the
others, which resumes each from its latest checkpoint; a workdir written with another config is refused, naming the
run, before anything trains. Ctrl-C (or SIGTERM) stops every running run with a checkpoint (SIGTERM to each); rerun
the command to go on. ``slurm`` writes an array script (task ``i`` = run ``i`` through ``task --index=i``) and never
replaces an existing file without ``--overwrite``. ``aggregate``: see ``experiments/sweep_aggregate.py``.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prosparse_jax.config import ConfigError
from prosparse_jax.main import common as cli
from prosparse_jax.sweeps.progress import fmt_s, is_finished, running_marker, status_table
from prosparse_jax.sweeps.spec import LOGS, ROOT, Run, Sweep, SweepError, format_value, load_sweep
from prosparse_jax.training import checkpoint as ckpt
from prosparse_jax.training.workdir import TrainError, check_workdir_config, json_config


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------
def check_workdirs(sweep: Sweep, root: Path, runs: Sequence[Run] | None = None) -> None:
    """Refuses (before anything trains) a run whose workdir holds a run of another config, naming the fields."""
    errors = []
    for r in sweep.runs if runs is None else runs:
        try:
            check_workdir_config(sweep.workdir(root, r), json_config(r.config), r.rc.model)
        except TrainError as e:
            errors.append(f"run {r.name!r}: {e}")
    if errors:
        raise SweepError(f"{len(errors)} run(s) cannot resume their workdir (nothing was started): "
                         + " | ".join(errors))


def _write_manifest(sweep: Sweep, root: Path) -> None:
    """``<root>/sweep.json``: the sweep, its base and every run's overrides and command (a record for the reader)."""
    m = {"sweep": sweep.ref, "name": sweep.name, "base": sweep.base,
         "runs": [{"index": r.index, "name": r.name, "axes": r.axes, "overrides": r.overrides,
                   "command": shlex.join(sweep.command(root, r))} for r in sweep.runs]}
    cli.write_text_atomic(Path(root) / "sweep.json", json.dumps(m, indent=2))


def prepare_corpora(runs: Sequence[Run], echo: Callable[[str], None]) -> None:
    """Prepares each run's corpus (TFDS array_record) once, before runs start in parallel: two processes preparing
    the same dataset at once would race."""
    from prosparse_jax.data import pipeline as data_lib

    seen = set()
    for r in runs:
        d = r.rc.data
        key = (d.source, d.data_dir, d.eval_fraction, d.text_key)
        if key not in seen:
            seen.add(key)
            t0 = time.time()
            data_lib.open_corpus(d)
            if time.time() - t0 > 1:
                echo(f"prepared the corpus {d.source} in {fmt_s(time.time() - t0)}")


def _log_tail(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][-300:] if lines else ""


class _Launcher:
    """Starts runs as train subprocesses (own session, output to ``<root>/logs/<run>.log``) and reaps them."""

    def __init__(self, sweep: Sweep, root: Path, echo: Callable[[str], None]) -> None:
        self.sweep, self.root, self.echo = sweep, Path(root), echo
        self.running: dict[str, tuple[Run, subprocess.Popen, Any, float]] = {}
        self.results: dict[str, str] = {}  # run -> state after its process ended: done | failed | stopped
        self.notes: dict[str, str] = {}

    def start(self, run: Run) -> None:
        log_path = self.root / LOGS / f"{run.name}.log"
        cmd = self.sweep.command(self.root, run)
        log = open(log_path, "a")  # noqa: SIM115 (closed when the run ends)
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        log.flush()
        resumed = ckpt.latest_step(self.sweep.workdir(self.root, run))
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # Ctrl-C reaches the launcher only; it stops the runs
        cli.write_text_atomic(running_marker(self.root, run), json.dumps(
            {"host": socket.gethostname(), "pid": proc.pid, "started": time.time()}))
        self.running[run.name] = (run, proc, log, time.time())
        self.echo(f"started {run.name} (pid {proc.pid}{f', resuming from step {resumed}' if resumed else ''}); "
                  f"log: {log_path}")

    def reap(self) -> None:
        for name, (run, proc, log, t0) in list(self.running.items()):
            code = proc.poll()
            if code is not None:
                self._ended(name, run, code, log, t0)

    def _ended(self, name: str, run: Run, code: int, log: Any, t0: float) -> None:
        del self.running[name]
        log.close()
        running_marker(self.root, run).unlink(missing_ok=True)
        took = fmt_s(time.time() - t0)
        if is_finished(self.sweep.workdir(self.root, run), run.steps):
            self.results[name] = "done"
            self.echo(f"finished {name} in {took}")
            return
        self.results[name] = "failed" if code else "stopped"
        log_path = self.root / LOGS / f"{name}.log"
        self.notes[name] = f"{name} (exit {code}: {_log_tail(log_path)}; log: {log_path})"
        self.echo(f"{'FAILED' if code else 'stopped'} {name} after {took}, exit {code}: {_log_tail(log_path)}")

    def stop_all(self, timeout: float = 300.0) -> None:
        """SIGTERM to every running run (each saves a checkpoint and exits), then waits; a second Ctrl-C kills."""
        for _, proc, _, _ in self.running.values():
            proc.send_signal(signal.SIGTERM)
        self.echo(f"stopping {len(self.running)} run(s): each saves a checkpoint (Ctrl-C again kills them)")
        try:
            for _, proc, _, _ in list(self.running.values()):
                proc.wait(timeout)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            for _, proc, _, _ in self.running.values():
                proc.kill()
        for name, (run, proc, log, t0) in list(self.running.items()):
            self._ended(name, run, proc.wait(), log, t0)


def run_sweep(sweep: Sweep, root: Path, parallel: int = 1, interval: float = 10.0,
              echo: Callable[[str], None] = lambda s: print(s, flush=True)) -> int:
    """Runs every unfinished run, ``parallel`` at a time, printing the progress table every ``interval`` s.

    Returns 0 when every run finished, 130 when stopped by Ctrl-C / SIGTERM (runs saved; rerun to resume).

    Raises:
      SweepError: a workdir holds another config (before anything starts), or runs failed (after the others ran).
    """
    root = Path(root)
    check_workdirs(sweep, root)
    (root / LOGS).mkdir(parents=True, exist_ok=True)
    _write_manifest(sweep, root)
    finished = {r.name for r in sweep.runs if is_finished(sweep.workdir(root, r), r.steps)}
    todo = [r for r in sweep.runs if r.name not in finished]
    done = [r.name for r in sweep.runs if r.name in finished]
    if done:
        echo(f"skipping {len(done)} finished run(s): {', '.join(done)}")
    launcher, t0, next_table = _Launcher(sweep, root, echo), time.time(), 0.0
    states = lambda: {**launcher.results, **{n: "running" for n in launcher.running}}  # noqa: E731

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # SIGTERM (e.g. a scheduler's) stops the sweep like Ctrl-C

    prev = _set_handlers((signal.SIGTERM,), on_term)
    try:
        prepare_corpora(todo, echo)
        while todo or launcher.running:
            while todo and len(launcher.running) < parallel:
                launcher.start(todo.pop(0))
            launcher.reap()
            if time.time() >= next_table:
                echo(status_table(sweep, root, states(), time.time() - t0))
                next_table = time.time() + interval
            time.sleep(0.2)
    except KeyboardInterrupt:
        launcher.stop_all()
        echo(status_table(sweep, root, states(), time.time() - t0))
        echo(f"sweep stopped: the stopped runs saved a checkpoint; rerun the command to resume them "
             f"({len(todo)} run(s) not started)")
        return 130
    finally:
        _set_handlers(prev)
    echo(status_table(sweep, root, states(), time.time() - t0))
    bad = [launcher.notes[n] for n in launcher.results if launcher.results[n] != "done"]
    if bad:
        raise SweepError(f"{len(bad)} of {len(sweep.runs)} run(s) did not finish: {' | '.join(bad)}; fix the cause "
                         "and rerun the command (finished runs are skipped, the others resume)")
    return 0


def run_task(sweep: Sweep, root: Path, index: int, dry_run: bool = False) -> int:
    """Runs (or resumes) run ``index`` in this process's foreground, as a SLURM array task does; returns its exit
    code. SIGTERM / SIGINT are passed on to train, which saves a checkpoint."""
    if not 0 <= index < len(sweep.runs):
        raise cli.UsageError(f"--index={index}: the sweep has {len(sweep.runs)} runs (0-{len(sweep.runs) - 1})")
    run, root = sweep.runs[index], Path(root)
    cmd = sweep.command(root, run)
    if dry_run:
        print(shlex.join(cmd))
        return 0
    check_workdirs(sweep, root, [run])
    wd = sweep.workdir(root, run)
    if is_finished(wd, run.steps):
        print(f"task {index}: {run.name} already finished at step {ckpt.latest_step(wd)}; nothing to do", flush=True)
        return 0
    (root / LOGS).mkdir(parents=True, exist_ok=True)
    print(f"task {index}: {run.name}: {shlex.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT)
    cli.write_text_atomic(running_marker(root, run), json.dumps({"host": socket.gethostname(), "pid": proc.pid,
                                                          "started": time.time()}))
    prev = _set_handlers((signal.SIGTERM, signal.SIGINT), lambda signum, frame: proc.send_signal(signum))
    try:
        code = proc.wait()
    finally:
        _set_handlers(prev)
        running_marker(root, run).unlink(missing_ok=True)
    if code == 0 and not is_finished(wd, run.steps):  # train saved and stopped (SIGTERM): not a finished task
        print(f"task {index}: {run.name} stopped at step {ckpt.latest_step(wd)} of {run.steps}; run the task again "
              "to resume it", flush=True)
        return 1
    return code


def _set_handlers(signals: Sequence[int] | dict[int, Any], handler: Any = None) -> dict[int, Any]:
    """Installs ``handler`` for ``signals`` (or restores a dict returned earlier); returns the previous handlers.
    Off the main thread (where Python takes no handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    todo = signals if isinstance(signals, dict) else dict.fromkeys(signals, handler)
    return {s: signal.signal(s, h) for s, h in todo.items()}


def slurm_script(sweep: Sweep, root: Path, max_parallel: int = 0, sbatch: Sequence[str] = ()) -> str:
    """A SLURM array script: task i runs run i through ``sweep.py task --index=$SLURM_ARRAY_TASK_ID``."""
    root = Path(root).absolute()
    n = len(sweep.runs)
    array = f"0-{n - 1}" + (f"%{max_parallel}" if max_parallel else "")
    lines = ["#!/bin/bash", f"# Sweep {sweep.name} ({sweep.ref}): {n} runs of {sweep.base}, one per array task.",
             "# Written by experiments/sweep.py slurm; submit with sbatch. A resubmitted task resumes its run from",
             "# its latest checkpoint; a finished run's task exits at once.",
             f"#SBATCH --job-name={sweep.name}", f"#SBATCH --array={array}",
             f"#SBATCH --output={root / LOGS}/slurm-%A_%a.out", "#SBATCH --signal=B:TERM@120",
             *(f"#SBATCH {s}" for s in sbatch), "#", "# task -> run:",
             *(f"#   {r.index:>3}  {r.name}" for r in sweep.runs), "set -euo pipefail", f"cd {shlex.quote(str(ROOT))}",
             "exec " + shlex.join([sys.executable, str(Path(__file__).resolve()), "task", f"--sweep={sweep.ref}",
                         f"--root={root}"]) + ' --index="$SLURM_ARRAY_TASK_ID"']
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def _parser() -> cli.ArgumentParser:
    ap = cli.ArgumentParser(prog="sweep", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str, root: bool = True) -> Any:
        p = sub.add_parser(name, help=help_)  # a cli.ArgumentParser too: --verbose, one-line errors
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


def _plan(sweep: Sweep, root: str | None) -> str:
    lines = [f"sweep {sweep.name} ({sweep.ref}): {len(sweep.runs)} runs of {sweep.base}; every override checked"]
    common = {k: v for k, v in sweep.runs[0].overrides.items()
              if len(sweep.runs) > 1 and all(k in r.overrides and r.overrides[k] == v for r in sweep.runs)}
    if common:
        lines.append("  every run: " + " ".join(f"{k}={format_value(v)}" for k, v in common.items()))
    for r in sweep.runs:
        over = " ".join(f"{k}={format_value(v)}" for k, v in r.overrides.items() if k not in common) or "-"
        lines.append(f"{r.index:>3}  {r.name}  steps={r.steps} params={r.rc.model.params_total:,}  {over}")
        if root:
            lines.append(f"     {shlex.join(sweep.command(Path(root), r))}")
    return "\n".join(lines)


def _body(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    for name in ("parallel", "interval"):
        if getattr(args, name, 1) <= 0:
            raise cli.UsageError(f"--{name}: must be positive, got {getattr(args, name)}")
    if getattr(args, "max_parallel", 0) < 0:
        raise cli.UsageError(f"--max_parallel: must be >= 0, got {args.max_parallel}")
    if args.command == "slurm":  # refused before any work
        out = Path(args.out)
        if out.exists() and not args.overwrite:
            raise cli.UsageError(f"--out: {out} exists; pass --overwrite to replace it (nothing was written)")
        cli.check_output_file(out, "--out")
    root = cli.check_output_dir(args.root, "--root") if args.root else None
    sweep = load_sweep(args.sweep)
    if args.command == "plan":
        print(_plan(sweep, args.root))
    elif args.command == "status":
        print(status_table(sweep, root))
    elif args.command == "run":
        return run_sweep(sweep, root, args.parallel, args.interval)
    elif args.command == "task":
        return run_task(sweep, root, args.index, args.dry_run)
    elif args.command == "slurm":
        (root / LOGS).mkdir(parents=True, exist_ok=True)  # SLURM does not create the --output folder
        cli.write_text_atomic(args.out, slurm_script(sweep, root, args.max_parallel, args.sbatch))
        os.chmod(args.out, 0o755)
        _write_manifest(sweep, root)
        print(f"wrote {args.out}: {len(sweep.runs)} array tasks (0-{len(sweep.runs) - 1}); submit with: "
              f"sbatch {args.out}")
    else:
        from prosparse_jax.sweeps import aggregate as sweep_aggregate

        print(sweep_aggregate.aggregate(sweep, root, Path(args.out) if args.out else root / "results",
                                        law_input=args.input, overwrite=args.overwrite))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (1 with one error line on stderr for bad input; --verbose: traceback)."""
    from prosparse_jax.analysis import law_inputs as law_ratios
    from prosparse_jax.data import pipeline as data_lib
    from prosparse_jax.training.metrics import MetricsFileError

    errors = (SweepError, ConfigError, TrainError, OSError, ckpt.CheckpointError, data_lib.DataError,
              law_ratios.LawRatiosError, MetricsFileError)
    return cli.call("sweep", None if argv is None else list(argv), lambda: _body(argv), errors)


if __name__ == "__main__":
    sys.exit(main())
