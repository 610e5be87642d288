r"""Evaluates a model on lm-evaluation-harness tasks in several sparse modes, the model loaded once.

    python -m prosparse_jax.main.evaluate --checkpoint=<workdir or HF folder> --tasks=stdlib_next_line,stdlib_ppl \
        --modes=dense,fatrelu:0.01 --out=<dir> [--include_path=<dir of task YAML> --limit=N --add_bos=true \
        --batch_size=8 --num_fewshot=N --step=N --max_length=N --scale_data=stdlib --log_samples --overwrite \
        --compilation_cache=<dir>]

Modes: dense, fatrelu:<t>, fatrelu:<x>rel, thresholds[:<sparse_mode.json>], topk:<k>, predictor:<dir>
(:mod:`prosparse_jax.evaluation.modes`). Tasks are lm-eval's names, the offline tasks stdlib_next_line,
stdlib_next_line_gen and stdlib_ppl (built from the built-in corpus's held-out split into <out>/tasks), or those of
--include_path. Writes <out>/<mode>.json (lm-eval's results, each task with the sparsity measured while it ran),
<out>/table.md and table.json (task x mode) and <out>/accuracy_vs_sparsity.png; prints the table. Details:
docs/evaluation.md.
"""

from __future__ import annotations

import sys

from absl import flags

from prosparse_jax.main import common


def _flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_string("checkpoint", None, "Workdir or HF model folder.", flag_values=fv)
    flags.DEFINE_list("tasks", None, "lm-eval task names, comma-separated.", flag_values=fv)
    flags.DEFINE_string("modes", "dense", "Sparse modes, comma-separated (dense, fatrelu:<t>, fatrelu:<x>rel, "
                        "thresholds[:<sparse_mode.json>], topk:<k>, predictor:<dir>).", flag_values=fv)
    flags.DEFINE_string("out", None, "Output folder.", flag_values=fv)
    flags.DEFINE_list("include_path", [], "Folders of local task YAML (+ JSONL) files.", flag_values=fv)
    flags.DEFINE_float("limit", None, "Documents per task (a fraction if < 1); default: all.", flag_values=fv)
    flags.DEFINE_integer("num_fewshot", None, "Few-shot examples; default: each task's.", flag_values=fv)
    flags.DEFINE_bool("add_bos", True, "Prepend the BOS token to every context (the ProSparse model card asks for "
                      "it).", flag_values=fv)
    flags.DEFINE_integer("batch_size", 8, "Sequences per forward.", flag_values=fv)
    flags.DEFINE_integer("step", None, "Checkpoint step of a workdir; default: the latest.", flag_values=fv)
    flags.DEFINE_integer("max_length", None, "Context in tokens; default: the model's.", flag_values=fv)
    flags.DEFINE_string("scale_data", "stdlib", "Held-out data for relative FATReLU thresholds (fatrelu:<x>rel).",
                        flag_values=fv)
    flags.DEFINE_integer("bootstrap_iters", 1000, "lm-eval's bootstrap iterations for standard errors.",
                         flag_values=fv)
    flags.DEFINE_bool("log_samples", False, "Keep every document's requests and responses in the JSON.",
                      flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace the results of an earlier evaluation in --out.", flag_values=fv)
    flags.DEFINE_bool("progress", True, "Show lm-eval's progress and log lines.", flag_values=fv)
    flags.DEFINE_string("compilation_cache", common.compilation_cache_default(),
                        "Keep XLA's compiled forwards here between runs (the same command again compiles nothing); "
                        "empty: off.", flag_values=fv)
    flags.mark_flags_as_required(["checkpoint", "tasks", "out"], flag_values=fv)
    return fv


def main(argv: list[str] | None = None) -> int:
    """Runs :func:`prosparse_jax.evaluation.report.evaluate_modes` and prints its table; returns the exit code."""
    fv = _flags()

    def body() -> str:
        from prosparse_jax.errors import UsageError
        from prosparse_jax.evaluation import report

        if fv.limit is not None and fv.limit <= 0:
            raise UsageError(f"--limit: must be > 0, got {fv.limit}")
        if fv.batch_size < 1:
            raise UsageError(f"--batch_size: must be at least 1, got {fv.batch_size}")
        limit = int(fv.limit) if fv.limit is not None and fv.limit >= 1 else fv.limit
        common.use_compilation_cache(fv.compilation_cache)
        res = report.evaluate_modes(
            fv.checkpoint, [t.strip() for t in fv.tasks if t.strip()], fv.modes, fv.out,
            include_paths=fv.include_path, limit=limit, num_fewshot=fv.num_fewshot, batch_size=fv.batch_size,
            add_bos=fv.add_bos, step=fv.step, max_length=fv.max_length, scale_data=fv.scale_data,
            log_samples=fv.log_samples, bootstrap_iters=fv.bootstrap_iters, overwrite=fv.overwrite,
            progress=fv.progress)
        table = report.format_table(res["table"], list(res["modes"]))
        return f"{table}\nwritten: {', '.join(res['files'])}"

    return common.run("evaluate", fv, argv, body, __doc__)


if __name__ == "__main__":
    sys.exit(main())
