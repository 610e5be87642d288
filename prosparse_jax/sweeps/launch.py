"""Launching a sweep's runs: locally, several at a time, or as a SLURM array; a run is resumed, never redone.

A run is finished when its latest checkpoint is at ``train.steps`` and ``final_eval.json`` exists; finished runs are
skipped, the others resume from their latest checkpoint. A run whose workdir lock a live trainer holds (one left by a
launcher that died, a SLURM task) is waited for, never started twice. Logs go to ``<root>/logs/<name>.log``. See
docs/sweeps.md.
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

from prosparse_jax import files
from prosparse_jax.data.corpus import open_corpus
from prosparse_jax.errors import TrainError, UsageError, UserError
from prosparse_jax.sweeps.progress import fmt_s, is_finished, running_marker, status_table
from prosparse_jax.sweeps.spec import LOGS, Sweep, SweepRun, format_value
from prosparse_jax.training import checkpoint as ckpt
from prosparse_jax.training import lock as lock_lib
from prosparse_jax.training.train import check_workdir_config, json_config


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------
def check_workdirs(sweep: Sweep, root: Path, runs: Sequence[SweepRun] | None = None) -> None:
    """Refuses (before anything trains) a run whose workdir holds a run of another config, naming the fields."""
    errors = []
    for r in sweep.runs if runs is None else runs:
        try:
            check_workdir_config(sweep.workdir(root, r), json_config(r.config))
        except UserError as e:  # another config, a params-only workdir, an unreadable config.json
            errors.append(f"run {r.name!r}: {e}")
    if errors:
        raise TrainError(f"{len(errors)} run(s) cannot resume their workdir (nothing was started): "
                         + " | ".join(errors))


def _write_manifest(sweep: Sweep, root: Path) -> None:
    """``<root>/sweep.json``: the sweep, its base and every run's overrides and command (a record for the reader)."""
    m = {"sweep": sweep.ref, "name": sweep.name, "base": sweep.base,
         "runs": [{"index": r.index, "name": r.name, "axes": r.axes, "overrides": r.overrides,
                   "command": shlex.join(sweep.command(root, r))} for r in sweep.runs]}
    files.write_text_atomic(Path(root) / "sweep.json", json.dumps(m, indent=2))


def prepare_corpora(runs: Sequence[SweepRun], echo: Callable[[str], None]) -> None:
    """Prepares each run's corpus once, before runs start in parallel (two processes preparing one dataset race)."""
    seen = set()
    for r in runs:
        d = r.rc.data
        key = (d.source, d.data_dir, d.eval_fraction, d.text_key)
        if key not in seen:
            seen.add(key)
            t0 = time.time()
            open_corpus(d)
            if time.time() - t0 > 1:
                echo(f"prepared the corpus {d.source} in {fmt_s(time.time() - t0)}")


def _log_tail(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][-300:] if lines else ""


class _Launcher:
    """Starts runs as train subprocesses (own session, output to ``<root>/logs/<run>.log``) and reaps them; a run
    another process trains (its workdir's lock is held) is watched instead until that process ends."""

    def __init__(self, sweep: Sweep, root: Path, echo: Callable[[str], None]) -> None:
        self.sweep, self.root, self.echo = sweep, Path(root), echo
        self.running: dict[str, tuple[SweepRun, subprocess.Popen, Any, float]] = {}
        self.elsewhere: dict[str, tuple[SweepRun, lock_lib.Holder]] = {}  # runs other processes train
        self.results: dict[str, str] = {}  # run -> state after its process ended: done | failed | stopped
        self.notes: dict[str, str] = {}

    @property
    def busy(self) -> int:
        """Runs training now, these and the watched ones (each takes one of the ``parallel`` slots)."""
        return len(self.running) + len(self.elsewhere)

    def watch_if_held(self, run: SweepRun) -> bool:
        """Watches ``run`` if a live process holds its workdir's lock; returns whether it does."""
        holder = lock_lib.live_holder(self.sweep.workdir(self.root, run))
        if holder is None:
            return False
        self.elsewhere[run.name] = (run, holder)
        self.echo(f"{run.name} is being trained by {holder.describe()}: waiting for it (no second trainer)")
        return True

    def start(self, run: SweepRun) -> None:
        if self.watch_if_held(run):
            return
        log_path = self.root / LOGS / f"{run.name}.log"
        cmd = self.sweep.command(self.root, run)
        log = open(log_path, "a")  # noqa: SIM115 (closed when the run ends)
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        log.flush()
        resumed = ckpt.latest_step(self.sweep.workdir(self.root, run))
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # Ctrl-C reaches the launcher only; it stops the runs
        files.write_text_atomic(running_marker(self.root, run), json.dumps(
            {"host": socket.gethostname(), "pid": proc.pid, "started": time.time()}))
        self.running[run.name] = (run, proc, log, time.time())
        self.echo(f"started {run.name} (pid {proc.pid}{f', resuming from step {resumed}' if resumed else ''}); "
                  f"log: {log_path}")

    def reap(self) -> list[SweepRun]:
        """Reaps the ended runs; returns the watched runs whose trainer ended before finishing (to start them)."""
        for name, (run, proc, log, t0) in list(self.running.items()):
            code = proc.poll()
            if code is not None:
                self._ended(name, run, code, log, t0)
        resume = []
        for name, (run, holder) in list(self.elsewhere.items()):
            wd = self.sweep.workdir(self.root, run)
            if lock_lib.live_holder(wd) is not None:
                continue
            del self.elsewhere[name]
            if is_finished(wd, run.steps):
                self.results[name] = "done"
                self.echo(f"finished {name} (trained by {holder.describe()})")
            else:
                self.echo(f"{name}: {holder.describe()} ended at step {ckpt.latest_step(wd) or 0} of {run.steps}; "
                          "resuming it")
                resume.append(run)
        return resume

    def _ended(self, name: str, run: SweepRun, code: int, log: Any, t0: float) -> None:
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
        if self.elsewhere:
            self.echo(f"not stopped: {', '.join(self.elsewhere)}, trained by other processes")
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
      TrainError: a workdir holds another config (before anything starts), or runs failed (after the others ran).
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
    todo = [r for r in todo if not launcher.watch_if_held(r)]  # trained by others (e.g. a dead launcher's orphans)
    states = lambda: {**launcher.results, **dict.fromkeys([*launcher.running, *launcher.elsewhere], "running")}  # noqa: E731

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # SIGTERM (e.g. a scheduler's) stops the sweep like Ctrl-C

    prev = _set_handlers((signal.SIGTERM,), on_term)
    try:
        prepare_corpora(todo, echo)
        while todo or launcher.busy:
            while todo and launcher.busy < parallel:
                launcher.start(todo.pop(0))
            todo[:0] = launcher.reap()
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
        raise TrainError(f"{len(bad)} of {len(sweep.runs)} run(s) did not finish: {' | '.join(bad)}; fix the cause "
                         "and rerun the command (finished runs are skipped, the others resume)")
    return 0


def run_task(sweep: Sweep, root: Path, index: int, dry_run: bool = False) -> int:
    """Runs (or resumes) run ``index`` in the foreground, as a SLURM array task does; returns its exit code.

    SIGTERM / SIGINT are passed on to train, which saves a checkpoint.
    """
    if not 0 <= index < len(sweep.runs):
        raise UsageError(f"--index={index}: the sweep has {len(sweep.runs)} runs (0-{len(sweep.runs) - 1})")
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
    lock_lib.check_free(wd)  # a trainer still runs it (an earlier task): refused, its marker left alone
    (root / LOGS).mkdir(parents=True, exist_ok=True)
    print(f"task {index}: {run.name}: {shlex.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd)
    files.write_text_atomic(running_marker(root, run), json.dumps({"host": socket.gethostname(), "pid": proc.pid,
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

    Off the main thread (where Python takes no handlers) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    todo = signals if isinstance(signals, dict) else dict.fromkeys(signals, handler)
    return {s: signal.signal(s, h) for s, h in todo.items()}


def slurm_script(sweep: Sweep, root: Path, max_parallel: int = 0, sbatch: Sequence[str] = ()) -> str:
    """A SLURM array script whose task i runs ``sweep task --index=i`` in the directory this is called from."""
    root = Path(root).absolute()
    n = len(sweep.runs)
    array = f"0-{n - 1}" + (f"%{max_parallel}" if max_parallel else "")
    task = [sys.executable, "-m", "prosparse_jax.main.sweep", "task", f"--sweep={sweep.ref}", f"--root={root}"]
    lines = ["#!/bin/bash", f"# Sweep {sweep.name} ({sweep.ref}): {n} runs of {sweep.base}, one per array task.",
             "# Submit with sbatch. A resubmitted task resumes its run from its latest checkpoint; a finished run's",
             "# task exits at once.",
             f"#SBATCH --job-name={sweep.name}", f"#SBATCH --array={array}",
             f"#SBATCH --output={root / LOGS}/slurm-%A_%a.out", "#SBATCH --signal=B:TERM@120",
             *(f"#SBATCH {s}" for s in sbatch), "#", "# task -> run:",
             *(f"#   {r.index:>3}  {r.name}" for r in sweep.runs), "set -euo pipefail",
             f"cd {shlex.quote(str(Path.cwd()))}",
             "exec " + shlex.join(task) + ' --index="$SLURM_ARRAY_TASK_ID"']
    return "\n".join(lines) + "\n"


def write_slurm_script(sweep: Sweep, root: Path, out: Path, max_parallel: int = 0, sbatch: Sequence[str] = ()) -> None:
    """Writes :func:`slurm_script` to ``out`` (executable) and the sweep's manifest into ``root``."""
    (Path(root) / LOGS).mkdir(parents=True, exist_ok=True)  # SLURM does not create the --output folder
    files.write_text_atomic(out, slurm_script(sweep, root, max_parallel, sbatch))
    os.chmod(out, 0o755)
    _write_manifest(sweep, root)


def plan(sweep: Sweep, root: Path | None = None) -> str:
    """The runs of the sweep, one line each (the overrides every run shares once), with their commands if ``root``."""
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
