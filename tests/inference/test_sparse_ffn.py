"""The sparse FFN equals the model's dense FFN (ffn_hidden + ffn_down) at every sparsity, activation and batch; with an
activation predictor, the dense FFN with x1 zeroed outside the predicted set."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import gated_ffn_weights

from prosparse_jax import errors
from prosparse_jax.inference import cpu_ffi
from prosparse_jax.inference.sparse_ffn import (
    IMPLEMENTATIONS,
    LayerPredictor,
    default_buckets,
    layer_predictor,
    predicted_set,
    prepare_weights,
    resolve_implementation,
    sparse_ffn,
)
from prosparse_jax.model import transformer as model
from prosparse_jax.predictor import core as predictor_core

D, F, CHUNK = 37, 203, 16  # F, D not multiples of any chunk or bucket
SPARSITIES = (0.0, 0.5, 0.88, 0.99, 1.0)
FAT_T = 0.05


def _weights(sparsity: float, B: int, seed: int = 0):
    return gated_ffn_weights(sparsity, B, D, F, FAT_T, seed)


def _dense_ref(x, wg, wu, wd, activation, threshold=0.0, tau=None):
    """The model's own dense FFN on the same weights (with the sparse-mode mask when tau is given)."""
    lp = {"w_gate_DxF": wg, "w_up_DxF": wu, "w_down_FxD": wd}
    x1, act = model.ffn_hidden(x[:, None, :], lp, activation, threshold)
    if tau is not None:
        mask = model.neuron_norm_mask({"layers": {"w_down_LxFxD": wd[None]}}, [tau])
        x1 = mask(jnp.int32(0), x1, act, jnp.ones(x1.shape[:2], bool))
    return model.ffn_down(x1, lp)[:, 0, :]


@functools.cache
def _jitted(activation, threshold, norm_mode, implementation, buckets):
    def f(x, wg, wu, wd, tau, norms, wut):
        return sparse_ffn(x, wg, wu, wd, activation=activation, threshold=threshold,
                          taus=tau if norm_mode else None, w_down_norms_F=norms, w_up_FxD=wut,
                          implementation=implementation, chunk=CHUNK, buckets=buckets)
    return jax.jit(f)


def _check(out, ref):
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    scale = np.max(np.abs(ref))
    if scale == 0:
        np.testing.assert_array_equal(out, 0.0)
    else:
        assert np.max(np.abs(out - ref)) <= 1e-5 * scale


FULL = (-(-F // CHUNK) * CHUNK,)  # one bucket holding every neuron: the gather loop runs at every sparsity
TWO = (32, 96)  # two buckets and the dense fallback above 96 active neurons (0% and 50% sparsity)


@pytest.mark.parametrize("buckets", [TWO, FULL], ids=["two_buckets", "one_bucket"])
@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("activation,threshold", [("relu", 0.0), ("fatrelu", FAT_T), ("drelu", 0.0)])
def test_gate_mask_equals_dense(activation, threshold, B, buckets):
    f = _jitted(activation, threshold, False, "cpu_gather", buckets)
    for s in SPARSITIES:
        x, wg, wu, wd = _weights(s, B)
        prep = prepare_weights(wu, wd)
        out, count = f(x, wg, wu, wd, 0.0, prep["w_down_norms_F"], prep["w_up_FxD"])
        _check(out, _dense_ref(x, wg, wu, wd, activation, threshold))
        _, act = model.ffn_hidden(x[:, None, :], {"w_gate_DxF": wg, "w_up_DxF": wu}, activation, threshold)
        assert int(count) == int(np.sum(np.any(np.asarray(act)[:, 0] != 0, axis=0)))
        if activation == "relu":
            assert int(count) == round((1.0 - s) * F)


@pytest.mark.parametrize("buckets", [TWO, FULL], ids=["two_buckets", "one_bucket"])
@pytest.mark.parametrize("B", [1, 4])
def test_silu_neuron_norm_mode_equals_masked_dense(B, buckets):
    f = _jitted("silu", 0.0, True, "cpu_gather", buckets)
    x, wg, wu, wd = _weights(0.5, B)
    norms = prepare_weights(wu, wd)["w_down_norms_F"]
    x1, _ = model.ffn_hidden(x[:, None, :], {"w_gate_DxF": wg, "w_up_DxF": wu}, "silu")
    n_F = np.concatenate([[-1.0], np.sort(np.abs(np.asarray(x1)[0, 0]) * np.asarray(norms)), [np.inf]])
    for s in SPARSITIES:
        k = round(s * F)  # tau between the k-th and (k+1)-th smallest norms of row 0 drops exactly k neurons
        tau = float(n_F[k] + n_F[k + 1]) / 2 if k < F else float(n_F[F]) * 2
        out, count = f(x, wg, wu, wd, tau, norms, None)
        _check(out, _dense_ref(x, wg, wu, wd, "silu", tau=tau))
        if B == 1:
            assert int(count) == F - round(s * F)


def test_union_of_independent_rows():
    rng = np.random.default_rng(3)
    _, wg, wu, wd = _weights(0.5, 1)
    x = jnp.asarray(rng.normal(size=(4, D)).astype(np.float32))  # each row its own active set
    out, count = sparse_ffn(x, wg, wu, wd, activation="relu", implementation="cpu_gather", chunk=CHUNK, buckets=FULL)
    _check(out, _dense_ref(x, wg, wu, wd, "relu"))
    union = np.any(np.asarray(x) @ np.asarray(wg) > 0, axis=0)
    assert int(count) == int(union.sum()) > int(np.sum(np.asarray(x[0]) @ np.asarray(wg) > 0))


@pytest.mark.parametrize("implementation", ["dense", "auto"])
def test_other_implementations_equal_dense(implementation):
    x, wg, wu, wd = _weights(0.88, 4)
    out, count = sparse_ffn(x, wg, wu, wd, activation="relu", implementation=implementation, chunk=CHUNK)
    _check(out, _dense_ref(x, wg, wu, wd, "relu"))
    assert int(count) == round(0.12 * F)


def test_bad_names_error():
    x, wg, wu, wd = _weights(0.5, 1)
    with pytest.raises(errors.UsageError, match="choose one of: auto, dense, cpu_gather"):
        sparse_ffn(x, wg, wu, wd, activation="relu", implementation="pallas_nope")
    with pytest.raises(errors.UsageError, match="no exact zeros"):
        sparse_ffn(x, wg, wu, wd, activation="silu")
    with pytest.raises(errors.UsageError, match="w_down_norms_F"):
        sparse_ffn(x, wg, wu, wd, activation="silu", taus=0.1)
    with pytest.raises(errors.UsageError, match="batch 9"):  # a kernel's own check, as the dispatcher's error
        sparse_ffn(jnp.ones((9, D)), wg, wu, wd, activation="relu", implementation="pallas_triton")
    with pytest.raises(errors.UsageError, match="multiples of chunk"):
        sparse_ffn(x, wg, wu, wd, activation="relu", implementation="cpu_gather", chunk=16, buckets=(24,))
    assert set(IMPLEMENTATIONS) == {"dense", "cpu_gather", "cpu_ffi", "pallas_triton", "pallas_compact",
                                   "pallas_mosaic"}


def test_auto_picks_the_platform_backend():
    cpu = "cpu_ffi" if cpu_ffi.available() else "cpu_gather"  # the C++ kernel where it builds (g++), else XLA's loop
    assert resolve_implementation("auto", "cpu") == cpu
    assert resolve_implementation("auto", "gpu") == "pallas_triton"
    assert resolve_implementation("auto", "tpu") == "pallas_mosaic"
    assert resolve_implementation("auto") == cpu  # this machine
    assert resolve_implementation("dense", "tpu") == "dense"


def test_default_buckets():
    assert default_buckets(11008, 128, 0.4) == (128, 256, 512, 1024, 2048, 4096, 4480)
    assert default_buckets(203, 16, 0.4) == (16, 32, 64, 96)
    assert default_buckets(10, 16, 0.4) == (16,)


@pytest.mark.parametrize("implementation", ["pallas_triton", "pallas_compact", "pallas_mosaic"])
@pytest.mark.parametrize("activation,threshold,norm_mode", [("relu", 0.0, False), ("fatrelu", FAT_T, False),
                                                            ("drelu", 0.0, False), ("silu", 0.0, True)])
def test_pallas_backends_behind_the_interface_equal_dense(implementation, activation, threshold, norm_mode):
    """The GPU / TPU kernels (interpreted on this CPU) as ``sparse_ffn`` backends: the dense FFN's output, and the
    count of W_down rows they read (the union of x1's non-zero columns)."""
    f = _jitted(activation, threshold, norm_mode, implementation, None)
    for s in (0.0, 0.88, 1.0):
        x, wg, wu, wd = _weights(s, 2)
        prep = prepare_weights(wu, wd)
        x1, _ = model.ffn_hidden(x[:, None, :], {"w_gate_DxF": wg, "w_up_DxF": wu}, activation, threshold)
        n_F = np.sort(np.abs(np.asarray(x1)[:, 0]).max(axis=0) * np.asarray(prep["w_down_norms_F"]))
        k = min(round(s * F), F - 1)  # tau midway between two neuron norms: no neuron sits on the cut
        tau = float(n_F[k - 1] + n_F[k]) / 2 if k > 0 else 0.5 * float(n_F[0])
        tau = (2.0 * float(n_F[-1]) if s == 1.0 else tau) if norm_mode else None
        out, count = f(x, wg, wu, wd, 0.0 if tau is None else tau, prep["w_down_norms_F"], prep["w_up_FxD"])
        _check(out, _dense_ref(x, wg, wu, wd, activation, threshold, tau=tau))
        x1_ref = np.asarray(x1)[:, 0]
        if norm_mode:
            x1_ref = np.where(np.abs(x1_ref) * np.asarray(prep["w_down_norms_F"]) > tau, x1_ref, 0.0)
        assert int(count) == int(np.sum(np.any(x1_ref != 0, axis=0)))


# ---------------------------------------------------------------------------------------------------------------
# With an activation predictor: every backend computes the FFN on the predicted set
# ---------------------------------------------------------------------------------------------------------------
def _predicted_case(sparsity: float, B: int, rank: int = 16, extra: float = 0.3, margin: float = 0.5):
    """(x, wg, wu, wd, true set, predicted set, LayerPredictor): the predicted set is the true one plus ``extra`` of its
    size (and 3) inactive neurons. The predictor has random w1 / w2, w2's column signs set from h0 = relu(x0 w1) and
    b2 = +-margin, so its set on every row (1 + b / 4) x0 is exactly the chosen one."""
    x, wg, wu, wd = _weights(sparsity, B)
    x0 = np.asarray(x[0])
    on_F = x0 @ np.asarray(wg) > 0
    rng = np.random.default_rng(11)
    pred_F = on_F.copy()
    off = np.flatnonzero(~on_F)
    pred_F[rng.choice(off, min(len(off), round(extra * on_F.sum()) + 3), replace=False)] = True
    w1 = rng.normal(size=(D, rank)).astype(np.float32) / np.sqrt(D)
    w2 = rng.normal(size=(rank, F)).astype(np.float32) / np.sqrt(rank)
    w2 = w2 * np.where((np.maximum(x0 @ w1, 0) @ w2 > 0) == pred_F, 1.0, -1.0).astype(np.float32)
    b2 = np.where(pred_F, margin, -margin).astype(np.float32)
    pred = LayerPredictor(jnp.asarray(w1), jnp.asarray(w2), jnp.asarray(b2), jnp.float32(0.0))
    return x, wg, wu, wd, on_F, pred_F, pred


def _dense_ref_on_set(x, wg, wu, wd, activation, pred_F, threshold=0.0, tau=None):
    """The model's dense FFN (with the sparse-mode mask when tau is given), x1 zeroed outside ``pred_F``."""
    lp = {"w_gate_DxF": wg, "w_up_DxF": wu, "w_down_FxD": wd}
    x1, act = model.ffn_hidden(x[:, None, :], lp, activation, threshold)
    if tau is not None:
        mask = model.neuron_norm_mask({"layers": {"w_down_LxFxD": wd[None]}}, [tau])
        x1 = mask(jnp.int32(0), x1, act, jnp.ones(x1.shape[:2], bool))
    return model.ffn_down(jnp.where(jnp.asarray(pred_F), x1, 0.0), lp)[:, 0, :]


def _midway_tau(x, wg, wu, norms) -> float:
    """A SiLU neuron-norm threshold near the median of |x1| * ||W_down[i]|| over every row, midway between two of
    those values (no neuron sits on the cut)."""
    x1, _ = model.ffn_hidden(x[:, None, :], {"w_gate_DxF": wg, "w_up_DxF": wu}, "silu")
    n = np.sort((np.abs(np.asarray(x1)[:, 0]) * np.asarray(norms)).ravel())
    return float(n[len(n) // 2] + n[len(n) // 2 + 1]) / 2


def test_predicted_set_is_the_predictor_formula():
    x, _, _, _, _, pred_F, pred = _predicted_case(0.5, 3)
    got = predicted_set(x, pred)
    stacked = {"w1_LxDxR": pred.w1_DxR[None], "w2_LxRxF": pred.w2_RxF[None], "b2_LxF": pred.b2_F[None],
               "threshold_L": jnp.zeros((1,), jnp.float32)}
    want = np.any(np.asarray(predictor_core.predicted_mask(stacked, 0, x[:, None, :]))[:, 0], axis=0)
    np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(want, pred_F)
    assert layer_predictor(stacked, 0)._replace(threshold=0.0).b2_F.shape == (F,)


@pytest.mark.parametrize("implementation", ["dense", "cpu_gather"])
@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("activation,threshold", [("relu", 0.0), ("fatrelu", FAT_T), ("drelu", 0.0)])
def test_xla_backends_with_a_predictor_equal_the_dense_ffn_on_its_set(activation, threshold, B, implementation):
    for s in SPARSITIES:
        x, wg, wu, wd, on_F, pred_F, pred = _predicted_case(s, B)
        out, count = sparse_ffn(x, wg, wu, wd, activation=activation, threshold=threshold, predictor=pred,
                                implementation=implementation, chunk=CHUNK, buckets=FULL)
        _check(out, _dense_ref_on_set(x, wg, wu, wd, activation, pred_F, threshold))
        assert int(count) == int(np.sum(on_F & pred_F))


def test_neuron_norm_mode_with_a_predictor_keeps_both_rules():
    x, wg, wu, wd, _, pred_F, pred = _predicted_case(0.5, 2)
    norms = prepare_weights(wu, wd)["w_down_norms_F"]
    tau = _midway_tau(x, wg, wu, norms)
    for implementation in ("dense", "cpu_gather", "cpu_ffi"):
        out, _ = sparse_ffn(x, wg, wu, wd, activation="silu", taus=tau, w_down_norms_F=norms, predictor=pred,
                            implementation=implementation, chunk=CHUNK, buckets=FULL)
        _check(out, _dense_ref_on_set(x, wg, wu, wd, "silu", pred_F, tau=tau))


@pytest.mark.parametrize("implementation", ["pallas_triton", "pallas_compact", "pallas_mosaic"])
@pytest.mark.parametrize("activation,threshold,norm_mode", [("relu", 0.0, False), ("silu", 0.0, False),
                                                            ("silu", 0.0, True)])
def test_pallas_backends_with_a_predictor_equal_the_dense_ffn_on_its_set(implementation, activation, threshold,
                                                                         norm_mode):
    """The GPU / TPU kernels (interpreted) take the predictor's set through S2's ``predicted_F``; SiLU without taus
    is decoded with the predictor alone."""
    x, wg, wu, wd, on_F, pred_F, pred = _predicted_case(0.88, 2)
    prep = prepare_weights(wu, wd)
    tau = None
    if norm_mode:
        tau = _midway_tau(x, wg, wu, prep["w_down_norms_F"])
    out, count = sparse_ffn(x, wg, wu, wd, activation=activation, threshold=threshold, taus=tau,
                            w_down_norms_F=prep["w_down_norms_F"], w_up_FxD=prep["w_up_FxD"], predictor=pred,
                            implementation=implementation)
    _check(out, _dense_ref_on_set(x, wg, wu, wd, activation, pred_F, threshold, tau=tau))
    if activation == "relu":
        assert int(count) == int(np.sum(on_F & pred_F))


def test_silu_without_taus_or_predictor_is_refused_with_both_remedies():
    x, wg, wu, wd = _weights(0.5, 1)
    with pytest.raises(errors.UsageError, match="pass taus .* or a predictor"):
        sparse_ffn(x, wg, wu, wd, activation="silu", implementation="dense")
