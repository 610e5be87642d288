"""Main job: the sparsity-loss frontier of ProSparse's methods in miniature, on the built-in corpus, on 2 CPU cores.

    python experiments/prosparse_miniature.py --workdir=runs/miniature

Pretrains a tiny SiLU model, then continues it at equal tokens as SiLU (the dense control) and as ReLU with the
progressive L1 of ProSparse (arXiv 2402.13516 §3.2) at several final lambdas (lambda = 0 is plain ReLU substitution).
Each continued run is one *method* with a family of training-free thresholds: FATReLU thresholds relative to the run's
activation scale (§3.3) for the ReLU runs, CETT targets for the SiLU control (Sparsing Law, arXiv 2411.02335 §4.1).
Reports each method's frontier (loss gap to the control at 88 / 95 / 98 / 99% sparsity, the largest sparsity within
+1% perplexity), the control, lambda = 0 and the best lambda (lambda*) over several data seeds as paired differences,
dead neurons in tiers per layer, the split of lambda*'s sparsity gain into neurons that die and survivors that fire
less, and the loss without each FFN. Writes ``<workdir>/results.{json,md}`` and figures; each run is an ordinary
workdir, so a rerun resumes. Results: docs/results/miniature.md.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import flags, logging

from configs import prosparse as prosparse_configs
from prosparse_jax import files
from prosparse_jax.analysis import analyze as analyze_lib
from prosparse_jax.analysis import frontier, neurons
from prosparse_jax.analysis.law_inputs import checkpoint_steps
from prosparse_jax.config import DataConfig, build_section
from prosparse_jax.data import corpus as corpus_lib
from prosparse_jax.data import pipeline as data_lib
from prosparse_jax.errors import UsageError
from prosparse_jax.main import common as cli
from prosparse_jax.training import checkpoint as ckpt
from prosparse_jax.training.metrics import read_metrics
from prosparse_jax.training.step import make_evaluate
from prosparse_jax.training.train import train

FLAGS = flags.FlagValues()  # own flag set, parsed by prosparse_jax.main.common.run (one-line errors, --verbose)
_WORKDIR = flags.DEFINE_string("workdir", "runs/miniature", "Output directory (one sub-workdir per run).",
                               flag_values=FLAGS)
_PRETRAIN = flags.DEFINE_integer("pretrain_steps", 240, "SiLU pretraining steps (warm-up, then constant LR).",
                                 flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("steps", 90, "Steps of each continued run: the config's WSD schedule, the LR decaying "
                              "over the last 40%.", flag_values=FLAGS)
_LAMBDAS = flags.DEFINE_list("lambdas", ["0", "2.5e-5", "5e-5", "1e-4", "2e-4", "4e-4"],
                             "Final L1 factors of the continued ReLU runs (TINY_STAGES' shape scaled to each final "
                             "value); 0 = plain ReLU substitution.", flag_values=FLAGS)
_SEEDS = flags.DEFINE_integer("seeds", 3, "Data seeds (row orders of the continued runs) of the control, lambda = 0 "
                              "and lambda*; the pretrained start and the held-out set are shared.", flag_values=FLAGS)
_REL = flags.DEFINE_list("relative_thresholds", ["0", "0.25", "0.5", "1", "1.5", "2", "3", "4"],
                         "FATReLU thresholds of each ReLU run in units of its mean positive gate activation.",
                         flag_values=FLAGS)
_CETT = flags.DEFINE_list("cett_targets", ["0", "0.05", "0.1", "0.2", "0.3", "0.4", "0.5", "0.6"],
                          "CETT targets of the SiLU control's frontier (the training-free baseline).",
                          flag_values=FLAGS)
_FRONTIER_BATCHES = flags.DEFINE_integer("frontier_batches", 8, "Held-out batches (8 x 256 tokens) of every "
                                         "frontier point, of the loss without the FFN and of the dead-neuron-vs-step "
                                         "figure.", flag_values=FLAGS)
_NEURON_BATCHES = flags.DEFINE_integer("neuron_batches", 32, "Held-out batches of the dead-neuron counts (32 = "
                                       "65,536 tokens).", flag_values=FLAGS)
_PPLP_BATCHES = flags.DEFINE_integer("pplp_batches", 2, "Held-out batches of the control's CETT-PPL-1% search.",
                                     flag_values=FLAGS)
_CETT_CALIBRATION = flags.DEFINE_integer("cett_calibration_batches", 2, "Frontier batches (the first ones) the "
                                         "control's CETT taus are bisected on; its points are measured on all of them.",
                                         flag_values=FLAGS)
_PARALLEL = flags.DEFINE_integer("parallel", min(2, len(os.sched_getaffinity(0))), "Continued runs (and measurements) "
                                 "at once, in worker processes pinned to an equal share of the cores; 1 = one after "
                                 "the other in this process.", flag_values=FLAGS)
_QUICK = flags.DEFINE_boolean("quick", False, "CI smoke version: 6 steps per run, lambda 0 and 2e-4 only, two seeds, "
                              "tiny eval.",
                              flag_values=FLAGS)

TARGETS = (0.88, 0.95, 0.98, 0.99)  # sparsity levels of the frontier table
PAPER_SILU_PPL1_RATIO = 0.40  # Sparsing Law §5: SiLU models' CETT-PPL-1% activation ratio, about 40%
FINAL_TINY_LAMBDA = prosparse_configs.TINY_STAGES[-1][0]
evaluator = functools.lru_cache(maxsize=4)(make_evaluate)  # one compiled evaluation per model config


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
def lambda_text(lam: float) -> str:
    """An L1 factor as written in run names and tables: 0, 2.5e-5, 1e-4."""
    return "0" if lam == 0 else f"{lam:.1e}".replace(".0e", "e").replace("e-0", "e-").replace("e+0", "e")


def run_name(lam: float | None, seed: int) -> str:
    """Workdir name of a continued run: the SiLU control (lam None) or the ReLU run at final L1 factor ``lam``."""
    return f"control_seed{seed}" if lam is None else f"lambda{lambda_text(lam)}_seed{seed}"


def run_config(activation: str, steps: int, stages: list[list[float]] | None, quick: bool, eval_batches: int):
    """The tiny config for one run of the job (equal schedule for every continued run); its final evaluation runs on
    the frontier's held-out batches (the same ``eval_batches`` windows)."""
    c = prosparse_configs.get_config("tiny")
    c.model.activation = activation
    c.train.steps = steps
    c.train.eval_every = 0
    c.train.checkpoint_every = steps
    c.train.log_every = max(min(10, steps // 4), 1)
    c.sparsity.stages = stages if stages is not None else [[0.0, steps]]
    c.sparsity.final_threshold = 0.0  # FATReLU is measured by the frontier, on every threshold of its grid
    c.train.eval_batches = eval_batches
    if quick:
        c.train.progress_bar = False
        c.optim.warmup_steps = 1
    return c


def stages_for(lam: float) -> list[list[float]] | None:
    """TINY_STAGES' shape (lambda 0, a quarter of the final value, a sine ramp, constant) scaled to final ``lam``."""
    if lam == 0:
        return None
    return [[v * lam / FINAL_TINY_LAMBDA, s] for v, s in prosparse_configs.TINY_STAGES]


def run(name: str, c, workdir: Path) -> dict[str, Any]:
    """Trains (or resumes, or finds finished) one run; returns its final evaluation."""
    t0 = time.time()
    print(f"\n=== {name}: activation={c.model.activation} steps={c.train.steps} data.seed={c.data.seed} "
          f"init_from={c.init_from or '-'}", flush=True)
    res = train(c, workdir / name)
    final = res.final_eval or json.loads((workdir / name / "final_eval.json").read_text())
    print(f"=== {name} done in {time.time() - t0:.0f}s: eval_loss={final['eval_loss']:.4f} "
          f"sparsity={final['eval_sparsity']:.4f}", flush=True)
    return final


@dataclasses.dataclass(frozen=True)
class Job:
    """What every task of the job needs (tasks run in worker processes, so this is all they get)."""

    workdir: Path
    pre_steps: int
    steps: int
    quick: bool
    frontier_batches: int
    neuron_batches: int
    rel: tuple[float, ...]
    cett_targets: tuple[float, ...]
    cett_calibration_batches: int
    pplp_batches: int

    @property
    def start(self) -> Path:
        return self.workdir / "silu"


def pretrain(job: Job) -> dict[str, Any]:
    """The SiLU start of every continued run: warm-up, then constant LR (the continued runs decay it)."""
    pre = run_config("silu", job.pre_steps, None, job.quick, job.frontier_batches)
    pre.optim.schedule = "constant"
    pre.optim.warmup_steps = 1 if job.quick else 20
    return run("silu", pre, job.workdir)


def continued(job: Job, lam: float | None, seed: int, keep: bool) -> dict[str, Any]:
    """One continued run from the SiLU start: the control (lam None) or ReLU at final L1 factor ``lam``; data seed
    ``seed`` orders its training rows (seed 0 is the pretraining's order, so seeds start at 1)."""
    c = run_config("silu" if lam is None else "relu", job.steps, stages_for(lam or 0.0), job.quick,
                   job.frontier_batches)
    c.init_from = str(job.start)
    c.data.seed = seed
    if keep:  # 6 checkpoints: the Sparsing Law fit's inputs (control, lambda 0) and the dead-neuron-vs-step figure
        c.train.checkpoint_every = c.train.keep_period = max(job.steps // 6, 1)
    return run(run_name(lam, seed), c, job.workdir)


def train_loss(workdir: Path) -> float:
    """Mean training LM loss of the last logged interval (the logged entries are interval means)."""
    return float(read_metrics(workdir, "train")[-1]["lm_loss"])


# ---------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------
class HeldOut:
    """The shared held-out batches (the tokenizer and corpus of the SiLU start, which every continued run keeps)."""

    def __init__(self, start: Path) -> None:
        run_config = json.loads((start / "config.json").read_text())
        self._data = build_section(DataConfig, "data", run_config["data"])
        self._corpus = corpus_lib.open_corpus(self._data)
        self._tokenizer = corpus_lib.load_tokenizer(start / "tokenizer.json")

    @functools.lru_cache(maxsize=4)  # noqa: B019 (one HeldOut per process, kept for the process's life)
    def batches(self, num_batches: int) -> list[dict[str, np.ndarray]]:
        return data_lib.make_eval_batches(self._corpus, self._tokenizer, seq_len=self._data.seq_len, batch_size=8,
                                          num_batches=num_batches)


held_out = functools.lru_cache(maxsize=2)(HeldOut)  # one per process and start


def method_points(job: Job, workdir: Path, final: dict[str, Any]) -> dict[str, Any]:
    """A run's frontier points without their gaps (:func:`frontier.with_gaps` adds them once the seed's control is
    known): CETT targets for the SiLU control (taus bisected on the first ``cett_calibration_batches``), FATReLU
    thresholds relative to the run's mean positive gate activation for a ReLU run, whose point 0 (the run as trained)
    is its final evaluation on the same batches."""
    batches = held_out(job.start).batches(job.frontier_batches)
    cfg, params, _ = ckpt.load_model(workdir)
    if cfg.activation == "silu":
        return {"kind": "cett", "rows": frontier.cett_points(
            params, cfg, batches, job.cett_targets, calibration=batches[:job.cett_calibration_batches])}
    scale = frontier.positive_gate_mean(params, cfg, batches[:4])
    as_trained = {"threshold": 0.0, "sparsity": final["eval_sparsity"], "loss": final["eval_loss"],
                  "sparsity_per_layer": final["eval_sparsity_per_layer"]}
    rows = [as_trained] + frontier.fatrelu_points(params, cfg, batches, [r * scale for r in job.rel[1:]])
    for r, x in zip(rows, job.rel, strict=True):
        r["relative"] = x
    return {"kind": "fatrelu", "gate_scale": scale, "rows": rows}


def read_front(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Best loss gap at each target sparsity and the largest sparsity within +1% perplexity, with their kinds."""
    pts = [frontier.Point(r["sparsity"], r["dloss"]) for r in rows]
    at = {f"{t:g}": vars(frontier.best_dloss_at(pts, t)) for t in TARGETS}
    within = frontier.max_sparsity_within(pts, frontier.loss_budget())
    return {"dloss_at": at, "max_sparsity_1pct": vars(within), "as_trained": rows[0]}


def firing_rates(workdir: Path, batches: list[dict[str, Any]], step: int | None = None) -> np.ndarray:
    """Per-neuron fraction of held-out tokens with a positive gate, [L, d_ff]: the firing frequencies of the model run
    with ReLU (for a ReLU run its own; for a SiLU model where it would fire after ReLU substitution)."""
    cfg, params, _ = ckpt.load_model(workdir, step)
    return neurons.firing_frequencies(params, cfg.replace(activation="relu"), batches)[0]


def ffn_removed(workdir: Path, batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Held-out loss with the FFN output removed (W_down zeroed): in every layer, and in each layer alone."""
    cfg, params, _ = ckpt.load_model(workdir)
    evaluate = evaluator(cfg)
    w = params["layers"]["w_down_LxFxD"]

    def without(layers: list[int]) -> float:
        p = {**params, "layers": {**params["layers"], "w_down_LxFxD": w.at[np.asarray(layers)].set(0.0)}}
        return evaluate(p, batches)["eval_loss"]

    base = evaluate(params, batches)["eval_loss"]
    return {"loss": base, "all_removed": without(list(range(cfg.n_layers))) - base,
            "per_layer_removed": [without([i]) - base for i in range(cfg.n_layers)]}


def dead_vs_step(rates_by_step: dict[int, np.ndarray]) -> list[dict[str, Any]]:
    """Dead fraction (rate < :data:`neurons.DEAD_FREQ`) per layer and mean firing rate of the live neurons at each
    step of ``{step: [L, d_ff] firing rates}``."""
    rows = []
    for step, rates in sorted(rates_by_step.items()):
        live = rates >= neurons.DEAD_FREQ
        rows.append({"step": step, "dead": float((~live).mean()),
                     "dead_per_layer": [float(x) for x in (~live).mean(axis=1)],
                     "live_rate": float(rates[live].mean()) if live.any() else 0.0})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Tasks: each a worker process's unit of work (module-level functions of picklable arguments)
# ---------------------------------------------------------------------------------------------------------------
def task_continued(job: Job, lam: float | None, seed: int, first_seed: bool) -> dict[str, Any]:
    """A continued run and what is measured on it: its final evaluation, its frontier points (no gaps), and on the
    first seed (every method) its firing rates on the neuron batches and, for the control and lambda = 0, the loss
    without each FFN."""
    held = held_out(job.start)
    final = continued(job, lam, seed, keep=first_seed)
    wd = job.workdir / run_name(lam, seed)
    out = {"final": final, "points": method_points(job, wd, final)}
    if first_seed:
        out["rates"] = firing_rates(wd, held.batches(job.neuron_batches))
        if lam is None or lam == 0:
            out["ffn_removed"] = ffn_removed(wd, held.batches(job.frontier_batches))
    return out


def task_start_rates(job: Job) -> np.ndarray:
    """The SiLU start's positive-gate firing rates on the neuron batches."""
    return firing_rates(job.start, held_out(job.start).batches(job.neuron_batches))


def task_star(job: Job, lam_star: float, first_seed: int) -> dict[str, Any]:
    """lambda*'s loss without each FFN and its firing rates (frontier batches) at every kept checkpoint."""
    wd, batches = job.workdir / run_name(lam_star, first_seed), held_out(job.start).batches(job.frontier_batches)
    return {"ffn_removed": ffn_removed(wd, batches),
            "rates_per_step": {s: firing_rates(wd, batches, s) for s in checkpoint_steps(wd)}}


def task_regime(job: Job, first_seed: int) -> dict[str, Any]:
    """The control's CETT-PPL-1% activation ratio (sparse-forward count): how far the miniature is from the papers'
    regime."""
    pplp = analyze_lib.analyze(job.workdir / run_name(None, first_seed), "stdlib", "pplp", 1.0,
                               job.workdir / "analysis" / "control_pplp_1", num_batches=1 if job.quick
                               else job.pplp_batches, pplp_steps=3 if job.quick else 8, batch_size=8,
                               progress=False, overwrite=True)
    return {"control_cett_ppl1_ratio": pplp["activation_ratio"], "control_cett_ppl1_ppl_ratio": pplp["ppl_ratio"],
            "paper_silu_ratio": PAPER_SILU_PPL1_RATIO}


# ---------------------------------------------------------------------------------------------------------------
# Workers: ``parallel`` processes, each pinned to its share of the cores (two one-thread runs at once train 1.22x
# faster than one two-thread run after the other on 2 cores: docs/benchmarks.md), output to <workdir>/logs/
# ---------------------------------------------------------------------------------------------------------------
_worker_log_dir: Path | None = None  # set in worker processes only


def _init_worker(cache_dir: str, log_dir: str, cores: Any) -> None:
    global _worker_log_dir
    os.sched_setaffinity(0, cores.get())
    logging.set_verbosity(logging.WARNING)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    _worker_log_dir = Path(log_dir)


def _logged(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Runs ``fn(*args)``; in a worker with its stdout and stderr appended to ``<workdir>/logs/<name>.log``."""
    if _worker_log_dir is None:
        return fn(*args)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(_worker_log_dir / f"{name}.log", "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            return fn(*args)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


class _Inline(concurrent.futures.Executor):
    """``--parallel=1``: every task runs in this process when submitted (its output on this terminal)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        f: concurrent.futures.Future = concurrent.futures.Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 (re-raised by result(), as a worker's would be)
            f.set_exception(e)
        return f


@contextlib.contextmanager
def workers(job: Job, parallel: int) -> Iterator[concurrent.futures.Executor]:
    """``parallel`` worker processes, each pinned to ``cores // parallel`` cores (one thread each when that is 1);
    ``parallel`` 1: this process."""
    if parallel == 1:
        yield _Inline()
        return
    cores = sorted(os.sched_getaffinity(0))
    share = len(cores) // parallel
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    for i in range(parallel):
        queue.put(set(cores[i * share:(i + 1) * share]))
    log_dir = job.workdir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    saved = os.environ.get("XLA_FLAGS")
    if share == 1:  # XLA:CPU's own thread pools off: one thread per worker
        os.environ["XLA_FLAGS"] = (saved or "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    try:
        with concurrent.futures.ProcessPoolExecutor(
                parallel, mp_context=ctx, initializer=_init_worker,
                initargs=(str(job.workdir.absolute() / ".jax_cache"), str(log_dir), queue)) as pool:
            for _ in range(parallel):  # start them all now, under this environment
                pool.submit(int)
            try:
                yield pool
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        if saved is None:
            os.environ.pop("XLA_FLAGS", None)
        else:
            os.environ["XLA_FLAGS"] = saved


# ---------------------------------------------------------------------------------------------------------------
# Choosing lambda*, the seed statistics
# ---------------------------------------------------------------------------------------------------------------
def choose_lambda_star(fronts: dict[float, dict[str, Any]]) -> float:
    """The L1 factor > 0 whose front reaches the highest sparsity within +1% perplexity (ties and unreached budgets:
    the lower loss gap as trained)."""
    def key(lam: float) -> tuple[float, float]:
        v = fronts[lam]["max_sparsity_1pct"]["value"]
        return (-1.0 if v is None else v, -fronts[lam]["as_trained"]["dloss"])

    return max((lam for lam in fronts if lam > 0), key=key)


def seed_stats(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Per quantity: the per-seed values (None where a front does not get there) and, when every seed has one, their
    mean and sd (paired differences are computed per seed first)."""
    out = {}
    for k in per_seed[0]:
        vals = [s[k] for s in per_seed]
        out[k] = {"values": vals}
        if all(v is not None for v in vals):
            out[k]["mean"], out[k]["sd"] = frontier.mean_sd(vals)
    return out


def per_seed_row(c: dict[str, Any], a: dict[str, Any], s: dict[str, Any]) -> dict[str, float | None]:
    """One seed's numbers from the fronts of the control (c), lambda = 0 (a) and lambda* (s)."""
    def diff(x: float | None, y: float | None) -> float | None:
        return None if x is None or y is None else x - y

    row: dict[str, float | None] = {
        "a_minus_control": a["as_trained"]["dloss"], "star_minus_control": s["as_trained"]["dloss"],
        "a_sparsity": a["as_trained"]["sparsity"], "star_sparsity": s["as_trained"]["sparsity"]}
    for key, f in (("control", c), ("a", a), ("star", s)):
        row[f"{key}_max_1pct"] = f["max_sparsity_1pct"]["value"]
    row["star_minus_a_max_1pct"] = diff(row["star_max_1pct"], row["a_max_1pct"])
    for t in (0.95, 0.98):
        for key, f in (("a", a), ("star", s)):
            row[f"{key}_dloss_at_{t:g}"] = f["dloss_at"][f"{t:g}"]["value"]
        row[f"star_minus_a_dloss_at_{t:g}"] = diff(row[f"star_dloss_at_{t:g}"], row[f"a_dloss_at_{t:g}"])
    return row


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------
def _reading(r: dict[str, Any], scale: float, fmt: str, unit: str = "") -> str:
    if r["value"] is None:
        return "not reached"
    return format(r["value"] * scale, fmt) + unit + (" (interp.)" if r["kind"] == "interpolated" else "")


def method_label(lam: float | None, lam_star: float) -> str:
    if lam is None:
        return "control (SiLU) + CETT"
    if lam == 0:
        return "(a) ReLU, λ = 0 + FATReLU"
    return f"ProSparse λ = {lambda_text(lam)} + FATReLU" + (" **(λ\\*)**" if lam == lam_star else "")


def summary_rows(res: dict[str, Any]) -> list[str]:
    """Markdown rows of the seeded methods (control + CETT, (a), lambda*): mean ± sd over seeds of the sparsity and
    loss gap as trained, the loss gap at 95% and 98% and the largest sparsity within +1% PPL."""
    lam_star, rows = res["lambda_star"], []
    for lam in (None, 0.0, lam_star):
        fronts = [read_front(res["points"][run_name(lam, seed)]["rows"]) for seed in res["seeds"]]
        sparsity = [f["as_trained"]["sparsity"] for f in fronts]
        cells = ["0% (dense)" if max(sparsity) == 0 else frontier.format_mean_sd(sparsity, 100) + "%",
                 "0 (the reference)" if lam is None else frontier.format_mean_sd([f["as_trained"]["dloss"]
                                                                                  for f in fronts])]
        for vals, scale, unit in ([[f["dloss_at"]["0.95"]["value"] for f in fronts], 1, ""],
                                  [[f["dloss_at"]["0.98"]["value"] for f in fronts], 1, ""],
                                  [[f["max_sparsity_1pct"]["value"] for f in fronts], 100, "%"]):
            missing = sum(v is None for v in vals)
            cells.append(frontier.format_mean_sd(vals, scale) + unit if not missing else
                         f"{missing} of {len(vals)} not reached"
                         + "".join(f"; {v * scale:.1f}{unit}" for v in vals if v is not None))
        label = method_label(lam, lam_star).replace(" **(λ\\*)**", "")
        rows.append(f"| {label}{' (λ*)' if lam == lam_star and lam else ''} | " + " | ".join(cells) + " |")
    return rows


def tables(res: dict[str, Any]) -> str:
    """The job's tables (``results.md``)."""
    return "\n".join([*runs_table(res), "", *frontier_table(res), "", *seed_tables(res), "", *neuron_tables(res), "",
                      regime_line(res["regime"])])


def runs_table(res: dict[str, Any]) -> list[str]:
    md = [f"Runs (held-out: the run's final evaluation on the frontier's {res['frontier']['tokens']:,} tokens; train "
          "loss: mean of the last logged interval):",
          "", "| run | activation | final λ | data seed | steps | activation sparsity | train loss | held-out loss |",
          "|---|---|---|---|---|---|---|---|"]
    for name, r in res["runs"].items():
        lam = "–" if r["lambda"] is None else lambda_text(r['lambda'])
        md.append(f"| {name} | {r['activation']} | {lam} | {r['seed']} | {r['steps_total']} | "
                  f"{100 * r['sparsity']:.2f}% | {r['train_loss']:.4f} | {r['eval_loss']:.4f} |")
    return md


def frontier_table(res: dict[str, Any]) -> list[str]:
    fr = res["frontier"]
    md = [f"Frontier, data seed {res['seeds'][0]} ({fr['tokens']:,} held-out tokens; Δloss in nats against the "
          "control's dense loss on the same tokens; each method's thresholds: FATReLU at "
          f"{', '.join(f'{x:g}' for x in res['relative_thresholds'])} × the run's mean positive gate activation, CETT "
          f"targets {', '.join(f'{x:g}' for x in res['cett_targets'])} for the control (taus bisected on the first "
          f"{res['cett_calibration_tokens']:,} tokens); 'interp.' = read between two "
          "measured points of the front):", "",
          "| method | sparsity as trained | Δloss as trained | "
          + " | ".join(f"Δloss at {100 * t:g}%" for t in TARGETS) + " | max sparsity within +1% PPL |",
          "|---|---|---|" + "---|" * (len(TARGETS) + 1)]
    for key, f in fr["methods"].items():
        lam = None if key == "control" else float(key)
        a = f["as_trained"]
        md.append(f"| {method_label(lam, res['lambda_star'])} | {100 * a['sparsity']:.2f}% | {a['dloss']:+.4f} | "
                  + " | ".join(_reading(f["dloss_at"][f"{t:g}"], 1, "+.4f") for t in TARGETS)
                  + f" | {_reading(f['max_sparsity_1pct'], 100, '.1f', '%')} |")
    return md


def seed_tables(res: dict[str, Any]) -> list[str]:
    """The seeded methods' summary (mean ± sd) and every per-seed quantity."""
    seeds = ", ".join(str(x) for x in res["seeds"])
    md = [f"The seeded methods over data seeds {seeds} (mean ± sd; Δloss in nats against the control on the same "
          "tokens, paired per seed):", "",
          "| method | sparsity as trained | Δloss as trained | Δloss at 95% | Δloss at 98% | max sparsity within +1% "
          "PPL |", "|---|---|---|---|---|---|", *summary_rows(res)]
    s, star = res["seed_table"], f"λ* = {lambda_text(res['lambda_star'])}"
    md += ["", f"Seeds: data seeds {seeds} (the continued runs' row order; same start and held-out tokens); "
           "differences are paired per seed, then mean ± sd (sd to its first significant digit):", "",
           "| quantity | " + " | ".join(f"seed {x}" for x in res["seeds"]) + " | mean ± sd |",
           "|---|" + "---|" * (len(res["seeds"]) + 1)]
    for key, label, scale, fmt in SEED_ROWS:
        if key in s:
            vals = s[key]["values"]
            missing = sum(v is None for v in vals)
            summary = (frontier.format_mean_sd(vals, scale) if not missing
                       else f"– ({missing} of {len(vals)} not reached)")
            md.append(f"| {label.replace('λ*', star)} | "
                      + " | ".join("not reached" if v is None else format(v * scale, fmt) for v in vals)
                      + f" | {summary} |")
    return md


def neuron_tables(res: dict[str, Any]) -> list[str]:
    """Dead-neuron tiers per layer, lambda*'s gain split, the loss without each FFN."""
    n, lam_star = res["neurons"], res["lambda_star"]
    tier_names = [name for name, _ in neurons.DEAD_TIERS]
    md = [f"Dead neurons per layer, layers 0 / 1 / ... ({n['tokens']:,} held-out tokens; a neuron's rate = the "
          "fraction of tokens with a positive gate; '!' = over half the layer active on < 1e-3 of tokens):", "",
          "| model | never active | active on < 1e-4 of tokens | active on < 1e-3 of tokens (dead) |",
          "|---|---|---|---|"]
    for name, tiers in n["tiers"].items():
        cells = []
        for tier in tier_names:
            cells.append(" / ".join(f"{100 * x:.0f}%" + ("!" if tier == tier_names[-1] and i in
                                                         tiers["mostly_dead_layers"] else "")
                                    for i, x in enumerate(tiers[tier]["fraction_per_layer"])))
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    g = n["gain_split"]
    share = "–" if g["share_from_newly_dead"] is None else f"{100 * g['share_from_newly_dead']:.0f}%"
    n_layers = len(next(iter(n["ffn_removed"].values()))["per_layer_removed"])
    md += ["", f"λ* = {lambda_text(lam_star)} against λ = 0 (same seed): activation ratio down "
           f"{100 * g['gain']:.1f} points, {100 * g['from_newly_dead']:.1f} of them ({share}) from the "
           f"{100 * g['newly_dead_fraction']:.1f}% of neurons that die (median rate before "
           + ("–" if g["newly_dead_median_freq_a"] is None else f"{100 * g['newly_dead_median_freq_a']:.1f}%")
           + f"), {100 * g['from_the_rest']:.1f} from the rest (survivors firing less); of λ*'s {g['dead_in_b']} "
           f"dead neurons, {g['dead_in_b_dead_at_start']} had a gate positive on < 1e-3 of tokens at the SiLU "
           "start already.", "", "Loss without the FFN (W_down zeroed; Δ nats against the model's own loss):", "",
           "| model | held-out loss | all FFNs removed | " + " | ".join(f"layer {i} removed" for i in range(n_layers))
           + " |", "|---|---|---|" + "---|" * n_layers]
    for name, f in n["ffn_removed"].items():
        md.append(f"| {name} | {f['loss']:.4f} | {f['all_removed']:+.3f} | "
                  + " | ".join(f"{x:+.3f}" for x in f["per_layer_removed"]) + " |")
    return md


def regime_line(reg: dict[str, Any]) -> str:
    return (f"Regime: the control's CETT-PPL-1% activation ratio (counted in the sparse forward) is "
            f"{100 * reg['control_cett_ppl1_ratio']:.1f}% (PPL ratio {reg['control_cett_ppl1_ppl_ratio']:.4f}); the "
            f"Sparsing Law's SiLU models sit near {100 * PAPER_SILU_PPL1_RATIO:.0f}%.")


SEED_ROWS = (  # (key, label, scale, format)
    ("control_loss", "control held-out loss (frontier tokens)", 1, ".4f"),
    ("a_minus_control", "(a) − control, Δloss as trained", 1, "+.4f"),
    ("star_minus_control", "λ* − control, Δloss as trained", 1, "+.4f"),
    ("a_sparsity", "(a) sparsity as trained (%)", 100, ".2f"),
    ("star_sparsity", "λ* sparsity as trained (%)", 100, ".2f"),
    ("control_max_1pct", "control + CETT: max sparsity within +1% PPL (%)", 100, ".1f"),
    ("a_max_1pct", "(a) + FATReLU: max sparsity within +1% PPL (%)", 100, ".1f"),
    ("star_max_1pct", "λ* + FATReLU: max sparsity within +1% PPL (%)", 100, ".1f"),
    ("star_minus_a_max_1pct", "λ* − (a): max sparsity within +1% PPL (points)", 100, "+.1f"),
    ("a_dloss_at_0.95", "(a) + FATReLU: Δloss at 95%", 1, "+.4f"),
    ("star_dloss_at_0.95", "λ* + FATReLU: Δloss at 95%", 1, "+.4f"),
    ("star_minus_a_dloss_at_0.95", "λ* − (a): Δloss at 95%", 1, "+.4f"),
    ("a_dloss_at_0.98", "(a) + FATReLU: Δloss at 98%", 1, "+.4f"),
    ("star_dloss_at_0.98", "λ* + FATReLU: Δloss at 98%", 1, "+.4f"),
    ("star_minus_a_dloss_at_0.98", "λ* − (a): Δloss at 98%", 1, "+.4f"),
)


# ---------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------
def plot(workdir: Path, res: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lam_star = res["lambda_star"]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, (key, f) in enumerate(res["frontier"]["methods"].items()):
        lam = None if key == "control" else float(key)
        seeded = res["seed_points"].get(key)
        if seeded:  # mean and sd over seeds of each threshold's point
            xs, ys = np.asarray(seeded["sparsity"]), np.asarray(seeded["dloss"])
            ax.errorbar(xs.mean(0), ys.mean(0), xerr=xs.std(0, ddof=1), yerr=ys.std(0, ddof=1), marker="o",
                        ms=4, lw=1.8, capsize=2, color=f"C{i}", label=method_label(lam, lam_star).replace("\\*", "*")
                        .replace("**", "") + f" ({len(xs)} seeds)")
        else:
            rows = f["rows"]
            ax.plot([r["sparsity"] for r in rows], [r["dloss"] for r in rows], marker=".", lw=1, color=f"C{i}",
                    label=method_label(lam, lam_star).replace("\\*", "*").replace("**", ""))
    ax.axhline(frontier.loss_budget(), color="k", ls="--", lw=0.8, label="+1% perplexity")
    ax.axhline(0.0, color="0.6", lw=0.6)
    for t in TARGETS:
        ax.axvline(t, color="0.8", ls=":", lw=0.8)
    ax.set_xlim(0.6, 1.0)
    ax.set_ylim(-0.01, 0.06)
    ax.set_xlabel("activation sparsity (held-out, sparse forward)")
    ax.set_ylabel("Δ held-out loss vs the dense control (nats)")
    ax.set_title("Sparsity-loss frontier per method (FATReLU / CETT thresholds, no retraining)")
    ax.legend(fontsize=7, loc="upper left")
    p1 = _save(fig, workdir / "frontier.png")

    rows = res["neurons"]["dead_vs_step"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.3))
    steps = [r["step"] for r in rows]
    axes[0].plot(steps, [r["dead"] for r in rows], "k-o", lw=2, label="all layers")
    for li in range(len(rows[0]["dead_per_layer"])):
        axes[0].plot(steps, [r["dead_per_layer"][li] for r in rows], "--", lw=1, label=f"layer {li}")
    axes[0].set_ylabel(f"dead fraction (rate < {neurons.DEAD_FREQ:g})")
    axes[1].plot(steps, [r["live_rate"] for r in rows], "k-o", lw=2)
    axes[1].set_ylabel("mean firing rate of the live neurons")
    logged = read_metrics(workdir / run_name(lam_star, res["seeds"][0]), "train")
    for ax in axes:
        ax.set_xlabel(f"step of the λ* = {lambda_text(lam_star)} run (seed {res['seeds'][0]})")
        twin = ax.twinx()
        twin.plot([r["step"] for r in logged], [r["reg_factor"] for r in logged], color="C3", alpha=0.5, lw=1)
        twin.set_ylabel("λ (red)", color="C3")
    axes[0].legend(fontsize=7)
    return [p1, _save(fig, workdir / "dead_vs_step.png")]


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with files.atomic_file(path) as tmp:  # a failed write (disk full) keeps the previous plot
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------------------
def _floats(holder: flags.FlagHolder) -> list[float]:
    try:
        vals = [float(x) for x in holder.value]
    except ValueError:
        raise UsageError(f"--{holder.name}: numbers expected, got {','.join(holder.value)}") from None
    if not vals or any(not math.isfinite(v) or v < 0 for v in vals):
        raise UsageError(f"--{holder.name}: finite numbers >= 0 expected, got {','.join(holder.value)}")
    return vals


def _check_flags() -> tuple[list[float], list[float], list[float]]:
    for holder in (_PRETRAIN, _STEPS, _SEEDS, _FRONTIER_BATCHES, _NEURON_BATCHES, _PPLP_BATCHES, _CETT_CALIBRATION,
                   _PARALLEL):
        if holder.value <= 0:
            raise UsageError(f"--{holder.name}: must be a positive integer, got {holder.value}")
    lams, rel, cett = _floats(_LAMBDAS), sorted(_floats(_REL)), sorted(_floats(_CETT))
    if 0.0 not in lams or not any(v > 0 for v in lams):
        raise UsageError(f"--lambdas: needs 0 (plain ReLU substitution) and at least one L1 factor > 0, got "
                         f"{','.join(_LAMBDAS.value)}")
    if rel[0] != 0.0 or cett[0] != 0.0:
        raise UsageError("--relative_thresholds / --cett_targets: start the grid at 0 (the model as trained)")
    return sorted(set(lams)), rel, cett


def _job() -> tuple[Job, list[float], list[int]]:
    """The job's settings from the flags (checked): (job, lambdas, seeds)."""
    workdir = files.check_output_path(_WORKDIR.value, "--workdir")  # a file in the way: refused before any training
    lams, rel, cett_targets = _check_flags()
    quick = _QUICK.value
    n_seeds = min(_SEEDS.value, 2) if quick else _SEEDS.value
    if quick:  # lambda 0 and one L1 factor (2e-4 when given: the one the README's commands use)
        positive = [v for v in lams if v > 0]
        lams = [0.0, 2e-4 if 2e-4 in positive else positive[0]]
    pre_steps, steps = (6, 6) if quick else (_PRETRAIN.value, _STEPS.value)
    nf, nn = (2, 2) if quick else (_FRONTIER_BATCHES.value, _NEURON_BATCHES.value)
    job = Job(workdir=workdir, pre_steps=pre_steps, steps=steps, quick=quick, frontier_batches=nf,
              neuron_batches=nn, rel=tuple(rel), cett_targets=tuple(cett_targets),
              cett_calibration_batches=min(_CETT_CALIBRATION.value, nf), pplp_batches=_PPLP_BATCHES.value)
    return job, lams, list(range(1, n_seeds + 1))


def schedule(job: Job, lams: list[float], seeds: list[int], pool: concurrent.futures.Executor
             ) -> tuple[dict[tuple, Any], float]:
    """Runs every task on ``pool``, each as soon as what it needs exists: the first seed's runs (every method), the
    SiLU start's rates, the other seeds' control and lambda = 0; lambda*'s seeds and checkpoints once the first seed's
    fronts choose it; the regime once the control is trained. Returns ({task key: result}, lambda*)."""
    first = seeds[0]
    pending: dict[concurrent.futures.Future, tuple] = {}
    results: dict[tuple, Any] = {}
    t0 = time.time()

    def submit(key: tuple, name: str, fn: Callable[..., Any], *args: Any) -> None:
        pending[pool.submit(_logged, name, fn, *args)] = key

    for lam in [None] + lams:
        submit(("run", lam, first), run_name(lam, first), task_continued, job, lam, first, True)
    submit(("start_rates",), "silu_rates", task_start_rates, job)
    for seed in seeds[1:]:
        for lam in (None, 0.0):
            submit(("run", lam, seed), run_name(lam, seed), task_continued, job, lam, seed, False)
    lam_star = None
    while pending:
        done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
        for f in done:
            key = pending.pop(f)
            results[key] = f.result()
            if key[0] == "run":
                final = results[key]["final"]
                print(f"=== {run_name(key[1], key[2])} trained and measured ({time.time() - t0:.0f}s into the runs): "
                      f"eval_loss={final['eval_loss']:.4f} sparsity={final['eval_sparsity']:.4f}", flush=True)
            if key == ("run", None, first):
                submit(("regime",), "regime", task_regime, job, first)
        if lam_star is None and all(("run", lam, first) in results for lam in [None] + lams):
            base = results[("run", None, first)]["final"]["eval_loss"]
            lam_star = choose_lambda_star({lam: read_front(frontier.with_gaps(
                results[("run", lam, first)]["points"]["rows"], base)) for lam in lams if lam > 0})
            print(f"=== lambda* = {lambda_text(lam_star)} (highest sparsity within +1% perplexity)", flush=True)
            for seed in seeds[1:]:
                submit(("run", lam_star, seed), run_name(lam_star, seed), task_continued, job, lam_star, seed, False)
            submit(("star",), "lambda_star_checkpoints", task_star, job, lam_star, first)
    assert lam_star is not None
    return results, lam_star


def assemble(job: Job, lams: list[float], seeds: list[int], lam_star: float, results: dict[tuple, Any],
             finals: dict[str, Any]) -> dict[str, Any]:
    """The job's results (``results.json``) from its tasks' results."""
    first = seeds[0]
    base = {s: results[("run", None, s)]["final"]["eval_loss"] for s in seeds}
    points = {}
    for (kind, *rest), r in results.items():
        if kind == "run":
            lam, seed = rest
            points[run_name(lam, seed)] = {**r["points"], "rows": frontier.with_gaps(r["points"]["rows"], base[seed])}
            finals[run_name(lam, seed)] = r["final"]
    fronts = {("control" if lam is None else lambda_text(lam)): {**read_front(points[run_name(lam, first)]["rows"]),
                                                                 "rows": points[run_name(lam, first)]["rows"]}
              for lam in [None] + lams}
    per_seed = []
    for seed in seeds:
        fronts_s = [read_front(points[run_name(lam, seed)]["rows"]) for lam in (None, 0.0, lam_star)]
        per_seed.append({"control_loss": base[seed], **per_seed_row(*fronts_s)})
    seed_points = {}
    for key, lam in (("control", None), ("0", 0.0), (lambda_text(lam_star), lam_star)):
        rows = [points[run_name(lam, seed)]["rows"] for seed in seeds]
        if len(rows) > 1:
            seed_points[key] = {"sparsity": [[r["sparsity"] for r in rr] for rr in rows],
                                "dloss": [[r["dloss"] for r in rr] for rr in rows]}
    start_rates = results[("start_rates",)]
    rates = {"SiLU start (gate > 0)": start_rates} | {run_name(lam, first): results[("run", lam, first)]["rates"]
                                                       for lam in [None] + lams}
    star, a_name = run_name(lam_star, first), run_name(0.0, first)
    neuron_batches = held_out(job.start).batches(job.neuron_batches)
    tokens = int(sum(float((np.asarray(b["segment_ids"]) != 0).sum()) for b in neuron_batches))
    front_batches = held_out(job.start).batches(job.frontier_batches)
    neurons_res = {
        "tokens": tokens, "tiers": {n: neurons.dead_neuron_tiers(r, tokens) for n, r in rates.items()},
        "gain_split": neurons.sparsity_gain_split(rates[a_name], rates[star], start_rates),
        "gain_split_per_lambda": {lambda_text(lam): neurons.sparsity_gain_split(
            rates[a_name], rates[run_name(lam, first)], start_rates) for lam in lams if lam > 0},
        "ffn_removed": {run_name(None, first): results[("run", None, first)]["ffn_removed"],
                        a_name: results[("run", 0.0, first)]["ffn_removed"], star: results[("star",)]["ffn_removed"]},
        "dead_vs_step": dead_vs_step({0: start_rates} | results[("star",)]["rates_per_step"])}
    runs = {}
    for name, f in finals.items():
        lam = None if name.startswith(("silu", "control")) else float(name[len("lambda"):].split("_")[0])
        seed = 0 if name == "silu" else int(name.rsplit("seed", 1)[1])
        runs[name] = {"activation": "relu" if lam is not None else "silu", "lambda": lam, "seed": seed,
                      "steps_total": job.pre_steps + (0 if name == "silu" else job.steps),
                      "sparsity": f["eval_sparsity"], "eval_loss": f["eval_loss"],
                      "train_loss": train_loss(job.workdir / name), "per_layer": f["eval_sparsity_per_layer"]}
    return {"runs": runs, "seeds": seeds, "lambdas": lams, "lambda_star": lam_star,
            "relative_thresholds": list(job.rel), "cett_targets": list(job.cett_targets),
            "cett_calibration_tokens": int(sum(float(np.asarray(b["weights"]).sum())
                                               for b in front_batches[:job.cett_calibration_batches])),
            "points": points, "seed_points": seed_points,
            "frontier": {"tokens": int(sum(float(np.asarray(b["weights"]).sum()) for b in front_batches)),
                         "methods": fronts},
            "seed_table": seed_stats(per_seed), "per_seed": per_seed, "neurons": neurons_res,
            "regime": results[("regime",)], "pretrain_steps": job.pre_steps, "steps": job.steps,
            "stages": prosparse_configs.TINY_STAGES, "quick": job.quick}


def link_lambda_star(workdir: Path, name: str) -> None:
    """``<workdir>/lambda_star``: a link to lambda*'s first-seed run, the model later commands start from (its
    predictor, its evaluation), replaced atomically."""
    tmp = workdir / f".lambda_star.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(name, target_is_directory=True)
    os.replace(tmp, workdir / "lambda_star")


def _run() -> str:
    """The job (flags parsed); returns the closing line."""
    logging.set_verbosity(logging.WARNING)  # orbax / tfds INFO lines would drown the progress bars
    job, lams, seeds = _job()
    parallel = _PARALLEL.value
    t_start = time.time()
    # Runs of one shape (the seeds' repeats, every evaluation) reuse their compiled programs from the workdir's cache
    jax.config.update("jax_compilation_cache_dir", str(job.workdir.absolute() / ".jax_cache"))
    finals = {"silu": pretrain(job)}
    held_out(job.start).batches(job.frontier_batches)  # the held-out split prepared before the workers read it
    print(f"\n=== {1 + len(lams) + 3 * (len(seeds) - 1)} continued runs and their measurements, {parallel} at a time"
          + (f" (logs: {job.workdir / 'logs'})" if parallel > 1 else ""), flush=True)
    with workers(job, parallel) as pool:
        results, lam_star = schedule(job, lams, seeds, pool)
    res = assemble(job, lams, seeds, lam_star, results, finals)
    res["parallel"] = parallel
    link_lambda_star(job.workdir, run_name(lam_star, seeds[0]))
    md = tables(res)
    print("\n" + md)
    plots = plot(job.workdir, res)
    res["total_seconds"] = time.time() - t_start
    files.write_text_atomic(job.workdir / "results.json", json.dumps(res, indent=2))
    files.write_text_atomic(job.workdir / "results.md", md + "\n")
    return (f"\nresults: {job.workdir / 'results.json'}, {job.workdir / 'results.md'}; figures: "
            f"{', '.join(str(p) for p in plots)}; total {res['total_seconds']:.0f}s")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (1 with one error line on stderr for bad input; --verbose: traceback)."""
    return cli.run("prosparse_miniature", FLAGS, argv, _run, __doc__)


if __name__ == "__main__":
    sys.exit(main())
