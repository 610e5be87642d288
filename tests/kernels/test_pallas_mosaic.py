"""TPU (Pallas Mosaic) sparse FFN kernels: equal to the references in TPU interpret mode on CPU, and lower for TPU.

The interpret mode simulates HBM, VMEM, the row DMAs and their semaphores (uninitialised VMEM reads as NaN), so a
missing wait, a wrong buffer slot or an unmasked tail row shows up as a wrong or non-finite result here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference as ref
from pallas_kernels import sparse_ffn_mosaic as mosaic
from prosparse_jax.inference.sparse_ffn import kernel_activation
from prosparse_jax.model.activations import ffn_product

HI = jax.lax.Precision.HIGHEST

#: float32: kernel and reference differ only in the float32 summation order (~1e-7 relative per term).
F32_TOL = 1e-5
#: bfloat16 (same bf16 inputs for both): both accumulate in float32 and round once to bf16 at the end; a float32
#: difference in summation order can move that rounding to the neighbouring bf16 value, one ulp = 2^-7 relative
#: (8 significant bits) < 2e-2.
BF16_TOL = 2e-2

SPARSITIES = (0.0, 0.5, 0.88, 0.99, 1.0)
#: (batch, d_model, d_ff): F is never a multiple of the chunk (the last chunk is partial); D = 200 exercises the
#: padding to the 128-lane width.
SHAPES = {1: (1, 128, 300), 3: (3, 200, 200)}
GATE_ACTIVATIONS = ("relu", "fatrelu", "drelu", "relu2")
ACTIVATIONS = (*GATE_ACTIVATIONS, "silu")  # silu runs in the neuron-norm mode (tau)


def s2(*args, activation: str, **kw):
    return mosaic.s2(*args, activation=kernel_activation(activation), **kw)


def s2_reference(*args, activation: str, **kw):
    return ref.s2_reference(*args, activation=kernel_activation(activation), **kw)


def _assert_close(out, want, tol):
    assert out.shape == want.shape and out.dtype == want.dtype
    out, want = np.asarray(out, np.float32), np.asarray(want, np.float32)
    assert np.all(np.isfinite(out))
    scale = max(1.0, float(np.max(np.abs(want))))
    err = float(np.max(np.abs(out - want)))
    assert err <= tol * scale, f"max|diff| = {err:.3g} > {tol} * {scale:.3g}"


def _gate_weights(rng, x_BxD, inactive_F):
    """W_gate whose ``inactive_F`` neurons have gate <= -margin in every batch row and whose others have gate >=
    margin in some row (random margins in [0.2, 1], so no ties): each random column is shifted along v = the sum of
    the rows of x (x_b . v > 0 for every b)."""
    x = np.asarray(x_BxD, np.float64)
    D, F = x.shape[1], len(inactive_F)
    margin = rng.uniform(0.2, 1.0, F)
    w = rng.standard_normal((D, F)) / np.sqrt(D)
    v = x.sum(0)
    s_B = x @ v
    assert np.all(s_B > 0)
    g_BxF = x @ w
    lam_down = np.maximum(0.0, np.max((g_BxF + margin) / s_B[:, None], axis=0))  # every row <= -margin
    lam_up = np.maximum(0.0, np.min((margin - g_BxF) / s_B[:, None], axis=0))  # some row >= margin
    return w + np.where(inactive_F, -lam_down, lam_up)[None, :] * v[:, None]


def _random_inactive(rng, F, sparsity):
    inactive_F = np.zeros(F, bool)
    inactive_F[rng.permutation(F)[:round(sparsity * F)]] = True
    return inactive_F


def _midpoint_cut(values_F, n_below):
    """A cut with exactly ``n_below`` of ``values_F`` (all >= 0) under it, half-way between neighbours (no ties)."""
    v = np.sort(np.asarray(values_F, np.float64))
    if n_below == 0:
        return float(v[0]) / 2
    if n_below == len(v):
        return float(v[-1]) + 1.0
    return float(v[n_below - 1] + v[n_below]) / 2


def _reference_quantities(x, w_gate, w_up, activation, threshold):
    """gate, up, x1 and act(gate) in float32 from the (possibly bf16) inputs, as s2_reference forms them."""
    x32 = x.astype(jnp.float32)
    gate = jnp.dot(x32, w_gate.astype(jnp.float32), precision=HI)
    up = jnp.dot(x32, w_up.astype(jnp.float32).T, precision=HI)
    x1, act = ffn_product(activation, gate, up, threshold)
    return gate, x1, act


def _s2_case(activation, B, sparsity, dtype, seed=0):
    """Inputs and kwargs of an S2 call whose union active set has sparsity ``sparsity`` (asserted)."""
    _, D, F = SHAPES[B]
    rng = np.random.default_rng(seed + 1000 * B + int(1000 * sparsity))
    n_inactive = round(sparsity * F)
    x = rng.standard_normal((B, D))
    # FATReLU and the norm mode set the sparsity by their cut; relu, drelu, relu2 by the gate's sign.
    by_sign = activation in ("relu", "drelu", "relu2")
    w_gate = _gate_weights(rng, x, _random_inactive(rng, F, sparsity if by_sign else 0.0))
    w_up = rng.standard_normal((F, D)) / np.sqrt(D)
    w_down_norms = rng.uniform(0.5, 2.0, F)
    x, w_gate, w_up = (jnp.asarray(a, jnp.float32).astype(dtype) for a in (x, w_gate, w_up))
    kw = dict(activation=activation)
    if activation == "fatrelu":
        gate, _, _ = _reference_quantities(x, w_gate, w_up, "relu", 0.0)
        kw["threshold"] = _midpoint_cut(np.max(np.asarray(gate), axis=0), n_inactive)
        assert kw["threshold"] > 0
    if activation == "silu":
        _, x1, _ = _reference_quantities(x, w_gate, w_up, "silu", 0.0)
        kw["w_down_norms_F"] = jnp.asarray(w_down_norms, jnp.float32)
        kw["tau"] = _midpoint_cut(np.max(np.abs(np.asarray(x1)) * w_down_norms, axis=0), n_inactive)
    return x, w_gate, w_up, kw


def _union_sparsity(x, w_gate, w_up, kw):
    """Fraction of neurons S2/S3 may skip: inactive in every batch row (gate mask or neuron norm)."""
    gate, x1, act = _reference_quantities(x, w_gate, w_up, kw["activation"], kw.get("threshold", 0.0))
    if "tau" in kw:
        keep = np.abs(np.asarray(x1)) * np.asarray(kw["w_down_norms_F"]) > kw["tau"]
    else:
        keep = np.asarray(act) != 0
    return float(np.mean(~keep.any(axis=0)))


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("B", sorted(SHAPES))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_s2_matches_reference_fp32(activation, B, sparsity):
    x, w_gate, w_up, kw = _s2_case(activation, B, sparsity, jnp.float32)
    assert abs(_union_sparsity(x, w_gate, w_up, kw) - sparsity) < 0.01
    out = s2(x, w_gate, w_up, **kw, interpret=True)
    _assert_close(out, s2_reference(x, w_gate, w_up, **kw), F32_TOL)


@pytest.mark.parametrize("sparsity", (0.0, 0.88, 1.0))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_s2_matches_reference_bf16(activation, sparsity):
    x, w_gate, w_up, kw = _s2_case(activation, 3, sparsity, jnp.bfloat16)
    assert abs(_union_sparsity(x, w_gate, w_up, kw) - sparsity) < 0.01
    out = s2(x, w_gate, w_up, **kw, interpret=True)
    _assert_close(out, s2_reference(x, w_gate, w_up, **kw), BF16_TOL)


def _s3_case(B, sparsity, dtype, seed=0):
    """x1 whose columns are all-zero for a fraction ``sparsity`` of the neurons (and scattered zeros elsewhere)."""
    _, D, F = SHAPES[B]
    rng = np.random.default_rng(seed + 7 + 1000 * B + int(1000 * sparsity))
    x1 = rng.standard_normal((B, F))
    zero_BxF = rng.uniform(size=(B, F)) < 0.3  # zeros inside active columns (batch rows disagree) ...
    zero_BxF[rng.integers(B, size=F), np.arange(F)] = False  # ... leaving every column one non-zero row
    x1[zero_BxF] = 0.0
    x1[:, _random_inactive(rng, F, sparsity)] = 0.0
    w_down = rng.standard_normal((F, D)) / np.sqrt(F)
    x1, w_down = (jnp.asarray(a, jnp.float32).astype(dtype) for a in (x1, w_down))
    assert abs(float(np.mean(~np.asarray(x1 != 0).any(axis=0))) - sparsity) < 0.01
    return x1, w_down


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("B", sorted(SHAPES))
@pytest.mark.parametrize("dtype", (jnp.float32, jnp.bfloat16))
def test_s3_matches_reference(dtype, B, sparsity):
    x1, w_down = _s3_case(B, sparsity, dtype)
    out = mosaic.s3(x1, w_down, interpret=True)
    _assert_close(out, ref.s3_reference(x1, w_down), F32_TOL if dtype == jnp.float32 else BF16_TOL)


def test_chunk_256_and_traced_cuts():
    """A wider chunk, and threshold / tau as traced scalars under jit."""
    x, w_gate, w_up, kw = _s2_case("fatrelu", 1, 0.5, jnp.float32)
    f = jax.jit(lambda t: s2(x, w_gate, w_up, activation="fatrelu", threshold=t, chunk=256, interpret=True))
    _assert_close(f(jnp.float32(kw["threshold"])), s2_reference(x, w_gate, w_up, **kw), F32_TOL)
    x, w_gate, w_up, kw = _s2_case("silu", 1, 0.88, jnp.float32)
    g = jax.jit(lambda t: s2(x, w_gate, w_up, activation="silu", tau=t, w_down_norms_F=kw["w_down_norms_F"],
                                    interpret=True))
    _assert_close(g(jnp.float32(kw["tau"])), s2_reference(x, w_gate, w_up, **kw), F32_TOL)
    x1, w_down = _s3_case(3, 0.5, jnp.float32)
    _assert_close(mosaic.s3(x1, w_down, chunk=256, interpret=True), ref.s3_reference(x1, w_down), F32_TOL)


@pytest.mark.parametrize("activation", ("relu", "drelu"))
def test_inactive_rows_are_never_read(activation):
    """NaN in the W_up / W_down rows of the inactive neurons (neuron 0, the index fill value, among them); 150 of 300
    neurons active: two grid steps (double-buffered DMAs), the second one partial."""
    B, D, F = 3, 128, 300
    rng = np.random.default_rng(5)
    inactive_F = _random_inactive(rng, F, 0.5)
    inactive_F[0], inactive_F[-1] = True, False  # 0 is the fill value of the index list
    x = rng.standard_normal((B, D))
    x, w_gate, w_up = (jnp.asarray(a, jnp.float32) for a in (x, _gate_weights(rng, x, inactive_F),
                                                             rng.standard_normal((F, D)) / np.sqrt(D)))
    kw = dict(activation=activation)
    _, _, act = _reference_quantities(x, w_gate, w_up, activation, 0.0)
    assert np.array_equal(~np.asarray(act != 0).any(axis=0), inactive_F) and inactive_F.sum() == 150
    w_up_nan = jnp.where(inactive_F[:, None], jnp.nan, w_up)
    want = s2_reference(x, w_gate, w_up, **kw)
    out = s2(x, w_gate, w_up_nan, **kw, interpret=True)
    _assert_close(out, want, F32_TOL)

    zero_cols_F = ~np.asarray(want != 0).any(axis=0)
    assert zero_cols_F[0]
    w_down = jnp.asarray(np.random.default_rng(1).standard_normal((F, D)) / np.sqrt(F), jnp.float32)
    w_down_nan = jnp.where(zero_cols_F[:, None], jnp.nan, w_down)
    _assert_close(mosaic.s3(want, w_down_nan, interpret=True), ref.s3_reference(want, w_down), F32_TOL)


@pytest.mark.parametrize("case", ["shapes", "negative_threshold", "negative_tau", "float16", "silu_without_tau",
                                  "s3_shapes", "s3_float16", "chunk"])
def test_bad_input_raises_before_any_kernel(case):
    x = jnp.ones((2, 128), jnp.float32)
    w_gate, w_up = jnp.ones((128, 200), jnp.float32), jnp.ones((200, 128), jnp.float32)
    norms = jnp.ones((200,), jnp.float32)
    calls = {
        "shapes": lambda: s2(x, w_gate, w_up[:, :64], activation="relu"),
        "negative_threshold": lambda: s2(x, w_gate, w_up, activation="fatrelu", threshold=-0.1),
        "negative_tau": lambda: s2(x, w_gate, w_up, activation="silu", tau=-1.0, w_down_norms_F=norms),
        "float16": lambda: s2(x.astype(jnp.float16), w_gate.astype(jnp.float16),
                                     w_up.astype(jnp.float16), activation="relu"),
        "silu_without_tau": lambda: s2(x, w_gate, w_up, activation="silu"),
        "s3_shapes": lambda: mosaic.s3(jnp.ones((2, 200)), jnp.ones((199, 128))),
        "s3_float16": lambda: mosaic.s3(jnp.ones((2, 200), jnp.float16), jnp.ones((200, 128), jnp.float16)),
        "chunk": lambda: mosaic.s3(jnp.ones((2, 200)), jnp.ones((200, 128)), chunk=64),
    }
    with pytest.raises(ref.KernelInputError):
        calls[case]()


def test_capacity_buckets():
    assert ref.capacity_buckets(300, 128) == (128, 256, 384)
    assert ref.capacity_buckets(11008, 128) == (128, 256, 512, 1024, 2048, 4096, 8192, 11008)
    assert ref.capacity_buckets(100, 128) == (128,)
    assert ref.capacity_buckets(11008, 128, 3302) == (128, 256, 512, 1024, 2048, 3328)


@pytest.mark.parametrize("dtype", (jnp.float32, jnp.bfloat16))
def test_lowers_for_tpu_at_llama2_7b_shape(dtype):
    """jax.export for TPU (Pallas -> Mosaic) at D=4096, F=11008; one Mosaic kernel per capacity bucket."""
    B, D, F = 1, 4096, 11008
    S = jax.ShapeDtypeStruct
    x, w_gate, w_up = S((B, D), dtype), S((D, F), dtype), S((F, D), dtype)
    n_buckets = len(ref.capacity_buckets(F, mosaic.DEFAULT_CHUNK))

    def lowered(f, *args):
        return jax.export.export(jax.jit(f), platforms=["tpu"])(*args).mlir_module()

    for activation in ("relu", "drelu"):
        text = lowered(lambda x, g, u, a=activation: s2(x, g, u, activation=a), x, w_gate, w_up)
        assert text.count("tpu_custom_call") == n_buckets
    text = lowered(lambda x1, w: mosaic.s3(x1, w), S((B, F), dtype), S((F, D), dtype))
    assert text.count("tpu_custom_call") == n_buckets
    # Norm mode: the up projection is dense (XLA), so S2 has no kernel; it must still lower.
    text = lowered(lambda x, g, u, n, t: s2(x, g, u, activation="silu", tau=t, w_down_norms_F=n),
                   x, w_gate, w_up, S((F,), jnp.float32), S((), jnp.float32))
    assert "tpu_custom_call" not in text


# ---------------------------------------------------------------------------------------------------------------
# S2 with an activation predictor's set (predicted_F)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation,tau", [("relu", None), ("silu", None), ("silu", 0.05)])
def test_s2_with_a_predicted_set_matches_reference(activation, tau):
    """Neurons outside predicted_F are zero in x1 (SiLU without tau: the set is the sparse mode; with tau: both
    rules); inside it, x1 as without a predictor."""
    B, D, F = 2, 128, 300
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, D)).astype(np.float32))
    wg = rng.normal(size=(D, F)).astype(np.float32) / np.sqrt(D)
    wg = wg * np.maximum(1.0, 0.1 / np.maximum(np.abs(np.asarray(x) @ wg).min(axis=0), 1e-6)).astype(np.float32)
    wu = jnp.asarray(rng.normal(size=(F, D)).astype(np.float32) / np.sqrt(D))
    wg = jnp.asarray(wg)
    pred_F = jnp.asarray(rng.random(F) < 0.4)
    norms = jnp.asarray(rng.uniform(0.5, 1.5, F).astype(np.float32)) if tau is not None else None
    kw = dict(activation=activation, tau=tau, w_down_norms_F=norms, predicted_F=pred_F)
    out = s2(x, wg, wu, interpret=True, **kw)
    _assert_close(out, s2_reference(x, wg, wu, **kw), F32_TOL)
    assert np.all(np.asarray(out)[:, ~np.asarray(pred_F)] == 0.0)
