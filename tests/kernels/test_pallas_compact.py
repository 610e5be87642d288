"""The compacting Pallas Triton S2 / S3 kernels equal their pure-jnp references and lower for CUDA.

On a CPU the kernels run in Pallas' interpret mode; on a GPU the same tests run the compiled Triton kernels.

Tolerances (never loosened to pass), as in test_pallas_triton.py:

* float32: ``max|kernel - ref| <= 1e-5 * max(1, max|ref|)`` -- the two differ only in float32 summation order.
* bfloat16: per element ``|kernel - ref| <= 2**-7 * |ref| + 1e-5 * max(1, max|ref|)`` (one bf16 rounding step).

Gate cases are exact by construction: x in {-1, 0, 1} and W_gate in multiples of 1/8 (exact in bf16 too), so every
gate is a multiple of 1/8 computed exactly in any summation order, and the cut (0 for the ReLU family, an odd multiple
of 1/16 for FATReLU) can never tie. A per-neuron bias (x[:, 0] = 1, W_gate[0, :]) drops a chosen set of neurons.
Dropped neurons' weight rows hold NaN in the kernels' inputs (the references get clean weights): a kernel that read
one would return NaN.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels import reference
from pallas_kernels import sparse_ffn_compact as compact
from pallas_kernels.reference import KernelInputError
from prosparse_jax.inference.sparse_ffn import kernel_activation

SPARSITIES = (0.0, 0.5, 0.88, 0.99, 1.0)
TRITON_CALL = "__gpu$xla.gpu.triton"
INTERPRET = jax.default_backend() != "gpu"  # compiled Triton kernels on a GPU, interpreted elsewhere
FATRELU_T = 0.4375  # 7/16: gates are multiples of 1/8, so none sits at the threshold


def _f64(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _assert_close(out, ref, dtype) -> None:
    out, ref = _f64(out), _f64(ref)
    assert out.shape == ref.shape
    assert np.all(np.isfinite(out))
    scale = max(1.0, float(np.max(np.abs(ref))))
    bound = 1e-5 * scale
    if jnp.dtype(dtype) == jnp.bfloat16:
        bound = bound + 2.0**-7 * np.abs(ref)
    err = np.abs(out - ref)
    assert np.all(err <= bound), f"max err {err.max():.3g} (worst excess {np.max(err - bound):.3g}), scale {scale:.3g}"


def _poison(w_FxD, keep_F):
    """``w_FxD`` with NaN in every row outside ``keep_F``."""
    return jnp.where(jnp.asarray(keep_F)[:, None], w_FxD, jnp.nan).astype(w_FxD.dtype)


def _gate_case(B: int, D: int, F: int, activation: str, sparsity: float, dtype, seed: int = 0):
    """(x, w_gate, w_up, kwargs, active_F) with exactly ``round(sparsity * F)`` neurons dropped (exact gates)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-1, 2, size=(B, D)).astype(np.float32)
    x[:, 0] = 1.0
    wg = (rng.integers(-4, 5, size=(D, F)) / 8).astype(np.float32)
    wg[0, :] = 0.0
    g0_F = (x @ wg).max(axis=0)  # exact: small dyadic rationals
    cut = 0.375 if activation == "fatrelu" else 0.0  # dropped iff max_b gate <= cut
    active_F = np.ones(F, bool)
    active_F[rng.permutation(F)[:round(sparsity * F)]] = False
    step_F = rng.integers(1, 4, size=F) / 8
    # ReLU family: active max gate >= 1/8, dropped <= -1/8. FATReLU: active >= 1/2 > t, dropped <= 3/8 < t.
    wg[0, :] = np.where(active_F, cut + step_F, cut - step_F + 0.125 * (activation == "fatrelu")) - g0_F
    wu = (rng.normal(size=(F, D)) / np.sqrt(D)).astype(np.float32)
    kwargs = {"threshold": FATRELU_T} if activation == "fatrelu" else {}
    x, wg, wu = (jnp.asarray(a, dtype) for a in (x, wg, wu))
    assert np.array_equal(np.any(_f64(x) @ _f64(wg) > cut, axis=0), active_F)  # exact in dtype too
    return x, wg, wu, kwargs, active_F


def _norm_case(B: int, D: int, F: int, sparsity: float, dtype, seed: int = 0):
    """SiLU in the neuron-norm mode: (x, w_gate, w_up, kwargs, active_F) with tau in the widest gap between the
    per-row values ``|x1| * norm`` that gives a sparsity within 0.03 of ``sparsity``."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(B, D)), dtype)
    wg = jnp.asarray(rng.normal(size=(D, F)) / np.sqrt(D), dtype)
    wu = jnp.asarray(rng.normal(size=(F, D)) / np.sqrt(D), dtype)
    norms_F = jnp.asarray(rng.uniform(0.5, 1.5, size=F), jnp.float32)
    g, u = _f64(x) @ _f64(wg), _f64(x) @ _f64(wu).T
    v_BxF = np.abs(g / (1 + np.exp(-g)) * u) * _f64(norms_F)
    vals = np.unique(v_BxF)
    cuts = np.concatenate([[0.0], (vals[:-1] + vals[1:]) / 2, [2 * vals[-1]]])
    gaps = np.concatenate([[vals[0]], np.diff(vals) / 2, [vals[-1]]])
    achieved = np.mean(v_BxF.max(axis=0)[None, :] <= cuts[:, None], axis=1)
    ok = np.abs(achieved - sparsity) <= 0.03
    j = np.flatnonzero(ok)[np.argmax(gaps[ok])]
    assert gaps[j] > 1e-4 * vals[-1], "no safe tau; change the seed"
    return x, wg, wu, {"tau": float(cuts[j]), "w_down_norms_F": norms_F}, v_BxF.max(axis=0) > cuts[j]


def _x1_case(B: int, F: int, sparsity: float, dtype, seed: int = 0):
    """x1 with round(sparsity * F) all-zero columns and, in the active columns, some zero rows (union semantics)."""
    rng = np.random.default_rng(seed)
    x1 = rng.normal(size=(B, F)).astype(np.float32)
    x1[:, rng.permutation(F)[:round(sparsity * F)]] = 0.0
    zero_BxF = rng.random((B, F)) < 0.3
    zero_BxF[0] = False  # row 0 keeps every active column active
    x1[zero_BxF] = 0.0
    return jnp.asarray(x1, dtype)


# ---------------------------------------------------------------------------------------------------------------
# S2 / S3 against the references, NaN in every dropped row
# ---------------------------------------------------------------------------------------------------------------
# (dtype, B, D, F, activation, blocks): F and D are not multiples of the blocks; the small explicit blocks give
# several programs, several sub-tiles per program (up to 8 at 0% sparsity) and several d_model steps.
SMALL = dict(block_f=32, slots=4, block_d=16)
S2_CASES = [(jnp.float32, 1, 48, 100, "relu", SMALL), (jnp.float32, 3, 40, 100, "fatrelu", SMALL),
            (jnp.bfloat16, 8, 48, 100, "drelu", SMALL), (jnp.float32, 3, 48, 100, "relu2", {}),
            (jnp.float32, 3, 48, 100, "silu", SMALL)]


@pytest.mark.parametrize("dtype,B,D,F,activation,blocks", S2_CASES)
def test_s2_equals_reference_at_every_sparsity(dtype, B, D, F, activation, blocks):
    act = kernel_activation(activation)
    traces = []

    def s2(x, wg, wu, kw):
        traces.append(1)
        return compact.s2(x, wg, wu, activation=act, interpret=INTERPRET, **blocks, **kw)

    run = jax.jit(s2)
    for sparsity in SPARSITIES:
        if activation == "silu":
            x, wg, wu, kw, active_F = _norm_case(B, D, F, sparsity, dtype)
            wu_k = wu  # every neuron with act != 0 is computed in the norm mode
        else:
            x, wg, wu, kw, active_F = _gate_case(B, D, F, activation, sparsity, dtype)
            wu_k = _poison(wu, active_F)
        assert abs(1 - active_F.mean() - sparsity) <= 0.03, (sparsity, active_F.mean())
        ref = reference.s2_reference(x, wg, wu, activation=act, **kw)
        out = run(x, wg, wu_k, kw)
        assert out.dtype == x.dtype and out.shape == (B, F)
        _assert_close(out, ref, dtype)
        assert np.all(_f64(out)[:, ~active_F] == 0.0)  # dropped neurons are exact zeros
    assert len(traces) == 1  # threshold / tau enter the kernel as data: one compiled kernel serves every layer


S3_CASES = [(jnp.float32, 1, 100, 48, dict(block_f=32, slots=4, block_d=16)),
            (jnp.float32, 3, 200, 40, dict(block_f=64, slots=8, block_d=16)),
            (jnp.bfloat16, 8, 100, 48, {})]


@pytest.mark.parametrize("dtype,B,F,D,blocks", S3_CASES)
def test_s3_equals_reference_at_every_sparsity(dtype, B, F, D, blocks):
    w_down = jnp.asarray(np.random.default_rng(1).normal(size=(F, D)) / np.sqrt(F), dtype)
    for sparsity in SPARSITIES:
        x1 = _x1_case(B, F, sparsity, dtype)
        active_F = np.any(_f64(x1) != 0, axis=0)
        assert abs(1 - active_F.mean() - sparsity) <= 0.01
        out = compact.s3(x1, _poison(w_down, active_F), interpret=INTERPRET, **blocks)
        assert out.dtype == x1.dtype and out.shape == (B, D)
        _assert_close(out, reference.s3_reference(x1, w_down), dtype)


def test_s3_partials_sum_to_the_reference():
    """reduce=False: float32 partials, one per range of block_f neurons, summing to S3 before the cast."""
    B, F, D = 3, 200, 40
    x1 = _x1_case(B, F, 0.88, jnp.float32, seed=4)
    w_down = jnp.asarray(np.random.default_rng(5).normal(size=(F, D)) / np.sqrt(F), jnp.float32)
    active_F = np.any(_f64(x1) != 0, axis=0)
    parts = compact.s3(x1, _poison(w_down, active_F), block_f=64, slots=4, block_d=16, reduce=False,
                       interpret=INTERPRET)
    assert parts.shape == (4, B, D) and parts.dtype == jnp.float32  # cdiv(200, 64) splits
    assert np.all(np.isfinite(_f64(parts)))
    _assert_close(jnp.sum(parts, axis=0), reference.s3_reference(x1, w_down), jnp.float32)
    for k in range(4):  # split k holds exactly the contribution of neurons [64k, 64k + 64)
        lo, hi = 64 * k, min(64 * k + 64, F)
        want = _f64(x1)[:, lo:hi] @ np.where(active_F[lo:hi, None], _f64(w_down)[lo:hi], 0.0)
        _assert_close(parts[k], want, jnp.float32)


def test_s2_then_s3_is_the_sparse_ffn():
    x, wg, wu, _, active_F = _gate_case(3, 48, 100, "relu", 0.88, jnp.float32, seed=2)
    wd = jnp.asarray(np.random.default_rng(3).normal(size=(100, 48)) / 10, jnp.float32)
    relu = kernel_activation("relu")
    x1 = compact.s2(x, wg, _poison(wu, active_F), activation=relu, interpret=INTERPRET)
    out = compact.s3(x1, _poison(wd, active_F), interpret=INTERPRET)
    want = _f64(reference.s2_reference(x, wg, wu, activation=relu)) @ _f64(wd)
    _assert_close(out, want, jnp.float32)


# ---------------------------------------------------------------------------------------------------------------
# S2 with an activation predictor's set (predicted_F)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_s2_with_a_predicted_set_matches_reference(activation):
    """Neurons outside predicted_F are zero whatever their gate, and their up rows are never read."""
    x, wg, wu, _, active_F = _gate_case(2, 48, 100, "relu", 0.5, jnp.float32, seed=6)
    rng = np.random.default_rng(7)
    pred_F = rng.random(100) < np.where(active_F, 0.5, 0.25)
    assert np.any(active_F & ~pred_F)  # the set drops neurons that were active
    act = kernel_activation(activation)
    out = compact.s2(x, wg, _poison(wu, pred_F), activation=act, predicted_F=jnp.asarray(pred_F), block_f=32,
                     slots=4, interpret=INTERPRET)
    _assert_close(out, reference.s2_reference(x, wg, wu, activation=act, predicted_F=jnp.asarray(pred_F)),
                  jnp.float32)
    assert np.all(_f64(out)[:, ~pred_F] == 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Bad input fails before any kernel is traced
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,words", [("fused_gate", "gate='fused'"), ("slots", "slots=6"), ("batch_9", "batch 9"),
                                        ("silu_no_tau", "pplp"), ("gelu_on_gpu", "erf")])
def test_s2_bad_input_raises_before_kernel(case, words):
    x, wg, wu, kw = jnp.ones((2, 16)), jnp.ones((16, 32)), jnp.ones((32, 16)), {"activation": "relu"}
    if case == "fused_gate":
        kw["gate"] = "fused"
    elif case == "slots":
        kw["slots"] = 6
    elif case == "batch_9":
        x = jnp.ones((9, 16))
    elif case == "silu_no_tau":
        kw["activation"] = "silu"
    elif case == "gelu_on_gpu":
        kw.update(activation="gelu", tau=0.1, w_down_norms_F=jnp.ones(32))
    kw["activation"] = kernel_activation(kw["activation"])
    with pytest.raises(KernelInputError, match=words):
        compact.s2(x, wg, wu, interpret=case != "gelu_on_gpu" and INTERPRET, **kw)


def test_s3_bad_input_raises_before_kernel():
    with pytest.raises(KernelInputError, match="w_down_FxD"):
        compact.s3(jnp.ones((2, 32)), jnp.ones((16, 32)), interpret=INTERPRET)
    with pytest.raises(KernelInputError, match="block_f=48"):
        compact.s3(jnp.ones((2, 32)), jnp.ones((32, 16)), block_f=48, interpret=INTERPRET)


# ---------------------------------------------------------------------------------------------------------------
# Lowering for CUDA (Pallas' Triton backend) at the LLaMA2-7B shape, no GPU needed
# ---------------------------------------------------------------------------------------------------------------
CHECKED_JAX = ("0.10.",)  # the Triton IR hook below reaches into jax._src (as test_pallas_triton_ir.py)


def _export(fn, *args, monkeypatch=None) -> tuple[str, list[str]]:
    """(StableHLO of the CUDA export of ``fn``, Triton IR of each pallas_call, verified) -- IR only with
    ``monkeypatch``."""
    modules = []
    if monkeypatch is not None:
        from jax._src.pallas.triton import lowering as triton_lowering  # private, see CHECKED_JAX

        lower = triton_lowering.lower_jaxpr_to_triton_module

        def spy(*a, **kw):
            result = lower(*a, **kw)
            result.module.operation.verify()  # what the GPU's Triton checks first
            modules.append(result.module.operation.get_asm())
            return result

        monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", spy)
    exp = export.export(jax.jit(fn), platforms=["cuda"],
                        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)
    return exp.mlir_module(), modules


def _loads(triton_ir: str, shape: str) -> list[bool]:
    """For each tt.load of a ``shape`` (e.g. "8x1024") tile: does it take a mask?"""
    masked = []
    for ln in triton_ir.splitlines():
        if "tt.load" in ln and f"tensor<{shape}x!tt.ptr<" in ln:
            generic = re.search(r'"tt.load"\(([^)]*)\)', ln)
            operands = generic.group(1) if generic else re.search(r"tt.load\s+([^:]*)", ln).group(1)
            masked.append(operands.count("%") > 1)
    return masked


@pytest.mark.parametrize("op", ["s2_relu", "s2_fatrelu_predicted", "s2_silu_norm", "s3", "s3_partials"])
def test_lowers_for_cuda_with_masked_gathered_tiles(op, monkeypatch):
    """One Triton kernel per operator, no conditional; its IR verifies, has the prefix sum (tt.scan), a loop with a
    dynamic bound, masked gathered [slots, block_d] row tiles and no dense [block_f, block_d] tile."""
    B, D, F, dtype = 4, 4096, 11008, jnp.bfloat16
    S = jax.ShapeDtypeStruct
    x, wg, w_FxD, x1 = S((B, D), dtype), S((D, F), dtype), S((F, D), dtype), S((B, F), dtype)
    scalar, norms, pred = S((), jnp.float32), S((F,), jnp.float32), S((F,), jnp.bool_)
    if op.startswith("s3"):
        fn, args = (lambda x1, w: compact.s3(x1, w, reduce=op == "s3")), (x1, w_FxD)
        tile, dense = f"{compact.S3_SLOTS}x{compact.S3_BLOCK_D}", f"{compact.S3_BLOCK_F}x{compact.S3_BLOCK_D}"
    else:
        tile, dense = f"{compact.S2_SLOTS}x{compact.S2_BLOCK_D}", f"{compact.S2_BLOCK_F}x{compact.S2_BLOCK_D}"
        if op == "s2_silu_norm":
            silu = kernel_activation("silu")
            fn, args = (lambda x, wg, wu, t, n: compact.s2(x, wg, wu, activation=silu, tau=t, w_down_norms_F=n)), \
                (x, wg, w_FxD, scalar, norms)
        else:
            act = kernel_activation(op.split("_")[1])
            fn, args = (lambda x, wg, wu, t, p: compact.s2(x, wg, wu, activation=act, threshold=t,
                                                           predicted_F=p if "predicted" in op else None)), \
                (x, wg, w_FxD, scalar, pred)
    checked = jax.__version__.startswith(CHECKED_JAX)
    hlo, irs = _export(fn, *args, monkeypatch=monkeypatch if checked else None)
    assert hlo.count(TRITON_CALL) == 1
    assert "stablehlo.case" not in hlo and "stablehlo.if" not in hlo  # no device-value conditional (host sync)
    if not checked:
        pytest.skip(f"Triton IR hook checked on jax {CHECKED_JAX} only, not {jax.__version__}")
    (ir,) = irs
    assert '"tt.scan"' in ir or "tt.scan" in ir
    assert re.search(r"scf\.for %\w+ = %c0_i32\w* to %\d+ ", ir)  # a loop bound computed in the kernel
    masked = _loads(ir, tile)
    assert masked and all(masked)
    assert not _loads(ir, dense)
