"""Per-checkpoint inputs of the Sparsing Law fit: the CETT-PPL-p% activation ratio A of every kept checkpoint.

Sparsing Law App. E (arXiv 2411.02335): drop the warmup checkpoints (and, with ``max_step``, those after it, e.g. a
wsd run's LR decay), search ONE CETT target on the last few kept ones (feasible iff every one's perplexity ratio stays
<= 1 + p/100), measure A of every kept checkpoint at that target on the held-out split of the run's own data, counted
inside the sparse forward (as the Sparsing Law public code counts). Protocol and outputs: docs/analysis.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from prosparse_jax import files
from prosparse_jax.analysis import measure, sparsity
from prosparse_jax.analysis.measure import Batch, LossSums
from prosparse_jax.config import model_config_from_dict
from prosparse_jax.errors import CheckpointError, InputError, OutputError, UsageError
from prosparse_jax.model.transformer import Params, ppl_ratio
from prosparse_jax.training import checkpoint as ckpt

DEFAULT_FILE = "law_ratios.json"
PROTOCOL = "CETT-PPL-p% activation ratio per checkpoint (Sparsing Law arXiv 2411.02335, App. E)"
FORMAT_VERSION = 2  # 2: activation_ratio counted in the sparse forward (1: in the dense forward)


class StaleOutputError(OutputError):
    """The output file exists but cannot be reused (other settings, or not a law_ratios file); overwrite replaces it."""


def check_window(min_step: int, max_step: int | None, where: str = "") -> None:
    """Raises :class:`UsageError` unless ``0 <= min_step < max_step`` (``max_step`` None: no upper cut); ``where``
    starts the message."""
    at = f"{where}: " if where else ""
    if min_step < 0:
        raise UsageError(f"{at}min_step: must be >= 0 (steps <= min_step are dropped), got {min_step}")
    if max_step is not None and max_step <= min_step:
        raise UsageError(f"{at}max_step {max_step} must exceed min_step {min_step} (the fit uses min_step < step <= "
                         "max_step); raise --max_step or lower --min_step")


def split_steps(steps: Sequence[int], min_step: int, max_step: int | None = None
                ) -> tuple[list[int], list[int], list[int]]:
    """(kept: ``min_step < step <= max_step``, dropped as warm-up: ``step <= min_step``, dropped after max_step),
    each ascending; ``max_step`` None: no upper cut. The one rule for which steps a law fit uses."""
    steps = sorted(int(s) for s in steps)
    hi = math.inf if max_step is None else max_step
    return ([s for s in steps if min_step < s <= hi], [s for s in steps if s <= min_step],
            [s for s in steps if s > hi])


@dataclasses.dataclass(frozen=True)
class CheckpointPlan:
    """Which checkpoints of a run the protocol measures: ``min_step < step <= max_step`` are kept (the law's points),
    the warmup ones (``dropped_steps``) and those after max_step (``late_steps``) dropped, all ascending;
    tokens_per_step = train.batch_size * data.seq_len."""

    kept_steps: tuple[int, ...]
    dropped_steps: tuple[int, ...]
    min_step: int
    tokens_per_step: int
    max_step: int | None = None  # None: no upper cut
    late_steps: tuple[int, ...] = ()

    def tokens(self, step: int) -> int:
        """Training tokens seen after ``step`` optimizer steps."""
        return step * self.tokens_per_step


def checkpoint_steps(workdir: str | Path) -> list[int]:
    """All checkpoint steps on disk under ``<workdir>/checkpoints`` (those with params), ascending."""
    d = Path(workdir) / ckpt.CKPT_DIR
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "params").exists())


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """A training workdir as the protocol reads it, once: its config.json, optim.warmup_steps (the default warmup
    cut), train.batch_size * data.seq_len and the checkpoint steps on disk, ascending."""

    workdir: Path
    config: dict[str, Any]
    warmup_steps: int
    tokens_per_step: int
    steps: tuple[int, ...]

    @classmethod
    def read(cls, workdir: str | Path) -> RunInfo:
        """Reads ``<workdir>/config.json`` and lists the checkpoints."""
        workdir = Path(workdir)
        config = ckpt.read_run_config(workdir)
        try:
            warmup = int(config["optim"]["warmup_steps"])
            tokens_per_step = int(config["train"]["batch_size"]) * int(config["data"]["seq_len"])
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(
                f"{workdir}/config.json lacks optim.warmup_steps / train.batch_size / data.seq_len ({e!r}): the law "
                "needs a training workdir of prosparse_jax.training.train (an imported HF model has no training "
                "tokens)") from e
        return cls(workdir, config, warmup, tokens_per_step, tuple(checkpoint_steps(workdir)))

    def plan(self, min_step: int | None = None, max_step: int | None = None) -> CheckpointPlan:
        """The checkpoints kept and dropped (warmup: step <= min_step, by default the run's warmup_steps; late:
        step > max_step, by default none)."""
        cut = self.warmup_steps if min_step is None else int(min_step)
        hi = None if max_step is None else int(max_step)
        check_window(cut, hi)
        kept, warm, late = split_steps(self.steps, cut, hi)
        return CheckpointPlan(kept_steps=tuple(kept), dropped_steps=tuple(warm), min_step=cut,
                              tokens_per_step=self.tokens_per_step, max_step=hi, late_steps=tuple(late))


def plan_checkpoints(workdir: str | Path, min_step: int | None = None, max_step: int | None = None
                     ) -> CheckpointPlan:
    """Lists a run's checkpoints and drops the warmup ones and those after max_step (:meth:`RunInfo.plan`); may keep
    none."""
    return RunInfo.read(workdir).plan(min_step, max_step)


def _validate(p: float, n_search: int, num_batches: int, batch_size: int, search_steps: int) -> None:
    if not (math.isfinite(p) and p >= 0):
        raise UsageError(f"p: the PPL budget in percent must be a finite value >= 0, got {p}")
    for name, v in (("n_search", n_search), ("num_batches", num_batches), ("batch_size", batch_size),
                    ("search_steps", search_steps)):
        if not isinstance(v, int) or v <= 0:
            raise UsageError(f"{name}: must be a positive integer, got {v!r}")


def _settings(info: RunInfo, plan: CheckpointPlan, *, p: float, n_search: int, num_batches: int, batch_size: int,
              search_steps: int, seq_len: int | None, data: str | None, data_dir: str | None) -> dict[str, Any]:
    """The resolved protocol settings (what an existing output file must match to be reused)."""
    run_data = measure.run_data_section(info.config)
    source = data if data is not None else str(run_data.get("source", "stdlib"))
    sources = [s.strip() for s in source.split(",") if s.strip()]
    if not sources:
        raise UsageError("data: give at least one source (stdlib, files:<glob>, tfds:<name>)")
    return {"p": float(p), "n_search": int(n_search), "num_batches": int(num_batches), "batch_size": int(batch_size),
            "search_steps": int(search_steps), "seq_len": int(seq_len or run_data.get("seq_len", 256)),
            "data": ",".join(sources), "data_dir": data_dir, "min_step": int(plan.min_step),
            "max_step": plan.max_step, "kept_steps": list(plan.kept_steps)}


@dataclasses.dataclass(frozen=True)
class _Validation:
    """The validation batches (every source's, in source order) and the dense model's jitted capture and tau
    forwards, shared by every checkpoint."""

    workdir: Path
    batches: list[Batch]
    capture: Callable[[Params, Batch], tuple[jax.Array, ...]]
    tau_forward: measure.SparseForward

    @classmethod
    def load(cls, info: RunInfo, settings: dict[str, Any]) -> _Validation:
        """The run's tokenizer, dense model config and held-out batches as ``settings`` say."""
        sources = settings["data"].split(",")
        tok_path = info.workdir / "tokenizer.json"
        if not tok_path.is_file():
            raise InputError(f"{info.workdir} has no tokenizer.json: the validation data must use the run's tokenizer")
        mcfg = model_config_from_dict(info.config["model"]).replace(neuron_thresholds=())  # dense baseline
        by_src, _ = measure.load_eval(sources, tok_path, measure.run_data_section(info.config), settings["seq_len"],
                                      settings["data_dir"], settings["batch_size"], settings["num_batches"],
                                      mcfg.vocab_size)
        return cls(info.workdir, [b for src in sources for b in by_src[src]], measure.make_capture(mcfg),
                   measure.make_tau_forward(mcfg))

    def measure(self, step: int) -> _Measured:
        """Loads checkpoint ``step`` and runs its dense capture pass."""
        _, params, _ = ckpt.load_model(self.workdir, step)
        return _Measured(step, jax.device_put(params), self)


class _Measured:
    """One checkpoint's params, dense loss and captured x1 (a CETTCache) on the shared validation batches."""

    def __init__(self, step: int, params: Params, val: _Validation) -> None:
        self.step = step
        self.params = params
        self._val = val
        dense = LossSums()
        captured = []
        for b in val.batches:
            nll, w, x1_LxBxTxF, act_LxBxTxF = val.capture(params, b)
            del act_LxBxTxF
            dense.add(nll, w)
            captured.append((x1_LxBxTxF, b["segment_ids"] != 0))
        self.dense_loss = dense.loss
        self.cache = sparsity.CETTCache(params["layers"]["w_down_LxFxD"], captured)
        self.memo: dict[float, tuple[np.ndarray, np.ndarray, LossSums]] = {}  # target -> (taus_L, cett_L, sparse)

    def at(self, target: float) -> tuple[np.ndarray, np.ndarray, LossSums]:
        """(taus_L, achieved CETT per layer, the sparse run's loss sums and activity) at the CETT target
        (memoised)."""
        if target not in self.memo:
            taus_L, cett_L = self.cache.bisect(target)
            sparse = measure.sparse_pass(self._val.tau_forward, self.params, self._val.batches, taus_L)
            self.memo[target] = (taus_L, cett_L, sparse)
        return self.memo[target]

    def row(self, target: float, plan: CheckpointPlan) -> dict[str, Any]:
        """This checkpoint's entry of the result's ``checkpoints`` at the CETT target: A counted in the sparse
        forward, the dense forward's count beside it."""
        taus_L, cett_L, sparse = self.at(target)
        ratio_L = sparse.activation_ratio_L
        dense_ratio_L = measure.tau_activation_ratio(self.cache, taus_L)
        tokens = plan.tokens(self.step)
        return {"step": int(self.step), "tokens": int(tokens), "D": tokens / 1e9,
                "activation_ratio": float(np.mean(ratio_L)),
                "activation_ratio_per_layer": [float(x) for x in ratio_L],
                "dense_forward_activation_ratio": float(np.mean(dense_ratio_L)),
                "dense_forward_activation_ratio_per_layer": [float(x) for x in dense_ratio_L],
                "ppl_ratio": ppl_ratio(sparse.loss, self.dense_loss), "dense_loss": float(self.dense_loss),
                "sparse_loss": float(sparse.loss),
                "taus_per_layer": [float(t) for t in np.asarray(taus_L, np.float32)],
                "cett_achieved_per_layer": [float(c) for c in cett_L]}


class _JointSearch:
    """The shared CETT target of the search checkpoints (App. E; Algorithm 1 on the worst case over them).

    Args:
      meas: the measured search checkpoints, ascending steps.
      limit: the PPL ratio bound 1 + p/100.
    """

    def __init__(self, meas: dict[int, _Measured], limit: float) -> None:
        self.meas = meas
        self.limit = limit
        self.order = list(reversed(meas))  # the latest checkpoint first; a checkpoint that failed moves to the front
        self.trace: list[dict[str, Any]] = []

    def feasible(self, target: float) -> bool:
        """Whether every search checkpoint has PPL ratio <= limit at ``target`` (stops at the first that fails)."""
        ratios: dict[str, float] = {}
        ok = True
        for s in list(self.order):
            m = self.meas[s]
            r = ppl_ratio(m.at(target)[2].loss, m.dense_loss)
            ratios[str(s)] = r
            if r > self.limit:  # one checkpoint over the bound decides: skip the others
                ok = False
                self.order.remove(s)
                self.order.insert(0, s)
                break
        self.trace.append({"cett_target": target, "feasible": ok, "ppl_ratio_per_step": ratios})
        return ok

    def search(self, steps: int) -> float:
        """t = 1 if feasible, else the bisection's lo after ``steps`` halvings (0: tau = 0, only exact zeros)."""
        if self.feasible(1.0):  # every neuron truncated (A = 0) and still within budget: FFNs that do not matter yet
            return 1.0
        return measure.bisect_target(self.feasible, steps)


def _measure_all(val: _Validation, plan: CheckpointPlan, meas: dict[int, _Measured], target: float,
                 log: Callable[[str], None]) -> tuple[list[dict[str, Any]], int]:
    """(one row per kept checkpoint at ``target`` in step order, eval tokens); frees the search set's captures
    first."""
    rows = []
    eval_tokens = 0
    for step in list(meas) + [s for s in plan.kept_steps if s not in meas]:
        m = meas.pop(step) if step in meas else val.measure(step)
        rows.append(m.row(target, plan))
        log(f"law_ratios: step {step}: A = {rows[-1]['activation_ratio']:.4f}, PPL ratio {rows[-1]['ppl_ratio']:.4f}")
        eval_tokens = int(round(m.cache.n_tokens))
        del m
    rows.sort(key=lambda r: r["step"])
    return rows, eval_tokens


def _assemble(workdir: Path, settings: dict[str, Any], plan: CheckpointPlan, search_set: list[int], target: float,
              limit: float, trace: list[dict[str, Any]], rows: list[dict[str, Any]], eval_tokens: int
              ) -> dict[str, Any]:
    """The result dict of :func:`compute_law_ratios`."""
    return {
        "format": FORMAT_VERSION, "protocol": PROTOCOL, "workdir": str(workdir), "settings": settings,
        "cett_target": float(target), "ppl_limit": limit, "search_checkpoints": search_set,
        "dropped_steps": list(plan.dropped_steps), "dropped_after_max_step": list(plan.late_steps),
        "tokens_per_step": plan.tokens_per_step,
        "eval_tokens": eval_tokens, "search": trace, "checkpoints": rows,
        "activation_definition": "x1_i non-zero in the sparse forward, where every layer drops neurons with output "
                                 "norm |x1_i| * ||W_down[:, i]|| <= tau_l (tau_l: CETT = target on layer l, pooled "
                                 "over the dense forward's eval tokens), so upstream masking changes downstream "
                                 "activations (the Sparsing Law public code's count); fraction of valid tokens x "
                                 "d_ff, mean over layers. dense_forward_activation_ratio: the same rule on the "
                                 "dense forward's activations",
        "joint_search": "worst case: the target is feasible iff every search checkpoint has PPL ratio <= ppl_limit",
    }


def compute_law_ratios(workdir: str | Path, *, p: float = 1.0, n_search: int = 5, num_batches: int = 4,
                       batch_size: int = 8, min_step: int | None = None, max_step: int | None = None,
                       search_steps: int = 12, seq_len: int | None = None, data: str | None = None,
                       data_dir: str | None = None, verbose: bool = False) -> dict[str, Any]:
    """Measures the CETT-PPL-p% activation ratio of every kept checkpoint (Sparsing Law App. E).

    Args:
      workdir: a training workdir of prosparse_jax.training.train (config.json, tokenizer.json, checkpoints/).
      p: PPL budget in percent: the perplexity ratio bound is 1 + p/100.
      n_search: the CETT target is searched on the last n_search kept checkpoints (all kept ones if fewer).
      num_batches, batch_size: validation batches, the same for every checkpoint.
      min_step: checkpoints with step <= min_step are dropped; None = the run's optim.warmup_steps.
      max_step: checkpoints with step > max_step are dropped, from the search set too (e.g. a wsd run's LR decay,
        which its final checkpoint is in); None = none.
      search_steps: bisection steps on the CETT target in [0, 1] (resolution 2^-search_steps); t = 1 is tried first.
      seq_len, data, data_dir: None = the run's data.seq_len, data.source, data.data_dir.
      verbose: one progress line per checkpoint on stderr.

    Returns:
      A JSON-serialisable dict; ``checkpoints`` holds one row per kept checkpoint in step order (step, tokens, D,
      activation_ratio, ppl_ratio, losses, taus), ``search`` the bisection's trace.

    Raises:
      CheckpointError: no checkpoint in (min_step, max_step].
      UsageError, InputError: bad settings, or a workdir that is not a training workdir with its tokenizer.json.
    """
    _validate(p, n_search, num_batches, batch_size, search_steps)
    return _compute(RunInfo.read(workdir), p=p, n_search=n_search, num_batches=num_batches, batch_size=batch_size,
                    min_step=min_step, max_step=max_step, search_steps=search_steps, seq_len=seq_len, data=data,
                    data_dir=data_dir, verbose=verbose)


def _compute(info: RunInfo, *, p: float, n_search: int, num_batches: int, batch_size: int, min_step: int | None,
             max_step: int | None, search_steps: int, seq_len: int | None, data: str | None, data_dir: str | None,
             verbose: bool) -> dict[str, Any]:
    plan = info.plan(min_step, max_step)
    if not plan.kept_steps:
        upper = "" if plan.max_step is None else f" and <= {plan.max_step}"
        raise CheckpointError(
            f"{info.workdir}: no checkpoint with step > {plan.min_step}{upper} (have "
            f"{list(plan.dropped_steps + plan.late_steps)}); train longer with train.keep_period set so checkpoints "
            "are kept, or lower min_step" + ("" if plan.max_step is None else " / raise max_step"))
    settings = _settings(info, plan, p=p, n_search=n_search, num_batches=num_batches, batch_size=batch_size,
                         search_steps=search_steps, seq_len=seq_len, data=data, data_dir=data_dir)
    val = _Validation.load(info, settings)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if verbose else (lambda msg: None)
    # 1. the shared CETT target, searched on the last n_search kept checkpoints (worst case; their x1 held at once)
    search_set, limit = list(plan.kept_steps[-n_search:]), 1.0 + p / 100.0
    meas = {s: val.measure(s) for s in search_set}
    log(f"law_ratios: {info.workdir}: searching one CETT target on steps {search_set} (PPL ratio <= {limit:g})")
    joint = _JointSearch(meas, limit)
    target = joint.search(search_steps)
    log(f"law_ratios: CETT target {target:.6g}")
    # 2. every kept checkpoint at that target; 3. the result
    rows, eval_tokens = _measure_all(val, plan, meas, target, log)
    return _assemble(info.workdir, settings, plan, search_set, target, limit, joint.trace, rows, eval_tokens)


def law_ratios(workdir: str | Path, out: str | Path | None = None, *, overwrite: bool = False, p: float = 1.0,
               n_search: int = 5, num_batches: int = 4, batch_size: int = 8, min_step: int | None = None,
               max_step: int | None = None, search_steps: int = 12, seq_len: int | None = None, data: str | None = None,
               data_dir: str | None = None, verbose: bool = False) -> dict[str, Any]:
    """The law inputs of a run: reads ``out`` if it holds the same settings, else computes and writes it.

    ``out`` defaults to ``<workdir>/law_ratios.json``; the other settings are :func:`compute_law_ratios`'s. Returns
    its result dict, with ``"reused": True`` when read from an existing file.

    Raises:
      StaleOutputError: ``out`` exists with other settings (another min_step or max_step, or other kept checkpoints,
        e.g. the run went on) and ``overwrite`` is False; nothing is computed or written then.
    """
    _validate(p, n_search, num_batches, batch_size, search_steps)
    info = RunInfo.read(workdir)
    kw = dict(p=p, n_search=n_search, num_batches=num_batches, batch_size=batch_size, search_steps=search_steps,
              seq_len=seq_len, data=data, data_dir=data_dir)
    out = info.workdir / DEFAULT_FILE if out is None else Path(out)
    if out.exists() and not overwrite:
        try:
            old = json.loads(out.read_text())
            have = old["settings"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StaleOutputError(f"{out} exists but is not a law_ratios file ({e!r}); pass overwrite=True "
                                   "(--overwrite) to replace it or choose another output (nothing was written)") from e
        if old.get("format") != FORMAT_VERSION:
            raise StaleOutputError(
                f"{out} has format {old.get('format')!r}, not {FORMAT_VERSION} (format 1 counted A in the dense "
                "forward; A is now counted in the sparse forward); pass overwrite=True (--overwrite) to recompute it "
                "(nothing was written)")
        want = _settings(info, info.plan(min_step, max_step), **kw)
        diffs = [f"{k}: file {have.get(k)!r} vs now {v!r}" for k, v in want.items() if have.get(k) != v]
        if diffs:
            raise StaleOutputError(
                f"{out} was computed with other settings ({'; '.join(diffs)}); pass overwrite=True (--overwrite) to "
                "recompute it, or choose another output file (nothing was written)")
        return {**old, "reused": True}
    res = _compute(info, min_step=min_step, max_step=max_step, verbose=verbose, **kw)
    out.parent.mkdir(parents=True, exist_ok=True)
    files.write_text_atomic(out, json.dumps(res, indent=2))  # a failed write leaves no .tmp and the old file intact
    return {**res, "reused": False}
