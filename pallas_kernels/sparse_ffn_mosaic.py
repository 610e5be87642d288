"""TPU (Pallas Mosaic) kernels for ProSparse's S2 and S3 (§4.3): skip neurons, not blocks; see docs/kernels.md.

A ``pl.when`` inside a BlockSpec pipeline saves compute only (the block is already fetched), so XLA computes the
active-index list and count, and a row-gather kernel (both in scalar prefetch) DMAs each active row from HBM into a
double-buffered VMEM ``[chunk, D]`` buffer. The grid is static: one ``pallas_call`` per capacity bucket, picked by
``lax.switch`` on the count. With ``tau`` S2 is dense in XLA and only S3 skips. D is zero-padded to 128 lanes.

Open risk (Mosaic's layout passes run only in the TPU compiler): a one-row DMA at an unaligned offset of an
(8, 128)-tiled array, bf16 most of all; the fallback is a tile-aligned weight layout ``[F, P, D / P]`` prepared once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.reference import (
    GatedActivation,
    KernelInputError,
    capacity_buckets,
    check_s2_inputs,
    check_s3_inputs,
    gated_product,
)

Array = jax.Array

#: Active neurons per grid step (rows per DMA batch). A multiple of 128: the x1 blocks are [B, chunk].
DEFAULT_CHUNK = 128

#: TPU lane width: the last dim of every block is a multiple of it.
LANES = 128


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _check_chunk(chunk: int | None) -> int:
    chunk = DEFAULT_CHUNK if chunk is None else chunk
    if not isinstance(chunk, int) or chunk <= 0 or chunk % LANES:
        raise KernelInputError(f"chunk={chunk!r} must be a positive multiple of {LANES} (the TPU lane width: x1 moves "
                               f"in [batch, chunk] blocks); use {DEFAULT_CHUNK}")
    return chunk


def _interpret_arg(interpret: Any) -> Any:
    """``True`` -> TPU interpret mode (simulates HBM/VMEM, DMAs and semaphores on CPU)."""
    if interpret is True:
        return pltpu.InterpretParams()
    return interpret


def _precision(dtype: Any) -> lax.Precision:
    """float32 products in full precision (TPU's default would round them to bf16); bf16 products are exact."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _pad_lanes(a: Array, d_pad: int) -> Array:
    """``a`` with its last dim zero-padded to ``d_pad`` (a copy; a no-op when already aligned)."""
    d = a.shape[-1]
    return a if d == d_pad else jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, d_pad - d)])


def _compiler_params(chunk: int, d_pad: int, dtype: Any) -> pltpu.CompilerParams:
    """Sequential grid (the DMA buffers and the accumulator carry across steps); VMEM limit raised for wide rows."""
    rows = 16  # a [B <= 8, n] block occupies at least one (16, 128) tile group
    vmem = 2 * chunk * d_pad * jnp.dtype(dtype).itemsize + 4 * rows * (d_pad + chunk) * 4
    limit = None if vmem <= (12 << 20) else int(vmem * 1.25) + (4 << 20)
    return pltpu.CompilerParams(dimension_semantics=("arbitrary",), vmem_limit_bytes=limit)


# ---------------------------------------------------------------------------------------------------------------
# The row gather shared by both kernels
# ---------------------------------------------------------------------------------------------------------------
def _gather_chunks(idx_ref: Any, count_ref: Any, w_hbm: Any, buf: Any, sem: Any, chunk: int,
                   compute: Callable[[Array, Array], None], idle: Callable[[], None] | None = None) -> None:
    """At grid step k: DMA rows ``w_hbm[idx[k*chunk : k*chunk + chunk]]`` (the active ones) and ``compute`` on them.

    Step k starts chunk k + 1's DMAs into the other buffer before waiting on its own. ``compute(w_CxD, n_valid)``
    must mask rows ``>= n_valid``: they are not fetched and may hold stale data or NaN. ``idle`` runs at steps past
    the last active chunk.
    """
    k = pl.program_id(0)
    count = count_ref[0]
    n_steps = lax.div(count + (chunk - 1), chunk)  # grid steps holding active neurons (lax.div: count >= 0)

    def rows_in(step: Array) -> Array:
        return jnp.clip(count - step * chunk, 0, chunk)

    def row_copy(step: Array, slot: Array, r: Array) -> Any:
        return pltpu.make_async_copy(w_hbm.at[pl.ds(idx_ref[step * chunk + r], 1)], buf.at[slot, pl.ds(r, 1)],
                                     sem.at[slot])

    def start(step: Array, slot: Array) -> None:
        lax.fori_loop(0, rows_in(step), lambda r, c: (row_copy(step, slot, r).start(), c)[1], 0)

    def wait(step: Array, slot: Array) -> None:
        lax.fori_loop(0, rows_in(step), lambda r, c: (row_copy(step, slot, r).wait(), c)[1], 0)

    @pl.when((k == 0) & (n_steps > 0))
    def _prologue() -> None:
        start(k, 0)

    @pl.when(k < n_steps)
    def _step() -> None:
        slot = lax.rem(k, 2)

        @pl.when(k + 1 < n_steps)
        def _prefetch_next() -> None:
            start(k + 1, 1 - slot)

        wait(k, slot)
        compute(buf[slot], rows_in(k))

    if idle is not None:
        @pl.when(k >= n_steps)
        def _idle() -> None:
            idle()


def _gather_scratch(chunk: int, d_pad: int, dtype: Any) -> list[Any]:
    return [pltpu.VMEM((2, chunk, d_pad), dtype), pltpu.SemaphoreType.DMA((2,))]


# ---------------------------------------------------------------------------------------------------------------
# S2
# ---------------------------------------------------------------------------------------------------------------
def _s2_kernel(idx_ref: Any, count_ref: Any, x_ref: Any, act_ref: Any, w_up_hbm: Any, x1_ref: Any, buf: Any,
               sem: Any, *, chunk: int, relu_up: bool, precision: lax.Precision) -> None:
    """x1 for this step's chunk of active neurons: act(gate) * (x @ W_up[idx]^T), written as a [B, chunk] block."""

    def compute(w_up_CxD: Array, n_valid: Array) -> None:
        up_BxC = lax.dot_general(x_ref[...], w_up_CxD, (((1,), (1,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32)
        if relu_up:
            up_BxC = jnp.maximum(up_BxC, 0.0)
        x1_BxC = act_ref[...] * up_BxC
        # Column c depends on buffer row c only: masking the [B, chunk] result drops the unfetched rows (the XLA
        # scatter drops those positions as well; this keeps the kernel's own output exactly zero there).
        valid_BxC = lax.broadcasted_iota(jnp.int32, x1_BxC.shape, 1) < n_valid
        x1_ref[...] = jnp.where(valid_BxC, x1_BxC, 0.0).astype(x1_ref.dtype)

    def idle() -> None:
        x1_ref[...] = jnp.zeros(x1_ref.shape, x1_ref.dtype)

    _gather_chunks(idx_ref, count_ref, w_up_hbm, buf, sem, chunk, compute, idle)


def _s2_gathered(x_BxD: Array, w_up_FxD: Array, act_BxF: Array, active_F: Array, *, cap: int, chunk: int,
                 relu_up: bool, interpret: Any) -> Array:
    """x1_BxF from one bucket of capacity ``cap``: gather, kernel, scatter back."""
    B, D = x_BxD.shape
    F = act_BxF.shape[1]
    count = jnp.sum(active_F, dtype=jnp.int32)
    idx_P = jnp.nonzero(active_F, size=cap, fill_value=0)[0].astype(jnp.int32)
    valid_P = jnp.arange(cap, dtype=jnp.int32) < count
    act_BxP = jnp.where(valid_P, jnp.take(act_BxF, idx_P, axis=1), 0.0).astype(jnp.float32)
    d_pad = _round_up(D, LANES)
    x_pad = _pad_lanes(x_BxD, d_pad)
    w_pad = _pad_lanes(w_up_FxD, d_pad)
    itemsize = jnp.dtype(x_BxD.dtype).itemsize
    x1_BxP = pl.pallas_call(
        functools.partial(_s2_kernel, chunk=chunk, relu_up=relu_up, precision=_precision(x_BxD.dtype)),
        out_shape=jax.ShapeDtypeStruct((B, cap), x_BxD.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(cap // chunk,),
            in_specs=[
                pl.BlockSpec((B, d_pad), lambda k, idx, cnt: (0, 0)),  # x, resident
                pl.BlockSpec((B, chunk), lambda k, idx, cnt: (0, k)),  # act(gate) at idx
                pl.BlockSpec(memory_space=pl.ANY),  # W_up^T stays in HBM, rows gathered by DMA
            ],
            out_specs=pl.BlockSpec((B, chunk), lambda k, idx, cnt: (0, k)),
            scratch_shapes=_gather_scratch(chunk, d_pad, x_BxD.dtype),
        ),
        compiler_params=_compiler_params(chunk, d_pad, x_BxD.dtype),
        cost_estimate=pl.CostEstimate(flops=2 * B * cap * d_pad, transcendentals=0,
                                      bytes_accessed=cap * d_pad * itemsize + B * (d_pad + 2 * cap) * 4),
        interpret=interpret,
        name="prosparse_s2_row_gather",
    )(idx_P, count[None], x_pad, act_BxP, w_pad)
    scatter_P = jnp.where(valid_P, idx_P, F)  # out of range -> dropped (the fill index 0 may be a real neuron)
    return jnp.zeros((B, F), x_BxD.dtype).at[:, scatter_P].set(x1_BxP, mode="drop")


@functools.partial(jax.jit, static_argnames=("activation", "chunk", "interpret"))
def _s2_impl(x_BxD: Array, w_gate_DxF: Array, w_up_FxD: Array, threshold: Any, tau: Any, w_down_norms_F: Any,
             predicted_F: Any, *, activation: GatedActivation, chunk: int, interpret: Any) -> Array:
    prec = _precision(x_BxD.dtype)
    gate_BxF = lax.dot(x_BxD, w_gate_DxF, precision=prec, preferred_element_type=jnp.float32)
    if tau is not None:  # neuron-norm mode: dense up projection, S2 skips nothing
        up_BxF = lax.dot_general(x_BxD, w_up_FxD, (((1,), (1,)), ((), ())), precision=prec,
                                 preferred_element_type=jnp.float32)
        x1_BxF, _ = gated_product(activation, gate_BxF, up_BxF, threshold)
        norms_BxF = jnp.abs(x1_BxF) * w_down_norms_F.astype(jnp.float32)
        keep_BxF = norms_BxF > jnp.asarray(tau, jnp.float32)
        if predicted_F is not None:
            keep_BxF = keep_BxF & predicted_F
        x1_BxF = jnp.where(keep_BxF, x1_BxF, 0.0)
        return x1_BxF.astype(x_BxD.dtype)
    act_BxF = activation.act(gate_BxF, threshold)
    if predicted_F is not None:  # the rows gathered below are the predicted active ones only
        act_BxF = jnp.where(predicted_F, act_BxF, 0.0)
    active_F = jnp.any(act_BxF != 0, axis=0)
    caps = capacity_buckets(act_BxF.shape[1], chunk)
    branch = jnp.searchsorted(jnp.asarray(caps, jnp.int32), jnp.sum(active_F, dtype=jnp.int32), side="left")
    branches = [functools.partial(_s2_gathered, cap=cap, chunk=chunk, relu_up=activation.relu_up,
                                  interpret=interpret) for cap in caps]
    return lax.switch(branch, branches, x_BxD, w_up_FxD, act_BxF, active_F)


def s2(x_BxD: Array, w_gate_DxF: Array, w_up_FxD: Array, *, activation: GatedActivation, threshold: Any = 0.0,
       tau: Any = None, w_down_norms_F: Array | None = None, predicted_F: Array | None = None,
       chunk: int | None = None, interpret: bool = False) -> Array:
    """ProSparse S2 on TPU: ``x1 = act(x W_gate) * (x W_up)`` reading only the active neurons' rows of ``w_up_FxD``.

    Equals :func:`pallas_kernels.reference.s2_reference` up to float32 summation order.

    Args:
      x_BxD: 1..``MAX_BATCH`` decode tokens, float32 or bfloat16; ``w_up_FxD`` holds one row per neuron.
      activation: from ``sparse_ffn.kernel_activation``; a gate-mask one, or any with ``tau``.
      threshold: FATReLU threshold t (gate >= t kept); may be traced.
      tau: neuron-norm mode (i kept iff ``|x1_i| * w_down_norms_F[i] > tau``; W_up read densely); may be traced.
      predicted_F: bool [F], an activation predictor's set (batch union): neurons outside it are dropped.
      chunk: active neurons per grid step (a multiple of 128; default :data:`DEFAULT_CHUNK`).
      interpret: ``True`` runs Pallas' TPU interpret mode on CPU (tests); a ``pltpu.InterpretParams`` is passed on.

    Raises:
      KernelInputError: bad shapes, dtypes, thresholds or chunk (before anything is traced).
    """
    check_s2_inputs(x_BxD, w_gate_DxF, w_up_FxD, activation=activation, threshold=threshold, tau=tau,
                    w_down_norms_F=w_down_norms_F, predicted_F=predicted_F)
    chunk = _check_chunk(chunk)
    return _s2_impl(x_BxD, w_gate_DxF, w_up_FxD, threshold, tau, w_down_norms_F, predicted_F, activation=activation,
                    chunk=chunk, interpret=_interpret_arg(interpret))


# ---------------------------------------------------------------------------------------------------------------
# S3
# ---------------------------------------------------------------------------------------------------------------
def _s3_kernel(idx_ref: Any, count_ref: Any, x1_ref: Any, w_down_hbm: Any, out_ref: Any, buf: Any, sem: Any,
               acc_ref: Any, *, chunk: int, precision: lax.Precision) -> None:
    """acc += x1[:, idx chunk] @ W_down[idx chunk]; the last grid step writes out_BxD."""
    k = pl.program_id(0)

    @pl.when(k == 0)
    def _init() -> None:
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def accumulate(w_down_CxD: Array) -> None:
        acc_ref[...] += jnp.dot(x1_ref[...], w_down_CxD, precision=precision, preferred_element_type=jnp.float32)

    def compute(w_down_CxD: Array, n_valid: Array) -> None:
        @pl.when(n_valid == chunk)
        def _full() -> None:
            accumulate(w_down_CxD)

        @pl.when(n_valid < chunk)
        def _tail() -> None:  # 0 * NaN = NaN: the unfetched rows are zeroed, not just their x1
            valid_CxD = lax.broadcasted_iota(jnp.int32, w_down_CxD.shape, 0) < n_valid
            accumulate(jnp.where(valid_CxD, w_down_CxD, jnp.zeros_like(w_down_CxD)))

    _gather_chunks(idx_ref, count_ref, w_down_hbm, buf, sem, chunk, compute)

    @pl.when(k == pl.num_programs(0) - 1)
    def _finish() -> None:
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _s3_gathered(x1_BxF: Array, w_down_FxD: Array, active_F: Array, *, cap: int, chunk: int,
                 interpret: Any) -> Array:
    B = x1_BxF.shape[0]
    D = w_down_FxD.shape[1]
    count = jnp.sum(active_F, dtype=jnp.int32)
    idx_P = jnp.nonzero(active_F, size=cap, fill_value=0)[0].astype(jnp.int32)
    valid_P = jnp.arange(cap, dtype=jnp.int32) < count
    x1_BxP = jnp.where(valid_P, jnp.take(x1_BxF, idx_P, axis=1), jnp.zeros((), x1_BxF.dtype))
    d_pad = _round_up(D, LANES)
    w_pad = _pad_lanes(w_down_FxD, d_pad)
    itemsize = jnp.dtype(x1_BxF.dtype).itemsize
    out_BxD = pl.pallas_call(
        functools.partial(_s3_kernel, chunk=chunk, precision=_precision(x1_BxF.dtype)),
        out_shape=jax.ShapeDtypeStruct((B, d_pad), x1_BxF.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(cap // chunk,),
            in_specs=[
                pl.BlockSpec((B, chunk), lambda k, idx, cnt: (0, k)),  # x1 at idx
                pl.BlockSpec(memory_space=pl.ANY),  # W_down stays in HBM, rows gathered by DMA
            ],
            out_specs=pl.BlockSpec((B, d_pad), lambda k, idx, cnt: (0, 0)),  # resident across the grid
            scratch_shapes=[*_gather_scratch(chunk, d_pad, x1_BxF.dtype), pltpu.VMEM((B, d_pad), jnp.float32)],
        ),
        compiler_params=_compiler_params(chunk, d_pad, x1_BxF.dtype),
        cost_estimate=pl.CostEstimate(flops=2 * B * cap * d_pad, transcendentals=0,
                                      bytes_accessed=(cap * d_pad + B * (cap + d_pad)) * itemsize),
        interpret=interpret,
        name="prosparse_s3_row_gather",
    )(idx_P, count[None], x1_BxP, w_pad)
    return out_BxD[:, :D]


@functools.partial(jax.jit, static_argnames=("chunk", "interpret"))
def _s3_impl(x1_BxF: Array, w_down_FxD: Array, *, chunk: int, interpret: Any) -> Array:
    active_F = jnp.any(x1_BxF != 0, axis=0)
    caps = capacity_buckets(x1_BxF.shape[1], chunk)
    branch = jnp.searchsorted(jnp.asarray(caps, jnp.int32), jnp.sum(active_F, dtype=jnp.int32), side="left")
    branches = [functools.partial(_s3_gathered, cap=cap, chunk=chunk, interpret=interpret) for cap in caps]
    return lax.switch(branch, branches, x1_BxF, w_down_FxD, active_F)


def s3(x1_BxF: Array, w_down_FxD: Array, *, chunk: int | None = None, interpret: bool = False) -> Array:
    """ProSparse S3 on TPU: ``out = x1 @ W_down`` reading only the rows of W_down whose x1 column is non-zero.

    Equals :func:`pallas_kernels.reference.s3_reference` up to float32 summation order; ``chunk`` and ``interpret``
    as in :func:`s2`.

    Raises:
      KernelInputError: bad shapes, dtypes or chunk (before anything is traced).
    """
    check_s3_inputs(x1_BxF, w_down_FxD)
    chunk = _check_chunk(chunk)
    return _s3_impl(x1_BxF, w_down_FxD, chunk=chunk, interpret=_interpret_arg(interpret))
