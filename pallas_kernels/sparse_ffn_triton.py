"""GPU (Pallas, Triton lowering) kernels for ProSparse's S2 and S3 (§4.3) as masked GEMVs; see docs/kernels.md.

As in TEAL (arXiv 2408.14690), weight rows are loaded under a per-neuron mask: a masked-off row issues no memory
transaction, so an inactive neuron costs no traffic and a NaN in its row cannot reach the output. S2's grid runs over
blocks of neurons; S3 is split-K with float32 partials summed outside the kernel. The batch is a static loop of
multiply + reduce per row (Triton's ``dot`` needs every dimension >= 16). Shapes that are not multiples of the
power-of-two blocks are zero-padded on every call; :func:`pad_weights` pays that once per model.
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

Array = jax.Array

#: Default (largest) neurons per program of S2 / per loop step of S3.
DEFAULT_BLOCK_F = 64
#: Default (largest) d_model columns per loop step of S2 / per program of S3. The defaults come from
#: ``bench_pallas_ffn.py --tune`` (docs/benchmarks.md).
DEFAULT_BLOCK_D = 256
#: Smallest block the default choice considers before it falls back to padding.
MIN_BLOCK = 16
#: S3 splits F until the grid has about this many programs (a few per SM on an H100's 132 SMs).
S3_TARGET_PROGRAMS = 512
#: Primitives jax's Triton lowering has no rule for (exact GELU needs erfc): an activation using one is refused
#: unless interpreted.
NO_TRITON_LOWERING = frozenset({"erf", "erfc"})
#: Triton launch parameters (GEMV tiles of 64x256: 8 warps, double-buffered loads).
NUM_WARPS = 8
NUM_STAGES = 2
#: Where S2's dense gate GEMV runs: "xla" (cuBLAS; the kernel reads the [B, F] gate) or "fused" (in-kernel from
#: [block_d, block_f] tiles of W_gate); "xla" is the faster (docs/benchmarks.md).
DEFAULT_GATE = "xla"


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pick_block(dim: int, block: int | None, default: int, name: str) -> int:
    """``block`` if given (a power of two), else the largest power of two in [MIN_BLOCK, default] dividing ``dim``.

    Failing that, ``default`` capped at ``dim`` rounded up to a power of two (the wrapper pads).
    """
    if block is not None:
        if block < 1 or block & (block - 1):
            raise KernelInputError(f"{name}={block} must be a power of two (Triton tiles are power-of-two shaped); "
                                   f"e.g. {_next_pow2(block)}")
        return block
    cap = min(default, _next_pow2(dim))
    b = cap
    while b >= MIN_BLOCK:
        if dim % b == 0:
            return b
        b //= 2
    return cap


def default_blocks(F: int, D: int) -> tuple[int, int]:
    """(block_f, block_d) that :func:`s2` and :func:`s3` use for d_ff ``F`` and d_model ``D`` when none are given."""
    return _pick_block(F, None, DEFAULT_BLOCK_F, "block_f"), _pick_block(D, None, DEFAULT_BLOCK_D, "block_d")


def _pad2(a: Array, rows: int, cols: int) -> Array:
    """``a`` zero-padded to ``[rows, cols]`` (no copy when already that shape)."""
    if a.shape == (rows, cols):
        return a
    return jnp.pad(a, ((0, rows - a.shape[0]), (0, cols - a.shape[1])))


def pad_weights(w_gate_DxF: Array, w_up_FxD: Array, w_down_FxD: Array, w_down_norms_F: Array | None = None, *,
                block_f: int | None = None, block_d: int | None = None) -> dict[str, Array]:
    """One layer's FFN weights, keyed by argument name, zero-padded to multiples of the blocks; call once per model.

    Padded neurons are inactive and padded columns zero, so the FFN is unchanged if x is zero-padded to D_pad and the
    output cut to ``[:, :D]``. Pass the same ``block_f`` / ``block_d`` (or none) to the kernels.
    """
    D, F = w_gate_DxF.shape
    bf = _pick_block(F, block_f, DEFAULT_BLOCK_F, "block_f")
    bd = _pick_block(D, block_d, DEFAULT_BLOCK_D, "block_d")
    Fp, Dp = _round_up(F, bf), _round_up(D, bd)
    out = {"w_gate_DxF": _pad2(w_gate_DxF, Dp, Fp), "w_up_FxD": _pad2(w_up_FxD, Fp, Dp),
           "w_down_FxD": _pad2(w_down_FxD, Fp, Dp)}
    if w_down_norms_F is not None:
        out["w_down_norms_F"] = jnp.pad(w_down_norms_F, (0, Fp - F))
    return out


def _check_num_warps(num_warps: int | None) -> None:
    if num_warps is not None and (num_warps < 1 or num_warps & (num_warps - 1)):
        raise KernelInputError(f"num_warps={num_warps} must be a power of two, e.g. {NUM_WARPS}")


def _compiler_params(num_warps: int | None) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=NUM_WARPS if num_warps is None else num_warps, num_stages=NUM_STAGES)


def _primitives(activation: GatedActivation) -> set[str]:
    """The names of the primitives ``activation.act`` is made of (nested jaxprs included)."""

    def walk(jaxpr: Any) -> set[str]:
        names = set()
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            for v in eqn.params.values():
                for sub in v if isinstance(v, (tuple, list)) else (v,):
                    sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds a Jaxpr
                    if hasattr(sub, "eqns"):
                        names |= walk(sub)
        return names

    return walk(jax.make_jaxpr(lambda g: activation.act(g, 0.0))(jnp.zeros((1,), jnp.float32)).jaxpr)


def _row(b: int) -> Array:
    """A static batch-row index as an int32 scalar (the interpreter's load discharge rejects Python ints)."""
    return jnp.int32(b)


def _any_nonzero(rows: list[Array]) -> Array:
    """Bool vector: element i is True iff some row is non-zero at i (Triton lowering has no jnp.any)."""
    m = jnp.abs(rows[0])
    for r in rows[1:]:
        m = jnp.maximum(m, jnp.abs(r))
    return m > 0


# ---------------------------------------------------------------------------------------------------------------
# S2
# ---------------------------------------------------------------------------------------------------------------
def _s2_kernel(params_ref, x_ref, w_gate_ref, w_up_ref, norms_ref, pred_ref, x1_ref, *, activation: GatedActivation,
               norm_mode: bool, B: int, n_d: int, block_f: int, block_d: int, gate_given: bool, predicted: bool):
    """One program: neurons [i * block_f, (i + 1) * block_f) of x1 for every batch row. ``gate_given``:
    ``w_gate_ref`` holds the gate pre-activations [B, F] (computed outside), else the gate weights [D, F].
    ``predicted``: ``pred_ref`` [F] (int32 1 / 0) is an activation predictor's set; neurons outside it are dropped
    and their up rows not loaded."""
    f0 = pl.multiple_of(pl.program_id(0) * block_f, block_f)
    f_slice = pl.ds(f0, block_f)
    threshold = params_ref[0]
    f32 = jnp.float32

    def x_rows(d0):
        return [plgpu.load(x_ref.at[_row(b), pl.ds(d0, block_d)]).astype(f32) for b in range(B)]

    def gate_body(k, acc):
        d0 = pl.multiple_of(k * block_d, block_d)
        w_DxF = plgpu.load(w_gate_ref.at[pl.ds(d0, block_d), f_slice]).astype(f32)
        return tuple(a + jnp.sum(xb[:, None] * w_DxF, axis=0) for a, xb in zip(acc, x_rows(d0), strict=True))

    zeros = tuple(jnp.zeros((block_f,), f32) for _ in range(B))
    if gate_given:
        gate = tuple(plgpu.load(w_gate_ref.at[_row(b), f_slice]).astype(f32) for b in range(B))
    else:
        gate = lax.fori_loop(0, n_d, gate_body, zeros)

    pred_f = plgpu.load(pred_ref.at[f_slice]) > 0 if predicted else None
    if norm_mode:
        active_f = jnp.full((block_f,), True) if pred_f is None else pred_f
        n_up = n_d if pred_f is None else n_d * jnp.max(active_f.astype(jnp.int32))
    else:
        act = [activation.act(g, threshold) for g in gate]
        active_f = _any_nonzero(act) if pred_f is None else _any_nonzero(act) & pred_f
        # An all-inactive block reads no W_up. (A jnp.where here lowers to an i1 select that Triton's verifier
        # rejects as a loop bound; the product stays int32.)
        n_up = n_d * jnp.max(active_f.astype(jnp.int32))
    mask_FxD = jnp.broadcast_to(active_f[:, None], (block_f, block_d))
    masked_up = not norm_mode or predicted

    def up_body(k, acc):
        d0 = pl.multiple_of(k * block_d, block_d)
        w_ref = w_up_ref.at[f_slice, pl.ds(d0, block_d)]
        w_FxD = (plgpu.load(w_ref, mask=mask_FxD, other=0.0) if masked_up else plgpu.load(w_ref)).astype(f32)
        return tuple(a + jnp.sum(w_FxD * xb[None, :], axis=1) for a, xb in zip(acc, x_rows(d0), strict=True))

    up = lax.fori_loop(0, n_up, up_body, zeros)

    if norm_mode:
        tau = params_ref[1]
        norms = plgpu.load(norms_ref.at[f_slice]).astype(f32)
    for b in range(B):
        # Gate mode: an inactive neuron has act = 0 and up = 0 (its row was not loaded), so x1 = 0 without a select.
        x1 = gated_product(activation, gate[b], up[b], threshold)[0]
        if norm_mode:
            x1 = jnp.where(jnp.abs(x1) * norms > tau, x1, 0.0)
        if predicted:  # act(gate) of a neuron outside the set may be non-zero; its up row was not loaded (0)
            x1 = jnp.where(pred_f, x1, 0.0)
        plgpu.store(x1_ref.at[_row(b), f_slice], x1.astype(x1_ref.dtype))


@functools.partial(jax.jit, static_argnames=("activation", "norm_mode", "block_f", "block_d", "interpret",
                                             "num_warps", "gate", "predicted"))
def _s2_call(params_2, x_BxD, w_gate_DxF, w_up_FxD, norms_F, pred_F, *, activation: GatedActivation, norm_mode: bool,
             block_f: int, block_d: int, interpret: bool, num_warps: int | None = None, gate: str = "xla",
             predicted: bool = False) -> Array:
    B, D = x_BxD.shape
    F = w_gate_DxF.shape[1]
    Fp, Dp = _round_up(F, block_f), _round_up(D, block_d)
    if gate == "xla":  # the dense gate GEMV by XLA (cuBLAS), float32 accumulation, no TF32
        w_gate_DxF = lax.dot(x_BxD, w_gate_DxF.astype(x_BxD.dtype), precision=lax.Precision.HIGHEST,
                             preferred_element_type=jnp.float32)
        w_gate_DxF = _pad2(w_gate_DxF, B, Fp)  # [B, Fp] gate pre-activations; padded neurons have gate 0
    else:
        w_gate_DxF = _pad2(w_gate_DxF, Dp, Fp)
    x_BxD = _pad2(x_BxD, B, Dp)
    w_up_FxD = _pad2(w_up_FxD, Fp, Dp)
    norms_F = jnp.pad(norms_F.astype(jnp.float32), (0, Fp - F))
    pred_F = jnp.pad(pred_F.astype(jnp.int32), (0, Fp - F))  # padded neurons: not predicted
    kernel = functools.partial(_s2_kernel, activation=activation, norm_mode=norm_mode, B=B, n_d=Dp // block_d,
                               block_f=block_f, block_d=block_d, gate_given=gate == "xla", predicted=predicted)
    x1_BxF = pl.pallas_call(
        kernel,
        grid=(Fp // block_f,),
        out_shape=jax.ShapeDtypeStruct((B, Fp), x_BxD.dtype),
        compiler_params=_compiler_params(num_warps),
        interpret=interpret,
        name="prosparse_s2",
    )(params_2, x_BxD, w_gate_DxF, w_up_FxD, norms_F, pred_F)
    return x1_BxF[:, :F]


def s2(x_BxD: Array, w_gate_DxF: Array, w_up_FxD: Array, *, activation: GatedActivation, threshold: Any = 0.0,
       tau: Any = None, w_down_norms_F: Array | None = None, predicted_F: Array | None = None,
       block_f: int | None = None, block_d: int | None = None, num_warps: int | None = None, gate: str | None = None,
       interpret: bool = False) -> Array:
    """ProSparse S2: ``x1 = act(x W_gate) * (x W_up)``, reading W_up rows only for the batch's active neurons.

    Args:
      x_BxD: FFN input, 1..``MAX_BATCH`` decode tokens, float32 or bfloat16.
      w_gate_DxF: gate weights as the model stores them (read densely).
      w_up_FxD: W_up transposed, one contiguous row per neuron (``sparse_ffn.prepare_weights``).
      activation: from ``sparse_ffn.kernel_activation``; a gate-mask one, or any with ``tau``.
      threshold: FATReLU threshold t (gate >= t kept); a Python float or a traced scalar.
      tau: neuron-norm mode (i kept iff ``|x1_i| * w_down_norms_F[i] > tau``; W_up then read in full); may be traced.
      w_down_norms_F: ``||W_down[i, :]||``, required with ``tau``.
      predicted_F: bool [F], an activation predictor's set (batch union): neurons outside it are dropped and their
        up rows not loaded (the gate is still read densely: W_gate's [D, F] layout has no per-neuron rows).
      block_f, block_d: neurons per program / d_model columns per loop step (powers of two); default
        :func:`default_blocks`.
      num_warps: Triton warps per program (power of two); default :data:`NUM_WARPS`.
      gate: ``"xla"`` or ``"fused"``, where the dense gate GEMV runs (same result); default :data:`DEFAULT_GATE`.
      interpret: run in the Pallas interpreter (CPU tests).

    Returns:
      x1_BxF in ``x_BxD.dtype``, exactly zero for every dropped neuron.

    Raises:
      KernelInputError: inputs the kernel cannot run on (checked before anything is traced).
    """
    check_s2_inputs(x_BxD, w_gate_DxF, w_up_FxD, activation=activation, threshold=threshold, tau=tau,
                    w_down_norms_F=w_down_norms_F, predicted_F=predicted_F)
    _check_num_warps(num_warps)
    gate = DEFAULT_GATE if gate is None else gate
    if gate not in ("xla", "fused"):
        raise KernelInputError(f"gate={gate!r}: choose 'xla' (the gate GEMV outside the kernel) or 'fused'")
    missing = sorted(_primitives(activation) & NO_TRITON_LOWERING) if not interpret else []
    if missing:
        raise KernelInputError(f"activation {activation.name!r} uses {', '.join(missing)}, which jax's Triton lowering "
                               "lacks, so this kernel cannot be compiled for a GPU; decode this model with "
                               "implementation='dense'")
    D, F = w_gate_DxF.shape
    bf = _pick_block(F, block_f, DEFAULT_BLOCK_F, "block_f")
    bd = _pick_block(D, block_d, DEFAULT_BLOCK_D, "block_d")
    norm_mode = tau is not None
    params_2 = jnp.stack([jnp.asarray(threshold, jnp.float32).reshape(()),
                          jnp.asarray(0.0 if tau is None else tau, jnp.float32).reshape(())])
    norms_F = w_down_norms_F if norm_mode else jnp.zeros((F,), jnp.float32)
    pred_F = jnp.ones((F,), bool) if predicted_F is None else predicted_F
    return _s2_call(params_2, x_BxD, w_gate_DxF, w_up_FxD, norms_F, pred_F, activation=activation,
                    norm_mode=norm_mode, block_f=bf, block_d=bd, interpret=interpret, num_warps=num_warps, gate=gate,
                    predicted=predicted_F is not None)


# ---------------------------------------------------------------------------------------------------------------
# S3
# ---------------------------------------------------------------------------------------------------------------
def _s3_kernel(x1_ref, w_down_ref, out_ref, *, B: int, n_f: int, chunks_per_split: int, block_f: int,
               block_d: int):
    """Program (j, k): float32 partial sums of out[:, j-th D block] over neuron chunks of split k."""
    d_slice = pl.ds(pl.multiple_of(pl.program_id(0) * block_d, block_d), block_d)
    k = pl.program_id(1)
    c_lo = k * chunks_per_split
    c_hi = jnp.minimum(c_lo + chunks_per_split, n_f)
    f32 = jnp.float32

    def body(c, acc):
        f0 = pl.multiple_of(c * block_f, block_f)
        x1 = [plgpu.load(x1_ref.at[_row(b), pl.ds(f0, block_f)]).astype(f32) for b in range(B)]
        active_f = _any_nonzero(x1)
        mask_FxD = jnp.broadcast_to(active_f[:, None], (block_f, block_d))
        w_FxD = plgpu.load(w_down_ref.at[pl.ds(f0, block_f), d_slice], mask=mask_FxD, other=0.0).astype(f32)
        return tuple(a + jnp.sum(xb[:, None] * w_FxD, axis=0) for a, xb in zip(acc, x1, strict=True))

    acc = lax.fori_loop(c_lo, c_hi, body, tuple(jnp.zeros((block_d,), f32) for _ in range(B)))
    for b in range(B):
        plgpu.store(out_ref.at[k, _row(b), d_slice], acc[b])


@functools.partial(jax.jit, static_argnames=("block_f", "block_d", "interpret", "n_split", "num_warps"))
def _s3_call(x1_BxF: Array, w_down_FxD: Array, *, block_f: int, block_d: int, interpret: bool,
             n_split: int | None = None, num_warps: int | None = None) -> Array:
    """S3 on checked inputs; ``n_split`` (default: about ``S3_TARGET_PROGRAMS`` programs) splits the neuron chunks."""
    B, F = x1_BxF.shape
    D = w_down_FxD.shape[1]
    Fp, Dp = _round_up(F, block_f), _round_up(D, block_d)
    x1_BxF_p = _pad2(x1_BxF, B, Fp)
    w_down_FxD = _pad2(w_down_FxD, Fp, Dp)
    n_f, n_d = Fp // block_f, Dp // block_d
    if n_split is None:
        n_split = S3_TARGET_PROGRAMS // n_d
    n_split = max(1, min(n_f, n_split))
    chunks_per_split = -(-n_f // n_split)
    n_split = -(-n_f // chunks_per_split)  # no empty split
    kernel = functools.partial(_s3_kernel, B=B, n_f=n_f, chunks_per_split=chunks_per_split, block_f=block_f,
                               block_d=block_d)
    partial_SxBxD = pl.pallas_call(
        kernel,
        grid=(n_d, n_split),
        out_shape=jax.ShapeDtypeStruct((n_split, B, Dp), jnp.float32),
        compiler_params=_compiler_params(num_warps),
        interpret=interpret,
        name="prosparse_s3",
    )(x1_BxF_p, w_down_FxD)
    return jnp.sum(partial_SxBxD, axis=0)[:, :D].astype(x1_BxF.dtype)


def s3(x1_BxF: Array, w_down_FxD: Array, *, block_f: int | None = None, block_d: int | None = None,
       num_warps: int | None = None, n_split: int | None = None, interpret: bool = False) -> Array:
    """ProSparse S3: ``out = x1 @ W_down`` (float32 split-K), reading only the W_down rows whose x1 column is non-zero.

    Args:
      x1_BxF: the S2 output, 1..``MAX_BATCH`` rows.
      w_down_FxD: down weights, one contiguous row per neuron.
      block_f, block_d: neurons per loop step / d_model columns per program (powers of two); default
        :func:`default_blocks`.
      num_warps: Triton warps per program (power of two); default :data:`NUM_WARPS`.
      n_split: how many ranges of neuron chunks split F per D block; default about :data:`S3_TARGET_PROGRAMS` programs.
      interpret: run in the Pallas interpreter (CPU tests).

    Raises:
      KernelInputError: inputs the kernel cannot run on (checked before anything is traced).
    """
    check_s3_inputs(x1_BxF, w_down_FxD)
    _check_num_warps(num_warps)
    F, D = w_down_FxD.shape
    bf = _pick_block(F, block_f, DEFAULT_BLOCK_F, "block_f")
    bd = _pick_block(D, block_d, DEFAULT_BLOCK_D, "block_d")
    if n_split is not None and n_split < 1:
        raise KernelInputError(f"n_split={n_split} must be at least 1")
    return _s3_call(x1_BxF, w_down_FxD, block_f=bf, block_d=bd, interpret=interpret, n_split=n_split,
                    num_warps=num_warps)
