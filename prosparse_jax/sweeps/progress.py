"""A sweep's progress: each run's state, step, loss and ETA read from its workdir, and the progress table."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path
from typing import Any

from prosparse_jax.sweeps.spec import LOGS, Sweep, SweepRun
from prosparse_jax.training import checkpoint as ckpt
from prosparse_jax.training import lock as lock_lib


@dataclasses.dataclass
class Progress:
    state: str  # done | running | partial | pending | failed | stopped
    step: int  # the step reached: the latest checkpoint's, or a running run's last logged step
    total: int
    checkpoint: int  # the latest checkpoint's step (0: none)
    loss: float | None = None  # last logged training LM loss
    tokens_per_sec: float | None = None
    eta_s: float | None = None


def _finished(workdir: Path, latest: int | None, steps: int) -> bool:
    return latest is not None and latest >= steps and (workdir / "final_eval.json").exists()


def is_finished(workdir: Path, steps: int) -> bool:
    """The run's latest checkpoint is at ``steps`` (or beyond) and its final evaluation was written."""
    return _finished(workdir, ckpt.latest_step(workdir), steps)


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


def running_marker(root: Path, run: SweepRun) -> Path:
    return Path(root) / LOGS / f"{run.name}.running"


def _marked_running(root: Path, run: SweepRun) -> bool:
    """A ``<root>/logs/<run>.running`` marker of a live process (on another host: trusted as is)."""
    try:
        m = json.loads(running_marker(root, run).read_text())
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


def progress(sweep: Sweep, root: Path, run: SweepRun, state: str | None = None) -> Progress:
    """The state, step and ETA of ``run`` (``state``: what the launcher knows, else read from disk: running while a
    launcher's marker names a live process or a live trainer holds the workdir's lock)."""
    wd = sweep.workdir(root, run)
    latest = ckpt.latest_step(wd)
    if _finished(wd, latest, run.steps):
        state = "done"
    elif state is None:
        running = _marked_running(root, run) or lock_lib.live_holder(wd) is not None
        state = "running" if running else "partial" if latest else "pending"
    p = Progress(state, latest or 0, run.steps, latest or 0)
    e = last_train_entry(wd / "metrics.jsonl") if state != "pending" else None
    if e is not None:
        p.loss = e.get("lm_loss")
        if state == "running":
            p.step = max(int(e["step"]), p.checkpoint)
            p.tokens_per_sec = e.get("tokens_per_sec")
            if p.tokens_per_sec:
                p.eta_s = (run.steps - p.step) * run.tokens_per_step / p.tokens_per_sec
    return p


def fmt_s(s: float | None) -> str:
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
                     f"{100 * p.step // max(p.total, 1):>4} {loss:>7} {tps:>8} {fmt_s(p.eta_s):>7}")
    counts: dict[str, int] = {}
    for _, p in rows:
        counts[p.state] = counts.get(p.state, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    took = f"; elapsed {fmt_s(elapsed)}" if elapsed is not None else ""
    return f"sweep {sweep.name} ({len(rows)} runs in {root}): {summary}{took}\n" + "\n".join(lines)
