"""Run metrics: ``<workdir>/metrics.jsonl`` (one JSON object per entry), TensorBoard events, matmul peak.

Each line has ``step``, ``kind`` ('train', 'eval' or 'final_fatrelu') and the values; train entries hold means over
the ``steps_averaged`` steps since the previous entry, and ``lr``, ``reg_factor``, ``last_*`` of the logged update. On
resume, entries after the restored step and a line cut by a crash move to ``metrics.discarded.jsonl``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prosparse_jax.errors import InputError


class MetricsWriter:
    """Appends metric entries to metrics.jsonl and TensorBoard (tensorboardX, no TensorFlow needed)."""

    def __init__(self, workdir: str | Path, *, resume_step: int = 0, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        if self.path.exists():
            entries = _parse_lines(self.path)
            keep = [line for line, e in entries if e is not None and e.get("step", 0) <= resume_step]
            drop = [line for line, e in entries if e is None or e.get("step", 0) > resume_step]
            if drop:  # entries of the interrupted run after the restored step, or a line cut by a crash mid-write
                with open(Path(workdir) / "metrics.discarded.jsonl", "a") as f:
                    f.write("\n".join(drop) + "\n")
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text("".join(x + "\n" for x in keep))
                tmp.replace(self.path)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(Path(workdir) / "tb"))

    def write(self, step: int, values: dict[str, Any], kind: str = "train") -> None:
        """Appends one entry as one line (a crash mid-write leaves at most a cut last line, dropped on resume)."""
        if not self.enabled:
            return
        entry = {"step": int(step), "kind": kind, "time": time.time(), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)
                elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
                    for i, x in enumerate(v):
                        self._tb.add_scalar(f"{kind}/{k}/{i}", x, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class IntervalMeans:
    """Running sums of per-step metrics between two log entries; :meth:`pop` returns their means and restarts."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = keys
        self.sums: dict[str, np.ndarray] = {}
        self.count = 0

    def add(self, step_metrics: dict[str, Any]) -> None:
        """Adds one step's (host) metrics; scalars and per-layer vectors alike, in float64."""
        for k in self.keys:
            self.sums[k] = self.sums.get(k, 0.0) + np.asarray(step_metrics[k], np.float64)
        self.count += 1

    def pop(self) -> tuple[dict[str, np.ndarray], int]:
        """(mean of each key over the steps added since the last pop, number of steps); then starts over."""
        means = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        n, self.sums, self.count = self.count, {}, 0
        return means, n


def _parse_lines(path: Path) -> list[tuple[str, dict[str, Any] | None]]:
    """(line, entry) of each non-empty line; entry None for a last line cut by a crash mid-write.

    Raises:
        InputError: a line other than the last one is not a JSON object (not a crash mid-write).
    """
    lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    out: list[tuple[str, dict[str, Any] | None]] = []
    for i, line in enumerate(lines):
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if i < len(lines) - 1:
                raise InputError(
                    f"{path}:{i + 1}: not a metrics entry ({e}); only the last line can be cut by a crash. Move the "
                    "file aside to start a fresh log (nothing was changed)") from None
            entry = None
        out.append((line, entry))
    return out


def read_metrics(workdir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Entries of ``<workdir>/metrics.jsonl`` (optionally only one kind); a last line cut by a crash is skipped."""
    path = Path(workdir) / "metrics.jsonl"
    rows = [e for _, e in _parse_lines(path) if e is not None] if path.exists() else []
    return [r for r in rows if kind is None or r.get("kind") == kind]


def measure_matmul_peak(n: int = 1024, repeats: int = 5, dtype: str = "float32") -> float:
    """Measured FLOP/s of one device on a square matmul (the MFU denominator on CPU, where no spec sheet applies)."""
    dev = jax.local_devices()[0]
    a = jax.device_put(jnp.ones((n, n), dtype), dev)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best
