"""How good a predictor is: per layer and on average, recall, predicted sparsity and the predicted/true active ratio on
held-out data; the model's held-out loss when its FFNs compute only the predicted neurons (the x1 hook, in a full
forward); and a frequency baseline (each layer's most often active neurons on training data, with the predictor's
budget) beside it.

Definitions, per layer l over the valid tokens of the measured batches (``active``: the model's own active set,
:mod:`prosparse_jax.predictor.collect`; ``predicted``: logits > threshold_l)::

    recall              = |predicted & active| / |active|
    predicted sparsity  = 1 - |predicted| / (tokens * d_ff)
    ratio               = |predicted| / |active|          (the predicted/true active ratio)
    true sparsity       = 1 - |active| / (tokens * d_ff)

The "mean" of each is the unweighted mean over layers. With the predictor in the loop the FFN computes
predicted & active: x1 is zeroed where a neuron is not predicted (on top of the model's own zeros).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prosparse_jax.config import ModelConfig
from prosparse_jax.model import transformer as model
from prosparse_jax.model.transformer import Params, X1Mask
from prosparse_jax.predictor.collect import make_collect
from prosparse_jax.predictor.core import Predictor, layer_logits, predicted_mask

COUNT_KEYS = ("active_L", "predicted_L", "hit_L")


# ---------------------------------------------------------------------------------------------------------------
# Counts and the metrics made of them
# ---------------------------------------------------------------------------------------------------------------
def mask_counts(predicted_LxMxF: Any, active_LxMxF: Any, valid_M: Any) -> dict[str, np.ndarray]:
    """Per-layer counts of one batch (host): {active_L, predicted_L, hit_L, tokens} over the valid tokens."""
    v = np.asarray(valid_M, bool)[None, :, None]
    p, a = np.asarray(predicted_LxMxF, bool) & v, np.asarray(active_LxMxF, bool) & v
    return {"active_L": a.sum(axis=(1, 2)), "predicted_L": p.sum(axis=(1, 2)), "hit_L": (p & a).sum(axis=(1, 2)),
            "tokens": int(v.sum())}


@jax.jit
def predictor_counts(pred: Predictor, x_LxMxD: jax.Array, active_LxMxF: jax.Array, valid_M: jax.Array
                     ) -> dict[str, jax.Array]:
    """:func:`mask_counts` of the predictor's sets on the device, one layer at a time (int32 [L] each)."""

    def one(args: tuple[jax.Array, ...]) -> jax.Array:
        w1_DxR, w2_RxF, b2_F, t, x_MxD, active_MxF = args
        v_Mx1 = valid_M[:, None]
        p_MxF = (layer_logits(w1_DxR, w2_RxF, b2_F, x_MxD) > t) & v_Mx1
        a_MxF = active_MxF & v_Mx1
        return jnp.stack([jnp.sum(a_MxF, dtype=jnp.int32), jnp.sum(p_MxF, dtype=jnp.int32),
                          jnp.sum(p_MxF & a_MxF, dtype=jnp.int32)])

    c_Lx3 = jax.lax.map(one, (pred["w1_LxDxR"], pred["w2_LxRxF"], pred["b2_LxF"], pred["threshold_L"], x_LxMxD,
                              active_LxMxF))
    return {"active_L": c_Lx3[:, 0], "predicted_L": c_Lx3[:, 1], "hit_L": c_Lx3[:, 2],
            "tokens": jnp.sum(valid_M, dtype=jnp.int32)}


@jax.jit
def keep_counts(keep_LxF: jax.Array, active_LxMxF: jax.Array, valid_M: jax.Array) -> dict[str, jax.Array]:
    """:func:`mask_counts` of a fixed per-layer set ``keep_LxF`` (the frequency baseline) on the device."""
    v_1xMx1 = valid_M[None, :, None]
    a = active_LxMxF & v_1xMx1
    p = jnp.broadcast_to(keep_LxF[:, None, :], a.shape) & v_1xMx1
    return {"active_L": jnp.sum(a, axis=(1, 2), dtype=jnp.int32), "predicted_L": jnp.sum(p, axis=(1, 2),
            dtype=jnp.int32), "hit_L": jnp.sum(p & a, axis=(1, 2), dtype=jnp.int32),
            "tokens": jnp.sum(valid_M, dtype=jnp.int32)}


def add_counts(acc: dict[str, Any] | None, counts: dict[str, Any]) -> dict[str, Any]:
    """Sum of two count dicts (host int64); ``acc`` None starts one."""
    c = {k: np.asarray(jax.device_get(v), np.int64) for k, v in counts.items()}
    return c if acc is None else {k: acc[k] + c[k] for k in acc}


def summarize(counts: dict[str, Any], d_ff: int) -> dict[str, Any]:
    """{per_layer: {recall, predicted_sparsity, ratio, true_sparsity: [L]}, mean: {...}, tokens} of summed counts.

    A layer with no active neuron has recall 1 and ratio inf when it predicts some (JSON: null)."""
    act = np.asarray(counts["active_L"], np.float64)
    pred = np.asarray(counts["predicted_L"], np.float64)
    hit = np.asarray(counts["hit_L"], np.float64)
    cells = max(float(counts["tokens"]), 1.0) * d_ff
    with np.errstate(divide="ignore", invalid="ignore"):
        per = {
            "recall": np.where(act > 0, hit / np.maximum(act, 1), 1.0),
            "predicted_sparsity": 1.0 - pred / cells,
            "ratio": np.where(act > 0, pred / np.maximum(act, 1), np.where(pred > 0, np.inf, 1.0)),
            "true_sparsity": 1.0 - act / cells,
        }
    return {"per_layer": {k: [_num(v) for v in a] for k, a in per.items()},
            "mean": {k: _num(float(np.mean(a))) for k, a in per.items()}, "tokens": int(counts["tokens"])}


def _num(v: float) -> float | None:
    """A float for JSON (None for inf / nan)."""
    v = float(v)
    return v if math.isfinite(v) else None


# ---------------------------------------------------------------------------------------------------------------
# The frequency baseline
# ---------------------------------------------------------------------------------------------------------------
@jax.jit
def active_counts(active_LxMxF: jax.Array, valid_M: jax.Array) -> jax.Array:
    """Per-neuron active-token counts [L, F] (int32) of one batch."""
    return jnp.sum(active_LxMxF & valid_M[None, :, None], axis=1, dtype=jnp.int32)


def frequency_keep(freq_LxF: Any, budget_L: Any) -> np.ndarray:
    """bool [L, F]: per layer the ``budget_L[l]`` most often active neurons (ties: the lower index first)."""
    freq_LxF = np.asarray(freq_LxF)
    keep = np.zeros(freq_LxF.shape, bool)
    for layer, (f_F, k) in enumerate(zip(freq_LxF, np.asarray(budget_L), strict=True)):
        k = int(min(max(k, 0), f_F.size))
        keep[layer, np.argsort(-f_F, kind="stable")[:k]] = True
    return keep


# ---------------------------------------------------------------------------------------------------------------
# In the loop: the x1 hooks
# ---------------------------------------------------------------------------------------------------------------
def predictor_hook(pred: Predictor, params: Params, cfg: ModelConfig) -> X1Mask:
    """The x1 hook computing only predicted & active neurons: the model's own (sparse mode) zeros, and x1 zeroed where
    the predictor, fed the layer's FFN input, does not predict the neuron."""
    base = model.sparse_mode_mask(params, cfg)

    def hook(layer: jax.Array, x1_BxTxF: jax.Array, act_BxTxF: jax.Array, valid_BxT: jax.Array, x_BxTxD: jax.Array
             ) -> jax.Array:
        if base is not None:
            x1_BxTxF = base(layer, x1_BxTxF, act_BxTxF, valid_BxT)
        return jnp.where(predicted_mask(pred, layer, x_BxTxD), x1_BxTxF, jnp.zeros_like(x1_BxTxF))

    return hook


def keep_hook(keep_LxF: jax.Array, params: Params, cfg: ModelConfig) -> X1Mask:
    """The x1 hook computing only the fixed per-layer set ``keep_LxF`` (and the model's own non-zeros)."""
    base = model.sparse_mode_mask(params, cfg)

    def hook(layer: jax.Array, x1_BxTxF: jax.Array, act_BxTxF: jax.Array, valid_BxT: jax.Array) -> jax.Array:
        if base is not None:
            x1_BxTxF = base(layer, x1_BxTxF, act_BxTxF, valid_BxT)
        return jnp.where(keep_LxF[layer], x1_BxTxF, jnp.zeros_like(x1_BxTxF))

    return hook


def make_loss_forward(cfg: ModelConfig, which: str):
    """Jitted (params, batch, arg) -> (NLL sum, weight sum, zero_frac_L of x1 in this forward) of the model as
    configured (``which="model"``), with the predictor ``arg`` in the loop (``"predictor"``) or the fixed sets
    ``arg`` (``"keep"``, bool [L, F])."""

    def f(params: Params, batch: dict[str, jax.Array], arg: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
        hook = {"model": lambda: None, "predictor": lambda: predictor_hook(arg, params, cfg),
                "keep": lambda: keep_hook(arg, params, cfg)}[which]()
        logits_BxTxV, st = model.forward(params, batch["inputs"], cfg, segment_ids_BxT=batch["segment_ids"],
                                         positions_BxT=batch["positions"], x1_mask=hook)
        w_BxT = batch["weights"]
        nll = model.cross_entropy(logits_BxTxV, batch["targets"], w_BxT) * jnp.maximum(w_BxT.sum(), 1.0)
        return nll, w_BxT.sum(), st.zero_frac

    return jax.jit(f)



def report(pred: Predictor, params: Params, cfg: ModelConfig, batches: list[dict[str, jax.Array]],
           on_batch: Any = None) -> dict[str, Any]:
    """The predictor's metrics (:func:`summarize`), and the model's loss and PPL ratio with the predictor in the loop
    against the model as configured (``cfg``, with its sparse mode), on ``batches``; ``on_batch()`` after each."""
    collect = make_collect(cfg)
    f_model, f_pred = make_loss_forward(cfg, "model"), make_loss_forward(cfg, "predictor")
    counts, sums = None, {"model": [0.0, 0.0], "predictor": [0.0, 0.0]}
    for b in batches:
        counts = add_counts(counts, predictor_counts(pred, *collect(params, b)))
        for k, (f, arg) in {"model": (f_model, 0), "predictor": (f_pred, pred)}.items():
            nll, w, _ = f(params, b, arg)
            sums[k][0] += float(nll)
            sums[k][1] += float(w)
        if on_batch is not None:
            on_batch()
    loss = {k: v[0] / max(v[1], 1.0) for k, v in sums.items()}
    return {**summarize(counts, cfg.d_ff), "rank": int(pred["w1_LxDxR"].shape[-1]),
            "threshold_L": [_num(t) for t in np.asarray(pred["threshold_L"])], "loss_model": loss["model"],
            "loss_with_predictor": loss["predictor"], "ppl_ratio": model.ppl_ratio(loss["predictor"], loss["model"])}
