"""Scoring speed of the lm-eval backend ``prosparse`` against lm-eval's own ``hf`` backend (transformers, PyTorch
CPU), side by side in one process, on the offline tasks of the built-in corpus, same model, same requests.

    python experiments/bench_evaluate.py --checkpoint=runs/miniature/lambda0_seed1 --limit=64 --modes=dense,fatrelu:0.01

The model is exported to a temporary HF folder for ``hf``. Both run without BOS (identical requests; docs/
evaluation.md); fp32; the same batch size. Every backend runs the tasks ``--reps`` times, the backends interleaved;
the first run of ours includes XLA compilation. ``model s``: the time in our forwards (the rest of the wall time is
lm-eval's own work). Tokens = the input tokens the model reads (ours counts them; ``hf`` reads the same windows).
Prints one JSON line per run and a markdown table; the metrics of both backends are printed too (they must agree).
Results: docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from prosparse_jax.main import common


def _parser() -> Any:
    p = common.ArgumentParser(description=__doc__, prog="bench_evaluate")
    p.add_argument("--checkpoint", required=True, help="workdir or HF folder")
    p.add_argument("--tasks", default="stdlib_next_line,stdlib_ppl")
    p.add_argument("--modes", default="dense", help="our modes, comma-separated (hf runs dense)")
    p.add_argument("--limit", type=int, default=64, help="documents per task")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--reps", type=int, default=2, help="runs per backend (ours: the first compiles)")
    p.add_argument("--tasks_dir", default="", help="offline tasks folder (default: built into a temp folder)")
    p.add_argument("--out", default="", help="also write the results as JSON here")
    return p


def _metrics(res: dict[str, Any]) -> dict[str, float]:
    from prosparse_jax.evaluation.report import primary_metric

    return {t: primary_metric(e)[1] for t, e in res["results"].items() if primary_metric(e)}


def _run(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from prosparse_jax.evaluation import tasks as tasks_lib
    from prosparse_jax.evaluation.backend import ProsparseLM
    from prosparse_jax.training import model_io

    torch.set_num_threads(os.cpu_count() or 1)
    tasks = [t for t in args.tasks.split(",") if t]
    tmp = Path(tempfile.mkdtemp(prefix="bench_evaluate_"))
    tasks_dir = Path(args.tasks_dir) if args.tasks_dir else tmp / "tasks"
    if not args.tasks_dir:
        tasks_lib.build_offline_tasks(tasks_dir)
    tm = tasks_lib.task_manager(tasks, [tasks_dir])
    hf_dir = args.checkpoint if model_io.is_hf_folder(args.checkpoint) else model_io.export_hf(args.checkpoint,
                                                                                             tmp / "hf")
    rows = []

    def timed(name: str, lm: Any, rep: int, tokens_of: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        res = simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=args.limit, bootstrap_iters=0)
        wall = time.perf_counter() - t0
        row = {"backend": name, "rep": rep, "wall_s": wall, "tokens": tokens_of(), "metrics": _metrics(res)}
        row["tokens_per_s"] = row["tokens"] / wall
        if isinstance(lm, ProsparseLM):
            row["sparsity"] = {t: r["sparsity"] for t, r in lm.sparsity.results().items()}
        print(json.dumps(row), flush=True)
        rows.append(row)
        return row

    ours = ProsparseLM(pretrained=str(args.checkpoint), add_bos=False, batch_size=args.batch_size)
    theirs = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=args.batch_size,
                  add_bos_token=False)
    tokens: dict[str, int] = {}
    for rep in range(args.reps):  # interleaved, so a busy machine slows every backend alike
        for mode in [m for m in args.modes.split(",") if m]:
            ours.set_mode(mode)
            row = timed(f"prosparse {mode}", ours, rep, lambda: ours.timing["tokens"])
            row["model_s"] = ours.timing["seconds"]
            tokens.setdefault("n", row["tokens"])
        timed("hf", theirs, rep, lambda: tokens["n"])
    print("\n| backend | run | wall s | model s | tokens | tokens/s (wall) | " + " | ".join(tasks) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(tasks))
    for r in rows:
        run = "1 (compiles)" if r["rep"] == 0 and r["backend"] != "hf" else f"{r['rep'] + 1}"
        ms = " | ".join(f"{r['metrics'].get(t, float('nan')):.4g}" for t in tasks)
        model_s = f"{r['model_s']:.2f}" if "model_s" in r else "–"
        print(f"| {r['backend']} | {run} | {r['wall_s']:.2f} | {model_s} | {r['tokens']} | {r['tokens_per_s']:.0f} | "
              f"{ms} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Returns the exit code (1 with one error line on stderr for bad input; --verbose: traceback)."""
    return common.call("bench_evaluate", argv, lambda: _run(argv))


if __name__ == "__main__":
    sys.exit(main())
