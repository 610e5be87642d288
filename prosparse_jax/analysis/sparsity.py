"""Activation-sparsity metrics as pure, jit-friendly functions on captured FFN tensors (docs/analysis.md).

exact: ProSparse §2; topk, fat, cett, pplp: Sparsing Law §4.1. A neuron is active on a token when its x1_i is non-zero
and survives the metric's mask; activation ratio = 1 - sparsity. Shape letters as in
:mod:`prosparse_jax.model.transformer`; N = flattened units.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prosparse_jax.model.transformer import X1Mask, neuron_output_norms

Array = jax.Array

METRICS = ("exact", "topk", "fat", "cett", "pplp")
TOPK_MODES = ("token", "global")  # the first is the default (the paper's definition)


# ---------------------------------------------------------------------------------------------------------------
# Masks (True = kept)
# ---------------------------------------------------------------------------------------------------------------
def exact_mask(x1: Array) -> Array:
    """x1 != 0 (ProSparse activation: exact non-zeros)."""
    return x1 != 0


def fat_mask(act_gate: Array, eps: float | Array) -> Array:
    """FAT-eps: keeps |act(gate)| >= eps (zeroes |act(gate)| < eps); works for SiLU's negative outputs too."""
    return jnp.abs(act_gate) >= eps


def topk_count(k: float | Array, n: int | Array) -> Array:
    """Number of kept units for fraction k of n units: round-half-up of k * n, at least 1 when n > 0."""
    c = jnp.floor(jnp.asarray(k, jnp.float32) * jnp.asarray(n, jnp.float32) + 0.5).astype(jnp.int32)
    return jnp.where(jnp.asarray(n) > 0, jnp.maximum(c, 1), 0)


def _keep_top(score_N: Array, count: Array) -> Array:
    """Boolean [N]: the ``count`` largest scores; ties go to the lower index (stable sort), deterministic."""
    order_N = jnp.argsort(-score_N, stable=True)
    kept_sorted_N = jnp.arange(score_N.shape[0]) < count
    return jnp.zeros(score_N.shape, bool).at[order_N].set(kept_sorted_N)


def topk_mask(act_gate_BxTxF: Array, k: float | Array, mode: str = "token",
              valid_BxT: Array | None = None) -> Array:
    """Top-k mask of one layer on |act(gate)|: exactly ``topk_count(k, units)`` True per layer or per valid token.

    Args:
      k: kept fraction in (0, 1]; ties go to the lower flat index (deterministic).
      mode: 'token' (over F, per token: the paper's rule) or 'global' (over all valid B x T x F units: the public
        code's rule).
      valid_BxT: False = padding, never kept; None = all tokens valid.
    """
    B, T, F = act_gate_BxTxF.shape
    valid_BxT = jnp.ones((B, T), bool) if valid_BxT is None else valid_BxT.astype(bool)
    # |act| >= 0, so -1 puts padding after every real unit.
    score_BxTxF = jnp.where(valid_BxT[..., None], jnp.abs(act_gate_BxTxF).astype(jnp.float32), -1.0)
    if mode == "global":
        count = topk_count(k, jnp.sum(valid_BxT) * F)
        keep = _keep_top(score_BxTxF.reshape(-1), count).reshape(B, T, F)
    elif mode == "token":
        count = topk_count(k, F)
        keep = jax.vmap(_keep_top, in_axes=(0, None))(score_BxTxF.reshape(B * T, F), count).reshape(B, T, F)
    else:
        raise ValueError(f"topk mode {mode!r}; choose one of: {', '.join(TOPK_MODES)}")
    return keep & valid_BxT[..., None]


def topk_threshold(act_gate_BxTxF: Array, keep_BxTxF: Array, mode: str, valid_BxT: Array) -> Array:
    """Equivalent |act(gate)| threshold of a top-k mask: the smallest kept value ('token': averaged over tokens)."""
    a = jnp.where(keep_BxTxF, jnp.abs(act_gate_BxTxF).astype(jnp.float32), jnp.inf)
    if mode == "global":
        return jnp.min(a)
    per_token_BxT = jnp.min(a, axis=-1)
    v = valid_BxT.astype(bool) & jnp.isfinite(per_token_BxT)
    return jnp.sum(jnp.where(v, per_token_BxT, 0.0)) / jnp.maximum(v.sum(), 1)


# ---------------------------------------------------------------------------------------------------------------
# CETT
# ---------------------------------------------------------------------------------------------------------------
def ffn_out_norms(x1_BxTxF: Array, w_down_FxD: Array) -> Array:
    """||FFN(x)|| = ||x1 @ W_down|| per token of one layer, [B, T] (the residual scale cancels in CETT)."""
    return jnp.linalg.norm(jnp.einsum("btf,fd->btd", x1_BxTxF.astype(jnp.float32),
                                      w_down_FxD.astype(jnp.float32)), axis=-1)


def cett_sum(x1_BxTxF: Array, w_down_FxD: Array, tau: Array, valid_BxT: Array,
             full_BxT: Array | None = None) -> Array:
    """Sum over valid tokens of ||tail(tau)|| / ||FFN(x)|| for one layer (divide by the token count for CETT).

    The tail holds the neurons with output norm n_i = |x1_i| * ||W_down[i]|| <= tau; tokens with FFN(x) == 0 add 0.
    """
    x1 = x1_BxTxF.astype(jnp.float32)
    w = w_down_FxD.astype(jnp.float32)
    n_BxTxF = neuron_output_norms(x1, jnp.linalg.norm(w, axis=-1))
    tail_BxTxD = jnp.einsum("btf,fd->btd", jnp.where(n_BxTxF <= tau, x1, 0.0), w)
    if full_BxT is None:
        full_BxT = jnp.linalg.norm(jnp.einsum("btf,fd->btd", x1, w), axis=-1)
    ratio_BxT = jnp.where(full_BxT > 0, jnp.linalg.norm(tail_BxTxD, axis=-1) / jnp.maximum(full_BxT, 1e-30), 0.0)
    return jnp.sum(ratio_BxT * valid_BxT.astype(jnp.float32))


def cett(x1_BxTxF: Array, w_down_FxD: Array, tau: float | Array, valid_BxT: Array | None = None) -> Array:
    """CETT(tau) of one layer: mean over valid tokens of ||sum_{n_i <= tau} x1_i W_down[:, i]|| / ||FFN(x)||."""
    B, T, _ = x1_BxTxF.shape
    valid_BxT = jnp.ones((B, T), bool) if valid_BxT is None else valid_BxT
    s = cett_sum(x1_BxTxF, w_down_FxD, jnp.asarray(tau, jnp.float32), valid_BxT)
    return s / jnp.maximum(valid_BxT.astype(jnp.float32).sum(), 1.0)


@jax.jit
def cett_sums_layers(x1_LxBxTxF: Array, w_down_LxFxD: Array, taus_L: Array, valid_BxT: Array,
                     full_LxBxT: Array) -> Array:
    """Per-layer sums of the CETT ratio over one batch's valid tokens, [L]."""
    return jax.vmap(cett_sum, in_axes=(0, 0, 0, None, 0))(x1_LxBxTxF, w_down_LxFxD, taus_L, valid_BxT, full_LxBxT)


@jax.jit
def full_norms_layers(x1_LxBxTxF: Array, w_down_LxFxD: Array) -> Array:
    """||FFN(x)|| per layer and token, [L, B, T]."""
    return jax.vmap(ffn_out_norms)(x1_LxBxTxF, w_down_LxFxD)


@jax.jit
def max_neuron_norm_layers(x1_LxBxTxF: Array, norms_LxF: Array) -> Array:
    """max_i n_i per layer over one batch, [L]."""
    return jnp.max(jnp.abs(x1_LxBxTxF.astype(jnp.float32)) * norms_LxF[:, None, None, :], axis=(1, 2, 3))


class CETTCache:
    """Captured x1 of several batches ((x1_LxBxTxF, valid_BxT) pairs) and what the CETT bisection reuses, so it needs
    no forward passes."""

    def __init__(self, w_down_LxFxD: Array, batches: list[tuple[Array, Array]]) -> None:
        self.w_down_LxFxD = jnp.asarray(w_down_LxFxD, jnp.float32)
        self.batches = batches
        self.norms_LxF = jnp.linalg.norm(self.w_down_LxFxD, axis=-1)
        self.full = [full_norms_layers(x1, self.w_down_LxFxD) for x1, _ in batches]
        self.n_tokens = float(sum(float(v.astype(jnp.float32).sum()) for _, v in batches))
        self.tau_max_L = np.max(np.stack([np.asarray(max_neuron_norm_layers(x1, self.norms_LxF))
                                          for x1, _ in batches]), axis=0).astype(np.float64)

    def cett(self, taus_L: Any) -> np.ndarray:
        """CETT per layer at per-layer thresholds tau, [L] (pooled over all cached tokens)."""
        t = jnp.asarray(np.asarray(taus_L, np.float32))
        s = sum(np.asarray(cett_sums_layers(x1, self.w_down_LxFxD, t, v, f), np.float64)
                for (x1, v), f in zip(self.batches, self.full, strict=True))
        return s / max(self.n_tokens, 1.0)

    def bisect(self, target: float, *, iters: int = 40, tol: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
        """Per-layer tau with CETT(tau) <= target as close as bisection gets; returns (taus_L float32, cett_L).

        Bisection on [0, max n_i] (CETT(0) = 0, CETT(max n_i) = 1), all layers at once, for ``iters`` steps or until
        every layer is within ``tol`` below the target. The returned tau is the lower bracket end, so the achieved
        CETT never exceeds the target. CETT is monotone in tau only for orthogonal W_down rows (a neuron added to the
        tail can cancel part of its sum); bisection finds a crossing of the target.
        """
        L = self.tau_max_L.shape[0]
        lo, hi = np.zeros(L), self.tau_max_L.copy()
        c_lo = np.zeros(L)
        if target >= 1.0:
            return hi.astype(np.float32), self.cett(hi.astype(np.float32))
        for _ in range(iters):
            mid = (lo + hi) / 2
            c = self.cett(mid.astype(np.float32))
            below = c <= target
            lo, c_lo = np.where(below, mid, lo), np.where(below, c, c_lo)
            hi = np.where(below, hi, mid)
            if np.all(target - c_lo <= tol):
                break
        return lo.astype(np.float32), c_lo


# ---------------------------------------------------------------------------------------------------------------
# Per-batch statistics of a mask
# ---------------------------------------------------------------------------------------------------------------
@jax.jit
def mask_stats(active_LxBxTxF: Array, valid_BxT: Array, positions_BxT: Array) -> dict[str, Array]:
    """Counts of active units for accumulation over batches.

    Returns:
      active_L: active units over valid tokens; neuron_active_LxF: tokens on which each neuron is active;
      pos_active_LxT: active units at each position (RoPE position within the document); pos_tokens_T: valid tokens
      at each position; tokens: valid tokens.
    """
    T = valid_BxT.shape[1]
    v_BxT = valid_BxT.astype(jnp.float32)
    act_LxBxT = jnp.sum(active_LxBxTxF.astype(jnp.float32), axis=-1) * v_BxT
    onehot_BxTxP = jax.nn.one_hot(jnp.clip(positions_BxT, 0, T - 1), T, dtype=jnp.float32) * v_BxT[..., None]
    return {
        "active_L": jnp.sum(act_LxBxT, axis=(1, 2)),
        "neuron_active_LxF": jnp.einsum("lbtf,bt->lf", active_LxBxTxF.astype(jnp.float32), v_BxT),
        "pos_active_LxT": jnp.einsum("lbt,btp->lp", act_LxBxT, onehot_BxTxP),
        "pos_tokens_T": onehot_BxTxP.sum(axis=(0, 1)),
        "tokens": v_BxT.sum(),
    }


def summarize_stats(stats: dict[str, np.ndarray], d_ff: int) -> dict[str, Any]:
    """Activation ratios, per-neuron firing frequencies and the per-position heatmap from accumulated
    :func:`mask_stats`."""
    tok = max(float(stats["tokens"]), 1.0)
    ratio_L = stats["active_L"] / (tok * d_ff)
    pos_tok_T = stats["pos_tokens_T"]
    heat_LxT = np.where(pos_tok_T > 0, stats["pos_active_LxT"] / np.maximum(pos_tok_T, 1.0) / d_ff, np.nan)
    return {
        "activation_ratio_per_layer": [float(x) for x in ratio_L],
        "activation_ratio": float(np.mean(ratio_L)),
        "sparsity": float(1.0 - np.mean(ratio_L)),
        "tokens_measured": int(round(float(stats["tokens"]))),
        "heatmap_LxT": heat_LxT,
        "freq_LxF": stats["neuron_active_LxF"] / tok,
    }


def add_stats(acc: dict[str, np.ndarray] | None, s: dict[str, Array]) -> dict[str, np.ndarray]:
    """acc + s (numpy, float64)."""
    s = {k: np.asarray(v, np.float64) for k, v in jax.device_get(s).items()}
    return s if acc is None else {k: acc[k] + s[k] for k in acc}


# ---------------------------------------------------------------------------------------------------------------
# x1 hooks of the gate rules (topk / fat sparse loss), see model.X1Mask: they rule on |act(gate)|, which for SiLU is
# not a rule on |x1| (x1 = act(gate) * up); cett / pplp use the model's own model.neuron_norm_mask
# ---------------------------------------------------------------------------------------------------------------
def fat_x1_mask(eps_L: Array) -> X1Mask:
    """FAT-eps in the model: x1_i zeroed where |act(gate_i)| < eps_l (layer l's eps from ``eps_L``)."""
    eps_L = jnp.asarray(eps_L, jnp.float32)

    def mask(layer: Array, x1_BxTxF: Array, act_gate_BxTxF: Array, valid_BxT: Array, x_BxTxD: Array | None = None
             ) -> Array:
        del valid_BxT, x_BxTxD
        return jnp.where(fat_mask(act_gate_BxTxF, eps_L[layer]), x1_BxTxF, jnp.zeros_like(x1_BxTxF))

    return mask


def topk_x1_mask(k_L: Array, mode: str) -> X1Mask:
    """Top-k in the model: x1 kept on the k-fraction of largest |act(gate)| (:func:`topk_mask` in ``mode``)."""
    k_L = jnp.asarray(k_L, jnp.float32)

    def mask(layer: Array, x1_BxTxF: Array, act_gate_BxTxF: Array, valid_BxT: Array, x_BxTxD: Array | None = None
             ) -> Array:
        del x_BxTxD
        keep_BxTxF = topk_mask(act_gate_BxTxF, k_L[layer], mode, valid_BxT)
        return jnp.where(keep_BxTxF, x1_BxTxF, jnp.zeros_like(x1_BxTxF))

    return mask
