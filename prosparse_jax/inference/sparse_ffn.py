"""Activation-sparse gated FFN for decoding: one interface, backends that differ only in how they skip neurons.

As in ProSparse (arXiv 2402.13516, §4.3) the gate projection is dense and only the active neurons' rows of W_up^T and
W_down are read. The neuron-norm mode (CETT, Sparsing Law §4.1: neuron i dropped iff |x1_i| * ||W_down[i, :]|| <= tau;
any activation) needs the full up projection to know x1, so it skips W_down rows only. A batch reads the union of its
rows' active sets; under ``jax.vmap`` the skipping is lost (docs/inference.md: backends, bounds, batches).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import sparse_ffn_mosaic, sparse_ffn_triton
from pallas_kernels.reference import GatedActivation, KernelInputError, capacity_buckets, gated_product
from prosparse_jax import errors
from prosparse_jax.inference import cpu_ffi
from prosparse_jax.model.activations import ACTIVATIONS, RELU_FAMILY, check_activation

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


def prepare_weights(w_up_DxF: Array, w_down_FxD: Array) -> dict[str, Array]:
    """The per-layer tensors the sparse backends read: ``w_up_FxD`` (W_up^T, rows = neurons) and ``w_down_norms_F``
    (||W_down[i, :]||). Compute once per model, outside the decode step, and pass them to :func:`sparse_ffn`."""
    return {"w_up_FxD": jnp.asarray(w_up_DxF).T.copy(),
            "w_down_norms_F": jnp.linalg.norm(jnp.asarray(w_down_FxD, jnp.float32), axis=-1)}


def default_buckets(F: int, chunk: int, crossover: float = DENSE_CROSSOVER) -> tuple[int, ...]:
    """The ``cpu_gather`` capacities: chunk * 2^k up to crossover * F in whole chunks, the last one exactly that."""
    return capacity_buckets(F, chunk, int(crossover * F))


class FFNWeights(NamedTuple):
    """One layer's FFN weights as the backends read them."""

    w_gate_DxF: Array  # noqa: N815 (shape suffix)
    w_up_DxF: Array  # noqa: N815
    w_down_FxD: Array  # noqa: N815
    w_up_FxD: Array | None  # noqa: N815 - W_up^T prepared once per model (prepare_weights), or None
    w_down_norms_F: Array | None  # noqa: N815 - ||W_down[i, :]||: the neuron-norm mode only

    def up_rows(self) -> Array:
        """W_up^T, one row per neuron: the prepared one, else transposed here (a full read of W_up)."""
        return self.w_up_DxF.T if self.w_up_FxD is None else self.w_up_FxD


class Mode(NamedTuple):
    """What decides the active neurons, and the ``cpu_gather`` loop's knobs (see :func:`sparse_ffn`)."""

    activation: GatedActivation
    threshold: Any
    tau: Any
    chunk: int
    buckets: tuple[int, ...] | None


# ---------------------------------------------------------------------------------------------------------------
# Active set
# ---------------------------------------------------------------------------------------------------------------
def _active_set(x_BxD: Array, w: FFNWeights, mode: Mode) -> tuple[Array, Array, Array | None]:
    """(active_F, act_gate_BxF, x1_BxF or None): the union over the batch of the neurons to read.

    Gate-mask mode: act(gate) != 0 (dReLU's up > 0 is applied after reading W_up). Neuron-norm mode (``tau``): x1 in
    full, active iff |x1| * ||W_down[i]|| > tau, returned masked so only W_down remains to be read.
    """
    gate_BxF = x_BxD @ w.w_gate_DxF.astype(x_BxD.dtype)
    if mode.tau is None:
        act_BxF = mode.activation.act(gate_BxF, mode.threshold)
        return jnp.any(act_BxF != 0, axis=0), act_BxF, None
    up_BxF = x_BxD @ w.w_up_DxF.astype(x_BxD.dtype)
    x1_BxF, act_BxF = gated_product(mode.activation, gate_BxF, up_BxF, mode.threshold)
    norms_BxF = jnp.abs(x1_BxF.astype(jnp.float32)) * w.w_down_norms_F
    keep_BxF = norms_BxF > jnp.asarray(mode.tau, jnp.float32)
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


def _cpu_ffi_impl(x_BxD: Array, w: FFNWeights, mode: Mode) -> tuple[Array, Array]:
    """C++ backend: the active rows read in place on all cores, any count in one call (no buckets); dense above
    ``CPU_FFI_CROSSOVER`` of F or the largest bucket; inputs other than float32 go to ``cpu_gather``."""
    w_up = w.w_up_DxF if w.w_up_FxD is None else w.w_up_FxD
    if not all(a.dtype == jnp.float32 for a in (x_BxD, w_up, w.w_down_FxD)):
        return _cpu_gather_impl(x_BxD, w, mode)
    active_F, act_BxF, x1_BxF = _active_set(x_BxD, w, mode)
    cap = max(mode.buckets) if mode.buckets else int(CPU_FFI_CROSSOVER * active_F.shape[0])
    count = jnp.sum(active_F, dtype=jnp.int32)
    read_up = x1_BxF is None

    def sparse() -> Array:
        w_up_FxD = w.up_rows() if read_up else w.w_down_FxD  # not read when x1 is known
        return cpu_ffi.gather_down(x_BxD, act_BxF if read_up else x1_BxF, active_F, w_up_FxD, w.w_down_FxD,
                                   read_up=read_up, drelu=mode.activation.relu_up)

    return lax.cond(count <= cap, sparse, lambda: _dense_down(x_BxD, w, act_BxF, x1_BxF, mode)), count


def _pallas_impl(name: str, kernels: Any) -> Callable[[Array, FFNWeights, Mode], tuple[Array, Array]]:
    """A backend from a ``pallas_kernels`` module's ``s2`` (up rows of the active neurons -> x1) and ``s3`` (W_down
    rows of x1's non-zero columns: the active count), interpreted off ``name``'s platform in :data:`AUTO` (tests)."""

    def impl(x_BxD: Array, w: FFNWeights, mode: Mode) -> tuple[Array, Array]:
        interpret = AUTO.get(jax.default_backend()) != name
        try:
            x1_BxF = kernels.s2(x_BxD, w.w_gate_DxF, w.up_rows(), activation=mode.activation, threshold=mode.threshold,
                                tau=mode.tau, w_down_norms_F=w.w_down_norms_F, interpret=interpret)
            out_BxD = kernels.s3(x1_BxF, w.w_down_FxD, interpret=interpret)
        except KernelInputError as e:
            raise errors.UsageError(f"sparse_ffn implementation={name!r}: {e}") from e
        return out_BxD, jnp.sum(jnp.any(x1_BxF != 0, axis=0), dtype=jnp.int32)

    return impl


#: name -> backend ``(x_BxD, weights, mode) -> (out_BxD, active_count)``.
IMPLEMENTATIONS: dict[str, Callable[[Array, FFNWeights, Mode], tuple[Array, Array]]] = {
    "dense": _dense_impl, "cpu_gather": _cpu_gather_impl, "cpu_ffi": _cpu_ffi_impl,
    "pallas_triton": _pallas_impl("pallas_triton", sparse_ffn_triton),
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
               buckets: tuple[int, ...] | None = None) -> tuple[Array, Array]:
    """The gated FFN act(x W_gate) * (x W_up) @ W_down, reading only the active neurons' weights (jit-compatible).

    Equals ``model.ffn_down(model.ffn_hidden(x))``, with ``model.neuron_norm_mask`` when ``taus`` is given, up to fp32
    summation order.

    Args:
      x_BxD: the normed FFN input of B decode tokens.
      activation: a registry name; outside relu / fatrelu / drelu / relu2 the gate cannot decide the active set and
        ``taus`` is required.
      threshold: FATReLU threshold t (gate >= t kept).
      taus: this layer's scalar threshold of the neuron-norm mode; needs ``w_down_norms_F``.
      w_down_norms_F, w_up_FxD: from :func:`prepare_weights`; without ``w_up_FxD`` W_up is transposed per call.
      implementation: ``auto`` (:data:`AUTO`) or a key of :data:`IMPLEMENTATIONS`.
      chunk, buckets: ``cpu_gather``'s neurons per loop step and capacities (multiples of ``chunk``; default
        :func:`default_buckets`), dense above the last; ``cpu_ffi`` runs dense above the largest bucket.

    Returns:
      (out_BxD, int32 size of the batch's union active set; the Pallas backends count x1's non-zero columns).

    Raises:
      errors.UsageError: unknown implementation, or a mode missing its inputs.
      errors.KernelUnavailableError: ``implementation="cpu_ffi"`` where its kernel cannot be built.
    """
    impl = IMPLEMENTATIONS[resolve_implementation(implementation)]
    act = kernel_activation(activation)
    if taus is None and not act.gate_mask:
        raise errors.UsageError(f"sparse_ffn: activation {activation!r} has no exact zeros; pass taus (the neuron-norm "
                                f"sparse mode) or use one of {sorted(GATE_MASK_ACTIVATIONS)}")
    if taus is not None and w_down_norms_F is None:
        raise errors.UsageError("sparse_ffn: the neuron-norm mode (taus given) needs w_down_norms_F "
                                "(prepare_weights)")
    w = FFNWeights(w_gate_DxF, w_up_DxF, w_down_FxD, w_up_FxD, w_down_norms_F)
    return impl(x_BxD, w, Mode(act, threshold, taus, chunk, buckets))
