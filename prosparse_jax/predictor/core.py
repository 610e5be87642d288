"""Activation predictors: the formula, the parameters and their checks (one source for training, measuring and the
sparse FFN kernels).

Per layer l, a rank-r network scores every neuron from the FFN's input ``x`` (the hidden state after the FFN's
RMSNorm, i.e. exactly what the gate projection reads)::

    logits_F = relu(x_D @ w1_DxR) @ w2_RxF + b2_F        predicted active  <=>  logits > threshold_l

(Deja Vu's ``Linear(d, r) -> Linear(r, d_ff)`` and PowerInfer's predictors, with the per-neuron bias that lets the
network start from each neuron's firing rate). ``threshold_L`` is calibrated on held-out data for a target recall
(:mod:`prosparse_jax.predictor.calibrate`); it is +inf-free: ``-inf`` predicts every neuron active.

Parameters are stacked over layers: ``{"w1_LxDxR", "w2_LxRxF", "b2_LxF", "threshold_L"}`` (float32).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from prosparse_jax.config import ModelConfig
from prosparse_jax.errors import InputError

Array = jax.Array
Predictor = dict[str, Any]

PARAM_NAMES = ("w1_LxDxR", "w2_LxRxF", "b2_LxF", "threshold_L")


def init_predictor(cfg: ModelConfig, rank: int, rng: Array, *, init_std: float = 0.02) -> Predictor:
    """Random float32 predictor for a model of config ``cfg``: w1 ~ N(0, 1/sqrt(D)), w2 ~ N(0, init_std), b2 = 0,
    thresholds 0 (logit 0 = probability 1/2) until calibrated."""
    if rank < 1:
        raise InputError(f"predictor rank must be >= 1, got {rank}; pass --rank=<int> (e.g. 256)")
    L, D, F = cfg.n_layers, cfg.d_model, cfg.d_ff
    k1, k2 = jax.random.split(rng)
    return {
        "w1_LxDxR": jax.random.normal(k1, (L, D, rank), jnp.float32) / jnp.sqrt(jnp.float32(D)),
        "w2_LxRxF": init_std * jax.random.normal(k2, (L, rank, F), jnp.float32),
        "b2_LxF": jnp.zeros((L, F), jnp.float32),
        "threshold_L": jnp.zeros((L,), jnp.float32),
    }


def layer_logits(w1_DxR: Array, w2_RxF: Array, b2_F: Array, x_MxD: Array) -> Array:
    """Predictor scores of one layer for rows ``x_MxD`` (float32 [M, F])."""
    h_MxR = jax.nn.relu(x_MxD.astype(jnp.float32) @ w1_DxR.astype(jnp.float32))
    return h_MxR @ w2_RxF.astype(jnp.float32) + b2_F.astype(jnp.float32)


def logits(pred: Predictor, layer: Array | int, x_BxTxD: Array) -> Array:
    """Predictor scores of layer ``layer`` (an int or a traced int32 scalar) for FFN inputs [B, T, D] -> [B, T, F]."""
    B, T, D = x_BxTxD.shape
    out_MxF = layer_logits(pred["w1_LxDxR"][layer], pred["w2_LxRxF"][layer], pred["b2_LxF"][layer],
                           x_BxTxD.reshape(B * T, D))
    return out_MxF.reshape(B, T, -1)


def predicted_mask(pred: Predictor, layer: Array | int, x_BxTxD: Array) -> Array:
    """The predicted active set of layer ``layer``: logits > the layer's calibrated threshold, bool [B, T, F]."""
    return logits(pred, layer, x_BxTxD) > pred["threshold_L"][layer]


def rank(pred: Predictor) -> int:
    """The predictor's rank r."""
    return int(pred["w1_LxDxR"].shape[-1])


def check_predictor(pred: Predictor, cfg: ModelConfig, where: str = "predictor") -> None:
    """Refuses (one line naming the mismatch) a predictor that is not for a model of config ``cfg``."""
    missing = [n for n in PARAM_NAMES if n not in pred]
    if missing:
        raise InputError(f"{where}: not a predictor (missing {', '.join(missing)}); train one with "
                         "`python -m prosparse_jax.main.predictor train`")
    L, D, F = cfg.n_layers, cfg.d_model, cfg.d_ff
    r = pred["w1_LxDxR"].shape[-1] if len(pred["w1_LxDxR"].shape) == 3 else -1
    want = {"w1_LxDxR": (L, D, r), "w2_LxRxF": (L, r, F), "b2_LxF": (L, F), "threshold_L": (L,)}
    for name, shape in want.items():
        got = tuple(pred[name].shape)
        if got != shape:
            raise InputError(f"{where}: {name} has shape {got} but the model needs {shape} (n_layers={L}, "
                             f"d_model={D}, d_ff={F}): this predictor was trained for another model; train one "
                             "for this checkpoint")
