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
resolve (values checked as ``prosparse_jax.train`` checks them), exactly as the train command will parse it -- before
anything is created or trained.

Run ``i`` is ``python -m prosparse_jax.train --config=<base> --workdir=<root>/<name> --config.<field>=<value> ...``
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

import dataclasses
import importlib.util
import json
import os
import re
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

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "experiments")):  # configs.sweeps, fit_laws, sweep_aggregate
    if _p not in sys.path:
        sys.path.insert(0, _p)

import ml_collections  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from prosparse_jax import checkpoint as ckpt  # noqa: E402
from prosparse_jax import cli  # noqa: E402
from prosparse_jax.config import ConfigError, RunConfig, did_you_mean  # noqa: E402
from prosparse_jax.run_config import resolve  # noqa: E402
from prosparse_jax.workdir import TrainError, check_workdir_config, json_config  # noqa: E402

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
RESERVED = ("logs", "results")  # <root>/logs holds the run logs, <root>/results the default aggregate
LOGS = "logs"


class SweepError(ValueError):
    """A sweep that cannot run as given; the message names the sweep, the run and the field."""


# ---------------------------------------------------------------------------------------------------------------
# The sweep: loaded, every run validated
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a sweep, validated: its overrides and the config train will see."""

    index: int
    name: str
    overrides: dict[str, Any]  # dotted field -> value
    axes: dict[str, str]  # axis -> value label (grid runs)
    config: ml_collections.ConfigDict  # the base config with the overrides, parsed as train parses its command
    rc: RunConfig

    @property
    def steps(self) -> int:
        return self.rc.train.steps

    @property
    def tokens_per_step(self) -> int:
        return self.rc.train.batch_size * self.rc.data.seq_len


@dataclasses.dataclass(frozen=True)
class Sweep:
    ref: str  # the sweep file (absolute) and its arg
    name: str
    base: str  # the base experiment config (absolute) and its arg
    runs: tuple[Run, ...]
    analysis: dict[str, Any]

    def workdir(self, root: Path, run: Run) -> Path:
        return Path(root).absolute() / run.name

    def command(self, root: Path, run: Run) -> list[str]:
        """The train command of ``run``: ``python -m prosparse_jax.train --config=<base> --workdir=... --config.*``."""
        return [sys.executable, "-m", "prosparse_jax.train", f"--config={self.base}",
                f"--workdir={self.workdir(root, run)}", *override_flags(run.overrides)]


def format_value(v: Any) -> str:
    """A config value as ``--config.<field>=`` takes it (bools lower-case, sequences as tuple literals)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return repr(_as_tuple(v))
    return str(v) if isinstance(v, str) else repr(v)


def override_flags(overrides: dict[str, Any]) -> list[str]:
    return [f"--config.{k}={format_value(v)}" for k, v in overrides.items()]


def _as_tuple(v: Any) -> Any:
    return tuple(_as_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v


def _split_ref(ref: str) -> tuple[str, str | None]:
    """``file.py:arg`` -> (file.py, arg); a ref without ``:arg`` -> (ref, None)."""
    path, sep, arg = ref.partition(".py:")
    return (path + ".py", arg) if sep else (ref, None)


def _find_file(path: str, what: str) -> Path:
    """A config file: absolute, or relative to the current directory, else to the repository root."""
    p = Path(path).expanduser()
    for cand in [p] if p.is_absolute() else [Path.cwd() / p, ROOT / p]:
        if cand.is_file():
            return cand.resolve()
    raise SweepError(f"{what}: {path} not found (a relative path is looked up in the current directory, then in "
                     f"{ROOT})")


def _load_sweep_config(path: Path, arg: str | None) -> Any:
    spec = importlib.util.spec_from_file_location(f"_prosparse_sweep_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise SweepError(f"--sweep: {path} line {e.lineno}: invalid Python ({e.msg})") from e
    if not hasattr(module, "get_config"):
        raise SweepError(f"--sweep: {path} has no get_config(arg); see configs/sweeps/__init__.py")
    try:
        return module.get_config() if arg is None else module.get_config(arg)
    except ValueError as e:  # ConfigError: an unknown arg; grid(): axes that clash
        raise SweepError(f"--sweep: {path}: {e}") from e


def parse_config(base: str, args: Sequence[str]) -> ml_collections.ConfigDict:
    """The ConfigDict that ``prosparse_jax.train --config=<base> <args>`` runs with (same flag parser)."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True, flag_values=fv)
    cli.parse_flags(fv, ["train", f"--config={base}", *args])
    return cli.load_config(fv)


def _flat_fields(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_fields(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _get(c: ml_collections.ConfigDict, dotted: str) -> Any:
    for part in dotted.split("."):
        c = c[part]
    return c


def _validate_run(index: int, spec: Any, sweep_ref: str, base: str, fields: list[str]) -> Run:
    name = spec.get("name") if hasattr(spec, "get") else None
    where = f"sweep {sweep_ref}: run {index} ({name!r})"
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or name in RESERVED:
        raise SweepError(f"{where}: a run name must be a directory name of letters, digits and ._+- (not "
                         f"{' or '.join(RESERVED)})")
    overrides = dict(spec.get("overrides") or {})
    for k in overrides:
        if any(f.startswith(f"{k}.") for f in fields):
            raise SweepError(f"{where}: {k!r} is a config section of {base}, not a field; override its fields one by "
                             f"one ('{k}.<field>')")
        if k not in fields:
            raise SweepError(f"{where}: {k!r} is not a config field of {base}{did_you_mean(k, fields)}")
    try:
        cfg = parse_config(base, override_flags(overrides))
    except (flags.Error, cli.UsageError) as e:
        raise SweepError(f"{where}: {cli.error_line(e)}") from e
    for k, v in overrides.items():
        got = _get(cfg, k)
        if _as_tuple(got) != _as_tuple(v):
            raise SweepError(f"{where}: {k}={v!r} reads back from the command line as {got!r}; give the value in the "
                             "field's type")
    try:
        rc = resolve(cfg)
    except ConfigError as e:
        raise SweepError(f"{where}: {e}") from e
    return Run(index, name, overrides, {str(a): str(v) for a, v in dict(spec.get("axes") or {}).items()}, cfg, rc)


def load_sweep(ref: str) -> Sweep:
    """Loads a sweep config and validates every run (fields, values, names) before anything is done."""
    path_s, arg = _split_ref(ref)
    path = _find_file(path_s, "--sweep")
    full_ref = f"{path}:{arg}" if arg is not None else str(path)
    s = _load_sweep_config(path, arg)
    for key in ("base", "runs"):
        if key not in s:
            raise SweepError(f"sweep {full_ref}: no {key!r} field; see configs/sweeps/__init__.py")
    base_path, base_arg = _split_ref(str(s["base"]))
    base_file = _find_file(base_path, f"sweep {full_ref}: base")
    base = f"{base_file}:{base_arg}" if base_arg is not None else str(base_file)
    try:
        fields = sorted(_flat_fields(parse_config(base, []).to_dict()))
    except (flags.Error, cli.UsageError) as e:
        raise SweepError(f"sweep {full_ref}: base {s['base']}: {cli.error_line(e)}") from e
    if not s["runs"]:
        raise SweepError(f"sweep {full_ref}: no runs")
    runs = tuple(_validate_run(i, r, full_ref, base, fields) for i, r in enumerate(s["runs"]))
    seen: dict[str, int] = {}
    for r in runs:
        if r.name in seen:
            raise SweepError(f"sweep {full_ref}: runs {seen[r.name]} and {r.index} are both named {r.name!r}")
        seen[r.name] = r.index
    analysis = s["analysis"].to_dict() if "analysis" in s and hasattr(s["analysis"], "to_dict") else \
        dict(s.get("analysis") or {})
    return Sweep(full_ref, str(s.get("name") or path.stem), base, runs, analysis)


# ---------------------------------------------------------------------------------------------------------------
# Progress: each run's state from its workdir
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Progress:
    state: str  # done | running | partial | pending | failed | stopped
    step: int
    total: int
    loss: float | None = None  # last logged training LM loss
    tokens_per_sec: float | None = None
    eta_s: float | None = None


def is_finished(workdir: Path, steps: int) -> bool:
    """The run's latest checkpoint is at ``steps`` (or beyond) and its final evaluation was written."""
    latest = ckpt.latest_step(workdir)
    return latest is not None and latest >= steps and (workdir / "final_eval.json").exists()


def last_train_entry(path: Path, tail_bytes: int = 65536) -> dict[str, Any] | None:
    """The last ``train`` entry of a metrics.jsonl, reading only its tail (a cut last line is skipped)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - tail_bytes, 0))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict) and e.get("kind", "train") == "train" and "step" in e:
            return e
    return None


def _marker(root: Path, run: Run) -> Path:
    return Path(root) / LOGS / f"{run.name}.running"


def _marked_running(root: Path, run: Run) -> bool:
    """A ``<root>/logs/<run>.running`` marker of a live process (on another host: trusted as is)."""
    try:
        m = json.loads(_marker(root, run).read_text())
    except (OSError, ValueError):
        return False
    if m.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(m["pid"]), 0)
    except (ProcessLookupError, KeyError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


def progress(sweep: Sweep, root: Path, run: Run, state: str | None = None) -> Progress:
    """The state, step and ETA of ``run`` (``state``: what the launcher knows, else read from disk)."""
    wd = sweep.workdir(root, run)
    latest = ckpt.latest_step(wd) or 0
    if is_finished(wd, run.steps):
        state = "done"
    elif state is None:
        state = "running" if _marked_running(root, run) else "partial" if latest else "pending"
    p = Progress(state, latest, run.steps)
    e = last_train_entry(wd / "metrics.jsonl") if state != "pending" else None
    if e is not None:
        p.loss = e.get("lm_loss")
        if state == "running":
            p.step = max(int(e["step"]), latest)
            p.tokens_per_sec = e.get("tokens_per_sec")
            if p.tokens_per_sec:
                p.eta_s = (run.steps - p.step) * run.tokens_per_step / p.tokens_per_sec
    return p


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def status_table(sweep: Sweep, root: Path, states: dict[str, str] | None = None, elapsed: float | None = None) -> str:
    """The progress table: one line per run (state, step / total, loss, tokens/s, ETA) and a summary line."""
    rows = [(r, progress(sweep, root, r, (states or {}).get(r.name))) for r in sweep.runs]
    w = max(len("run"), *(len(r.name) for r in sweep.runs))
    lines = [f"{'#':>3}  {'run':<{w}}  {'state':<8} {'step/total':>13} {'%':>4} {'loss':>7} {'tok/s':>8} {'ETA':>7}"]
    for r, p in rows:
        loss = f"{p.loss:.3f}" if p.loss is not None else "-"
        tps = f"{p.tokens_per_sec:,.0f}" if p.tokens_per_sec else "-"
        lines.append(f"{r.index:>3}  {r.name:<{w}}  {p.state:<8} {f'{p.step}/{p.total}':>13} "
                     f"{100 * p.step // max(p.total, 1):>4} {loss:>7} {tps:>8} {_fmt_s(p.eta_s):>7}")
    counts: dict[str, int] = {}
    for _, p in rows:
        counts[p.state] = counts.get(p.state, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    took = f"; elapsed {_fmt_s(elapsed)}" if elapsed is not None else ""
    return f"sweep {sweep.name} ({len(rows)} runs in {root}): {summary}{took}\n" + "\n".join(lines)


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
    from prosparse_jax import data as data_lib

    seen = set()
    for r in runs:
        d = r.rc.data
        key = (d.source, d.data_dir, d.eval_fraction, d.text_key)
        if key not in seen:
            seen.add(key)
            t0 = time.time()
            data_lib.open_corpus(d)
            if time.time() - t0 > 1:
                echo(f"prepared the corpus {d.source} in {_fmt_s(time.time() - t0)}")


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
        cli.write_text_atomic(_marker(self.root, run), json.dumps(
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
        _marker(self.root, run).unlink(missing_ok=True)
        took = _fmt_s(time.time() - t0)
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
    cli.write_text_atomic(_marker(root, run), json.dumps({"host": socket.gethostname(), "pid": proc.pid,
                                                          "started": time.time()}))
    prev = _set_handlers((signal.SIGTERM, signal.SIGINT), lambda signum, frame: proc.send_signal(signum))
    try:
        code = proc.wait()
    finally:
        _set_handlers(prev)
        _marker(root, run).unlink(missing_ok=True)
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
        import sweep_aggregate

        print(sweep_aggregate.aggregate(sweep, root, Path(args.out) if args.out else root / "results",
                                        law_input=args.input, overwrite=args.overwrite))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (1 with one error line on stderr for bad input; --verbose: traceback)."""
    from prosparse_jax import data as data_lib
    from prosparse_jax import law_ratios
    from prosparse_jax.metrics import MetricsFileError

    errors = (SweepError, ConfigError, TrainError, OSError, ckpt.CheckpointError, data_lib.DataError,
              law_ratios.LawRatiosError, MetricsFileError)
    return cli.call("sweep", None if argv is None else list(argv), lambda: _body(argv), errors)


if __name__ == "__main__":
    sys.modules.setdefault("sweep", sys.modules["__main__"])  # sweep_aggregate imports this module by name
    sys.exit(main())
