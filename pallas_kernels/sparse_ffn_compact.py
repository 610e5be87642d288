"""GPU (Pallas, Triton lowering) kernels for ProSparse's S2 and S3 (§4.3) that compact the live neurons per program.

ProSparse (arXiv 2402.13516) §4.3 (docs/kernels.md). Instead of looping over dense ``[block_f, block_d]`` tiles
under a per-neuron mask
(``sparse_ffn_triton``, as TEAL, arXiv 2408.14690), each program lists the live neurons of its range in registers and
loads only their rows, as Deja Vu's ``gather_gemv`` (arXiv 2310.17157) does with a predictor's index list, so
nearly every loaded byte is useful:

1. ``live`` (the batch union of ``act(gate) != 0``, or of ``x1 != 0`` in S3), its exclusive prefix sum ``pos``
   (``lax.cumsum``, Triton's ``tt.scan``) and the count ``cnt``;
2. a loop with the dynamic bound ``cdiv(cnt, slots)``; sub-tile j's compact ids come from an ``[slots, block]``
   compare-reduce, ``sel[s, n] = live[n] & (pos[n] == j * slots + s)``, ``ids[s] = sum_n sel[s, n] * n``;
3. gathered ``[slots, block_d]`` row tiles (rows ``base + ids``, columns ``d0 + range(block_d)``) loaded under
   ``slot < cnt``: a dead slot and a dead neuron's row issue no memory transaction, so a NaN there cannot reach the
   output;
4. S2 scatters x1 back to its block in registers with the same ``sel`` and stores one contiguous ``[B, block_f]`` tile
   (exact zeros for dropped neurons); S3 accumulates float32 partials ``[n_split, B, D]`` (one per range of
   ``block_f`` neurons), summed by XLA or returned un-reduced (``reduce=False``) for a fusion with the residual add.

S2 keeps the dense gate GEMV in XLA (cuBLAS): it is ~85% of S2's bytes at 88% sparsity and must stay a bandwidth-bound
dense GEMV. The neuron-norm mode (Sparsing Law §4.1, ``tau``) keeps every neuron with a non-zero ``act(gate)`` live in
S2, as the reference defines. No ``jnp.nonzero`` and no ``lax.cond`` / ``lax.switch`` on device values (each costs
extra kernels or a host sync per layer on a GPU). Same public contract as ``sparse_ffn_triton.s2`` / ``s3``; checks
from ``reference``. d_model that is not a multiple of ``block_d`` is zero-padded on every call (a no-op at the
7B / 13B / MiniCPM shapes); d_ff never is (only x1 and the gate, which are small, are padded).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.reference import (
    GatedActivation,
    KernelInputError,
    check_s2_inputs,
    check_s3_inputs,
    gated_product,
)
from pallas_kernels.sparse_ffn_triton import (
    NO_TRITON_LOWERING,
    _any_nonzero,
    _check_num_warps,
    _pad2,
    _pick_block,
    _primitives,
    _round_up,
    _row,
)

Array = jax.Array

#: S2: neurons per program (one program per block; 7B: 172 programs).
S2_BLOCK_F = 64
#: S2: live neurons per gathered sub-tile (usually one sub-tile per block at 88% sparsity: ~7.7 live of 64).
S2_SLOTS = 8
#: S2: d_model columns per gathered load (slots x block_d = 8 K elements per load).
S2_BLOCK_D = 1024
#: S3: neurons per split (one float32 partial per split; 7B: 43 splits).
S3_BLOCK_F = 256
#: S3: live neurons per gathered sub-tile (~31 live of 256 at 88%: one sub-tile).
S3_SLOTS = 32
#: S3: d_model columns per program (7B: 8 x 43 = 344 programs).
S3_BLOCK_D = 512
#: Triton launch parameters.
NUM_WARPS = 4
NUM_STAGES = 2


def _pick_pow2(value: int | None, default: int, name: str) -> int:
    if value is None:
        return default
    if value < 1 or value & (value - 1):
        raise KernelInputError(f"{name}={value} must be a power of two (Triton tiles are power-of-two shaped)")
    return value


def _compiler_params(num_warps: int | None) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=NUM_WARPS if num_warps is None else num_warps, num_stages=NUM_STAGES)


def _compact(live_N: Array, n_slots: int):
    """(pos_N, cnt, n_sub, select): the exclusive prefix sum of ``live_N``, its count, ``cdiv(cnt, n_slots)``, and
    ``select(j) -> (sel_SxN, ids_S, valid_S)`` for sub-tile j (the j-th ``n_slots`` live neurons, in order)."""
    n = live_N.shape[0]
    a_N = live_N.astype(jnp.int32)
    pos_N = lax.cumsum(a_N, axis=0) - a_N
    cnt = jnp.sum(a_N)
    # int32 arithmetic (a select would give Triton's verifier an i1 loop bound); cnt >= 0, so lax.div is a floor.
    n_sub = lax.div(cnt + (n_slots - 1), jnp.int32(n_slots))
    lane_N = lax.broadcasted_iota(jnp.int32, (n_slots, n), 1)

    def select(j):
        slot_S = j * n_slots + lax.broadcasted_iota(jnp.int32, (n_slots,), 0)
        sel_SxN = live_N[None, :] & (pos_N[None, :] == slot_S[:, None])
        ids_S = jnp.sum(jnp.where(sel_SxN, lane_N, 0), axis=1)  # dead slots: 0, a row inside the range (masked)
        return sel_SxN, ids_S, slot_S < cnt

    return pos_N, cnt, n_sub, select


def _row_tile(ref: Any, rows_S: Array, d0: Array, block_d: int) -> Any:
    """``ref`` at rows ``rows_S`` and columns ``[d0, d0 + block_d)``: an ``[S, block_d]`` gathered tile.

    Both indices are integer arrays (``[S, 1]`` and ``[1, block_d]``), not ``ref.at[rows_S, pl.ds(d0, block_d)]``:
    Pallas' interpreter discharges no load that mixes an integer-array index with a slice (jax 0.10.2), while the
    Triton lowering builds the same offsets ``rows * D + (d0 + range(block_d))`` from either form.
    """
    cols_D = d0 + lax.broadcasted_iota(jnp.int32, (block_d,), 0)
    return ref.at[rows_S[:, None], cols_D[None, :]]


def _gather(sel_SxN: Array, v_N: Array) -> Array:
    """``v_N`` at the selected lane of each slot (0 for a dead slot): ``sum_n sel[s, n] * v[n]`` without a product."""
    return jnp.sum(jnp.where(sel_SxN, v_N[None, :], 0.0), axis=1)


def _scatter(sel_SxN: Array, v_S: Array) -> Array:
    """Back to the block: lane n gets the value of the slot that selected it, 0 if none."""
    return jnp.sum(jnp.where(sel_SxN, v_S[:, None], 0.0), axis=0)


# ---------------------------------------------------------------------------------------------------------------
# S2
# ---------------------------------------------------------------------------------------------------------------
def _s2_kernel(params_ref, x_ref, gate_ref, w_up_ref, norms_ref, pred_ref, x1_ref, *, activation: GatedActivation,
               norm_mode: bool, predicted: bool, B: int, F: int, n_d: int, block_f: int, block_d: int, slots: int):
    """Program i: neurons [i * block_f, (i + 1) * block_f) of x1 for every batch row, reading W_up rows of live ones
    only. ``gate_ref`` holds the gate pre-activations [B, F_pad] (float32, XLA); ``pred_ref`` [F_pad] int32 1 / 0."""
    f0 = pl.multiple_of(pl.program_id(0) * block_f, block_f)
    f_slice = pl.ds(f0, block_f)
    threshold = params_ref[0]
    f32 = jnp.float32

    gate = [plgpu.load(gate_ref.at[_row(b), f_slice], eviction_policy="evict_last") for b in range(B)]
    act = [activation.act(g, threshold) for g in gate]
    live_F = _any_nonzero(act) & (f0 + lax.broadcasted_iota(jnp.int32, (block_f,), 0) < F)
    if predicted:
        live_F = live_F & (plgpu.load(pred_ref.at[f_slice]) > 0)
    _, _, n_sub, select = _compact(live_F, slots)

    def sub_tile(j, x1_blk):
        sel_SxF, ids_S, valid_S = select(j)
        rows_S = f0 + ids_S
        mask_SxD = jnp.broadcast_to(valid_S[:, None], (slots, block_d))

        def d_step(k, up):
            d0 = pl.multiple_of(k * block_d, block_d)
            w_SxD = plgpu.load(_row_tile(w_up_ref, rows_S, d0, block_d), mask=mask_SxD, other=0.0,
                               eviction_policy="evict_first").astype(f32)
            xs = [plgpu.load(x_ref.at[_row(b), pl.ds(d0, block_d)]).astype(f32) for b in range(B)]
            return tuple(u + jnp.sum(w_SxD * xb[None, :], axis=1) for u, xb in zip(up, xs, strict=True))

        up = lax.fori_loop(0, n_d, d_step, tuple(jnp.zeros((slots,), f32) for _ in range(B)))
        out = []
        for b in range(B):
            x1_S = gated_product(activation, _gather(sel_SxF, gate[b]), up[b], threshold)[0]
            out.append(x1_blk[b] + _scatter(sel_SxF, x1_S))
        return tuple(out)

    x1_blk = lax.fori_loop(0, n_sub, sub_tile, tuple(jnp.zeros((block_f,), f32) for _ in range(B)))
    if norm_mode:
        tau = params_ref[1]
        norms_F = plgpu.load(norms_ref.at[f_slice])
    for b in range(B):
        x1 = x1_blk[b]
        if norm_mode:
            x1 = jnp.where(jnp.abs(x1) * norms_F > tau, x1, 0.0)
        plgpu.store(x1_ref.at[_row(b), f_slice], x1.astype(x1_ref.dtype))


@functools.partial(jax.jit, static_argnames=("activation", "norm_mode", "predicted", "block_f", "block_d", "slots",
                                             "interpret", "num_warps"))
def _s2_call(params_2, x_BxD, w_gate_DxF, w_up_FxD, norms_F, pred_F, *, activation: GatedActivation, norm_mode: bool,
             predicted: bool, block_f: int, block_d: int, slots: int, interpret: bool,
             num_warps: int | None = None) -> Array:
    B, D = x_BxD.shape
    F = w_gate_DxF.shape[1]
    Fp, Dp = _round_up(F, block_f), _round_up(D, block_d)
    # The dense gate GEMV by XLA (cuBLAS), float32 accumulation, no TF32.
    gate_BxF = lax.dot(x_BxD, w_gate_DxF, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    gate_BxF = _pad2(gate_BxF, B, Fp)  # padded neurons are never live (the kernel masks f >= F)
    x_BxD = _pad2(x_BxD, B, Dp)
    w_up_FxD = _pad2(w_up_FxD, F, Dp)  # d_model only; rows are gathered by live index < F
    norms_F = jnp.pad(norms_F.astype(jnp.float32), (0, Fp - F))
    pred_F = jnp.pad(pred_F.astype(jnp.int32), (0, Fp - F))
    kernel = functools.partial(_s2_kernel, activation=activation, norm_mode=norm_mode, predicted=predicted, B=B, F=F,
                               n_d=Dp // block_d, block_f=block_f, block_d=block_d, slots=slots)
    x1_BxF = pl.pallas_call(
        kernel,
        grid=(Fp // block_f,),
        out_shape=jax.ShapeDtypeStruct((B, Fp), x_BxD.dtype),
        compiler_params=_compiler_params(num_warps),
        interpret=interpret,
        name="prosparse_compact_s2",
    )(params_2, x_BxD, gate_BxF, w_up_FxD, norms_F, pred_F)
    return x1_BxF[:, :F]


def s2(x_BxD: Array, w_gate_DxF: Array, w_up_FxD: Array, *, activation: GatedActivation, threshold: Any = 0.0,
       tau: Any = None, w_down_norms_F: Array | None = None, predicted_F: Array | None = None,
       block_f: int | None = None, block_d: int | None = None, slots: int | None = None,
       num_warps: int | None = None, gate: str | None = None, interpret: bool = False) -> Array:
    """ProSparse S2: ``x1 = act(x W_gate) * (x W_up)``, gathering W_up rows of the batch's live neurons only.

    Args:
      x_BxD: FFN input, 1..``MAX_BATCH`` decode tokens, float32 or bfloat16.
      w_gate_DxF: gate weights as the model stores them (read densely by XLA).
      w_up_FxD: W_up transposed, one contiguous row per neuron (``sparse_ffn.prepare_weights``).
      activation: from ``sparse_ffn.kernel_activation``; a gate-mask one, or any with ``tau`` or ``predicted_F``.
      threshold: FATReLU threshold t (gate >= t kept); a Python float or a traced scalar.
      tau: neuron-norm mode (i kept iff ``|x1_i| * w_down_norms_F[i] > tau``; every neuron with a non-zero
        ``act(gate)`` is computed); may be traced.
      w_down_norms_F: ``||W_down[i, :]||``, required with ``tau``.
      predicted_F: bool [F], an activation predictor's set (batch union): neurons outside it are dropped and their
        up rows not loaded.
      block_f: neurons per program (power of two); default :data:`S2_BLOCK_F`.
      block_d: d_model columns per gathered load (power of two); default the largest power of two up to
        :data:`S2_BLOCK_D` dividing d_model.
      slots: live neurons per gathered sub-tile (power of two); default :data:`S2_SLOTS`.
      num_warps: Triton warps per program (power of two); default :data:`NUM_WARPS`.
      gate: only ``"xla"`` (the dense gate GEMV by XLA); accepted for ``sparse_ffn_triton.s2`` compatibility.
      interpret: run in the Pallas interpreter (CPU tests).

    Returns:
      x1_BxF in ``x_BxD.dtype``, exactly zero for every dropped neuron.

    Raises:
      KernelInputError: inputs the kernel cannot run on (checked before anything is traced).
    """
    check_s2_inputs(x_BxD, w_gate_DxF, w_up_FxD, activation=activation, threshold=threshold, tau=tau,
                    w_down_norms_F=w_down_norms_F, predicted_F=predicted_F)
    _check_num_warps(num_warps)
    if gate not in (None, "xla"):
        raise KernelInputError(f"gate={gate!r}: the compact S2 runs the gate GEMV in XLA only ('xla'); the in-kernel "
                               "gate is sparse_ffn_triton.s2(gate='fused')")
    missing = sorted(_primitives(activation) & NO_TRITON_LOWERING) if not interpret else []
    if missing:
        raise KernelInputError(f"activation {activation.name!r} uses {', '.join(missing)}, which jax's Triton lowering "
                               "lacks, so this kernel cannot be compiled for a GPU; decode this model with "
                               "implementation='dense'")
    D, F = w_gate_DxF.shape
    bf = _pick_pow2(block_f, S2_BLOCK_F, "block_f")
    bd = _pick_block(D, block_d, S2_BLOCK_D, "block_d")
    sl = min(_pick_pow2(slots, S2_SLOTS, "slots"), bf)
    norm_mode = tau is not None
    params_2 = jnp.stack([jnp.asarray(threshold, jnp.float32).reshape(()),
                          jnp.asarray(0.0 if tau is None else tau, jnp.float32).reshape(())])
    norms_F = w_down_norms_F if norm_mode else jnp.zeros((F,), jnp.float32)
    pred_F = jnp.ones((F,), bool) if predicted_F is None else predicted_F
    return _s2_call(params_2, x_BxD, w_gate_DxF.astype(x_BxD.dtype), w_up_FxD, norms_F, pred_F,
                    activation=activation, norm_mode=norm_mode, predicted=predicted_F is not None, block_f=bf,
                    block_d=bd, slots=sl, interpret=interpret, num_warps=num_warps)


# ---------------------------------------------------------------------------------------------------------------
# S3
# ---------------------------------------------------------------------------------------------------------------
def _s3_kernel(x1_ref, w_down_ref, out_ref, *, B: int, block_f: int, block_d: int, slots: int):
    """Program (j, k): the float32 partial of out[:, j-th d_model block] over the live neurons of split k."""
    d0 = pl.multiple_of(pl.program_id(0) * block_d, block_d)
    d_slice = pl.ds(d0, block_d)
    k = pl.program_id(1)
    f0 = pl.multiple_of(k * block_f, block_f)
    f32 = jnp.float32
    # x1 is padded with zero columns to whole splits, so a neuron past d_ff is never live.
    x1 = [plgpu.load(x1_ref.at[_row(b), pl.ds(f0, block_f)], eviction_policy="evict_last").astype(f32)
          for b in range(B)]
    _, _, n_sub, select = _compact(_any_nonzero(x1), slots)

    def sub_tile(t, acc):
        sel_SxF, ids_S, valid_S = select(t)
        mask_SxD = jnp.broadcast_to(valid_S[:, None], (slots, block_d))
        w_SxD = plgpu.load(_row_tile(w_down_ref, f0 + ids_S, d0, block_d), mask=mask_SxD, other=0.0,
                           eviction_policy="evict_first").astype(f32)
        return tuple(a + jnp.sum(_gather(sel_SxF, xb)[:, None] * w_SxD, axis=0)
                     for a, xb in zip(acc, x1, strict=True))

    acc = lax.fori_loop(0, n_sub, sub_tile, tuple(jnp.zeros((block_d,), f32) for _ in range(B)))
    for b in range(B):
        plgpu.store(out_ref.at[k, _row(b), d_slice], acc[b])


@functools.partial(jax.jit, static_argnames=("block_f", "block_d", "slots", "interpret", "num_warps", "reduce"))
def _s3_call(x1_BxF: Array, w_down_FxD: Array, *, block_f: int, block_d: int, slots: int, interpret: bool,
             num_warps: int | None, reduce: bool) -> Array:
    B, F = x1_BxF.shape
    D = w_down_FxD.shape[1]
    n_split, Dp = -(-F // block_f), _round_up(D, block_d)
    x1_BxF_p = _pad2(x1_BxF, B, n_split * block_f)
    w_down_FxD = _pad2(w_down_FxD, F, Dp)  # d_model only; rows are gathered by live index < F
    kernel = functools.partial(_s3_kernel, B=B, block_f=block_f, block_d=block_d, slots=slots)
    partial_SxBxD = pl.pallas_call(
        kernel,
        grid=(Dp // block_d, n_split),
        out_shape=jax.ShapeDtypeStruct((n_split, B, Dp), jnp.float32),
        compiler_params=_compiler_params(num_warps),
        interpret=interpret,
        name="prosparse_compact_s3",
    )(x1_BxF_p, w_down_FxD)
    partial_SxBxD = partial_SxBxD[:, :, :D]
    if not reduce:
        return partial_SxBxD
    return jnp.sum(partial_SxBxD, axis=0).astype(x1_BxF.dtype)


def s3(x1_BxF: Array, w_down_FxD: Array, *, block_f: int | None = None, block_d: int | None = None,
       slots: int | None = None, num_warps: int | None = None, reduce: bool = True,
       interpret: bool = False) -> Array:
    """ProSparse S3: ``out = x1 @ W_down`` (float32 split over neuron ranges), gathering only the W_down rows whose
    x1 column is non-zero.

    Args:
      x1_BxF: the S2 output, 1..``MAX_BATCH`` rows.
      w_down_FxD: down weights, one contiguous row per neuron.
      block_f: neurons per split, i.e. per float32 partial (power of two); default :data:`S3_BLOCK_F`.
      block_d: d_model columns per program (power of two); default the largest power of two up to
        :data:`S3_BLOCK_D` dividing d_model.
      slots: live neurons per gathered sub-tile (power of two); default :data:`S3_SLOTS`.
      num_warps: Triton warps per program (power of two); default :data:`NUM_WARPS`.
      reduce: sum the partials (default); False returns them, for the caller to fuse the sum with its residual add.
      interpret: run in the Pallas interpreter (CPU tests).

    Returns:
      out_BxD in ``x1_BxF.dtype``; with ``reduce=False`` the float32 partials ``[cdiv(F, block_f), B, D]``, whose sum
      over axis 0 is ``out_BxD`` before the cast.

    Raises:
      KernelInputError: inputs the kernel cannot run on (checked before anything is traced).
    """
    check_s3_inputs(x1_BxF, w_down_FxD)
    _check_num_warps(num_warps)
    F, D = w_down_FxD.shape
    bf = _pick_pow2(block_f, S3_BLOCK_F, "block_f")
    bd = _pick_block(D, block_d, S3_BLOCK_D, "block_d")
    sl = min(_pick_pow2(slots, S3_SLOTS, "slots"), bf)
    return _s3_call(x1_BxF, w_down_FxD, block_f=bf, block_d=bd, slots=sl, interpret=interpret, num_warps=num_warps,
                    reduce=reduce)
