"""Exact offline permutation of the FFN neurons (co-active ones side by side), and a block-sparsity report.

A block-sparse FFN kernel skips a block of 16-64 neurons only when all are inactive; grouping co-active neurons
(PowerInfer's hot / cold split, arXiv 2312.12456) raises the skipped fraction. Permuting a layer's W_gate / W_up columns
and W_down rows alike computes the same function, so sparse mode's thresholds stay valid. Usage: docs/inference.md.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy.linalg import blas

from prosparse_jax import files
from prosparse_jax.analysis import measure
from prosparse_jax.analysis.measure import Batch
from prosparse_jax.config import ModelConfig
from prosparse_jax.errors import InputError, UsageError
from prosparse_jax.model import transformer as model
from prosparse_jax.model.transformer import Params
from prosparse_jax.training import checkpoint as ckpt
from prosparse_jax.training.lock import WorkdirLock
from prosparse_jax.training.model_io import is_hf_folder, load_model

ORDERS = ("frequency", "coactivation")
BLOCKS = (16, 32, 64)
_FFN_LEAVES = {"w_gate_LxDxF": 2, "w_up_LxDxF": 2, "w_down_LxFxD": 1}  # leaf -> its F axis (stacked layout)
_FLOAT32_EXACT = 2**24  # token counts up to here sum exactly in float32

# ---------------------------------------------------------------------------------------------------------------
# Activity statistics
# ---------------------------------------------------------------------------------------------------------------
def active_mask(x1_LxBxTxF: jax.Array, params: Params, cfg: ModelConfig) -> jax.Array:
    """Active neurons, [L, B, T, F] bool: x1 != 0, and in sparse mode also output norm > the layer's tau."""
    active = x1_LxBxTxF != 0
    if cfg.neuron_thresholds:
        taus_L = jnp.asarray(cfg.neuron_thresholds, jnp.float32)
        active = active & measure.active_tau(x1_LxBxTxF, model.w_down_norms(params), taus_L)
    return active


@functools.lru_cache(maxsize=8)
def _capture_fn(cfg: ModelConfig) -> Any:
    """Jitted (params, batch) -> (NLL sum, weight sum, active_LxBxTxF, valid_BxT) of the model as configured (one
    per config: the passes of a run share its compilation)."""

    def f(params: Params, batch: Batch) -> tuple[jax.Array, ...]:
        logits_BxTxV, st = model.forward(params, batch["inputs"], cfg, segment_ids_BxT=batch["segment_ids"],
                                         positions_BxT=batch["positions"], capture=True)
        w_BxT = batch["weights"]
        nll = model.cross_entropy(logits_BxTxV, batch["targets"], w_BxT) * jnp.maximum(w_BxT.sum(), 1.0)
        return nll, w_BxT.sum(), active_mask(st.x1, params, cfg), batch["segment_ids"] != 0

    return jax.jit(f)


def _tokens(active_LxBxTxF: jax.Array, valid_BxT: jax.Array) -> np.ndarray:
    """The valid tokens' activity, [L, N, F] bool numpy (N = valid tokens)."""
    a = np.asarray(active_LxBxTxF)
    return a.reshape(a.shape[0], -1, a.shape[-1])[:, np.asarray(valid_BxT).reshape(-1)]


def neuron_stats(params: Params, cfg: ModelConfig, batches: Iterable[Batch], *, keep_activity: bool = False
                 ) -> dict[str, Any]:
    """Per-layer activity of every neuron over the valid tokens of ``batches`` (one forward with capture each).

    Args:
      cfg: model config; in sparse mode (``neuron_thresholds``) activity follows the sparse mode's rule.
      keep_activity: also keep every token's activity, packed (``activity_L``: L x N x F / 8 bytes), for
        :func:`permutation_from_activity`.

    Returns:
      {"freq_LxF": activation frequency (float64), "count_LxF": active tokens (int64), "tokens": valid tokens,
      "nll": NLL sum, "weight": weight sum, and "activity_L" (per layer, :func:`pack_activity` of its [N, F]
      activity) if asked}.
    """
    capture = _capture_fn(cfg)
    count_LxF, packed_L, tokens, nll, weight = None, [[] for _ in range(cfg.n_layers)], 0, 0.0, 0.0
    for b in batches:
        n, w, active_LxBxTxF, valid_BxT = capture(params, b)
        a_LxNxF = _tokens(active_LxBxTxF, valid_BxT)
        nll, weight, tokens = nll + float(n), weight + float(w), tokens + a_LxNxF.shape[1]
        c_LxF = a_LxNxF.sum(axis=1, dtype=np.int64)
        count_LxF = c_LxF if count_LxF is None else count_LxF + c_LxF
        if keep_activity:
            for packed, a_NxF in zip(packed_L, a_LxNxF, strict=True):
                packed.append(pack_activity(a_NxF))
    if count_LxF is None:
        raise ValueError("neuron_stats: no batches")
    out = {"freq_LxF": count_LxF / max(tokens, 1), "count_LxF": count_LxF, "tokens": tokens, "nll": nll,
           "weight": weight}
    if keep_activity:
        out["activity_L"] = [np.concatenate(packed) for packed in packed_L]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Neuron orders (plain numpy: activity counts and packed per-token activity in, permutations out)
# ---------------------------------------------------------------------------------------------------------------
def pack_activity(active_NxF: Any) -> np.ndarray:
    """One layer's activity packed 8 neurons to a byte along F: uint8 [N, ceil(F / 8)] (``np.packbits``)."""
    return np.packbits(np.asarray(active_NxF, bool), axis=-1)


def _mirror_upper(m_FxF: np.ndarray, block: int = 64) -> None:
    """Copies the upper triangle of a square matrix onto its lower one, in place, ``block`` rows at a time."""
    F = m_FxF.shape[0]
    for i0 in range(0, F, block):
        i1 = min(i0 + block, F)
        m_FxF[i0:i1, :i0] = m_FxF[:i0, i0:i1].T
        d_BxB, lower = m_FxF[i0:i1, i0:i1], np.tril_indices(i1 - i0, -1)
        d_BxB[lower] = d_BxB.T[lower]


def coactivation_counts(activity_NxP: np.ndarray, d_ff: int, block: int | None = None) -> np.ndarray:
    """co_FxF[i, j] = tokens on which neurons i and j are both active, from one layer's :func:`pack_activity`.

    A^T A by BLAS rank-k updates of the upper triangle, ``block`` tokens at a time (default max(256, F / 4)), so
    memory is the F x F result plus ``block`` unpacked tokens whatever the token count. float32, exact below 2^24
    tokens; float64 from there on.
    """
    n_tokens = activity_NxP.shape[0]
    dtype, syrk = (np.float32, blas.ssyrk) if n_tokens < _FLOAT32_EXACT else (np.float64, blas.dsyrk)
    block = block or max(256, d_ff // 4)
    co_FxF = np.zeros((d_ff, d_ff), dtype, order="F")  # Fortran order: syrk updates it in place
    buf_TxF = np.empty((min(block, n_tokens), d_ff), dtype)
    for t0 in range(0, n_tokens, block):
        a_TxF = buf_TxF[:min(block, n_tokens - t0)]
        a_TxF[...] = np.unpackbits(activity_NxP[t0:t0 + block], axis=-1, count=d_ff)
        co_FxF = syrk(1.0, a_TxF.T, beta=1.0, c=co_FxF, trans=0, lower=0, overwrite_c=1)
    _mirror_upper(co_FxF)
    return co_FxF


def permutation_by_frequency(freq_LxF: Any) -> np.ndarray:
    """Most active neurons first (PowerInfer's hot neurons), per layer: int [L, F]; ties keep the original order."""
    return np.argsort(-np.asarray(freq_LxF, np.float64), axis=-1, kind="stable")


def _greedy_layer(count_F: np.ndarray, co_FxF: np.ndarray, cluster: int, window: int) -> np.ndarray:
    """Greedy clusters of one layer, O(F^2): seed = the most frequent unassigned neuron; then, among the ``window``
    most frequent unassigned neurons, add the j most co-active with the cluster: the largest
    sum_i co_ij / count_j = sum_i P(i active | j active) over the members i (ties: the more frequent). The window keeps
    cold neurons out of hot clusters; ``window = 1`` is the frequency order."""
    F = count_F.shape[0]
    count = count_F.astype(np.float64)
    rank_F = np.argsort(-count, kind="stable")
    free = np.ones(F, bool)
    order: list[int] = []
    while len(order) < F:
        seed = int(rank_F[free[rank_F]][0])
        free[seed] = False
        order.append(seed)
        co_sum = co_FxF[seed].astype(np.float64)
        for _ in range(min(cluster, F - len(order) + 1) - 1):
            cand = rank_F[free[rank_F]][:window]
            j = int(cand[np.argmax(co_sum[cand] / np.maximum(count[cand], 1.0))])
            free[j] = False
            order.append(j)
            co_sum += co_FxF[j]
    return np.asarray(order, np.int64)


def _check_cluster(cluster: int, window: int | None) -> int:
    """The window (None = cluster), after checking both are >= 1."""
    window = cluster if window is None else window
    if cluster < 1 or window < 1:
        raise ValueError(f"cluster and window must be >= 1, got {cluster}, {window}")
    return window


def permutation_by_coactivation(count_LxF: Any, co_LxFxF: Any, cluster: int = 16, window: int | None = None
                                ) -> np.ndarray:
    """Co-active neurons together (greedy clustering, :func:`_greedy_layer`), clusters in decreasing frequency of
    their seeds: int [L, F]. Holds all L co-activation matrices; :func:`permutation_from_activity` builds one at a time.

    Args:
      count_LxF: active tokens per neuron (or frequencies).
      co_LxFxF: tokens (or frequency) where both neurons are active, same units as ``count_LxF``.
      cluster: neurons per cluster (the kernel's block size; clusters of 16 nest into blocks of 32 / 64).
      window: candidates per pick, the most frequent unassigned neurons; None = cluster (F: pure co-activation).
    """
    window = _check_cluster(cluster, window)
    count_LxF, co_LxFxF = np.asarray(count_LxF), np.asarray(co_LxFxF)
    return np.stack([_greedy_layer(count_LxF[i], co_LxFxF[i], cluster, window) for i in range(count_LxF.shape[0])])


def permutation_from_activity(count_LxF: Any, activity_L: list[np.ndarray], d_ff: int, cluster: int = 16,
                              window: int | None = None) -> np.ndarray:
    """:func:`permutation_by_coactivation` from the packed activity (``neuron_stats(..., keep_activity=True)``), one
    layer at a time: its co-activation counts (:func:`coactivation_counts`, O(F^2)) are built, clustered and dropped
    before the next layer's. Same order, int [L, F]."""
    window = _check_cluster(cluster, window)
    count_LxF = np.asarray(count_LxF)
    return np.stack([_greedy_layer(count_LxF[i], coactivation_counts(activity_L[i], d_ff), cluster, window)
                     for i in range(count_LxF.shape[0])])


def check_permutation(perm_LxF: Any, n_layers: int, d_ff: int) -> np.ndarray:
    """``perm_LxF`` as int64 [L, F], checked to be a bijection of 0..F-1 per layer; ValueError otherwise."""
    perm = np.asarray(perm_LxF)
    if perm.shape != (n_layers, d_ff) or not np.issubdtype(perm.dtype, np.integer):
        raise ValueError(f"permutation must be int [{n_layers}, {d_ff}], got {perm.dtype} {list(perm.shape)}")
    bad = [i for i in range(n_layers) if not np.array_equal(np.sort(perm[i]), np.arange(d_ff))]
    if bad:
        raise ValueError(f"permutation of layer {bad[0]} is not a bijection of 0..{d_ff - 1}")
    return perm.astype(np.int64)


# ---------------------------------------------------------------------------------------------------------------
# The exact permutation and block sparsity
# ---------------------------------------------------------------------------------------------------------------
def _permute_group(group: dict[str, Any], perm_LxF: np.ndarray) -> dict[str, Any]:
    """One stacked dict of layer leaves with its FFN leaves permuted along F."""
    out = dict(group)
    for name, axis in _FFN_LEAVES.items():
        idx = jnp.asarray(perm_LxF).reshape(perm_LxF.shape[:1] + (1,) * (axis - 1) + perm_LxF.shape[1:]
                                            + (1,) * (2 - axis))
        out[name] = jnp.take_along_axis(jnp.asarray(group[name]), idx, axis=axis)
    return out


def permute_neurons(params: Params, perm_LxF: Any) -> Params:
    """Params whose FFN neuron j of layer l is the old neuron ``perm_LxF[l, j]``: W_gate / W_up columns and W_down
    rows reordered (stacked or per-layer layout, kept). The model computes the same function; its x1 is permuted."""
    layers = params["layers"]
    per_layer = model.is_per_layer(params)
    n_layers = len(layers) if per_layer else layers["w_up_LxDxF"].shape[0]
    d_ff = (layers[0] if per_layer else layers)["w_up_LxDxF"].shape[-1]
    perm = check_permutation(perm_LxF, n_layers, d_ff)
    if per_layer:
        return dict(params, layers=[_permute_group(g, perm[i:i + 1]) for i, g in enumerate(layers)])
    return dict(params, layers=_permute_group(layers, perm))


def block_inactive_counts(active_LxNxF: Any, block: int) -> np.ndarray:
    """(token, block) pairs whose ``block`` consecutive neurons are all inactive, per layer: int64 [L] (a last,
    partial block counts as one block)."""
    a = np.asarray(active_LxNxF, bool)
    L, N, F = a.shape
    pad = -F % block
    if pad:
        a = np.concatenate([a, np.zeros((L, N, pad), bool)], axis=-1)
    return (~a.reshape(L, N, -1, block).any(axis=-1)).sum(axis=(1, 2), dtype=np.int64)


def block_sparsity(active_LxNxF: Any, block: int) -> np.ndarray:
    """Per layer, the fraction of (token, block) pairs whose block of ``block`` neurons is entirely inactive: [L]."""
    L, N, F = np.shape(active_LxNxF)
    return block_inactive_counts(active_LxNxF, block) / max(N * math.ceil(F / block), 1)


def block_report(params: Params, cfg: ModelConfig, batches: Iterable[Batch], blocks: Iterable[int] = BLOCKS
                 ) -> dict[str, Any]:
    """Block sparsity of the model's own activity on ``batches``: {"loss", "tokens" (valid tokens),
    "activation_ratio", "block_sparsity": {str(block): {"mean", "per_layer"}}} (one forward with capture per
    batch)."""
    capture, blocks = _capture_fn(cfg), list(blocks)
    counts = {b: np.zeros(cfg.n_layers, np.int64) for b in blocks}
    active, tokens, nll, weight = np.zeros(cfg.n_layers, np.int64), 0, 0.0, 0.0
    for bt in batches:
        n, w, active_LxBxTxF, valid_BxT = capture(params, bt)
        a_LxNxF = _tokens(active_LxBxTxF, valid_BxT)
        nll, weight, tokens = nll + float(n), weight + float(w), tokens + a_LxNxF.shape[1]
        active += a_LxNxF.sum(axis=(1, 2), dtype=np.int64)
        for b in blocks:
            counts[b] += block_inactive_counts(a_LxNxF, b)
    per = {b: counts[b] / max(tokens * math.ceil(cfg.d_ff / b), 1) for b in blocks}
    return {"loss": measure.mean_loss(nll, weight), "tokens": tokens,
            "activation_ratio": float(active.sum() / max(tokens * cfg.d_ff * cfg.n_layers, 1)),
            "block_sparsity": {str(b): {"mean": float(per[b].mean()), "per_layer": [float(x) for x in per[b]]}
                               for b in blocks}}


# ---------------------------------------------------------------------------------------------------------------
# permute()
# ---------------------------------------------------------------------------------------------------------------
def _check_args(checkpoint: str | Path, out: str | Path, order: str, batch_size: int, num_batches: int,
                report_batches: int, cluster: int, window: int | None) -> Path:
    """Checks the arguments before any work: out first (refused when it exists and is not empty)."""
    out = files.check_empty_dir(out, "out")
    files.check_model_path(checkpoint, "checkpoint")
    if order not in ORDERS:
        raise UsageError(f"order: {order!r}; choose one of: {', '.join(ORDERS)}")
    for name, v in (("batch_size", batch_size), ("num_batches", num_batches), ("cluster", cluster),
                    ("window", 1 if window is None else window)):
        if v <= 0:
            raise UsageError(f"{name}: must be a positive integer, got {v}")
    if report_batches < 0:
        raise UsageError(f"report_batches: must be >= 0 (0 = report on the num_batches batches, in-sample), "
                         f"got {report_batches}")
    return out


def _split_batches(batches: list[Batch], distinct: int, data: str, num_batches: int, report_batches: int
                   ) -> tuple[list[Batch], list[Batch]]:
    """(fit batches, report batches): the first ``num_batches`` and the rest, refused unless their ``distinct``
    token positions show that no token is in both (a held-out split too small for them is cycled)."""
    fit, held = batches[:num_batches], batches[num_batches:]
    need = sum(int(np.prod(b["inputs"].shape)) for b in batches)
    if held and distinct < need:
        raise UsageError(
            f"num_batches / report_batches: the held-out split of {data!r} has {distinct} distinct token "
            f"positions, fewer than the {need} of {num_batches} + {report_batches} disjoint batches; lower "
            "num_batches, report_batches or batch_size, raise the run's data.eval_fraction, or set "
            "report_batches=0 to report on the fitting batches (in-sample)")
    return fit, held


def _load(checkpoint: str | Path, step: int | None, data: str, seq_len: int | None, data_dir: str | None,
          batch_size: int, num_batches: int, report_batches: int
          ) -> tuple[ModelConfig, Params, Path, dict[str, Any], list[Batch], list[Batch]]:
    """(model config, params, tokenizer path, run config, fit batches, report batches) of a checkpoint: the
    num_batches + report_batches held-out batches of one deterministic draw, split in two."""
    mcfg, params, tok_path = load_model(checkpoint, step)
    if tok_path is None:
        raise InputError(f"checkpoint: {checkpoint} has no tokenizer.json next to config.json")
    run_cfg = files.read_json(Path(checkpoint) / "config.json", "config.json")
    batches, distinct = measure.load_eval([data], tok_path, measure.run_data_section(run_cfg), seq_len, data_dir,
                                          batch_size, num_batches + report_batches, mcfg.vocab_size)
    fit, held = _split_batches(batches[data], distinct[data], data, num_batches, report_batches)
    return mcfg, jax.device_put(params), tok_path, {} if is_hf_folder(checkpoint) else run_cfg, fit, held


def _order(params: Params, cfg: ModelConfig, batches: list[Batch], order: str, cluster: int, window: int
           ) -> tuple[np.ndarray, int]:
    """(the permutation int [L, F] in ``order``, tokens it was chosen on) from the activity on ``batches``."""
    st = neuron_stats(params, cfg, batches, keep_activity=order == "coactivation")
    if order == "frequency":
        return permutation_by_frequency(st["freq_LxF"]), st["tokens"]
    return permutation_from_activity(st["count_LxF"], st["activity_L"], cfg.d_ff, cluster, window), st["tokens"]


def permute(checkpoint: str | Path, out: str | Path, *, order: str = "frequency", data: str = "stdlib",
            num_batches: int = 4, report_batches: int | None = None, batch_size: int = 8, seq_len: int | None = None,
            step: int | None = None, data_dir: str | None = None, cluster: int = 16, window: int | None = None
            ) -> dict[str, Any]:
    """Chooses a neuron order (``order``) on ``num_batches`` held-out batches of ``data``, reports block sparsity
    before / after on ``report_batches`` further batches (None = num_batches; 0 = the fitting batches, in-sample) and
    writes the permuted model to ``out``; returns the dict written to ``<out>/permutation.json``."""
    report_batches = num_batches if report_batches is None else report_batches
    out = _check_args(checkpoint, out, order, batch_size, num_batches, report_batches, cluster, window)
    if step is None and not is_hf_folder(checkpoint):
        step = ckpt.latest_step(checkpoint)  # the step permuted, recorded in permutation.json and permuted_from
    mcfg, params, tok_path, run_cfg, fit, held = _load(checkpoint, step, data, seq_len, data_dir, batch_size,
                                                       num_batches, report_batches)
    window = cluster if window is None else window
    perm_LxF, tokens = _order(params, mcfg, fit, order, cluster, window)
    new_params = permute_neurons(params, perm_LxF)
    before, after = block_report(params, mcfg, held or fit), block_report(new_params, mcfg, held or fit)
    res = {"checkpoint": str(checkpoint), "step": step, "order": order, "data": data, "tokens": tokens,
           "cluster": cluster if order == "coactivation" else None,
           "window": window if order == "coactivation" else None, "before": before, "after": after,
           "report_batches": {"count": len(held) or len(fit), "tokens": before["tokens"],
                              "held_out_from_fit": bool(held)},
           "permutation_rule": "new neuron j of layer l = old neuron permutation[l][j]",
           "permutation": perm_LxF.tolist()}
    run_cfg = dict(run_cfg, permuted_from={"checkpoint": str(Path(checkpoint).absolute()), "step": step,
                                           "order": order})
    with WorkdirLock(out, "permute"), files.staged_output(out) as stage:
        ckpt.write_params_workdir(stage, mcfg, jax.tree.map(np.asarray, new_params), run_config=run_cfg)
        (stage / "tokenizer.json").write_bytes(tok_path.read_bytes())
        (stage / "permutation.json").write_text(json.dumps(res))
    return res


def summary_line(res: dict[str, Any]) -> str:
    """The report as one JSON line: the tokens the order was chosen on, the report's batches (held out from those
    or in-sample), mean block sparsity before / after per block size, and both losses."""
    keys = res["before"]["block_sparsity"]
    return json.dumps({
        "order": res["order"], "tokens": res["tokens"], "report_batches": res["report_batches"],
        "activation_ratio": res["before"]["activation_ratio"],
        "loss_before": res["before"]["loss"], "loss_after": res["after"]["loss"],
        "block_sparsity_before": {b: res["before"]["block_sparsity"][b]["mean"] for b in keys},
        "block_sparsity_after": {b: res["after"]["block_sparsity"][b]["mean"] for b in keys}})
