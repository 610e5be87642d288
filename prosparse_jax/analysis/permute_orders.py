"""The neuron orders of :mod:`prosparse_jax.analysis.permute`, in plain numpy: activity packing, one layer's co-activation
counts, the frequency order (PowerInfer's hot / cold split, arXiv 2312.12456), greedy co-activation clusters, and the
permutation checks. No model here: the inputs are activation counts / packed per-token activity.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.linalg import blas

_FLOAT32_EXACT = 2**24  # token counts up to here sum exactly in float32


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
    """co_FxF[i, j] = tokens on which neurons i and j are both active (A^T A, a BLAS rank-k update of its upper
    triangle per ``block`` tokens), from one layer's packed activity (:func:`pack_activity`): float32, exact below
    2^24 tokens (float64 from there on).

    Memory: the F x F result plus ``block`` unpacked tokens (default max(256, F / 4): about 1.3 F^2 floats in all
    for F >= 1024), whatever the token count.
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
    their seeds: int [L, F]. Holds all L co-activation matrices: :func:`permutation_from_activity` builds one layer's
    at a time.

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


def inverse_permutation(perm_LxF: Any) -> np.ndarray:
    """inv with inv[l, perm[l, j]] = j, int [L, F]."""
    perm = np.asarray(perm_LxF)
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.arange(perm.shape[1])[None, :].repeat(perm.shape[0], 0), axis=1)
    return inv
