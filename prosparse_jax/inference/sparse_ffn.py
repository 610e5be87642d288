"""Activation-sparse gated FFN for batch-1..4 decoding: one interface, swappable backends.

``sparse_ffn(x_BxD, w_gate_DxF, w_up_DxF, w_down_FxD, activation=..., implementation=...)`` returns the FFN output
and the number of active neurons, like ``jax.nn.dot_product_attention(..., implementation=...)``: the backends in
:data:`IMPLEMENTATIONS` compute the same function and differ only in how they skip the dropped neurons.

The operator follows ProSparse (arXiv 2402.13516) §4.3: S2 -- the gate projection is dense, its activation decides
which neurons are active, and only those columns of W_up (rows of W_up^T) are read; S3 -- only the rows of W_down
whose x1 is non-zero are read. PowerInfer (arXiv 2312.12456) and TEAL (arXiv 2408.14690) use the same row-skipping
idea (predictor- / magnitude-selected neurons). The gain is bounded by the bytes read: with sparsity s of x1 a
gate-mask FFN reads W_gate plus (1 - s) of W_up and W_down, so the speedup over the dense FFN is at most
3 / (1 + 2 (1 - s)). The neuron-norm threshold mode (any activation, e.g. SiLU; CETT, Sparsing Law §4.1: neuron i
dropped iff |x1_i| * ||W_down[i, :]|| <= tau) needs the full up projection to know x1, so it only skips W_down rows:
its bound is 3 / (2 + (1 - s)) < 1.5.

``cpu_gather`` (XLA:CPU): active indices from ``jnp.nonzero(mask, size=cap)``, then a ``lax.fori_loop`` over chunks
of ``chunk`` active neurons whose trip count is the (dynamic) number of chunks. Each chunk gathers ``chunk`` rows of
W_up^T and W_down (contiguous D-float rows) and does two small matmuls. Skipping is per neuron, not per block: at 88%
sparsity a block of 16 neurons is all-zero with probability 0.88^16 ~ 0.13, so block skipping saves almost nothing.
The capacity is bucketed (powers of two times ``chunk``), one ``lax.switch`` branch per bucket, and above
``DENSE_CROSSOVER`` active density the dense FFN runs instead (measured: ``experiments/bench_sparse_ffn.py``).
A single ``jnp.take`` of all active rows is slower than the dense FFN on CPU (it materialises the whole gathered
copy); the chunked loop materialises one chunk at a time. It streams the active rows on one thread, at roughly 1/3-1/2
of the dense matvec's bandwidth.

``cpu_ffi`` (XLA:CPU custom call in C++, :mod:`cpu_ffi`, ``csrc/sparse_ffn_cpu.cc``; compiled with g++ on first use):
the gate projection stays in XLA; the kernel takes the active mask, reads the active rows of W_up^T and W_down in place
(no gathered copy), four neurons' rows streaming together with the next four prefetched, on every core of XLA's
intra-op thread pool (chunks of neurons claimed dynamically, one accumulator per thread). It handles any active count
in one call (no buckets); the dense FFN runs above ``CPU_FFI_CROSSOVER``. float32 only: other dtypes run
``cpu_gather``. Building the index list inside the kernel instead of ``jnp.nonzero`` in XLA (~20 small XLA ops) saved
~0.4 ms per call at 4096x11008.

Measured (2-core AMD EPYC with AVX-512, load ~1, fp32, relu, iid masks, ``python experiments/bench_sparse_ffn.py
--sparsities=0,0.5,0.8,0.88,0.95,0.99``, README "Sparse decoding"): 4096x11008 batch 1 at 88% sparsity (bound 2.42x):
``cpu_ffi`` 2.34x dense, ``cpu_gather`` 1.35x; at 95% 2.77x vs 1.92x; batch 4 at 88% 2.47x vs 1.32x; at 0% sparsity
``cpu_ffi`` is 1.05x dense (it reads the same bytes). The gate projection is ~3/4 of the op's time at 88%; the custom
call alone streams the active rows (not in cache) at ~30 GB/s on two threads, ~24 GB/s on one. End to end
(``experiments/bench_decode.py --d_model=4096 --d_ff=11008 --n_layers=2 --n_heads=32``, 88%): ``cpu_ffi`` 1.54x
dense decode, ``cpu_gather`` 1.45x.

W_up layout: gathering *columns* of a row-major [D, F] W_up is a strided read (one cache line per float), so pass
``w_up_FxD = w_up_DxF.T`` prepared once per model (:func:`prepare_weights`); without it the transpose is done inside
the call, which costs one full read of W_up.

``pallas_triton`` / ``pallas_mosaic`` (GPU / TPU, :mod:`pallas_kernels`): ProSparse's S2 (gate, activation, up rows of
the active neurons, fused) and S3 (down rows of the non-zero x1) as Pallas kernels -- masked row loads on GPU,
scalar-prefetched index lists and row DMAs on TPU. ``implementation="auto"`` picks the platform's backend
(:data:`AUTO`); on a CPU the Pallas backends run interpreted (for tests).

Batch > 1: the active set is the union of the rows' active sets (a neuron is read if any row needs it), so the
sparsity seen by the operator falls with the batch. Under ``jax.vmap`` (independent calls side by side) every backend
gives the same results, but the bucket / dense-fallback ``lax.switch`` / ``lax.cond`` becomes a select that runs all
its branches, the dense FFN included: batch the rows into one call instead to keep the skipping.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from prosparse_jax.inference import cpu_ffi
from prosparse_jax.model.activations import RELU_FAMILY, check_activation, ffn_product

Array = jax.Array

#: Active density (active neurons / F) above which ``cpu_gather`` runs the dense FFN. Measured on a 2-core AVX2 EPYC
#: shared with other jobs (noisy), fp32, relu, iid masks (``experiments/bench_sparse_ffn.py``, the raw operator without
#: fallback): break-even at density ~0.3-0.45 for 4096x11008 (batch 1 and 4), ~0.2-0.3 for 1536x3840 (the loop's
#: per-chunk overhead weighs more on small rows). We switch at 0.3; pass ``buckets`` to move it per shape.
DENSE_CROSSOVER = 0.3

#: Active density above which ``cpu_ffi`` runs the dense FFN. Measured as ``DENSE_CROSSOVER`` (raw operator,
#: ``--sparsities=0,0.2,0.35,0.5,0.65 --implementations=cpu_ffi``, 4096x11008 and 1536x3840, batch 1 and 4):
#: ``cpu_ffi`` is 1.3-1.9x dense at density 0.35-0.65, 0.9-1.3x at 0.8 and 0.93-1.15x at 1 (it reads the same bytes),
#: so the dense FFN only runs for nearly dense inputs; pass ``buckets`` (its largest entry is the threshold) to move
#: it.
CPU_FFI_CROSSOVER = 0.8

#: Neurons per iteration of the gather loop (64-256 measured equally good; 128 is in the middle).
DEFAULT_CHUNK = 128

#: Activations whose gate output alone decides the active set (x1_i = 0 whenever act(gate_i) = 0).
GATE_MASK_ACTIVATIONS = RELU_FAMILY


def prepare_weights(w_up_DxF: Array, w_down_FxD: Array) -> dict[str, Array]:
    """The per-layer tensors ``cpu_gather`` reads: W_up^T (rows = neurons) and ||W_down[i, :]||.

    Compute once per model (outside the decode step) and pass ``w_up_FxD`` / ``w_down_norms_F`` to :func:`sparse_ffn`.
    """
    return {"w_up_FxD": jnp.asarray(w_up_DxF).T.copy(),
            "w_down_norms_F": jnp.linalg.norm(jnp.asarray(w_down_FxD, jnp.float32), axis=-1)}


def default_buckets(F: int, chunk: int, crossover: float = DENSE_CROSSOVER) -> tuple[int, ...]:
    """Capacities chunk * 2^k (rounded to whole chunks) up to ceil(crossover * F), the last one exactly that."""
    top = max(chunk, -(-int(crossover * F) // chunk) * chunk)
    caps, cap = [], chunk
    while cap < top:
        caps.append(cap)
        cap *= 2
    caps.append(top)
    return tuple(caps)


# ---------------------------------------------------------------------------------------------------------------
# Active set
# ---------------------------------------------------------------------------------------------------------------
def _active_set(x_BxD: Array, w_gate_DxF: Array, w_up_DxF: Array, activation: str, threshold: float,
                tau: Any, w_down_norms_F: Array | None) -> tuple[Array, Array, Array | None]:
    """(active_F bool, act_gate_BxF, x1_BxF or None): the union over the batch of the neurons to read.

    Gate-mask mode: act(gate) != 0 (dReLU: gate > 0; its up > 0 condition is applied after reading W_up). Neuron-norm
    mode (``tau`` given): x1 = act(gate) * up computed in full, active iff |x1| * ||W_down[i]|| > tau; x1 is returned
    already masked so only W_down remains to be read.
    """
    gate_BxF = x_BxD @ w_gate_DxF.astype(x_BxD.dtype)
    if tau is None:
        if activation not in GATE_MASK_ACTIVATIONS:
            raise ValueError(f"activation {activation!r} has no exact zeros; pass tau (the neuron-norm sparse mode) "
                             f"or use one of {sorted(GATE_MASK_ACTIVATIONS)}")
        _, act_BxF = ffn_product(activation, gate_BxF, gate_BxF, threshold)
        return jnp.any(act_BxF != 0, axis=0), act_BxF, None
    if w_down_norms_F is None:
        raise ValueError("the neuron-norm mode (tau given) needs w_down_norms_F")
    up_BxF = x_BxD @ w_up_DxF.astype(x_BxD.dtype)
    x1_BxF, act_BxF = ffn_product(activation, gate_BxF, up_BxF, threshold)
    norms_BxF = jnp.abs(x1_BxF.astype(jnp.float32)) * w_down_norms_F
    keep_BxF = norms_BxF > jnp.asarray(tau, jnp.float32)
    x1_BxF = jnp.where(keep_BxF, x1_BxF, jnp.zeros_like(x1_BxF))
    return jnp.any(keep_BxF, axis=0), act_BxF, x1_BxF


def _x1_from_up(activation: str, act_BxC: Array, up_BxC: Array) -> Array:
    """x1 = act(gate) * up on gathered columns (dReLU: relu(up))."""
    return act_BxC * (jax.nn.relu(up_BxC) if activation == "drelu" else up_BxC)


# ---------------------------------------------------------------------------------------------------------------
# Backends: (x_BxD, weights, mode) -> (out_BxD, active_count)
# ---------------------------------------------------------------------------------------------------------------
class Mode(NamedTuple):
    """What decides the active neurons, and the ``cpu_gather`` loop's knobs (see :func:`sparse_ffn`)."""

    activation: str
    threshold: Any
    tau: Any
    chunk: int
    buckets: tuple[int, ...] | None


def _dense_down(x_BxD: Array, w: dict[str, Array], act_BxF: Array, x1_BxF: Array | None, activation: str) -> Array:
    """The dense remainder of the FFN: up projection (unless x1 is known) and down projection."""
    if x1_BxF is None:
        x1_BxF = _x1_from_up(activation, act_BxF, x_BxD @ w["w_up_DxF"].astype(x_BxD.dtype))
    return x1_BxF @ w["w_down_FxD"].astype(x1_BxF.dtype)


def _dense_impl(x_BxD: Array, w: dict[str, Array], mode: Mode) -> tuple[Array, Array]:
    """Reference backend: the dense FFN (same masks, no skipping)."""
    active_F, act_BxF, x1_BxF = _active_set(x_BxD, w["w_gate_DxF"], w["w_up_DxF"], mode.activation, mode.threshold,
                                            mode.tau, w["w_down_norms_F"])
    return _dense_down(x_BxD, w, act_BxF, x1_BxF, mode.activation), jnp.sum(active_F, dtype=jnp.int32)


def _gather_loop(x_BxD: Array, w: dict[str, Array], active_F: Array, act_BxF: Array, x1_BxF: Array | None,
                 activation: str, chunk: int, cap: int) -> Array:
    """Sum over the active neurons in chunks of ``chunk``; indices padded to ``cap`` (a multiple of chunk)."""
    count = jnp.sum(active_F, dtype=jnp.int32)
    idx_P = jnp.nonzero(active_F, size=cap, fill_value=0)[0].astype(jnp.int32)
    dt = x_BxD.dtype
    w_down_FxD = w["w_down_FxD"]
    coeff_BxF = act_BxF if x1_BxF is None else x1_BxF

    def body(k: Array, acc_BxD: Array) -> Array:
        start = k * chunk
        idx_C = lax.dynamic_slice(idx_P, (start,), (chunk,))
        valid_C = (start + jnp.arange(chunk, dtype=jnp.int32)) < count
        c_BxC = jnp.where(valid_C, jnp.take(coeff_BxF, idx_C, axis=1), jnp.zeros((), dt))
        if x1_BxF is None:
            up_CxD = jnp.take(w["w_up_FxD"], idx_C, axis=0, mode="clip").astype(dt)
            c_BxC = _x1_from_up(activation, c_BxC, lax.dot_general(x_BxD, up_CxD, (((1,), (1,)), ((), ()))))
        down_CxD = jnp.take(w_down_FxD, idx_C, axis=0, mode="clip").astype(dt)
        return acc_BxD + c_BxC @ down_CxD

    n_chunks = (count + chunk - 1) // chunk
    acc0_BxD = jnp.zeros((x_BxD.shape[0], w_down_FxD.shape[1]), dt)
    return lax.fori_loop(0, n_chunks, body, acc0_BxD)


def _cpu_gather_impl(x_BxD: Array, w: dict[str, Array], mode: Mode) -> tuple[Array, Array]:
    """Gather backend: the smallest capacity bucket holding the active count, or the dense FFN above the last."""
    active_F, act_BxF, x1_BxF = _active_set(x_BxD, w["w_gate_DxF"], w["w_up_DxF"], mode.activation, mode.threshold,
                                            mode.tau, w["w_down_norms_F"])
    F, chunk = active_F.shape[0], mode.chunk
    caps = default_buckets(F, chunk) if mode.buckets is None else tuple(sorted(mode.buckets))
    if any(c % chunk for c in caps):
        raise ValueError(f"bucket capacities {caps} must be multiples of chunk={chunk}")
    if w["w_up_FxD"] is None and x1_BxF is None:
        w = dict(w, w_up_FxD=w["w_up_DxF"].T)
    count = jnp.sum(active_F, dtype=jnp.int32)
    branch = jnp.searchsorted(jnp.asarray(caps, jnp.int32), count, side="left")  # == len(caps) above the last cap

    def sparse_branch(cap: int) -> Callable[[], Array]:
        return lambda: _gather_loop(x_BxD, w, active_F, act_BxF, x1_BxF, mode.activation, chunk, cap)

    branches = [sparse_branch(c) for c in caps] + [lambda: _dense_down(x_BxD, w, act_BxF, x1_BxF, mode.activation)]
    return lax.switch(branch, branches), count


def _is_float32(x_BxD: Array, w: dict[str, Array]) -> bool:
    """Whether the input and the weights ``cpu_ffi`` reads (W_up, W_down) are all float32."""
    w_up = w["w_up_DxF"] if w["w_up_FxD"] is None else w["w_up_FxD"]
    return all(a.dtype == jnp.float32 for a in (x_BxD, w_up, w["w_down_FxD"]))


def _cpu_ffi_impl(x_BxD: Array, w: dict[str, Array], mode: Mode) -> tuple[Array, Array]:
    """C++ backend (:mod:`prosparse_jax.inference.cpu_ffi`): the active rows of W_up^T / W_down read in place on all cores.

    One custom call handles any active count (no capacity buckets); above the crossover (``CPU_FFI_CROSSOVER`` of F,
    or the largest of ``mode.buckets``) the dense FFN runs. Non-float32 inputs or weights run ``cpu_gather``.
    """
    if not _is_float32(x_BxD, w):
        return _cpu_gather_impl(x_BxD, w, mode)
    active_F, act_BxF, x1_BxF = _active_set(x_BxD, w["w_gate_DxF"], w["w_up_DxF"], mode.activation, mode.threshold,
                                            mode.tau, w["w_down_norms_F"])
    cap = max(mode.buckets) if mode.buckets else int(CPU_FFI_CROSSOVER * active_F.shape[0])
    count = jnp.sum(active_F, dtype=jnp.int32)
    read_up = x1_BxF is None

    def sparse() -> Array:
        w_up_FxD = w["w_down_FxD"]  # not read when x1 is known
        if read_up:
            w_up_FxD = w["w_up_DxF"].T if w["w_up_FxD"] is None else w["w_up_FxD"]
        return cpu_ffi.gather_down(x_BxD, act_BxF if read_up else x1_BxF, active_F, w_up_FxD, w["w_down_FxD"],
                                   read_up=read_up, drelu=mode.activation == "drelu")

    return lax.cond(count <= cap, sparse, lambda: _dense_down(x_BxD, w, act_BxF, x1_BxF, mode.activation)), count


def _pallas_impl(name: str, module_name: str) -> Callable[[Array, dict[str, Array], Mode], tuple[Array, Array]]:
    """A backend from a ``pallas_kernels`` module's ``s2`` (gate, activation, up rows of the active neurons -> x1)
    and ``s3`` (W_down rows of the non-zero x1 columns). On a CPU the kernels run in Pallas' interpret mode (to test
    them; slow), and so on any platform that is not the kernels' own (the Mosaic kernels on a GPU). The active count
    is the union of x1's non-zero columns: the W_down rows S3 reads. ``name``'s own platforms are those :data:`AUTO`
    gives it."""

    def impl(x_BxD: Array, w: dict[str, Array], mode: Mode) -> tuple[Array, Array]:
        kernels = importlib.import_module(f"pallas_kernels.{module_name}")
        interpret = AUTO.get(jax.default_backend()) != name
        w_up_FxD = w["w_up_DxF"].T if w["w_up_FxD"] is None else w["w_up_FxD"]
        x1_BxF = kernels.s2(x_BxD, w["w_gate_DxF"], w_up_FxD, activation=mode.activation, threshold=mode.threshold,
                            tau=mode.tau, w_down_norms_F=w["w_down_norms_F"], interpret=interpret)
        out_BxD = kernels.s3(x1_BxF, w["w_down_FxD"], interpret=interpret)
        return out_BxD, jnp.sum(jnp.any(x1_BxF != 0, axis=0), dtype=jnp.int32)

    return impl


#: name -> backend ``(x_BxD, weights, mode) -> (out_BxD, active_count)``; ``weights`` holds w_gate_DxF, w_up_DxF,
#: w_up_FxD (or None), w_down_FxD, w_down_norms_F (or None). ``cpu_gather``: XLA gather loop; ``cpu_ffi``: C++ custom
#: call on all cores (float32; other dtypes run ``cpu_gather``). ``pallas_triton``: GPU kernels through Pallas'
#: Triton lowering (per-neuron masked row loads); ``pallas_mosaic``: TPU kernels (scalar-prefetched index lists, row
#: DMAs); both in ``pallas_kernels/``.
IMPLEMENTATIONS: dict[str, Callable[[Array, dict[str, Array], Mode], tuple[Array, Array]]] = {
    "dense": _dense_impl, "cpu_gather": _cpu_gather_impl, "cpu_ffi": _cpu_ffi_impl,
    "pallas_triton": _pallas_impl("pallas_triton", "sparse_ffn_triton"),
    "pallas_mosaic": _pallas_impl("pallas_mosaic", "sparse_ffn_mosaic")}

#: What ``implementation="auto"`` runs on each platform (anything else: ``dense``). ``cpu_ffi`` is built on first use;
#: where it cannot be (no g++), ``auto`` warns once and runs ``cpu_gather``.
AUTO: dict[str, str] = {"cpu": "cpu_ffi", "gpu": "pallas_triton", "cuda": "pallas_triton", "rocm": "pallas_triton",
                        "tpu": "pallas_mosaic"}


@functools.cache
def _cpu_ffi_or_gather() -> str:
    """``cpu_ffi`` when its kernel builds here (compiled on this first call), else ``cpu_gather`` with one warning."""
    if cpu_ffi.available():
        return "cpu_ffi"
    warnings.warn(f"sparse_ffn: implementation='auto' runs cpu_gather: {cpu_ffi.unavailable_reason()}", stacklevel=3)
    return "cpu_gather"


def resolve_implementation(implementation: str, platform: str | None = None) -> str:
    """``auto`` -> the backend of ``platform`` (default: JAX's default backend) in :data:`AUTO`; else checked."""
    if implementation == "auto":
        name = AUTO.get(platform or jax.default_backend(), "dense")
        return _cpu_ffi_or_gather() if name == "cpu_ffi" else name
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown sparse FFN implementation {implementation!r}; choose one of: "
                         f"{', '.join(['auto', *IMPLEMENTATIONS])}")
    return implementation


def sparse_ffn(x_BxD: Array, w_gate_DxF: Array, w_up_DxF: Array, w_down_FxD: Array, *, activation: str,
               threshold: float = 0.0, taus: Any = None, w_down_norms_F: Array | None = None,
               w_up_FxD: Array | None = None, implementation: str = "auto", chunk: int = DEFAULT_CHUNK,
               buckets: tuple[int, ...] | None = None) -> tuple[Array, Array]:
    """The gated FFN act(x W_gate) * (x W_up) @ W_down reading only the active neurons' weights.

    Equals ``model.ffn_down(model.ffn_hidden(x))`` (with ``model.neuron_norm_mask`` applied when ``taus`` is given)
    up to fp32 summation order. Jit-compatible: the active count is dynamic, the capacity bucket is picked by
    ``lax.switch``.

    Args:
      x_BxD: the FFN input (after the RMSNorm), batch B = 1..4 decode tokens.
      w_gate_DxF, w_up_DxF, w_down_FxD: one layer's FFN weights.
      activation: gated activation name (``prosparse_jax.model.activations``). relu / fatrelu / drelu / relu2: the gate
        decides the active set (ProSparse S2 + S3, bound 3 / (1 + 2 (1 - s))). Any other activation needs ``taus``.
      threshold: FATReLU threshold t (gate >= t kept).
      taus: this layer's scalar tau of the neuron-norm sparse mode (neuron i dropped iff |x1_i| ||W_down[i]|| <= tau).
        The up projection is then dense and only W_down rows are skipped (bound 3 / (2 + (1 - s))).
      w_down_norms_F: ||W_down[i, :]||, required with ``taus`` (:func:`prepare_weights`).
      w_up_FxD: W_up^T prepared once (:func:`prepare_weights`); computed per call when omitted.
      implementation: ``auto`` (by platform, :data:`AUTO`: ``cpu_ffi`` on CPU, or ``cpu_gather`` where the C++
        kernel cannot be built; ``pallas_triton`` on GPU, ``pallas_mosaic`` on TPU), or a key of
        :data:`IMPLEMENTATIONS`.
      chunk: active neurons per loop iteration of ``cpu_gather``.
      buckets: capacities (multiples of ``chunk``) of ``cpu_gather``; default :func:`default_buckets`. Above the last
        one the dense FFN runs. ``cpu_ffi`` uses only the largest as its dense threshold (default
        ``CPU_FFI_CROSSOVER * F``).

    Returns:
      (out_BxD, active_count): the FFN output and the int32 number of neurons in the batch's union active set
      (the Pallas backends count the non-zero columns of x1, the W_down rows they read).

    Raises:
      ValueError: unknown implementation or activation, or a mode missing its inputs.
      cpu_ffi.CpuKernelUnavailableError: ``implementation="cpu_ffi"`` where its kernel cannot be built.
    """
    impl = IMPLEMENTATIONS[resolve_implementation(implementation)]
    check_activation(activation)
    w = {"w_gate_DxF": w_gate_DxF, "w_up_DxF": w_up_DxF, "w_up_FxD": w_up_FxD, "w_down_FxD": w_down_FxD,
         "w_down_norms_F": w_down_norms_F}
    return impl(x_BxD, w, Mode(activation, threshold, taus, chunk, buckets))
