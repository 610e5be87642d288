"""TPU (Pallas Mosaic) kernels for ProSparse's sparse FFN operators S2 and S3: skip neurons, not blocks.

ProSparse (arXiv 2402.13516) §4.3 defines the two operators (contract and pure-jnp references in
:mod:`pallas_kernels.reference`):

* **S2** -- ``x1 = act(x W_gate) * (x W_up)``: the gate is dense, its activation decides which neurons are active,
  and only the active neurons' rows of ``w_up_FxD`` are read.
* **S3** -- ``out = x1 @ W_down``: only the rows of ``w_down_FxD`` whose x1 column is non-zero in some batch row
  are read.

PowerInfer (arXiv 2312.12456) skips the same rows on GPU/CPU with predictor-selected neurons.

Why index lists and DMAs, not ``pl.when`` over blocks: batch-1..8 decode is bound by the bytes read from HBM, and on
TPU a ``pl.when`` inside a BlockSpec pipeline saves compute only -- the pipeline has already fetched the block. And
at 88% sparsity a block of 16 neurons is all-inactive with probability 0.88^16 ~ 0.13, so block skipping would save
almost nothing anyway. So the skipping is per neuron:

1. In XLA: ``gate = x @ W_gate`` (dense), ``act(gate)``, the union active set over the batch rows (S3: any
   ``x1 != 0`` over the rows), ``count = sum(active)`` and ``idx = nonzero(active, size=cap)``.
2. A row-gather kernel (``pltpu.PrefetchScalarGridSpec`` with ``idx`` and ``count`` prefetched to SMEM, grid
   ``cap // chunk``): the weight matrix stays in HBM (``memory_space=pl.ANY``); grid step k issues one row DMA
   ``w_hbm[idx[k * chunk + r]] -> buf[r]`` per active neuron of its chunk into a VMEM ``[chunk, D]`` buffer and
   computes on it. The DMAs of chunk k + 1 are started before chunk k is waited on and computed (double buffering,
   two VMEM buffers and two DMA semaphores), so HBM streams while the MXU works. Steps past the active chunks issue
   no DMA; rows past ``count`` in the last chunk are neither fetched nor used (masked by position, so stale or
   uninitialised VMEM cannot leak in).

   - S2: ``up = x @ buf^T`` for the chunk's neurons, ``x1 = act(gate[idx]) * up`` (dReLU: ``relu(up)``) written as
     a ``[B, chunk]`` output block; XLA scatters the ``[B, cap]`` result back into ``x1_BxF``.
   - S3: ``x1`` gathered at ``idx`` in XLA (``[B, cap]``, zero past ``count``) is read in ``[B, chunk]`` blocks and
     ``acc += x1_blk @ buf`` accumulates in a float32 VMEM scratch across the grid (the output block is resident);
     the last step writes ``out_BxD``.
3. Capacity buckets: the grid is static, so one ``pallas_call`` is built per capacity ``chunk * 2^k`` (up to F
   rounded up to ``chunk``) and ``lax.switch`` on the dynamic count picks the smallest that holds the active set (as
   :mod:`prosparse_jax.inference.sparse_ffn` does on CPU): an 88%-sparse call runs ~F/8/chunk grid steps, not F/chunk.

Neuron-norm mode (``tau`` given; any activation, e.g. SiLU; CETT, Sparsing Law §4.1): neuron i is kept iff
``|x1_i| * ||W_down[i, :]|| > tau``, which needs the up projection of *every* neuron, so S2 computes it densely in
XLA and skips nothing (its x1 is masked exactly as the reference does); the skipping happens in S3.

Neuron permutation: :mod:`prosparse_jax.analysis.permute` reorders the neurons offline by activation frequency, so the active
rows cluster and neighbouring row DMAs read neighbouring HBM addresses (merging such runs into one multi-row DMA is a
possible refinement, not done here). The per-neuron gather does not need the permutation for correctness: any order
of ``idx`` gives the same result.

TPU block constraints: the last two dims of a block must be divisible by (8, 128) or equal the array's. Hence
``chunk`` is a multiple of 128 (the ``[B, chunk]`` blocks; B is the full batch dim) and D is padded to a multiple of
128 with zero columns -- which copies ``x`` and the weight once per call unless D is already aligned (it is for
LLaMA-style models: 4096, 5120, 8192). F needs no padding: the weights are only read through ``idx``. VMEM holds
``2 * chunk * D`` weight elements (4 MiB at D = 4096, f32, chunk 128). The grid is sequential ("arbitrary"): the
DMA buffers and the accumulator carry across steps, so a megacore chip runs it on one TensorCore.

Numerics: products accumulate in float32 (f32 inputs: ``Precision.HIGHEST``), outputs are cast to the input dtype.

Not yet checked on a TPU: the kernels *lower* for TPU (``jax.export``, Pallas -> Mosaic) and run in Pallas' TPU
interpret mode on CPU (which simulates the DMAs and semaphores), but Mosaic's layout passes run only inside the TPU
compiler. The open risk is the one-row DMA at an arbitrary row offset of an (8, 128)-tiled array: JAX's TPU tests
do DMAs at dynamic, unaligned second-minor offsets for 32-bit data, but Mosaic's ``tpu.memref_slice`` verifier
asks for tile-aligned offsets along tiled dims, and a bfloat16 row is half of a packed 32-bit sublane. If Mosaic
rejects it, the fallback is a tile-aligned weight layout prepared once per model, ``[F, P, D / P]`` with P the
sublane tile (8 * 32 / bitwidth), DMAed along the untiled leading dim and read with strided loads.
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

from pallas_kernels.reference import KernelInputError, check_s2_inputs, check_s3_inputs
from prosparse_jax.inference.sparse_ffn import default_buckets
from prosparse_jax.model.activations import ffn_product

Array = jax.Array

#: Active neurons per grid step (rows per DMA batch). A multiple of 128: the x1 blocks are [B, chunk].
DEFAULT_CHUNK = 128

#: TPU lane width: the last dim of every block is a multiple of it.
LANES = 128


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def capacity_buckets(F: int, chunk: int) -> tuple[int, ...]:
    """Grid capacities ``chunk * 2^k`` below F rounded up to ``chunk``, then that bound itself (the CPU backend's
    buckets with no dense fallback: every active count fits the last one)."""
    return default_buckets(F, chunk, crossover=1.0)


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

    Double-buffered: step k starts chunk k + 1's DMAs into the other VMEM buffer before waiting on its own. Rows past
    ``count`` are not fetched: ``compute(w_CxD, n_valid)`` gets the ``[chunk, D]`` buffer whose rows ``>= n_valid``
    hold stale or uninitialised data (possibly NaN) that it must mask out. ``idle`` runs at the steps past the last
    active chunk (no DMA, no compute).
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
               sem: Any, *, chunk: int, drelu: bool, precision: lax.Precision) -> None:
    """x1 for this step's chunk of active neurons: act(gate) * (x @ W_up[idx]^T), written as a [B, chunk] block."""

    def compute(w_up_CxD: Array, n_valid: Array) -> None:
        up_BxC = lax.dot_general(x_ref[...], w_up_CxD, (((1,), (1,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32)
        if drelu:
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
                 drelu: bool, interpret: Any) -> Array:
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
        functools.partial(_s2_kernel, chunk=chunk, drelu=drelu, precision=_precision(x_BxD.dtype)),
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
def _s2_impl(x_BxD: Array, w_gate_DxF: Array, w_up_FxD: Array, threshold: Any, tau: Any, w_down_norms_F: Any, *,
             activation: str, chunk: int, interpret: Any) -> Array:
    prec = _precision(x_BxD.dtype)
    gate_BxF = lax.dot(x_BxD, w_gate_DxF, precision=prec, preferred_element_type=jnp.float32)
    if tau is not None:  # neuron-norm mode: dense up projection, S2 skips nothing
        up_BxF = lax.dot_general(x_BxD, w_up_FxD, (((1,), (1,)), ((), ())), precision=prec,
                                 preferred_element_type=jnp.float32)
        x1_BxF, _ = ffn_product(activation, gate_BxF, up_BxF, threshold)
        norms_BxF = jnp.abs(x1_BxF) * w_down_norms_F.astype(jnp.float32)
        x1_BxF = jnp.where(norms_BxF > jnp.asarray(tau, jnp.float32), x1_BxF, 0.0)
        return x1_BxF.astype(x_BxD.dtype)
    _, act_BxF = ffn_product(activation, gate_BxF, gate_BxF, threshold)
    active_F = jnp.any(act_BxF != 0, axis=0)
    caps = capacity_buckets(act_BxF.shape[1], chunk)
    branch = jnp.searchsorted(jnp.asarray(caps, jnp.int32), jnp.sum(active_F, dtype=jnp.int32), side="left")
    branches = [functools.partial(_s2_gathered, cap=cap, chunk=chunk, drelu=activation == "drelu",
                                  interpret=interpret) for cap in caps]
    return lax.switch(branch, branches, x_BxD, w_up_FxD, act_BxF, active_F)


def s2(x_BxD: Array, w_gate_DxF: Array, w_up_FxD: Array, *, activation: str, threshold: Any = 0.0, tau: Any = None,
       w_down_norms_F: Array | None = None, chunk: int | None = None, interpret: bool = False) -> Array:
    """ProSparse S2 on TPU: ``x1 = act(x W_gate) * (x W_up)`` reading only the active neurons' rows of ``w_up_FxD``.

    Equals :func:`pallas_kernels.reference.s2_reference` up to float32 summation order. Jit-compatible; ``threshold``
    and ``tau`` may be traced scalars.

    Args:
      x_BxD: the FFN input, batch 1..``MAX_BATCH`` decode tokens, float32 or bfloat16.
      w_gate_DxF: W_gate as the model stores it (read densely).
      w_up_FxD: W_up transposed, one row per neuron (``sparse_ffn.prepare_weights``).
      activation: relu / fatrelu / drelu / relu2 (the gate decides the active set), or any activation with ``tau``.
      threshold: FATReLU threshold t (gate >= t kept), >= 0.
      tau: neuron-norm mode: neuron i kept iff ``|x1_i| * ||W_down[i]|| > tau``. The up projection is then dense (S2
        skips nothing; S3 does the skipping).
      w_down_norms_F: ``||W_down[i, :]||``, required with ``tau``.
      chunk: active neurons per grid step (a multiple of 128; default :data:`DEFAULT_CHUNK`).
      interpret: ``True`` runs Pallas' TPU interpret mode on CPU (tests); a ``pltpu.InterpretParams`` is passed on.

    Returns:
      x1_BxF in ``x_BxD.dtype``, exactly zero for every dropped neuron.

    Raises:
      KernelInputError: bad shapes, dtypes, thresholds or chunk (before anything is traced).
    """
    check_s2_inputs(x_BxD, w_gate_DxF, w_up_FxD, activation=activation, threshold=threshold, tau=tau,
                    w_down_norms_F=w_down_norms_F)
    chunk = _check_chunk(chunk)
    return _s2_impl(x_BxD, w_gate_DxF, w_up_FxD, threshold, tau, w_down_norms_F, activation=activation, chunk=chunk,
                    interpret=_interpret_arg(interpret))


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

    Equals :func:`pallas_kernels.reference.s3_reference` up to float32 summation order. Jit-compatible.

    Args:
      x1_BxF: the S2 output, batch 1..``MAX_BATCH``, float32 or bfloat16.
      w_down_FxD: W_down (one row per neuron, as the model stores it).
      chunk: active neurons per grid step (a multiple of 128; default :data:`DEFAULT_CHUNK`).
      interpret: ``True`` runs Pallas' TPU interpret mode on CPU (tests); a ``pltpu.InterpretParams`` is passed on.

    Returns:
      out_BxD in ``x1_BxF.dtype``.

    Raises:
      KernelInputError: bad shapes, dtypes or chunk (before anything is traced).
    """
    check_s3_inputs(x1_BxF, w_down_FxD)
    chunk = _check_chunk(chunk)
    return _s3_impl(x1_BxF, w_down_FxD, chunk=chunk, interpret=_interpret_arg(interpret))
