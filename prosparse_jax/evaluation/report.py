"""Several sparse modes in one process: the model loaded once, lm-eval run per mode, and the outputs.

``<out>/<mode>.json``: lm-eval's results of one mode, each task's entry with the ``sparsity`` measured while it ran
(``sparsity``: plain mean over layers, ``sparsity_per_layer``, ``tokens``), plus a ``prosparse`` section (mode
settings, BOS, speed). ``<out>/table.md`` / ``table.json``: task x mode, the task's main metric and the sparsity.
``<out>/accuracy_vs_sparsity.png``: per task, the metric against the sparsity of every mode.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

from prosparse_jax import files
from prosparse_jax.errors import OutputError
from prosparse_jax.evaluation import modes as modes_lib
from prosparse_jax.evaluation import tasks as tasks_lib

PRIMARY_METRICS = ("acc", "exact_match", "word_perplexity", "acc_norm", "bits_per_byte", "byte_perplexity")
OUTPUT_FILES = ("table.md", "table.json", "accuracy_vs_sparsity.png")


def mode_slug(mode: str) -> str:
    """A file name for a mode string (``fatrelu:0.01`` -> ``fatrelu_0.01``; ``thresholds:<dir>/sparse_mode.json`` ->
    ``thresholds_<dir>``)."""
    kind, _, arg = mode.partition(":")
    if "/" in arg or os.sep in arg or arg.endswith(".json"):  # a path: its name (sparse_mode.json: its folder's)
        p = Path(arg)
        arg = p.parent.name if p.name == "sparse_mode.json" and p.parent.name else (p.stem or p.name)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{kind}_{arg}" if arg else kind)


def primary_metric(task_result: dict[str, Any]) -> tuple[str, float] | None:
    """(name, value) of a task's main metric in lm-eval's results (``acc,none`` -> ``acc``), else None."""
    values = {}
    for key, v in task_result.items():
        name = key.split(",")[0]
        if isinstance(v, int | float) and not isinstance(v, bool) and not name.endswith("_stderr"):
            values.setdefault(name, float(v))
    for name in PRIMARY_METRICS:
        if name in values:
            return name, values[name]
    return next(iter(sorted(values.items())), None)


def evaluate_modes(checkpoint: str | os.PathLike, tasks: list[str], modes: str | list[str], out: str | os.PathLike,
                   *, include_paths: list[str | os.PathLike] | None = None, limit: float | None = None,
                   num_fewshot: int | None = None, batch_size: int = 8, add_bos: bool = True, step: int | None = None,
                   max_length: int | None = None, scale_data: str = "stdlib", log_samples: bool = False,
                   bootstrap_iters: int = 1000, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Evaluates ``tasks`` on the model at ``checkpoint`` in every mode of ``modes`` and writes the outputs to ``out``.

    Every mode, task and local task file is checked before the model runs; the offline tasks
    (:data:`tasks_lib.OFFLINE_TASKS`) are built into ``<out>/tasks`` when asked for and not in ``include_paths``.

    Returns:
      {"table": :func:`table_rows`, "files": the files written, "modes": {mode: its results' prosparse section}}.
    """
    from lm_eval import simple_evaluate
    from lm_eval import utils as lm_utils

    from prosparse_jax.evaluation.backend import ProsparseLM

    specs = modes_lib.parse_modes(",".join(modes) if isinstance(modes, list) else modes)
    out = files.check_output_path(out, "out")
    if not overwrite and any((out / f).exists() for f in OUTPUT_FILES):
        raise OutputError(f"out: {out} already holds evaluation results; choose another folder or set overwrite "
                          "(nothing was written)")
    files.check_model_path(checkpoint, "checkpoint")
    include = [Path(p) for p in (include_paths or [])]
    local = {name for p in include for name in tasks_lib.check_task_dir(p)}
    if any(t in tasks_lib.OFFLINE_TASKS and t not in local for t in tasks):
        tasks_lib.build_offline_tasks(out / "tasks")
        include.append(out / "tasks")
    tm = tasks_lib.task_manager(tasks, include)
    lm = ProsparseLM(pretrained=str(checkpoint), step=step, mode=specs[0].text, add_bos=add_bos,
                     batch_size=batch_size, max_length=max_length, scale_data=scale_data)
    for spec in specs[1:]:  # every mode the model cannot run is refused before any evaluation
        modes_lib.resolve_mode(spec, lm.model_cfg, checkpoint=lm.path, scale=lm.positive_gate_mean)
    if not progress:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    written, by_mode = [], {}
    for spec in specs:
        mode = lm.set_mode(spec)
        print(f"evaluate: mode {mode.name}", file=sys.stderr)
        res = simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, limit=limit, num_fewshot=num_fewshot,
                              log_samples=log_samples, bootstrap_iters=bootstrap_iters)
        if res is None:
            raise OutputError("lm-eval returned no results")
        sparsity = lm.sparsity.results()
        for task, entry in res["results"].items():
            if task in sparsity:
                entry["sparsity"] = sparsity[task]
        secs = lm.timing["seconds"]
        res["prosparse"] = {"mode": mode.name, "settings": mode.settings, "add_bos": lm.add_bos,
                            "checkpoint": str(checkpoint), "sparsity": sparsity, "tokens": lm.timing["tokens"],
                            "model_seconds": secs,
                            "tokens_per_s": lm.timing["tokens"] / secs if secs > 0 else None}
        path = out / f"{mode_slug(mode.name)}.json"
        out.mkdir(parents=True, exist_ok=True)
        files.write_text_atomic(path, json.dumps(res, indent=2, default=lm_utils.handle_non_serializable))
        written.append(path)
        by_mode[mode.name] = res
    rows = table_rows(by_mode)
    files.write_text_atomic(out / "table.json", json.dumps(rows, indent=2))
    files.write_text_atomic(out / "table.md", format_table(rows, [s.text for s in specs]))
    plot(rows, out / "accuracy_vs_sparsity.png")
    written += [out / f for f in OUTPUT_FILES]
    return {"table": rows, "files": [str(p) for p in written],
            "modes": {m: r["prosparse"] for m, r in by_mode.items()}}


def table_rows(by_mode: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, mode): {task, mode, metric, value, sparsity, sparsity_per_layer}."""
    rows = []
    for mode, res in by_mode.items():
        for task, entry in sorted(res["results"].items()):
            m = primary_metric(entry)
            sp = entry.get("sparsity") or {}
            rows.append({"task": task, "mode": mode, "metric": m[0] if m else None, "value": m[1] if m else None,
                         "sparsity": sp.get("sparsity"), "sparsity_per_layer": sp.get("sparsity_per_layer")})
    return rows


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{100 * v:.1f}%" if pct else f"{v:.4g}"


def format_table(rows: list[dict[str, Any]], modes: list[str]) -> str:
    """Markdown table: a row per task, per mode a column "metric value (sparsity)"."""
    tasks = sorted({r["task"] for r in rows})
    cell = {(r["task"], r["mode"]): r for r in rows}
    lines = ["| task | metric | " + " | ".join(modes) + " |", "|---|---|" + "---|" * len(modes)]
    for t in tasks:
        metric = next((cell[(t, m)]["metric"] for m in modes if (t, m) in cell and cell[(t, m)]["metric"]), "–")
        cells = [f"{_fmt(cell[(t, m)]['value'])} ({_fmt(cell[(t, m)]['sparsity'], pct=True)})" if (t, m) in cell
                 else "–" for m in modes]
        lines.append(f"| {t} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nEach cell: the task's metric (activation sparsity measured while it ran).\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Per task, its metric against the measured sparsity, one labelled point per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows if r["value"] is not None and r["sparsity"] is not None})
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(4.2 * max(len(tasks), 1), 3.6), squeeze=False)
    for ax, t in zip(axes[0], tasks, strict=False):
        pts = [r for r in rows if r["task"] == t and r["value"] is not None and r["sparsity"] is not None]
        ax.plot([100 * r["sparsity"] for r in pts], [r["value"] for r in pts], "o")
        for r in pts:
            ax.annotate(r["mode"], (100 * r["sparsity"], r["value"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel("activation sparsity (%)")
        ax.set_ylabel(pts[0]["metric"] if pts else "")
        ax.set_title(t, fontsize=9)
        ax.grid(alpha=0.3)
    if not tasks:
        axes[0][0].text(0.5, 0.5, "no task with a metric and a sparsity", ha="center", va="center")
    fig.tight_layout()
    with files.atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
