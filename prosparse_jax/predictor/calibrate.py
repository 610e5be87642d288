"""Per-layer decision thresholds for a target recall, chosen on held-out data.

The predictor's logits of the truly active neurons (valid tokens only) are counted per layer into a fixed histogram
(:data:`N_BINS` bins of width 1/128 over [-32, 32), plus one bin below and one above), summed over the calibration
batches on the device: memory does not grow with the data. The threshold of layer l is the lower edge of the highest
bin whose suffix holds at least ``target`` of the layer's active neurons, less half a bin, so that on the calibration
data ``recall_l >= target`` (a neuron is predicted iff its logit > threshold). A layer with no positive below -32 at
that quantile gets -inf (every neuron predicted); a layer never active predicts none (the largest float32).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prosparse_jax.errors import UsageError
from prosparse_jax.predictor.core import Predictor, layer_logits

LO, HI = -32.0, 32.0
N_BINS = 8192
BIN_WIDTH = (HI - LO) / N_BINS  # 1/128, exact in float32


def check_target(target: float) -> float:
    """``target`` if it is a recall in (0, 1]; else a :class:`UsageError`."""
    if not 0.0 < target <= 1.0:
        raise UsageError(f"target_recall: must be in (0, 1], got {target} (e.g. --target_recall=0.99)")
    return float(target)


@jax.jit
def positive_histogram(pred: Predictor, x_LxMxD: jax.Array, active_LxMxF: jax.Array, valid_M: jax.Array
                       ) -> jax.Array:
    """[L, N_BINS + 2] int32 counts of the logits of the active neurons of valid tokens (bin 0: < LO, last: >= HI)."""

    def one(args: tuple[jax.Array, ...]) -> jax.Array:
        w1_DxR, w2_RxF, b2_F, x_MxD, active_MxF = args
        z_MxF = layer_logits(w1_DxR, w2_RxF, b2_F, x_MxD)
        bins_MxF = jnp.clip(jnp.floor((z_MxF - LO) / BIN_WIDTH).astype(jnp.int32) + 1, 0, N_BINS + 1)
        weight_MxF = (active_MxF & valid_M[:, None]).astype(jnp.int32)
        return jnp.zeros((N_BINS + 2,), jnp.int32).at[bins_MxF.reshape(-1)].add(weight_MxF.reshape(-1))

    return jax.lax.map(one, (pred["w1_LxDxR"], pred["w2_LxRxF"], pred["b2_LxF"], x_LxMxD, active_LxMxF))


def thresholds_for_recall(hist_LxK: Any, target: float) -> np.ndarray:
    """Per-layer thresholds [L] (float32) reaching recall >= ``target`` on the histogrammed data (see module)."""
    hist_LxK = np.asarray(hist_LxK, np.int64)
    out = np.empty(hist_LxK.shape[0], np.float32)
    for layer, h_K in enumerate(hist_LxK):
        total = int(h_K.sum())
        if total == 0:
            out[layer] = np.finfo(np.float32).max
            continue
        suffix_K = np.cumsum(h_K[::-1])[::-1]  # positives with a bin >= k
        b = int(np.nonzero(suffix_K >= target * total)[0].max())  # the highest bin reaching the target
        out[layer] = -np.inf if b == 0 else LO + (b - 1) * BIN_WIDTH - BIN_WIDTH / 2
    return out


def calibrate(pred: Predictor, batches: Iterable[tuple[jax.Array, jax.Array, jax.Array]], target: float
              ) -> tuple[np.ndarray, int]:
    """(threshold_L, tokens used) for recall ``target`` on the collected held-out ``batches`` of
    (x_LxMxD, active_LxMxF, valid_M)."""
    target = check_target(target)
    hist, tokens = None, 0
    for x_LxMxD, active_LxMxF, valid_M in batches:
        h = positive_histogram(pred, x_LxMxD, active_LxMxF, valid_M)
        hist = h if hist is None else hist + h
        tokens += int(jnp.sum(valid_M))
    if hist is None:
        raise UsageError("calibration: no held-out batches; raise --calib_batches")
    return thresholds_for_recall(jax.device_get(hist), target), tokens
