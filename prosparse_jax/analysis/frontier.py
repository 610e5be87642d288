"""The sparsity-loss frontier of a method: measured (sparsity, loss) points, their Pareto front, the best loss gap at a
target sparsity and the largest sparsity within a perplexity budget, and seed statistics of such numbers.

A *method* is one trained model with a family of training-free thresholds (FATReLU thresholds on a ReLU model,
ProSparse §3.3; CETT targets on a SiLU model, Sparsing Law §4.1): each threshold gives one point, its activation
sparsity and its held-out loss gap to the dense control. Between two measured points the front is read by linear
interpolation (a threshold between the two would land near that line); every such value is marked ``interpolated``,
and nothing is extrapolated beyond the sparsest point measured. Used by the main job (experiments/
prosparse_miniature.py; docs/results/miniature.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from prosparse_jax.analysis import measure, sparsity
from prosparse_jax.config import ModelConfig
from prosparse_jax.model.transformer import Params

PPL_BUDGET = 0.01  # +1% perplexity: the Sparsing Law's PPL-1% budget (§4.1)


def loss_budget(ppl_increase: float = PPL_BUDGET) -> float:
    """The loss gap (nats) of a perplexity ratio 1 + ``ppl_increase``: log(1 + p)."""
    return math.log1p(ppl_increase)


@dataclasses.dataclass(frozen=True)
class Point:
    """One measured setting of a method: activation sparsity (fraction of zeros) and loss gap to the control (nats)."""

    sparsity: float
    dloss: float
    setting: float = 0.0  # the threshold (or target) that produced it


@dataclasses.dataclass(frozen=True)
class Reading:
    """A value read off a front: ``kind`` is 'measured' (a measured point), 'interpolated' (between two measured
    points) or 'unreached' (``value`` None: the front does not get there)."""

    value: float | None
    kind: str


def pareto_front(points: Iterable[Point]) -> list[Point]:
    """The points no other point beats (at least as sparse with at most the loss gap, one of them strictly), sorted
    by sparsity; along the result both sparsity and loss gap increase strictly.

    Raises:
      ValueError: no points, or a non-finite coordinate.
    """
    pts = list(points)
    if not pts:
        raise ValueError("pareto_front: no points")
    for p in pts:
        if not (math.isfinite(p.sparsity) and math.isfinite(p.dloss)):
            raise ValueError(f"pareto_front: non-finite point {p}")
    front: list[Point] = []
    # Sparsest first (ties: the lower gap first); keep a point iff its gap is below every sparser point's.
    for p in sorted(pts, key=lambda q: (-q.sparsity, q.dloss)):
        if not front or p.dloss < front[-1].dloss:
            front.append(p)
    return front[::-1]


def best_dloss_at(points: Iterable[Point], sparsity: float) -> Reading:
    """The lowest loss gap at activation sparsity >= ``sparsity`` on the interpolated front.

    Below the front's least sparse point that point's gap is the answer ('measured': a model at least that sparse);
    between two front points the straight line between them ('interpolated'); beyond the sparsest point 'unreached'.
    """
    front = pareto_front(points)
    if sparsity <= front[0].sparsity:
        return Reading(front[0].dloss, "measured")
    for lo, hi in zip(front, front[1:], strict=False):
        if sparsity == hi.sparsity:
            return Reading(hi.dloss, "measured")
        if lo.sparsity < sparsity < hi.sparsity:
            w = (sparsity - lo.sparsity) / (hi.sparsity - lo.sparsity)
            return Reading(lo.dloss + w * (hi.dloss - lo.dloss), "interpolated")
    return Reading(None, "unreached")


def max_sparsity_within(points: Iterable[Point], budget: float) -> Reading:
    """The largest activation sparsity whose interpolated loss gap is <= ``budget`` (nats).

    'measured' when that is a measured point (the sparsest point is within budget, or the next one is exactly at it),
    'interpolated' when the line to the next front point crosses the budget, 'unreached' (None) when no measured
    point is within budget.
    """
    front = pareto_front(points)
    inside = [i for i, p in enumerate(front) if p.dloss <= budget]
    if not inside:
        return Reading(None, "unreached")
    i = inside[-1]
    if i == len(front) - 1 or front[i].dloss == budget:
        return Reading(front[i].sparsity, "measured")
    lo, hi = front[i], front[i + 1]
    w = (budget - lo.dloss) / (hi.dloss - lo.dloss)
    return Reading(lo.sparsity + w * (hi.sparsity - lo.sparsity), "interpolated")


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value)."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def format_mean_sd(values: Sequence[float], scale: float = 1.0, *, min_decimals: int = 0, max_decimals: int = 4
                   ) -> str:
    """``mean ± sd`` of ``values * scale`` to the precision the spread supports: the sd to one significant digit (two
    when it starts with 1), the mean to the same decimal place (between ``min_decimals`` and ``max_decimals``)."""
    mean, sd = mean_sd([x * scale for x in values])
    if sd > 0 and math.isfinite(sd):
        exponent = math.floor(math.log10(sd))
        digits = 2 if f"{sd:e}"[0] == "1" else 1
        decimals = min(max(-exponent + digits - 1, min_decimals), max_decimals)
    else:
        decimals = max_decimals
    return f"{mean:.{decimals}f} ± {sd:.{decimals}f}"


# ---------------------------------------------------------------------------------------------------------------
# Measuring a method's points on held-out batches (sparse forward: thresholds applied layer by layer)
# ---------------------------------------------------------------------------------------------------------------
# One compiled forward per model config, shared by every run of that shape (a config is a frozen dataclass).
_capture = functools.lru_cache(maxsize=8)(measure.make_capture)
_fat_forward = functools.lru_cache(maxsize=8)(measure.make_fat_forward)
_tau_forward = functools.lru_cache(maxsize=8)(measure.make_tau_forward)


def positive_gate_mean(params: Params, cfg: ModelConfig, batches: list[dict[str, Any]]) -> float:
    """Mean positive gate activation act(gate) > 0 of a model on ``batches`` (valid tokens): its activation scale,
    the unit of relative FATReLU thresholds."""
    capture = _capture(cfg)
    total, count = 0.0, 0.0
    for b in batches:
        act_LxBxTxF = capture(params, b)[3]
        valid = (b["segment_ids"] != 0)[None, :, :, None]
        pos = (act_LxBxTxF > 0) & valid
        total += float(jnp.sum(jnp.where(pos, act_LxBxTxF.astype(jnp.float32), 0.0)))
        count += float(jnp.sum(pos))
    return total / max(count, 1.0)


def fatrelu_points(params: Params, cfg: ModelConfig, batches: list[dict[str, Any]], thresholds: Sequence[float]
                   ) -> list[dict[str, Any]]:
    """FATReLU at each absolute threshold t (x1 kept where act(gate) >= t, every layer; t = 0 is the model as
    trained): activation sparsity counted in that sparse forward and the loss (:func:`with_gaps` adds the gap)."""
    forward = _fat_forward(cfg)
    rows = []
    for t in thresholds:
        sums = measure.sparse_pass(forward, params, batches, [float(t)] * cfg.n_layers)
        ratio_L = sums.activation_ratio_L
        rows.append({"threshold": float(t), "sparsity": float(1.0 - ratio_L.mean()), "loss": sums.loss,
                     "sparsity_per_layer": [float(1 - r) for r in ratio_L]})
    return rows


def cett_points(params: Params, cfg: ModelConfig, batches: list[dict[str, Any]], targets: Sequence[float], *,
                calibration: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """CETT truncation at each shared target (per-layer taus bisected on the dense forward's x1 of ``calibration``,
    default ``batches``; Sparsing Law §4.1; neurons with |x1_i| * ||W_down[i]|| <= tau_l dropped): sparsity counted
    in the sparse forward on ``batches`` and the loss (:func:`with_gaps` adds the gap). The CETT reached on the
    calibration batches is recorded as ``cett``."""
    capture = _capture(cfg)
    cached = []
    for b in batches if calibration is None else calibration:
        x1_LxBxTxF = capture(params, b)[2]
        cached.append((x1_LxBxTxF, b["segment_ids"] != 0))
    cache = sparsity.CETTCache(params["layers"]["w_down_LxFxD"], cached)
    forward = _tau_forward(cfg)
    rows = []
    for target in targets:
        taus_L, cett_L = cache.bisect(float(target))
        sums = measure.sparse_pass(forward, params, batches, taus_L)
        ratio_L = sums.activation_ratio_L
        rows.append({"cett_target": float(target), "cett": float(np.mean(cett_L)),
                     "sparsity": float(1.0 - ratio_L.mean()), "loss": sums.loss,
                     "sparsity_per_layer": [float(1 - r) for r in ratio_L]})
    return rows


def with_gaps(rows: Iterable[dict[str, Any]], control_loss: float) -> list[dict[str, Any]]:
    """``rows`` (from :func:`fatrelu_points` / :func:`cett_points`) with ``dloss`` = loss - ``control_loss`` (the
    control measured on the same batches)."""
    return [{**r, "dloss": r["loss"] - control_loss} for r in rows]


def points(rows: Iterable[dict[str, Any]], setting_key: str) -> list[Point]:
    """The :class:`Point` of each measured row (from :func:`fatrelu_points` / :func:`cett_points`)."""
    return [Point(r["sparsity"], r["dloss"], r[setting_key]) for r in rows]
