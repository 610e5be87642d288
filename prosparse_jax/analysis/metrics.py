"""The metrics of :mod:`prosparse_jax.analysis.analyze`, one object each: exact, topk, fat, cett, pplp.

A :class:`Metric` ``observe``s every batch of the dense capture pass (where it counts its rule on the dense forward's
activations), then ``finish`` finds the per-layer thresholds, runs the sparse forwards (which count the activity inside
themselves: the headline) and returns an :class:`Outcome`. Definitions: docs/analysis.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prosparse_jax.analysis import measure, sparsity
from prosparse_jax.analysis.measure import Batch, LossSums
from prosparse_jax.config import ModelConfig
from prosparse_jax.model.transformer import Params, ppl_ratio

Stats = dict[str, np.ndarray]  # accumulated sparsity.mask_stats of one data source (dense-forward count)


# ---------------------------------------------------------------------------------------------------------------
# What every metric measures on, and what a metric hands back
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Measurement:
    """What the metrics of one analyze call measure on: the dense model, its eval batches per source, the progress
    bar and the pass counts.

    Attributes:
      cfg: the model config with sparse mode off (the dense baseline).
      pbar: tqdm progress bar, one tick per batch forward.
      dense: per-source loss sums of the dense capture pass.
      passes: batch forwards so far: {"capture": n, "sparse": n}.
      distinct: per source, the distinct held-out token positions the batches measure (:func:`measure.load_eval`).
    """

    cfg: ModelConfig
    params: Params
    by_src: dict[str, list[Batch]]
    pbar: Any
    dense: dict[str, LossSums]
    passes: dict[str, int] = dataclasses.field(default_factory=lambda: {"capture": 0, "sparse": 0})
    distinct: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def n_batches(self) -> int:
        """Eval batches over all sources."""
        return sum(len(b) for b in self.by_src.values())

    def dense_loss(self) -> float:
        """Dense loss pooled over all sources."""
        return LossSums.pool(self.dense.values()).loss

    def sparse_pass(self, forward: measure.SparseForward, p_L: Any) -> dict[str, LossSums]:
        """Runs a sparse forward at per-layer parameters ``p_L`` on every batch; per-source loss sums."""
        return {src: measure.sparse_pass(forward, self.params, batches, p_L, self._tick)
                for src, batches in self.by_src.items()}

    def _tick(self) -> None:
        self.passes["sparse"] += 1
        self.pbar.update(1)


@dataclasses.dataclass
class Outcome:
    """What a metric found after the capture pass.

    Attributes:
      sparse: per-source loss sums and activity counts of the sparse run; None: the dense run is the metric's sparse
        run (exact).
      fields: extra result fields in output order (threshold_kind, cett_target, ...).
      sparse_mode: the thresholds are CETT taus for ``model.neuron_thresholds`` (written to sparse_mode.json).
    """

    thresholds: list[float]
    sparse: dict[str, LossSums] | None
    fields: dict[str, Any]
    sparse_mode: bool = False


# ---------------------------------------------------------------------------------------------------------------
# One object per metric: observe() every captured batch, then finish() -> Outcome
# ---------------------------------------------------------------------------------------------------------------
class Metric:
    """A metric's accumulator: ``observe`` sees each captured batch of the dense pass, ``finish`` finds the
    thresholds and runs the sparse forwards; ``stats`` holds each source's summed :func:`sparsity.mask_stats` of the
    metric's rule on the dense forward's activations (the dense-forward count).

    Args:
      value: the metric's --value (k, eps, CETT target or p).
      topk_mode, pplp_steps: used by topk and pplp only.
    """

    sweeps = 1  # sparse passes over all batches (progress bar)
    topk_mode_field: str | None = None  # the result's "topk_mode"

    def __init__(self, value: float, sources: list[str], topk_mode: str, pplp_steps: int) -> None:
        self.value = value
        self.stats: dict[str, Stats | None] = {s: None for s in sources}

    def observe(self, src: str, batch: Batch, x1_LxBxTxF: jax.Array, act_LxBxTxF: jax.Array) -> None:
        """Takes one captured batch of source ``src``."""
        raise NotImplementedError

    def finish(self, meas: Measurement) -> Outcome:
        """Thresholds, sparse run and result fields, after every batch was observed."""
        raise NotImplementedError

    def _count(self, src: str, active_LxBxTxF: jax.Array, valid_BxT: jax.Array, positions_BxT: jax.Array) -> None:
        self.stats[src] = sparsity.add_stats(self.stats[src],
                                             sparsity.mask_stats(active_LxBxTxF, valid_BxT, positions_BxT))


@jax.jit
def _active_exact(x1_LxBxTxF: jax.Array) -> jax.Array:
    return sparsity.exact_mask(x1_LxBxTxF)


class Exact(Metric):
    """ProSparse's activation (x1 != 0); the dense run is the sparse run."""

    sweeps = 0

    def observe(self, src: str, batch: Batch, x1_LxBxTxF: jax.Array, act_LxBxTxF: jax.Array) -> None:
        """Counts the exact non-zeros of x1."""
        self._count(src, _active_exact(x1_LxBxTxF), batch["segment_ids"] != 0, batch["positions"])

    def finish(self, meas: Measurement) -> Outcome:
        """No thresholds (0 per layer) and no sparse run."""
        return Outcome([0.0] * meas.cfg.n_layers, None, {"threshold_kind": "none (exact zeros of x1)"})


def _make_active_topk(mode: str) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """Jitted (x1, act, k, valid) -> (kept non-zeros [L, B, T, F], equivalent |act(gate)| threshold per layer [L])."""

    def f(x1_LxBxTxF: jax.Array, act_LxBxTxF: jax.Array, k: jax.Array, valid_BxT: jax.Array
          ) -> tuple[jax.Array, jax.Array]:
        keep_LxBxTxF = jax.vmap(lambda a: sparsity.topk_mask(a, k, mode, valid_BxT))(act_LxBxTxF)
        thr_L = jax.vmap(lambda a, m: sparsity.topk_threshold(a, m, mode, valid_BxT))(act_LxBxTxF, keep_LxBxTxF)
        return keep_LxBxTxF & (x1_LxBxTxF != 0), thr_L

    return jax.jit(f)


class Topk(Metric):
    """Top-k on |act(gate)| ('token' or 'global' rule); the threshold is the mean smallest kept |act(gate)|."""

    def __init__(self, value: float, sources: list[str], topk_mode: str, pplp_steps: int) -> None:
        super().__init__(value, sources, topk_mode, pplp_steps)
        self.topk_mode_field = topk_mode
        self._active = _make_active_topk(topk_mode)
        self._thr_sum_L: np.ndarray | float = 0.0
        self._thr_n = 0

    def observe(self, src: str, batch: Batch, x1_LxBxTxF: jax.Array, act_LxBxTxF: jax.Array) -> None:
        """Counts the kept non-zeros and sums the per-layer threshold."""
        valid_BxT = batch["segment_ids"] != 0
        active_LxBxTxF, thr_L = self._active(x1_LxBxTxF, act_LxBxTxF, jnp.float32(self.value), valid_BxT)
        self._thr_sum_L = self._thr_sum_L + np.asarray(thr_L, np.float64)
        self._thr_n += 1
        self._count(src, active_LxBxTxF, valid_BxT, batch["positions"])

    def finish(self, meas: Measurement) -> Outcome:
        """Mean thresholds; the sparse run with the Top-k x1 hook."""
        sparse = meas.sparse_pass(measure.make_topk_forward(meas.cfg, self.topk_mode_field),
                                  np.full(meas.cfg.n_layers, self.value))
        kind = ("smallest kept |act(gate)| per layer, mean over batches" if self.topk_mode_field == "global"
                else "smallest kept |act(gate)| per token, mean over tokens and batches")
        thresholds = [float(x) for x in self._thr_sum_L / max(self._thr_n, 1)]
        return Outcome(thresholds, sparse, {"threshold_kind": kind})


@jax.jit
def _active_fat(x1_LxBxTxF: jax.Array, act_LxBxTxF: jax.Array, eps: jax.Array) -> jax.Array:
    return sparsity.fat_mask(act_LxBxTxF, eps) & (x1_LxBxTxF != 0)


class Fat(Metric):
    """FAT-eps: |act(gate)| >= eps kept."""

    def observe(self, src: str, batch: Batch, x1_LxBxTxF: jax.Array, act_LxBxTxF: jax.Array) -> None:
        """Counts the kept non-zeros."""
        active_LxBxTxF = _active_fat(x1_LxBxTxF, act_LxBxTxF, jnp.float32(self.value))
        self._count(src, active_LxBxTxF, batch["segment_ids"] != 0, batch["positions"])

    def finish(self, meas: Measurement) -> Outcome:
        """eps per layer; the sparse run with the FAT x1 hook."""
        L = meas.cfg.n_layers
        sparse = meas.sparse_pass(measure.make_fat_forward(meas.cfg), np.full(L, self.value))
        return Outcome([float(self.value)] * L, sparse, {"threshold_kind": "|act(gate)| >= eps kept"})


class _CETTMetric(Metric):
    """cett / pplp: keeps the captured x1; ``finish`` picks per-layer taus on them (:class:`sparsity.CETTCache`),
    then counts neuron output norms > tau."""

    def __init__(self, value: float, sources: list[str], topk_mode: str, pplp_steps: int) -> None:
        super().__init__(value, sources, topk_mode, pplp_steps)
        self._cached: list[tuple[str, jax.Array, jax.Array, jax.Array]] = []  # (source, x1, valid, positions)

    def observe(self, src: str, batch: Batch, x1_LxBxTxF: jax.Array, act_LxBxTxF: jax.Array) -> None:
        """Keeps x1 for the tau bisection."""
        self._cached.append((src, x1_LxBxTxF, batch["segment_ids"] != 0, batch["positions"]))

    def choose(self, cache: sparsity.CETTCache, meas: Measurement
               ) -> tuple[np.ndarray, np.ndarray, dict[str, LossSums], float, dict[str, Any]]:
        """(taus_L, achieved CETT per layer, sparse run, CETT target, extra fields first in the result)."""
        raise NotImplementedError

    def finish(self, meas: Measurement) -> Outcome:
        """Taus of the chosen CETT target, their sparse run and the dense-forward count of n_i > tau."""
        cache = sparsity.CETTCache(meas.params["layers"]["w_down_LxFxD"], [(x1, v) for _, x1, v, _ in self._cached])
        taus_L, cett_L, sparse, target, fields = self.choose(cache, meas)
        taus_dev_L = jnp.asarray(np.asarray(taus_L, np.float32))
        for src, x1_LxBxTxF, valid_BxT, positions_BxT in self._cached:
            self._count(src, measure.active_tau(x1_LxBxTxF, cache.norms_LxF, taus_dev_L), valid_BxT, positions_BxT)
        self._cached = []
        kind = "tau on the neuron output norm |x1_i| * ||W_down[:, i]|| (n_i <= tau truncated)"
        fields = {**fields, "threshold_kind": kind, "cett_target": float(target),
                  "cett_achieved_per_layer": [float(c) for c in cett_L]}
        return Outcome([float(t) for t in np.asarray(taus_L, np.float32)], sparse, fields, sparse_mode=True)


class Cett(_CETTMetric):
    """CETT: per-layer taus with CETT(tau_l) = the target (bisected on the captured x1, no forward passes)."""

    def choose(self, cache: sparsity.CETTCache, meas: Measurement
               ) -> tuple[np.ndarray, np.ndarray, dict[str, LossSums], float, dict[str, Any]]:
        """The taus of --value; one sparse run."""
        taus_L, cett_L = cache.bisect(self.value)
        return taus_L, cett_L, meas.sparse_pass(measure.make_tau_forward(meas.cfg), taus_L), self.value, {}


class PPLp(_CETTMetric):
    """CETT-PPL-p%: the largest shared CETT target whose PPL ratio is <= 1 + p/100 (Sparsing Law Algorithm 1)."""

    def __init__(self, value: float, sources: list[str], topk_mode: str, pplp_steps: int) -> None:
        super().__init__(value, sources, topk_mode, pplp_steps)
        self.sweeps = pplp_steps

    def choose(self, cache: sparsity.CETTCache, meas: Measurement
               ) -> tuple[np.ndarray, np.ndarray, dict[str, LossSums], float, dict[str, Any]]:
        """Bisects the target (one sparse run per step); no feasible step: target 0 (tau = 0, exact zeros only)."""
        limit, dense_loss = 1.0 + self.value / 100.0, meas.dense_loss()
        tau_forward = measure.make_tau_forward(meas.cfg)
        tried: dict[float, tuple[np.ndarray, np.ndarray, dict[str, LossSums]]] = {}
        search: list[dict[str, Any]] = []

        def feasible(target: float) -> bool:
            taus_L, cett_L = cache.bisect(target)
            tried[target] = (taus_L, cett_L, meas.sparse_pass(tau_forward, taus_L))
            sparse_loss = LossSums.pool(tried[target][2].values()).loss
            ratio = ppl_ratio(sparse_loss, dense_loss)
            search.append({"cett_target": target, "ppl_ratio": ratio, "sparse_loss": sparse_loss,
                           "feasible": bool(ratio <= limit), "mean_tau": float(np.mean(taus_L))})
            return ratio <= limit

        target = measure.bisect_target(feasible, self.sweeps)
        if target == 0.0:  # nothing feasible, and target 0 (tau = 0: exact zeros only) was never tried: run it
            meas.pbar.total += meas.n_batches
            taus_L, cett_L = cache.bisect(0.0)
            tried[0.0] = (taus_L, cett_L, meas.sparse_pass(tau_forward, taus_L))
        return (*tried[target], target, {"pplp_search": search})


METRIC_CLASSES: dict[str, type[Metric]] = {"exact": Exact, "topk": Topk, "fat": Fat, "cett": Cett, "pplp": PPLp}
