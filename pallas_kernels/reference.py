"""Pure-jnp references and input checks for the Pallas sparse FFN kernels (ProSparse §4.3 S2 / S3).

S2: ``x1 = act(x W_gate) * (x W_up)``, W_up read only for active neurons (the gate decides, or, with ``tau``, the
neuron-norm mode of Sparsing Law §4.1 keeps i iff ``|x1_i| * ||W_down[i, :]|| > tau`` and only S3 skips). S3:
``out = x1 @ W_down`` over the rows whose x1 column is non-zero. ``w_up_FxD`` / ``w_down_FxD`` hold one contiguous row
per neuron; a batch of 1..``MAX_BATCH`` tokens shares the union active set; float32 accumulation; a dropped neuron's
weights are never read, so it contributes exactly zero.

With an activation predictor, S2 also takes ``predicted_F`` (bool [F], the union over the batch of the predictor's
set): a neuron outside it is dropped whatever its gate, so a truly active neuron the predictor misses contributes
nothing (the kernel may then skip its gate as well as its up row).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

#: Input dtypes the kernels accept (weights and activations in the same dtype).
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))

#: Largest decode batch the kernels are built for (the union of the rows' active sets loses sparsity fast beyond it;
#: use the dense FFN for prefill and large batches).
MAX_BATCH = 8


class KernelInputError(ValueError):
    """Inputs a sparse FFN kernel cannot run on; raised before any kernel is traced."""


class GatedActivation(NamedTuple):
    """The FFN activation as the kernels apply it: ``x1 = act(gate, threshold) * (relu(up) if relu_up else up)``.

    The dispatcher builds it from the model's activation registry, so each formula is written once, there. Hashable:
    the jitted kernels take it as a static argument.
    """

    name: str  # for error messages
    act: Callable[[Array, Any], Array]  # elementwise on the gate pre-activation; the second argument is FATReLU's t
    relu_up: bool  # dReLU: relu(gate) * relu(up)
    gate_mask: bool  # act(gate) == 0 makes x1 == 0: the gate alone decides which neurons are active


def gated_product(activation: GatedActivation, gate: Array, up: Array, threshold: Any) -> tuple[Array, Array]:
    """(x1, act(gate)) of ``activation`` on the gate and up pre-activations."""
    act_gate = activation.act(gate, threshold)
    return act_gate * (jax.nn.relu(up) if activation.relu_up else up), act_gate


def capacity_buckets(F: int, chunk: int, top: int | None = None) -> tuple[int, ...]:
    """Capacities ``chunk * 2^k`` below ``top`` (default F) rounded up to whole chunks, then that bound itself.

    A kernel whose grid is static builds one variant per capacity and picks the smallest that holds the active count.
    """
    top = F if top is None else min(top, F)
    last = max(chunk, -(-top // chunk) * chunk)
    caps, cap = [], chunk
    while cap < last:
        caps.append(cap)
        cap *= 2
    caps.append(last)
    return tuple(caps)


def _concrete(value: Any) -> np.ndarray | None:
    """``value`` as a numpy array if it is known at trace time, else None."""
    if isinstance(value, jax.core.Tracer):
        return None
    return np.asarray(value)


def _check_dtype(name: str, arr: Array, want: Any | None = None) -> None:
    dt = jnp.dtype(arr.dtype)
    if dt not in SUPPORTED_DTYPES:
        raise KernelInputError(f"{name}: dtype {dt} is not supported by the sparse FFN kernels; cast to float32 or "
                               "bfloat16")
    if want is not None and dt != jnp.dtype(want):
        raise KernelInputError(f"{name}: dtype {dt} differs from x's {jnp.dtype(want)}; cast the weights to the "
                               "activations' dtype once, before decoding")


def _check_nonneg(name: str, value: Any) -> None:
    v = _concrete(value)
    if v is None:
        return
    if v.size != 1:
        raise KernelInputError(f"{name}: expected a scalar, got shape {v.shape}")
    if not np.isfinite(v) or float(v) < 0:
        raise KernelInputError(f"{name}: {float(v)} must be finite and >= 0 (a negative threshold would keep "
                               "neurons whose gate is zero); check the model config's thresholds")


def check_s2_inputs(x_BxD: Array, w_gate_DxF: Array, w_up_FxD: Array, *, activation: GatedActivation,
                    threshold: Any = 0.0, tau: Any = None, w_down_norms_F: Array | None = None,
                    predicted_F: Array | None = None) -> None:
    """Raises :class:`KernelInputError` naming the problem and the fix; returns None when S2 can run."""
    if not isinstance(activation, GatedActivation):
        raise KernelInputError(f"activation={activation!r}: pass a GatedActivation "
                               "(prosparse_jax.inference.sparse_ffn.kernel_activation(name))")
    if tau is None and not activation.gate_mask and predicted_F is None:
        raise KernelInputError(
            f"activation {activation.name!r} has no exact zeros, so the gate cannot decide which neurons to skip; "
            "pass tau and w_down_norms_F (the neuron-norm sparse mode, from `python -m prosparse_jax.main.analyze "
            "--metric=pplp`) or use a ReLU-family activation")
    if x_BxD.ndim != 2:
        raise KernelInputError(f"x_BxD: expected [batch, d_model], got shape {x_BxD.shape}; flatten batch and time")
    B, D = x_BxD.shape
    if not 1 <= B <= MAX_BATCH:
        raise KernelInputError(f"x_BxD: batch {B} outside 1..{MAX_BATCH}; the sparse kernels are for decode tokens "
                               "(use the dense FFN for prefill)")
    _check_dtype("x_BxD", x_BxD)
    if w_gate_DxF.ndim != 2 or w_gate_DxF.shape[0] != D:
        raise KernelInputError(f"w_gate_DxF: shape {w_gate_DxF.shape} does not match x's d_model {D}; expected "
                               f"[{D}, d_ff]")
    F = w_gate_DxF.shape[1]
    if w_up_FxD.shape != (F, D):
        raise KernelInputError(f"w_up_FxD: shape {w_up_FxD.shape}, expected ({F}, {D}) (W_up transposed: one row "
                               "per neuron; sparse_ffn.prepare_weights makes it)")
    _check_dtype("w_gate_DxF", w_gate_DxF, x_BxD.dtype)
    _check_dtype("w_up_FxD", w_up_FxD, x_BxD.dtype)
    _check_nonneg("threshold", threshold)
    if tau is not None:
        _check_nonneg("tau", tau)
        if w_down_norms_F is None:
            raise KernelInputError("tau given without w_down_norms_F; pass ||W_down[i, :]|| "
                                   "(sparse_ffn.prepare_weights)")
        if w_down_norms_F.shape != (F,):
            raise KernelInputError(f"w_down_norms_F: shape {w_down_norms_F.shape}, expected ({F},)")
    if predicted_F is not None and (predicted_F.shape != (F,) or jnp.dtype(predicted_F.dtype) != jnp.bool_):
        raise KernelInputError(f"predicted_F: shape {predicted_F.shape} dtype {jnp.dtype(predicted_F.dtype)}, expected "
                               f"bool ({F},) (the union over the batch of the predictor's active set)")


def check_s3_inputs(x1_BxF: Array, w_down_FxD: Array) -> None:
    """Raises :class:`KernelInputError` naming the problem and the fix; returns None when S3 can run."""
    if x1_BxF.ndim != 2:
        raise KernelInputError(f"x1_BxF: expected [batch, d_ff], got shape {x1_BxF.shape}")
    B, F = x1_BxF.shape
    if not 1 <= B <= MAX_BATCH:
        raise KernelInputError(f"x1_BxF: batch {B} outside 1..{MAX_BATCH}; use the dense FFN for prefill")
    _check_dtype("x1_BxF", x1_BxF)
    if w_down_FxD.ndim != 2 or w_down_FxD.shape[0] != F:
        raise KernelInputError(f"w_down_FxD: shape {w_down_FxD.shape} does not match x1's d_ff {F}; expected "
                               f"[{F}, d_model]")
    _check_dtype("w_down_FxD", w_down_FxD, x1_BxF.dtype)


def s2_reference(x_BxD: Array, w_gate_DxF: Array, w_up_FxD: Array, *, activation: GatedActivation,
                 threshold: Any = 0.0, tau: Any = None, w_down_norms_F: Array | None = None,
                 predicted_F: Array | None = None) -> Array:
    """x1_BxF of S2 in plain jnp (float32 accumulation), zero for every dropped neuron (and every neuron outside
    ``predicted_F`` when given)."""
    check_s2_inputs(x_BxD, w_gate_DxF, w_up_FxD, activation=activation, threshold=threshold, tau=tau,
                    w_down_norms_F=w_down_norms_F, predicted_F=predicted_F)
    hi = jax.lax.Precision.HIGHEST
    x = x_BxD.astype(jnp.float32)
    gate_BxF = jnp.dot(x, w_gate_DxF.astype(jnp.float32), precision=hi)
    up_BxF = jnp.dot(x, w_up_FxD.astype(jnp.float32).T, precision=hi)
    x1_BxF, act_BxF = gated_product(activation, gate_BxF, up_BxF, threshold)
    if tau is None:
        keep_F = jnp.any(act_BxF != 0, axis=0)  # the union active set: only these up rows are read
        x1_BxF = jnp.where(keep_F, x1_BxF, 0.0)
    else:
        norms_BxF = jnp.abs(x1_BxF) * w_down_norms_F.astype(jnp.float32)
        x1_BxF = jnp.where(norms_BxF > jnp.asarray(tau, jnp.float32), x1_BxF, 0.0)
    if predicted_F is not None:
        x1_BxF = jnp.where(predicted_F, x1_BxF, 0.0)
    return x1_BxF.astype(x_BxD.dtype)


def s3_reference(x1_BxF: Array, w_down_FxD: Array) -> Array:
    """out_BxD of S3 in plain jnp (float32 accumulation); rows of W_down with an all-zero x1 column are not used."""
    check_s3_inputs(x1_BxF, w_down_FxD)
    active_F = jnp.any(x1_BxF != 0, axis=0)
    w = jnp.where(active_F[:, None], w_down_FxD.astype(jnp.float32), 0.0)  # inactive rows never contribute
    out = jnp.dot(x1_BxF.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    return out.astype(x1_BxF.dtype)
