"""Activation-sparse gated FFN for decoding: one interface, backends that differ only in how they skip neurons.

As in ProSparse (arXiv 2402.13516, §4.3) the gate projection is dense and only the active neurons' rows of W_up^T and
W_down are read. The neuron-norm mode (CETT, Sparsing Law §4.1: neuron i dropped iff |x1_i| * ||W_down[i, :]|| <= tau;
any activation) needs the full up projection to know x1, so it skips W_down rows only. A batch reads the union of its
rows' active sets; under ``jax.vmap`` the skipping is lost (docs/inference.md: backends, bounds, batches).

With an activation predictor (:class:`LayerPredictor`, the formula of :mod:`prosparse_jax.predictor.core`) only the
neurons it predicts for some row of the batch are computed: x1 is kept on the predicted and truly active neurons, so
a truly active neuron the predictor misses contributes nothing. ``cpu_ffi`` then reads only the predicted neurons'
rows of W_gate^T as well (:func:`prosparse_jax.inference.cpu_ffi.predict_gate`); the other backends compute the same
set in XLA. A model without exact zeros (SiLU) can decode with a predictor alone: its set is the sparse mode.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import sparse_ffn_compact, sparse_ffn_mosaic, sparse_ffn_triton
from pallas_kernels.reference import GatedActivation, KernelInputError, capacity_buckets, gated_product
from prosparse_jax import errors
from prosparse_jax.inference import cpu_ffi
from prosparse_jax.model.activations import ACTIVATIONS, RELU_FAMILY, check_activation
from prosparse_jax.predictor import core as predictor_core

Array = jax.Array

#: Active density (active neurons / F) above which ``cpu_gather`` runs the dense FFN, near its break-even
#: (``experiments/bench_sparse_ffn.py --crossover``); ``buckets`` moves it per shape.
DENSE_CROSSOVER = 0.3

#: Active density above which ``cpu_ffi`` runs the dense FFN (at density 1 it reads the dense FFN's bytes, so only
#: nearly dense inputs fall back); the largest of ``buckets`` moves it.
CPU_FFI_CROSSOVER = 0.8

#: Neurons per iteration of the ``cpu_gather`` loop.
DEFAULT_CHUNK = 128

#: Activations whose gate output alone decides the active set (x1_i = 0 whenever act(gate_i) = 0).
GATE_MASK_ACTIVATIONS = RELU_FAMILY


def kernel_activation(name: str) -> GatedActivation:
    """The registered activation ``name`` as the kernels take it (the formula stays in the model's registry)."""
    check_activation(name)
    act, on_up = ACTIVATIONS[name]
    return GatedActivation(name, act, on_up, name in GATE_MASK_ACTIVATIONS)


def prepare_weights(w_up_DxF: Array, w_down_FxD: Array, w_gate_DxF: Array | None = None) -> dict[str, Array]:
    """The per-layer tensors the sparse backends read: ``w_up_FxD`` (W_up^T, rows = neurons) and ``w_down_norms_F``
    (||W_down[i, :]||), and with ``w_gate_DxF`` W_gate^T ``w_gate_FxD`` (the predictor path of ``cpu_ffi`` reads the
    predicted neurons' gate rows). Compute once per model, outside the decode step, and pass them to
    :func:`sparse_ffn`."""
    out = {"w_up_FxD": jnp.asarray(w_up_DxF).T.copy(),
           "w_down_norms_F": jnp.linalg.norm(jnp.asarray(w_down_FxD, jnp.float32), axis=-1)}
    if w_gate_DxF is not None:
        out["w_gate_FxD"] = jnp.asarray(w_gate_DxF).T.copy()
    return out


def default_buckets(F: int, chunk: int, crossover: float = DENSE_CROSSOVER) -> tuple[int, ...]:
    """The ``cpu_gather`` capacities: chunk * 2^k up to crossover * F in whole chunks, the last one exactly that."""
    return capacity_buckets(F, chunk, int(crossover * F))


class LayerPredictor(NamedTuple):
    """One layer's activation predictor: neuron i is predicted active iff ``relu(x w1) w2 + b2 > threshold``
    (:func:`prosparse_jax.predictor.core.layer_logits`) on some row of the batch."""

    w1_DxR: Array  # noqa: N815 (shape suffix)
    w2_RxF: Array  # noqa: N815
    b2_F: Array  # noqa: N815
    threshold: Any  # the layer's calibrated threshold, one float (may be traced); -inf predicts every neuron


def layer_predictor(pred: predictor_core.Predictor, layer: Array | int) -> LayerPredictor:
    """Layer ``layer`` (an int or a traced int32 scalar) of a predictor stacked over layers
    (:mod:`prosparse_jax.predictor.core`)."""
    return LayerPredictor(pred["w1_LxDxR"][layer], pred["w2_LxRxF"][layer], pred["b2_LxF"][layer],
                          pred["threshold_L"][layer])


def _threshold(predictor: LayerPredictor) -> Array:
    return jnp.asarray(predictor.threshold, jnp.float32).reshape(())


def predicted_set(x_BxD: Array, predictor: LayerPredictor) -> Array:
    """The predictor's set for the batch ``x_BxD``: bool [F], the union over its rows of logits > threshold."""
    logits_BxF = predictor_core.layer_logits(predictor.w1_DxR, predictor.w2_RxF, predictor.b2_F, x_BxD)
    return jnp.any(logits_BxF > _threshold(predictor), axis=0)


def check_predictor(predictor: LayerPredictor, D: int, F: int) -> None:
    """Refuses (one line naming the shapes) a predictor that is not for an FFN of d_model ``D`` and d_ff ``F``."""
    if not isinstance(predictor, LayerPredictor):
        raise errors.UsageError(f"sparse_ffn: predictor must be a LayerPredictor (layer_predictor(pred, layer)), "
                                f"got {type(predictor).__name__}")
    w1 = tuple(predictor.w1_DxR.shape)
    if len(w1) != 2 or w1[0] != D:
        raise errors.UsageError(f"sparse_ffn: predictor w1_DxR has shape {w1}, expected ({D}, rank); pass this "
                                "layer's predictor of this model")
    want = {"w2_RxF": (w1[1], F), "b2_F": (F,)}
    for name, shape in want.items():
        got = tuple(getattr(predictor, name).shape)
        if got != shape:
            raise errors.UsageError(f"sparse_ffn: predictor {name} has shape {got}, expected {shape} (d_model={D}, "
                                    f"d_ff={F}, rank={w1[1]}); pass this layer's predictor of this model")
    if jnp.size(predictor.threshold) != 1:
        raise errors.UsageError(f"sparse_ffn: predictor threshold has shape {jnp.shape(predictor.threshold)}, "
                                "expected one float (the layer's threshold_L[l])")


class FFNWeights(NamedTuple):
    """One layer's FFN weights as the backends read them."""

    w_gate_DxF: Array  # noqa: N815 (shape suffix)
    w_up_DxF: Array  # noqa: N815
    w_down_FxD: Array  # noqa: N815
    w_up_FxD: Array | None  # noqa: N815 - W_up^T prepared once per model (prepare_weights), or None
    w_down_norms_F: Array | None  # noqa: N815 - ||W_down[i, :]||: the neuron-norm mode only
    w_gate_FxD: Array | None = None  # noqa: N815 - W_gate^T (prepare_weights with w_gate_DxF), or None

    def up_rows(self) -> Array:
        """W_up^T, one row per neuron: the prepared one, else transposed here (a full read of W_up)."""
        return self.w_up_DxF.T if self.w_up_FxD is None else self.w_up_FxD

    def gate_rows(self) -> Array:
        """W_gate^T, one row per neuron: the prepared one, else transposed here (a full read of W_gate)."""
        return self.w_gate_DxF.T if self.w_gate_FxD is None else self.w_gate_FxD


class Mode(NamedTuple):
    """What decides the active neurons, and the ``cpu_gather`` loop's knobs (see :func:`sparse_ffn`)."""

    activation: GatedActivation
    threshold: Any
    tau: Any
    chunk: int
    buckets: tuple[int, ...] | None
    predictor: LayerPredictor | None = None


# ---------------------------------------------------------------------------------------------------------------
# Active set
# ---------------------------------------------------------------------------------------------------------------
def _active_set(x_BxD: Array, w: FFNWeights, mode: Mode, gate_BxF: Array | None = None,
                predicted_F: Array | None = None) -> tuple[Array, Array, Array | None]:
    """(active_F, act_gate_BxF, x1_BxF or None): the union over the batch of the neurons to read.

    Gate-mask mode: act(gate) != 0 (dReLU's up > 0 is applied after reading W_up). Neuron-norm mode (``tau``): x1 in
    full, active iff |x1| * ||W_down[i]|| > tau, returned masked so only W_down remains to be read. With a predictor,
    also inside its set (``predicted_F``, else :func:`predicted_set`); ``gate_BxF``: the gate when already computed.
    """
    if gate_BxF is None:
        gate_BxF = x_BxD @ w.w_gate_DxF.astype(x_BxD.dtype)
    if predicted_F is None and mode.predictor is not None:
        predicted_F = predicted_set(x_BxD, mode.predictor)
    if mode.tau is None:
        act_BxF = mode.activation.act(gate_BxF, mode.threshold)
        if predicted_F is not None:
            act_BxF = jnp.where(predicted_F, act_BxF, jnp.zeros_like(act_BxF))
        return jnp.any(act_BxF != 0, axis=0), act_BxF, None
    up_BxF = x_BxD @ w.w_up_DxF.astype(x_BxD.dtype)
    x1_BxF, act_BxF = gated_product(mode.activation, gate_BxF, up_BxF, mode.threshold)
    norms_BxF = jnp.abs(x1_BxF.astype(jnp.float32)) * w.w_down_norms_F
    keep_BxF = norms_BxF > jnp.asarray(mode.tau, jnp.float32)
    if predicted_F is not None:
        keep_BxF = keep_BxF & predicted_F
    x1_BxF = jnp.where(keep_BxF, x1_BxF, jnp.zeros_like(x1_BxF))
    return jnp.any(keep_BxF, axis=0), act_BxF, x1_BxF


def _x1_from_up(activation: GatedActivation, act_BxC: Array, up_BxC: Array) -> Array:
    """x1 = act(gate) * up on gathered columns (dReLU: relu(up))."""
    return act_BxC * (jax.nn.relu(up_BxC) if activation.relu_up else up_BxC)


# ---------------------------------------------------------------------------------------------------------------
# Backends: (x_BxD, weights, mode) -> (out_BxD, active_count)
# ---------------------------------------------------------------------------------------------------------------
def _dense_down(x_BxD: Array, w: FFNWeights, act_BxF: Array, x1_BxF: Array | None, mode: Mode) -> Array:
    """The dense remainder of the FFN: up projection (unless x1 is known) and down projection."""
    if x1_BxF is None:
        x1_BxF = _x1_from_up(mode.activation, act_BxF, x_BxD @ w.w_up_DxF.astype(x_BxD.dtype))
    return x1_BxF @ w.w_down_FxD.astype(x1_BxF.dtype)


def _dense_impl(x_BxD: Array, w: FFNWeights, mode: Mode) -> tuple[Array, Array]:
    """Reference backend: the dense FFN (same masks, no skipping)."""
    active_F, act_BxF, x1_BxF = _active_set(x_BxD, w, mode)
    return _dense_down(x_BxD, w, act_BxF, x1_BxF, mode), jnp.sum(active_F, dtype=jnp.int32)


def _gather_loop(x_BxD: Array, w: FFNWeights, active_F: Array, act_BxF: Array, x1_BxF: Array | None, mode: Mode,
                 cap: int) -> Array:
    """Sum over the active neurons in chunks of ``mode.chunk``; indices padded to ``cap`` (a multiple of chunk).

    One chunk is gathered at a time: a single ``jnp.take`` of all active rows would materialise the whole gathered
    copy, which is slower than the dense FFN on a CPU.
    """
    chunk = mode.chunk
    count = jnp.sum(active_F, dtype=jnp.int32)
    idx_P = jnp.nonzero(active_F, size=cap, fill_value=0)[0].astype(jnp.int32)
    dt = x_BxD.dtype
    coeff_BxF = act_BxF if x1_BxF is None else x1_BxF
    w_up_FxD = w.up_rows() if x1_BxF is None else None

    def body(k: Array, acc_BxD: Array) -> Array:
        start = k * chunk
        idx_C = lax.dynamic_slice(idx_P, (start,), (chunk,))
        valid_C = (start + jnp.arange(chunk, dtype=jnp.int32)) < count
        c_BxC = jnp.where(valid_C, jnp.take(coeff_BxF, idx_C, axis=1), jnp.zeros((), dt))
        if w_up_FxD is not None:
            up_CxD = jnp.take(w_up_FxD, idx_C, axis=0, mode="clip").astype(dt)
            c_BxC = _x1_from_up(mode.activation, c_BxC, lax.dot_general(x_BxD, up_CxD, (((1,), (1,)), ((), ()))))
        down_CxD = jnp.take(w.w_down_FxD, idx_C, axis=0, mode="clip").astype(dt)
        return acc_BxD + c_BxC @ down_CxD

    n_chunks = (count + chunk - 1) // chunk
    acc0_BxD = jnp.zeros((x_BxD.shape[0], w.w_down_FxD.shape[1]), dt)
    return lax.fori_loop(0, n_chunks, body, acc0_BxD)


def _cpu_gather_impl(x_BxD: Array, w: FFNWeights, mode: Mode) -> tuple[Array, Array]:
    """Gather backend: the smallest capacity bucket holding the active count, or the dense FFN above the last."""
    active_F, act_BxF, x1_BxF = _active_set(x_BxD, w, mode)
    F, chunk = active_F.shape[0], mode.chunk
    caps = default_buckets(F, chunk) if mode.buckets is None else tuple(sorted(mode.buckets))
    if any(c % chunk for c in caps):
        raise errors.UsageError(f"sparse_ffn: bucket capacities {caps} must be multiples of chunk={chunk}")
    count = jnp.sum(active_F, dtype=jnp.int32)
    branch = jnp.searchsorted(jnp.asarray(caps, jnp.int32), count, side="left")  # == len(caps) above the last cap

    def sparse_branch(cap: int) -> Callable[[], Array]:
        return lambda: _gather_loop(x_BxD, w, active_F, act_BxF, x1_BxF, mode, cap)

    branches = [sparse_branch(c) for c in caps] + [lambda: _dense_down(x_BxD, w, act_BxF, x1_BxF, mode)]
    return lax.switch(branch, branches), count


def _predict_gate(x_BxD: Array, w: FFNWeights, predictor: LayerPredictor) -> tuple[Array, Array]:
    """(gate_BxF, predicted_F) in C++: the predictor's set and the gate of its neurons only (0 elsewhere)."""
    f32 = jnp.float32
    h_BxR = jax.nn.relu(x_BxD.astype(f32) @ predictor.w1_DxR.astype(f32))  # predictor_core.layer_logits' first half
    return cpu_ffi.predict_gate(x_BxD, h_BxR, predictor.w2_RxF.astype(f32), predictor.b2_F.astype(f32),
                                _threshold(predictor), w.gate_rows())


def _cpu_ffi_impl(x_BxD: Array, w: FFNWeights, mode: Mode) -> tuple[Array, Array]:
    """C++ backend: the active rows read in place on all cores, any count in one call (no buckets); dense above
    ``CPU_FFI_CROSSOVER`` of F or the largest bucket; inputs other than float32 go to ``cpu_gather``. With a
    predictor the gate is computed for its predicted neurons only (:func:`cpu_ffi.predict_gate`)."""
    w_up = w.w_up_DxF if w.w_up_FxD is None else w.w_up_FxD
    w_gate = w.w_gate_DxF if w.w_gate_FxD is None else w.w_gate_FxD
    read = (x_BxD, w_up, w.w_down_FxD) + ((w_gate,) if mode.predictor is not None else ())
    if not all(a.dtype == jnp.float32 for a in read):
        return _cpu_gather_impl(x_BxD, w, mode)
    gate_BxF = predicted_F = None
    if mode.predictor is not None:
        gate_BxF, predicted_F = _predict_gate(x_BxD, w, mode.predictor)
    active_F, act_BxF, x1_BxF = _active_set(x_BxD, w, mode, gate_BxF, predicted_F)
    cap = max(mode.buckets) if mode.buckets else int(CPU_FFI_CROSSOVER * active_F.shape[0])
    count = jnp.sum(active_F, dtype=jnp.int32)
    read_up = x1_BxF is None

    def sparse() -> Array:
        w_up_FxD = w.up_rows() if read_up else w.w_down_FxD  # not read when x1 is known
        return cpu_ffi.gather_down(x_BxD, act_BxF if read_up else x1_BxF, active_F, w_up_FxD, w.w_down_FxD,
                                   read_up=read_up, drelu=mode.activation.relu_up)

    return lax.cond(count <= cap, sparse, lambda: _dense_down(x_BxD, w, act_BxF, x1_BxF, mode)), count


def _pallas_impl(name: str, kernels: Any, native: str | None = None
                 ) -> Callable[[Array, FFNWeights, Mode], tuple[Array, Array]]:
    """A backend from a ``pallas_kernels`` module's ``s2`` (up rows of the active neurons -> x1; a predictor's set as
    ``predicted_F``) and ``s3`` (W_down rows of x1's non-zero columns: the active count), compiled on the platforms
    whose :data:`AUTO` backend is ``native`` (default ``name``: the same lowering) and interpreted elsewhere (tests)."""

    def impl(x_BxD: Array, w: FFNWeights, mode: Mode) -> tuple[Array, Array]:
        interpret = AUTO.get(jax.default_backend()) != (native or name)
        predicted_F = None if mode.predictor is None else predicted_set(x_BxD, mode.predictor)
        # An interpreted kernel dispatches JAX ops from io_callbacks on an XLA thread: an eager op dispatched by the
        # caller meanwhile can deadlock on the runtime's limit of in-flight computations, so concrete results are
        # waited for before the next op (traced ones are scheduled by XLA).
        wait = interpret and not isinstance(x_BxD, jax.core.Tracer)
        try:
            x1_BxF = kernels.s2(x_BxD, w.w_gate_DxF, w.up_rows(), activation=mode.activation, threshold=mode.threshold,
                                tau=mode.tau, w_down_norms_F=w.w_down_norms_F, predicted_F=predicted_F,
                                interpret=interpret)
            if wait and not isinstance(x1_BxF, jax.core.Tracer):
                x1_BxF = jax.block_until_ready(x1_BxF)
            out_BxD = kernels.s3(x1_BxF, w.w_down_FxD, interpret=interpret)
        except KernelInputError as e:
            raise errors.UsageError(f"sparse_ffn implementation={name!r}: {e}") from e
        if wait and not isinstance(out_BxD, jax.core.Tracer):
            out_BxD = jax.block_until_ready(out_BxD)
        return out_BxD, jnp.sum(jnp.any(x1_BxF != 0, axis=0), dtype=jnp.int32)

    return impl


#: name -> backend ``(x_BxD, weights, mode) -> (out_BxD, active_count)``.
IMPLEMENTATIONS: dict[str, Callable[[Array, FFNWeights, Mode], tuple[Array, Array]]] = {
    "dense": _dense_impl, "cpu_gather": _cpu_gather_impl, "cpu_ffi": _cpu_ffi_impl,
    "pallas_triton": _pallas_impl("pallas_triton", sparse_ffn_triton),
    "pallas_compact": _pallas_impl("pallas_compact", sparse_ffn_compact, native="pallas_triton"),
    "pallas_mosaic": _pallas_impl("pallas_mosaic", sparse_ffn_mosaic)}

#: What ``implementation="auto"`` runs on each platform (anything else: ``dense``). Where the ``cpu_ffi`` kernel
#: cannot be built or loaded (no g++, an unusable cache directory), ``auto`` warns once, naming why, and runs
#: ``cpu_gather``.
AUTO: dict[str, str] = {"cpu": "cpu_ffi", "gpu": "pallas_triton", "cuda": "pallas_triton", "rocm": "pallas_triton",
                        "tpu": "pallas_mosaic"}

_WARNED: set[str] = set()  # the reasons ``auto`` already warned about


def _cpu_ffi_or_gather() -> str:
    """``cpu_ffi`` when its kernel builds and loads here, else ``cpu_gather`` with one warning per reason."""
    try:
        reason = cpu_ffi.unavailable_reason()
    except Exception as e:  # noqa: BLE001 -- any failure of the optional kernel: run cpu_gather and say why
        reason = f"cpu_ffi: {type(e).__name__}: {e}"
    if not reason:
        return "cpu_ffi"
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"sparse_ffn: implementation='auto' runs cpu_gather: {reason}", stacklevel=3)
    return "cpu_gather"


def resolve_implementation(implementation: str, platform: str | None = None) -> str:
    """``auto`` -> the backend of ``platform`` (default: JAX's default backend) in :data:`AUTO`; else checked."""
    if implementation == "auto":
        name = AUTO.get(platform or jax.default_backend(), "dense")
        return _cpu_ffi_or_gather() if name == "cpu_ffi" else name
    if implementation not in IMPLEMENTATIONS:
        raise errors.UsageError(f"unknown sparse FFN implementation {implementation!r}; choose one of: "
                                f"{', '.join(['auto', *IMPLEMENTATIONS])}")
    return implementation


def sparse_ffn(x_BxD: Array, w_gate_DxF: Array, w_up_DxF: Array, w_down_FxD: Array, *, activation: str,
               threshold: float = 0.0, taus: Any = None, w_down_norms_F: Array | None = None,
               w_up_FxD: Array | None = None, implementation: str = "auto", chunk: int = DEFAULT_CHUNK,
               buckets: tuple[int, ...] | None = None, predictor: LayerPredictor | None = None,
               w_gate_FxD: Array | None = None) -> tuple[Array, Array]:
    """The gated FFN act(x W_gate) * (x W_up) @ W_down, reading only the active neurons' weights (jit-compatible).

    Equals ``model.ffn_down(model.ffn_hidden(x))``, with ``model.neuron_norm_mask`` when ``taus`` is given, up to fp32
    summation order; with a ``predictor``, with x1 zeroed outside its set (:func:`predicted_set`).

    Args:
      x_BxD: the normed FFN input of B decode tokens.
      activation: a registry name; outside relu / fatrelu / drelu / relu2 the gate cannot decide the active set and
        ``taus`` or a ``predictor`` is required.
      threshold: FATReLU threshold t (gate >= t kept).
      taus: this layer's scalar threshold of the neuron-norm mode; needs ``w_down_norms_F``.
      w_down_norms_F, w_up_FxD, w_gate_FxD: from :func:`prepare_weights`; without ``w_up_FxD`` W_up is transposed
        per call, and without ``w_gate_FxD`` W_gate (``cpu_ffi`` with a predictor).
      implementation: ``auto`` (:data:`AUTO`) or a key of :data:`IMPLEMENTATIONS`.
      chunk, buckets: ``cpu_gather``'s neurons per loop step and capacities (multiples of ``chunk``; default
        :func:`default_buckets`), dense above the last; ``cpu_ffi`` runs dense above the largest bucket.
      predictor: this layer's activation predictor (:func:`layer_predictor`), or None.

    Returns:
      (out_BxD, int32 size of the batch's union active set, within the predicted set; the Pallas backends count x1's
      non-zero columns).

    Raises:
      errors.UsageError: unknown implementation, a mode missing its inputs, or a predictor of other shapes.
      errors.KernelUnavailableError: ``implementation="cpu_ffi"`` where its kernel cannot be built.
    """
    impl = IMPLEMENTATIONS[resolve_implementation(implementation)]
    act = kernel_activation(activation)
    if taus is None and not act.gate_mask and predictor is None:
        raise errors.UsageError(f"sparse_ffn: activation {activation!r} has no exact zeros; pass taus (the neuron-norm "
                                f"sparse mode) or a predictor (layer_predictor), or use one of "
                                f"{sorted(GATE_MASK_ACTIVATIONS)}")
    if taus is not None and w_down_norms_F is None:
        raise errors.UsageError("sparse_ffn: the neuron-norm mode (taus given) needs w_down_norms_F "
                                "(prepare_weights)")
    D, F = x_BxD.shape[-1], w_gate_DxF.shape[-1]
    if predictor is not None:
        check_predictor(predictor, D, F)
    if w_gate_FxD is not None and tuple(w_gate_FxD.shape) != (F, D):
        raise errors.UsageError(f"sparse_ffn: w_gate_FxD has shape {tuple(w_gate_FxD.shape)}, expected {(F, D)} "
                                "(W_gate^T: prepare_weights(w_up, w_down, w_gate))")
    w = FFNWeights(w_gate_DxF, w_up_DxF, w_down_FxD, w_up_FxD, w_down_norms_F, w_gate_FxD)
    return impl(x_BxD, w, Mode(act, threshold, taus, chunk, buckets, predictor))
