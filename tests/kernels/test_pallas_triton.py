"""The Pallas Triton S2 / S3 kernels equal their pure-jnp references and lower for CUDA.

On a CPU the kernels run in Pallas' interpret mode; on a GPU the same tests run the compiled Triton kernels
(tests/conftest.py sets float32 matmuls to "highest": JAX's default on a GPU is TF32, which would make the pure-jnp
references, not the kernels, miss the float32 tolerance).

Tolerances (never loosened to pass):

* float32: ``max|kernel - ref| <= 1e-5 * max(1, max|ref|)`` -- the two differ only in float32 summation order.
* bfloat16 (inputs in bf16, reference run on the same bf16 inputs): per element
  ``|kernel - ref| <= 2**-7 * |ref| + 1e-5 * max(1, max|ref|)``. Both accumulate in float32 and round once to bf16;
  two float32 values a summation-order apart can round to adjacent bf16 values, which are 1 ulp <= 2**-7 |ref| apart.

Sparsity is set per case by a bias column (x[:, 0] = 1, w_gate[0, :] = bias) and by the FATReLU threshold / tau,
each cut placed far from every gate (or |x1| * norm) value, so the kernel and the reference cannot disagree on a
neuron sitting at the cut; every case asserts the achieved sparsity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels import reference
from pallas_kernels import sparse_ffn_triton as triton_ffn
from pallas_kernels.reference import KernelInputError
from pallas_kernels.sparse_ffn_triton import default_blocks, pad_weights
from prosparse_jax.inference.sparse_ffn import kernel_activation, sparse_ffn

SPARSITIES = (0.0, 0.5, 0.88, 0.99, 1.0)
SPARSITY_TOL = 0.02  # |achieved - target|: the cut trades up to 1% of sparsity for a safe margin
GATE_ACTS = ("relu", "fatrelu", "drelu", "relu2")
ACTS = (*GATE_ACTS, "silu")  # silu runs in the neuron-norm mode (tau)
TRITON_CALL = "__gpu$xla.gpu.triton"
INTERPRET = jax.default_backend() != "gpu"  # compiled Triton kernels on a GPU, interpreted elsewhere


def s2(*args, activation: str, **kw):
    return triton_ffn.s2(*args, activation=kernel_activation(activation), **kw)


def s3(*args, **kw):
    return triton_ffn.s3(*args, **kw)


def s2_reference(*args, activation: str, **kw):
    return reference.s2_reference(*args, activation=kernel_activation(activation), **kw)


s3_reference = reference.s3_reference


def _assert_close(out, ref, dtype) -> None:
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    assert out.shape == ref.shape
    assert np.all(np.isfinite(out))
    scale = max(1.0, float(np.max(np.abs(ref))))
    bound = 1e-5 * scale
    if jnp.dtype(dtype) == jnp.bfloat16:
        bound = bound + 2.0**-7 * np.abs(ref)
    err = np.abs(out - ref)
    assert np.all(err <= bound), f"max err {err.max():.3g} (worst excess {np.max(err - bound):.3g}), scale {scale:.3g}"


def _cut(values, union, target: float, min_cut: float | None = None, dtype=None) -> float:
    """A cut c, mean(union <= c) within 1% of ``target``'s best, as far as possible from every one of ``values``.

    ``union`` is each neuron's largest value over the batch (the neuron is dropped iff union <= c); ``values`` are
    all per-row values, so no row of any neuron sits near the cut either (the margin must exceed float32 summation
    noise, ~1e-7 of the span, by a wide margin). ``dtype``: the cut is stored in it (rounded before the margin).
    """
    v = np.unique(np.asarray(values, np.float64))
    span = float(v[-1] - v[0]) + 1.0
    c = np.concatenate([(v[:-1] + v[1:]) / 2, [v[-1] + span, v[0] - span, v[0] / 2]])
    if dtype is not None:
        c = _f64(jnp.asarray(c, dtype))
    if min_cut is not None:
        c = c[c > min_cut]
    i = np.searchsorted(v, c)
    margin = np.minimum(np.abs(c - v[np.maximum(i - 1, 0)]), np.abs(v[np.minimum(i, len(v) - 1)] - c))
    achieved = np.mean(np.asarray(union)[None, :] <= c[:, None], axis=1)
    err = np.abs(achieved - target)
    ok = err <= err.min() + 0.01  # trade up to 1% of sparsity for a wider margin
    if 0 < target < 1:
        ok &= (achieved > 0) & (achieved < 1)  # 99% must stay sparse-but-not-empty
    best = np.flatnonzero(ok)
    j = best[np.argmax(margin[best])]
    assert margin[j] > 1e-5 * span, f"no safe cut near sparsity {target} (margin {margin[j]:.2g}); change the seed"
    return float(c[j])


def _f64(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _s2_case(B: int, D: int, F: int, activation: str, sparsity: float, dtype, seed: int = 0):
    """(x, w_gate, w_up, w_down, s2 kwargs, achieved sparsity) with about ``sparsity`` of the neurons dropped."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, D)).astype(np.float32)
    x[:, 0] = 1.0  # bias column: w_gate[0, :] shifts every gate
    wg = (rng.normal(size=(D, F)) / np.sqrt(D)).astype(np.float32)
    wg[0, :] = 0.0
    wu = (rng.normal(size=(F, D)) / np.sqrt(D)).astype(np.float32)
    wd = (rng.normal(size=(F, D)) / np.sqrt(F)).astype(np.float32)
    x, wu, wd = (jnp.asarray(a, dtype) for a in (x, wu, wd))
    g0_BxF = _f64(x) @ _f64(jnp.asarray(wg, dtype))
    kwargs = {}
    if activation in ("relu", "drelu", "relu2"):
        bias = -_cut(g0_BxF, g0_BxF.max(0), sparsity, dtype=dtype)  # gate = g0 + bias: dropped iff max_b gate <= 0
    elif activation == "fatrelu":
        bias = 0.1 - g0_BxF.max(0).min()  # every union gate >= 0.1, so a cut > 0 reaches sparsity 0
    else:
        bias = 0.0
    wg[0, :] = bias
    wg = jnp.asarray(wg, dtype)
    gate_BxF = _f64(x) @ _f64(wg)
    if activation == "fatrelu":
        kwargs["threshold"] = _cut(gate_BxF, gate_BxF.max(0), sparsity, min_cut=0.0)
        dropped_F = gate_BxF.max(0) < kwargs["threshold"]
    elif activation in GATE_ACTS:
        dropped_F = gate_BxF.max(0) <= 0
    else:
        norms_F = jnp.linalg.norm(jnp.asarray(wd, jnp.float32), axis=1)
        up_BxF = _f64(x) @ _f64(wu).T
        v_BxF = np.abs(gate_BxF / (1 + np.exp(-gate_BxF)) * up_BxF) * np.asarray(norms_F, np.float64)
        kwargs.update(tau=_cut(v_BxF, v_BxF.max(0), sparsity, min_cut=0.0), w_down_norms_F=norms_F)
        dropped_F = v_BxF.max(0) <= kwargs["tau"]
    return x, wg, wu, wd, kwargs, float(dropped_F.mean())


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
# S2 / S3 against the references
# ---------------------------------------------------------------------------------------------------------------
S2_CASES = [(jnp.float32, 1, 48, 100, a) for a in ACTS] + [(jnp.float32, 3, 100, 200, a) for a in ACTS] + \
           [(jnp.bfloat16, 3, 96, 200, a) for a in ACTS]


@pytest.mark.parametrize("dtype,B,D,F,activation", S2_CASES)
def test_s2_equals_reference_at_every_sparsity(dtype, B, D, F, activation):
    for sparsity in SPARSITIES:
        x, wg, wu, _, kw, achieved = _s2_case(B, D, F, activation, sparsity, dtype)
        assert abs(achieved - sparsity) <= SPARSITY_TOL, (sparsity, achieved)
        ref = s2_reference(x, wg, wu, activation=activation, **kw)
        out = s2(x, wg, wu, activation=activation, interpret=INTERPRET, **kw)
        assert out.dtype == x.dtype
        _assert_close(out, ref, dtype)
        zero_cols = float(np.mean(np.all(_f64(ref) == 0, axis=0)))
        assert zero_cols >= achieved  # the reference drops (at least) the neurons the case meant to drop


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("activation", ACTS)
def test_s2_with_the_gate_fused_in_the_kernel_equals_reference(activation, dtype):
    """gate="fused" (the kernel accumulates x @ W_gate itself) is the same function as the default gate="xla"."""
    for sparsity in (0.0, 0.88, 1.0):
        x, wg, wu, _, kw, _ = _s2_case(3, 100, 200, activation, sparsity, dtype)
        out = s2(x, wg, wu, activation=activation, gate="fused", interpret=INTERPRET, **kw)
        _assert_close(out, s2_reference(x, wg, wu, activation=activation, **kw), dtype)


S3_CASES = [(jnp.float32, 1, 100, 48), (jnp.float32, 3, 200, 100), (jnp.bfloat16, 3, 200, 96)]


@pytest.mark.parametrize("dtype,B,F,D", S3_CASES)
def test_s3_equals_reference_at_every_sparsity(dtype, B, F, D):
    w_down = jnp.asarray(np.random.default_rng(1).normal(size=(F, D)) / np.sqrt(F), dtype)
    for sparsity in SPARSITIES:
        x1 = _x1_case(B, F, sparsity, dtype)
        achieved = float(np.mean(np.all(_f64(x1) == 0, axis=0)))
        assert abs(achieved - sparsity) <= SPARSITY_TOL, (sparsity, achieved)
        out = s3(x1, w_down, interpret=INTERPRET)
        assert out.dtype == x1.dtype
        _assert_close(out, s3_reference(x1, w_down), dtype)


def test_explicit_blocks_and_uneven_splits():
    """Non-default blocks (padding on both axes) and an S3 split with several neuron chunks, the last one shorter."""
    B, D, F = 2, 40, 200
    x, wg, wu, wd, kw, _ = _s2_case(B, D, F, "relu", 0.5, jnp.float32, seed=3)
    ref = s2_reference(x, wg, wu, activation="relu")
    _assert_close(s2(x, wg, wu, activation="relu", block_f=32, block_d=16, interpret=INTERPRET), ref, jnp.float32)
    x1 = ref
    for n_split in (1, 3):  # 7 chunks of 32 neurons: splits of 7, or 3 + 3 + 1
        out = s3(x1, wd, block_f=32, block_d=16, n_split=n_split, interpret=INTERPRET)
        _assert_close(out, s3_reference(x1, wd), jnp.float32)


def test_traced_threshold_and_tau_under_jit():
    """threshold and tau enter the kernel as data: one compiled function serves every layer's value."""
    traces = []

    def norm(x, wg, wu, tau, n):
        traces.append("silu")
        return s2(x, wg, wu, activation="silu", tau=tau, w_down_norms_F=n, interpret=INTERPRET)

    def fat(x, wg, wu, t):
        traces.append("fatrelu")
        return s2(x, wg, wu, activation="fatrelu", threshold=t, interpret=INTERPRET)

    norm_f, fat_f = jax.jit(norm), jax.jit(fat)
    for sparsity in (0.5, 0.88, 0.99):  # same weights and x, a different (safe-margin) tau / threshold each time
        x, wg, wu, _, kw, _ = _s2_case(3, 48, 100, "silu", sparsity, jnp.float32)
        ref = s2_reference(x, wg, wu, activation="silu", **kw)
        _assert_close(norm_f(x, wg, wu, jnp.float32(kw["tau"]), kw["w_down_norms_F"]), ref, jnp.float32)
        x, wg, wu, _, kw, _ = _s2_case(3, 48, 100, "fatrelu", sparsity, jnp.float32)
        ref = s2_reference(x, wg, wu, activation="fatrelu", **kw)
        _assert_close(fat_f(x, wg, wu, jnp.float32(kw["threshold"])), ref, jnp.float32)
    assert traces == ["silu", "fatrelu"]  # traced once each: later values reuse the compiled function


# ---------------------------------------------------------------------------------------------------------------
# Inactive rows are never read
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["relu", "drelu"])
def test_s2_never_reads_inactive_up_rows(activation):
    x, wg, wu, _, kw, _ = _s2_case(3, 48, 100, activation, 0.88, jnp.float32)
    active_F = np.any(_f64(x) @ _f64(wg) > 0, axis=0)
    wu_nan = jnp.where(jnp.asarray(active_F)[:, None], wu, jnp.nan)
    assert np.isnan(np.asarray(x @ wu_nan.T)).any()  # a dense (multiply-by-zero) read would give NaN
    out = s2(x, wg, wu_nan, activation=activation, interpret=INTERPRET)
    _assert_close(out, s2_reference(x, wg, wu, activation=activation), jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_s3_never_reads_inactive_down_rows(dtype):
    x1 = _x1_case(3, 200, 0.88, dtype)
    w_down = jnp.asarray(np.random.default_rng(1).normal(size=(200, 96)), dtype)
    active_F = np.any(_f64(x1) != 0, axis=0)
    w_inf = jnp.where(jnp.asarray(active_F)[:, None], w_down, jnp.inf)
    assert not np.isfinite(np.asarray(x1.astype(jnp.float32) @ w_inf.astype(jnp.float32))).all()
    _assert_close(s3(x1, w_inf, interpret=INTERPRET), s3_reference(x1, w_down), dtype)


def test_norm_mode_s3_skips_dropped_neurons():
    """Neuron-norm mode: S2 reads all of W_up, and S3 skips the W_down rows of the neurons tau dropped."""
    x, wg, wu, wd, kw, _ = _s2_case(3, 48, 100, "silu", 0.88, jnp.float32)
    x1 = s2(x, wg, wu, activation="silu", interpret=INTERPRET, **kw)
    active_F = np.any(_f64(x1) != 0, axis=0)
    assert 0 < active_F.sum() < 100
    wd_nan = jnp.where(jnp.asarray(active_F)[:, None], wd, jnp.nan)
    _assert_close(s3(x1, wd_nan, interpret=INTERPRET), s3_reference(x1, wd), jnp.float32)


# ---------------------------------------------------------------------------------------------------------------
# S2 then S3 is the model's FFN
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ACTS)
def test_s2_s3_equals_dense_sparse_ffn(activation):
    x, wg, wu, wd, kw, _ = _s2_case(3, 48, 100, activation, 0.88, jnp.float32, seed=2)
    out = s3(s2(x, wg, wu, activation=activation, interpret=INTERPRET, **kw), wd, interpret=INTERPRET)
    ref, _ = sparse_ffn(x, wg, wu.T, wd, activation=activation, threshold=kw.get("threshold", 0.0),
                        taus=kw.get("tau"), w_down_norms_F=kw.get("w_down_norms_F"), implementation="dense")
    _assert_close(out, ref, jnp.float32)


def test_padded_weights_give_the_same_ffn():
    """pad_weights once per model + zero-padded x: the kernels copy nothing and the FFN is unchanged."""
    B, D, F = 2, 40, 100
    x, wg, wu, wd, _, _ = _s2_case(B, D, F, "relu", 0.5, jnp.float32)
    p = pad_weights(wg, wu, wd)
    Dp, Fp = p["w_gate_DxF"].shape
    assert Dp % default_blocks(F, D)[1] == 0 and Fp % default_blocks(F, D)[0] == 0
    assert default_blocks(Fp, Dp) == default_blocks(F, D)
    x_p = jnp.pad(x, ((0, 0), (0, Dp - D)))
    out = s3(s2(x_p, p["w_gate_DxF"], p["w_up_FxD"], activation="relu", interpret=INTERPRET), p["w_down_FxD"],
             interpret=INTERPRET)[:, :D]
    ref = s3_reference(s2_reference(x, wg, wu, activation="relu"), wd)
    _assert_close(out, ref, jnp.float32)


def test_default_blocks_avoid_padding_for_model_shapes():
    assert default_blocks(11008, 4096) == (64, 256)  # LLaMA2-7B
    assert default_blocks(13824, 5120) == (64, 256)  # LLaMA2-13B
    assert default_blocks(3840, 1536) == (64, 256)  # MiniCPM-1B
    assert default_blocks(100, 48) == (64, 16)  # F padded to 128; D = 3 x 16


# ---------------------------------------------------------------------------------------------------------------
# Bad input fails before any kernel is traced
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["up_shape", "gate_shape", "neg_threshold", "neg_tau", "float16", "silu_no_tau",
                                  "batch_9", "tau_no_norms", "block_not_pow2", "gelu_on_gpu", "bad_gate",
                                  "warps_not_pow2"])
def test_s2_bad_input_raises_before_kernel(case):
    B, D, F = 2, 16, 32
    x, wg, wu = jnp.ones((B, D)), jnp.ones((D, F)), jnp.ones((F, D))
    kw = dict(activation="relu")
    if case == "up_shape":
        wu = jnp.ones((D, F))
    elif case == "gate_shape":
        wg = jnp.ones((D + 1, F))
    elif case == "neg_threshold":
        kw.update(activation="fatrelu", threshold=-0.1)
    elif case == "neg_tau":
        kw.update(activation="silu", tau=-1.0, w_down_norms_F=jnp.ones(F))
    elif case == "float16":
        x, wg, wu = (a.astype(jnp.float16) for a in (x, wg, wu))
    elif case == "silu_no_tau":
        kw.update(activation="silu")
    elif case == "batch_9":
        x = jnp.ones((9, D))
    elif case == "tau_no_norms":
        kw.update(activation="silu", tau=0.1)
    elif case == "block_not_pow2":
        kw.update(block_f=48)
    elif case == "gelu_on_gpu":  # the Triton lowering has no erf / erfc: refused unless interpreted
        kw.update(activation="gelu", tau=0.1, w_down_norms_F=jnp.ones(F), interpret=False)
    elif case == "bad_gate":
        kw.update(gate="cublas")
    elif case == "warps_not_pow2":
        kw.update(num_warps=6)
    words = {"up_shape": "w_up_FxD", "gate_shape": "w_gate_DxF", "neg_threshold": "threshold", "neg_tau": "tau",
             "float16": "float16", "silu_no_tau": "pplp", "batch_9": "batch 9",
             "tau_no_norms": "w_down_norms_F", "block_not_pow2": "block_f", "gelu_on_gpu": "erf",
             "bad_gate": "gate='cublas'.*'xla'", "warps_not_pow2": "num_warps=6"}
    with pytest.raises(KernelInputError, match=words[case]):
        s2(x, wg, wu, **{"interpret": INTERPRET, **kw})


@pytest.mark.parametrize("case", ["down_shape", "float16", "x1_rank", "block_not_pow2"])
def test_s3_bad_input_raises_before_kernel(case):
    x1, wd, kw = jnp.ones((2, 32)), jnp.ones((32, 16)), {}
    if case == "down_shape":
        wd = jnp.ones((16, 32))
    elif case == "float16":
        x1, wd = x1.astype(jnp.float16), wd.astype(jnp.float16)
    elif case == "x1_rank":
        x1 = jnp.ones((2, 1, 32))
    elif case == "block_not_pow2":
        kw = dict(block_d=24)
    with pytest.raises(KernelInputError):
        s3(x1, wd, interpret=INTERPRET, **kw)


# ---------------------------------------------------------------------------------------------------------------
# Lowering for CUDA (Pallas' Triton backend), no GPU needed; the Triton IR itself: test_pallas_triton_ir.py
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["s2_relu", "s2_drelu", "s2_fatrelu", "s2_silu_norm", "s2_relu_fused", "s3"])
def test_exports_for_cuda_at_llama2_7b_shape(op):
    """``jax.export`` for CUDA at 4096x11008, bf16: one Triton kernel per operator."""
    B, D, F, dtype = 4, 4096, 11008, jnp.bfloat16
    S = jax.ShapeDtypeStruct
    x, wg, w_FxD, x1 = S((B, D), dtype), S((D, F), dtype), S((F, D), dtype), S((B, F), dtype)
    scalar, norms = S((), jnp.float32), S((F,), jnp.float32)
    if op == "s3":
        fn, args = s3, (x1, w_FxD)
    elif op == "s2_silu_norm":
        fn, args = (lambda x, wg, wu, tau, n: s2(x, wg, wu, activation="silu", tau=tau, w_down_norms_F=n)), \
            (x, wg, w_FxD, scalar, norms)
    else:
        act, _, gate = op.removeprefix("s2_").partition("_")
        fn, args = (lambda x, wg, wu, t: s2(x, wg, wu, activation=act, threshold=t, gate=gate or None)), \
            (x, wg, w_FxD, scalar)
    exp = export.export(jax.jit(fn), platforms=["cuda"],
                        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)
    assert exp.mlir_module().count(TRITON_CALL) == 1


# ---------------------------------------------------------------------------------------------------------------
# On a GPU only: the compiled kernels at the model shapes
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled Triton kernels need a GPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("B,D,F", [(1, 4096, 11008), (4, 4096, 11008), (1, 5120, 13824), (1, 1536, 3840)])
def test_compiled_kernels_equal_reference_at_model_shapes(B, D, F, dtype):
    """LLaMA2-7B / 13B and MiniCPM-1B FFN shapes at 88%: S2 then S3 equal the references on the same inputs."""
    x, wg, wu, wd, kw, achieved = _s2_case(B, D, F, "relu", 0.88, dtype)
    assert abs(achieved - 0.88) <= SPARSITY_TOL
    ref_x1 = s2_reference(x, wg, wu, activation="relu", **kw)
    _assert_close(s2(x, wg, wu, activation="relu", **kw), ref_x1, dtype)
    _assert_close(s3(ref_x1, wd), s3_reference(ref_x1, wd), dtype)


# ---------------------------------------------------------------------------------------------------------------
# S2 with an activation predictor's set (predicted_F)
# ---------------------------------------------------------------------------------------------------------------
def _predicted_inputs(B: int = 2, D: int = 64, F: int = 200, seed: int = 0):
    """Inputs with gates at least 0.1 away from 0, and a predicted set holding half the positive gates (one dropped
    on purpose) and a quarter of the others."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, D)).astype(np.float32)
    wg = rng.normal(size=(D, F)).astype(np.float32) / np.sqrt(D)
    gate = x @ wg
    wg = wg * np.maximum(1.0, 0.1 / np.maximum(np.abs(gate).min(axis=0), 1e-6)).astype(np.float32)
    wu = rng.normal(size=(F, D)).astype(np.float32) / np.sqrt(D)
    pred_F = rng.random(F) < np.where(np.any(x @ wg > 0, axis=0), 0.5, 0.25)
    return jnp.asarray(x), jnp.asarray(wg), jnp.asarray(wu), jnp.asarray(pred_F)


@pytest.mark.parametrize("gate", ["xla", "fused"])
@pytest.mark.parametrize("activation", ["relu", "drelu", "silu"])
def test_s2_with_a_predicted_set_matches_reference(activation, gate):
    """Neurons outside predicted_F are zero in x1 whatever their gate (SiLU without tau: the set is the sparse mode);
    inside it, x1 as without a predictor."""
    x, wg, wu, pred_F = _predicted_inputs()
    out = s2(x, wg, wu, activation=activation, predicted_F=pred_F, gate=gate, interpret=INTERPRET)
    want = s2_reference(x, wg, wu, activation=activation, predicted_F=pred_F)
    _assert_close(out, want, jnp.float32)
    assert np.all(np.asarray(out)[:, ~np.asarray(pred_F)] == 0.0)
    full = s2_reference(x, wg, wu, activation="relu")
    assert np.any(np.asarray(full)[:, ~np.asarray(pred_F)] != 0.0)  # the set drops neurons that were active


def test_s2_with_a_predicted_set_in_the_neuron_norm_mode():
    x, wg, wu, pred_F = _predicted_inputs(seed=1)
    norms = jnp.asarray(np.random.default_rng(2).uniform(0.5, 1.5, wg.shape[1]).astype(np.float32))
    kw = dict(activation="silu", tau=0.05, w_down_norms_F=norms, predicted_F=pred_F)
    _assert_close(s2(x, wg, wu, interpret=INTERPRET, **kw), s2_reference(x, wg, wu, **kw), jnp.float32)


def test_s2_refuses_a_predicted_set_of_another_shape():
    x, wg, wu, pred_F = _predicted_inputs()
    with pytest.raises(KernelInputError, match="predicted_F"):
        s2(x, wg, wu, activation="relu", predicted_F=pred_F[:-1], interpret=INTERPRET)
    with pytest.raises(KernelInputError, match="predicted_F"):
        s2(x, wg, wu, activation="relu", predicted_F=pred_F.astype(jnp.float32), interpret=INTERPRET)
