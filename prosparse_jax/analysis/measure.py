"""Measurement passes shared by analyze, law_inputs, neurons and permute, one copy each.

Held-out batches, the jitted dense forward with capture, sparse forwards through the model's one x1 hook (CETT taus by
sparse mode's own rule, Top-k, FAT-eps) that count the active neurons inside that forward, loss sums, the perplexity
ratio and the bisection on a shared CETT target (Sparsing Law, arXiv 2411.02335, Algorithm 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prosparse_jax.analysis import sparsity
from prosparse_jax.config import ModelConfig
from prosparse_jax.data import corpus as corpus_lib
from prosparse_jax.data import pipeline as data_lib
from prosparse_jax.model import transformer as model
from prosparse_jax.model.transformer import Params

Batch = dict[str, jax.Array]
# (params, batch, per-layer parameter p_L) -> (NLL sum, weight sum, sparsity.mask_stats of the x1 != 0 of this forward)
SparseForward = Callable[[Params, Batch, jax.Array], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]
# (params, p_L) -> the x1 hook of model.forward for per-layer parameters p_L (taus, k or eps)
MaskFactory = Callable[[Params, jax.Array], model.X1Mask]


# ---------------------------------------------------------------------------------------------------------------
# Held-out batches
# ---------------------------------------------------------------------------------------------------------------
def run_data_section(run_cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``data`` section of a run config dict; {} when it has none (e.g. a HuggingFace config.json)."""
    return run_cfg.get("data", {}) if isinstance(run_cfg.get("data"), dict) else {}


def distinct_positions(stream_len: int, seq_len: int, batch_size: int, num_batches: int) -> int:
    """Distinct stream positions the inputs of :func:`prosparse_jax.data.pipeline.make_eval_batches` cover (fewer
    than their tokens when a short stream's rows are cycled)."""
    if stream_len <= 0:
        return 0
    row = seq_len + 1
    windows_W = np.unique(data_lib.window_indices(-(-stream_len // row), batch_size, num_batches))
    pos_WxT = (windows_W[:, None] * row + np.arange(seq_len)) % stream_len
    return int(np.unique(pos_WxT).size)


def load_eval(sources: list[str], tok_path: Path, run_data: dict[str, Any], seq_len: int | None,
              data_dir: str | None, batch_size: int, num_batches: int, vocab: int
              ) -> tuple[dict[str, list[Batch]], dict[str, int]]:
    """({source: held-out batches on device}, {source: :func:`distinct_positions`}), tokenized with ``tok_path``.

    data_dir / text_key / seq_len / eval_fraction default to the run's ``data`` section (``run_data``).

    Raises:
      UsageError: a bad source or sequence length.
      InputError: a tokenizer larger than the model's vocabulary ``vocab``.
    """
    tok = corpus_lib.load_model_tokenizer(tok_path, vocab)
    out, distinct = {}, {}
    for src in sources:
        dcfg = corpus_lib.run_data_config(run_data, src, data_dir, seq_len)
        corpus = corpus_lib.open_corpus(dcfg)
        batches = data_lib.make_eval_batches(corpus, tok, seq_len=dcfg.seq_len, batch_size=batch_size,
                                             num_batches=num_batches)
        out[src] = [{k: jnp.asarray(v) for k, v in b.items()} for b in batches]
        stream_L, _ = corpus.token_stream(corpus_lib.EVAL_SPLIT, tok)
        distinct[src] = distinct_positions(len(stream_L), dcfg.seq_len, batch_size, num_batches)
    return out, distinct


# ---------------------------------------------------------------------------------------------------------------
# Jitted forwards
# ---------------------------------------------------------------------------------------------------------------
def _nll_sums(logits_BxTxV: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(NLL summed over weighted targets, weight sum) of one batch."""
    w_BxT = batch["weights"]
    return model.cross_entropy(logits_BxTxV, batch["targets"], w_BxT) * jnp.maximum(w_BxT.sum(), 1.0), w_BxT.sum()


def make_capture(cfg: ModelConfig) -> Callable[[Params, Batch], tuple[jax.Array, ...]]:
    """Jitted dense forward with capture: (params, batch) -> (NLL sum, weight sum, x1_LxBxTxF, act_gate_LxBxTxF)."""

    def f(params: Params, batch: Batch) -> tuple[jax.Array, ...]:
        logits_BxTxV, st = model.forward(params, batch["inputs"], cfg, segment_ids_BxT=batch["segment_ids"],
                                         positions_BxT=batch["positions"], capture=True)
        return (*_nll_sums(logits_BxTxV, batch), st.x1, st.act_gate)

    return jax.jit(f)


def _counted_forward(params: Params, batch: Batch, cfg: ModelConfig, x1_mask: model.X1Mask | None
                     ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(NLL sum, weight sum, :func:`sparsity.mask_stats` of x1 != 0) of one batch, counted inside this forward: with
    a hook, upstream layers' masking changes what downstream layers see (the Sparsing Law public code's count)."""
    logits_BxTxV, st = model.forward(params, batch["inputs"], cfg, segment_ids_BxT=batch["segment_ids"],
                                     positions_BxT=batch["positions"], x1_mask=x1_mask, capture=True)
    stats = sparsity.mask_stats(st.x1 != 0, batch["segment_ids"] != 0, batch["positions"])
    return (*_nll_sums(logits_BxTxV, batch), stats)


def make_sparse_forward(cfg: ModelConfig, mask_factory: MaskFactory) -> SparseForward:
    """Jitted sparse loss and activity of the model run with the x1 hook ``mask_factory(params, p_L)``
    (:data:`SparseForward`)."""

    def f(params: Params, batch: Batch, p_L: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        return _counted_forward(params, batch, cfg, mask_factory(params, p_L))

    return jax.jit(f)


def make_model_forward(cfg: ModelConfig) -> Callable[[Params, Batch], tuple[jax.Array, jax.Array, dict[str, Any]]]:
    """Jitted (params, batch) -> (NLL sum, weight sum, :func:`sparsity.mask_stats` of x1 != 0) of the model as
    configured (its activation, and its sparse mode when ``cfg.neuron_thresholds`` is set)."""
    return jax.jit(lambda params, batch: _counted_forward(params, batch, cfg, None))


def make_tau_forward(cfg: ModelConfig) -> SparseForward:
    """Sparse loss at per-layer CETT taus through sparse mode's own hook: neuron i dropped iff
    |x1_i| * ||W_down[i]|| <= tau_l."""
    return make_sparse_forward(cfg, model.neuron_norm_mask)


def make_topk_forward(cfg: ModelConfig, mode: str) -> SparseForward:
    """Sparse loss of Top-k (per-layer k_L, ``mode`` 'token' or 'global') on |act(gate)|."""
    return make_sparse_forward(cfg, lambda params, k_L: sparsity.topk_x1_mask(k_L, mode))


def make_fat_forward(cfg: ModelConfig) -> SparseForward:
    """Sparse loss of FAT-eps (per-layer eps_L) on |act(gate)|."""
    return make_sparse_forward(cfg, lambda params, eps_L: sparsity.fat_x1_mask(eps_L))


@jax.jit
def active_tau(x1_LxBxTxF: jax.Array, norms_LxF: jax.Array, taus_L: jax.Array) -> jax.Array:
    """CETT activity: neuron output norm |x1_i| * ||W_down[:, i]|| > tau of its layer, [L, B, T, F] bool."""
    n_LxBxTxF = jnp.abs(x1_LxBxTxF.astype(jnp.float32)) * norms_LxF[:, None, None, :]
    return n_LxBxTxF > taus_L[:, None, None, None]


@jax.jit
def _active_counts_tau(x1_LxBxTxF: jax.Array, norms_LxF: jax.Array, taus_L: jax.Array, valid_BxT: jax.Array
                       ) -> jax.Array:
    """Active units (neuron output norm > tau) on valid tokens, per layer and sequence: [L, B] int32."""
    active_LxBxTxF = active_tau(x1_LxBxTxF, norms_LxF, taus_L) & valid_BxT[None, :, :, None]
    return jnp.sum(active_LxBxTxF, axis=(2, 3), dtype=jnp.int32)


def tau_activation_ratio(cache: sparsity.CETTCache, taus_L: Any) -> np.ndarray:
    """Per-layer fraction of the cached (valid token x d_ff) units with neuron output norm > tau_l, [L] float64."""
    taus_dev_L = jnp.asarray(np.asarray(taus_L, np.float32))
    active_L = np.zeros(cache.norms_LxF.shape[0], np.int64)
    for x1_LxBxTxF, valid_BxT in cache.batches:
        counts_LxB = np.asarray(_active_counts_tau(x1_LxBxTxF, cache.norms_LxF, taus_dev_L, valid_BxT), np.int64)
        active_L += counts_LxB.sum(axis=1)
    return active_L / (max(cache.n_tokens, 1.0) * cache.norms_LxF.shape[1])


# ---------------------------------------------------------------------------------------------------------------
# Loss sums, perplexity ratio, sparse passes
# ---------------------------------------------------------------------------------------------------------------
def mean_loss(nll_sum: float, weight_sum: float) -> float:
    """Mean NLL per weighted target."""
    return nll_sum / max(weight_sum, 1.0)



@dataclasses.dataclass
class LossSums:
    """Sums over eval batches of one (dense or sparse) run; ``stats`` (the run's :func:`sparsity.mask_stats`,
    summed) is None until a batch with them is added."""

    nll: float = 0.0
    weight: float = 0.0
    stats: dict[str, np.ndarray] | None = None
    batches: int = 0

    def add(self, nll: jax.Array | float, weight: jax.Array | float, stats: dict[str, Any] | None = None) -> None:
        """Adds one batch's sums (and its activity counts)."""
        self.nll += float(nll)
        self.weight += float(weight)
        if stats is not None:
            self.stats = sparsity.add_stats(self.stats, stats)
        self.batches += 1

    @property
    def loss(self) -> float:
        """Mean NLL per weighted target."""
        return mean_loss(self.nll, self.weight)

    @property
    def activation_ratio_L(self) -> np.ndarray | None:  # noqa: N802 - shape suffix
        """Per-layer activation ratio of the run, pooled over its valid tokens x d_ff, [L]; None without stats."""
        if self.stats is None:
            return None
        d_ff = self.stats["neuron_active_LxF"].shape[-1]
        return self.stats["active_L"] / (max(float(self.stats["tokens"]), 1.0) * d_ff)

    @staticmethod
    def pool(parts: Iterable[LossSums]) -> LossSums:
        """The sums of several runs (e.g. data sources) together."""
        parts = list(parts)
        stats = None
        for p in parts:
            if p.stats is not None:
                stats = sparsity.add_stats(stats, p.stats)
        return LossSums(sum(p.nll for p in parts), sum(p.weight for p in parts), stats,
                        sum(p.batches for p in parts))


def sparse_pass(forward: SparseForward, params: Params, batches: list[Batch], p_L: Any,
                on_batch: Callable[[], None] | None = None) -> LossSums:
    """Runs ``forward`` at per-layer parameters ``p_L`` on every batch; ``on_batch`` is called after each one."""
    p_dev_L = jnp.asarray(np.asarray(p_L, np.float32))
    sums = LossSums()
    for b in batches:
        sums.add(*forward(params, b, p_dev_L))
        if on_batch is not None:
            on_batch()
    return sums


def bisect_target(feasible: Callable[[float], bool], steps: int) -> float:
    """Bisection on the shared CETT target in [0, 1] (Sparsing Law, arXiv 2411.02335, Algorithm 1).

    Keeps lo feasible (or 0) and hi infeasible (or 1), calling ``feasible`` once per step at the midpoint. Returns lo
    after ``steps`` halvings: 0.0 iff no midpoint was feasible.
    """
    lo, hi = 0.0, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        if feasible(mid):
            lo = mid
        else:
            hi = mid
    return lo
