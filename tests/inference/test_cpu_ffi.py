"""The C++ sparse FFN kernel (``cpu_ffi``) equals the dense FFN, keeps jit's cache, rejects bad shapes, and its build
is cached and fails with the fix in the message."""

import functools
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import gated_ffn_weights

from prosparse_jax import errors
from prosparse_jax.inference import cpu_ffi, sparse_ffn
from prosparse_jax.inference.sparse_ffn import prepare_weights

D, F = 100, 333  # neither a multiple of the kernel's 16-float vectors nor of its chunk of neurons
SPARSITIES = (0.0, 0.5, 0.88, 0.99, 1.0)
FAT_T = 0.05


def _weights(sparsity: float, B: int, seed: int = 0, D: int = D, F: int = F) -> tuple[jax.Array, ...]:
    return gated_ffn_weights(sparsity, B, D, F, FAT_T, seed)


@functools.cache
def _jitted(activation: str, threshold: float, norm_mode: bool, implementation: str, buckets=(F,)):
    def f(x, wg, wu, wd, tau, norms, wut):
        return sparse_ffn.sparse_ffn(x, wg, wu, wd, activation=activation, threshold=threshold,
                                     taus=tau if norm_mode else None, w_down_norms_F=norms, w_up_FxD=wut,
                                     implementation=implementation, buckets=buckets)
    return jax.jit(f)


def _check(out, ref) -> None:
    """|out - ref| <= 1e-5 * max(1, max |ref|) in fp32."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.max(np.abs(out - ref)) <= 1e-5 * max(1.0, np.max(np.abs(ref)))


def _tau(x, wg, wu, norms, sparsity: float) -> float:
    """The neuron-norm threshold dropping round(s F) neurons of the batch union (midway between two norms)."""
    F = wg.shape[1]
    x1 = jax.nn.silu(x @ wg) * (x @ wu)
    n_F = np.sort(np.max(np.abs(np.asarray(x1)), axis=0) * np.asarray(norms))
    k = round(sparsity * F)
    return float((n_F[k - 1] + n_F[k]) / 2) if 0 < k < F else (0.5 * n_F[0] if k == 0 else 2.0 * n_F[-1])


MODES = [("relu", 0.0, False), ("fatrelu", FAT_T, False), ("drelu", 0.0, False), ("relu2", 0.0, False),
         ("silu", 0.0, True)]


def _check_modes_against_dense(activation, threshold, norm_mode, B, sparsities, D=D, F=F):
    got_f = _jitted(activation, threshold, norm_mode, "cpu_ffi", (F,))  # never the dense fallback
    ref_f = _jitted(activation, threshold, norm_mode, "dense")
    for s in sparsities:
        x, wg, wu, wd = _weights(s, B, D=D, F=F)
        prep = prepare_weights(wu, wd)
        tau = _tau(x, wg, wu, prep["w_down_norms_F"], s) if norm_mode else 0.0
        args = (x, wg, wu, wd, tau, prep["w_down_norms_F"], None if norm_mode else prep["w_up_FxD"])
        (out, count), (ref, ref_count) = got_f(*args), ref_f(*args)
        _check(out, ref)
        assert int(count) == int(ref_count) == (F - round(s * F) if norm_mode else round((1.0 - s) * F))


@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("activation,threshold,norm_mode", MODES, ids=[m[0] for m in MODES])
def test_equals_dense_ffn_at_every_sparsity(activation, threshold, norm_mode, B):
    _check_modes_against_dense(activation, threshold, norm_mode, B, SPARSITIES)


@pytest.mark.parametrize("activation,threshold,norm_mode", [MODES[0], MODES[2], MODES[4]],
                         ids=["relu", "drelu", "silu"])
def test_equals_dense_ffn_when_the_work_is_split_over_threads(activation, threshold, norm_mode):
    """Megabytes of active rows: the kernel schedules a task on XLA's thread pool (one accumulator per thread). Which
    chunks the task gets is up to the scheduler; a kernel that loses the task's accumulator failed this test in 5 of
    5 runs (in 2-3 of its 3 cases)."""
    _check_modes_against_dense(activation, threshold, norm_mode, 5, (0.0, 0.5), D=1000, F=1500)


def test_dense_fallback_above_the_crossover_and_w_up_transposed_in_the_call():
    f = _jitted("relu", 0.0, False, "cpu_ffi", None)  # default crossover (0.8): dense at 0% sparsity only
    for s in (0.0, 0.5, 0.88):
        x, wg, wu, wd = _weights(s, 2)
        out, count = f(x, wg, wu, wd, 0.0, None, None)
        ref, ref_count = sparse_ffn.sparse_ffn(x, wg, wu, wd, activation="relu", implementation="dense")
        _check(out, ref)
        assert int(count) == int(ref_count)


def test_a_count_that_changes_does_not_recompile():
    traces = []

    def ffn(x, wg, wu, wd, wut):
        traces.append(1)
        return sparse_ffn.sparse_ffn(x, wg, wu, wd, activation="relu", w_up_FxD=wut, implementation="cpu_ffi")

    f = jax.jit(ffn)
    _, _, wu, wd = _weights(0.5, 1)
    prep = prepare_weights(wu, wd)
    for s in (0.5, 0.88, 0.99, 0.3):
        x, wg, _, _ = _weights(s, 1)
        out, count = f(x, wg, wu, wd, prep["w_up_FxD"])
        _check(out, sparse_ffn.sparse_ffn(x, wg, wu, wd, activation="relu", implementation="dense")[0])
        assert int(count) == round((1.0 - s) * F)
    assert len(traces) == 1


def test_vmap_over_calls_equals_each_call():
    """Under jax.vmap (e.g. over sequences decoded side by side) the custom call loops over the mapped axis."""
    xs, wgs = zip(*[_weights(s, 2, seed=0)[:2] for s in (0.5, 0.88, 0.99)], strict=True)
    _, _, wu, wd = _weights(0.5, 2)
    prep = prepare_weights(wu, wd)

    def one(x, wg):
        return sparse_ffn.sparse_ffn(x, wg, wu, wd, activation="relu", w_up_FxD=prep["w_up_FxD"],
                                     implementation="cpu_ffi")

    outs, counts = jax.jit(jax.vmap(one))(jnp.stack(xs), jnp.stack(wgs))
    for k, (x, wg) in enumerate(zip(xs, wgs, strict=True)):
        out, count = one(x, wg)
        np.testing.assert_array_equal(np.asarray(outs[k]), np.asarray(out))
        assert int(counts[k]) == int(count)


def test_non_float32_runs_the_gather_backend():
    x, wg, wu, wd = _weights(0.88, 2)
    wu, wd = wu.astype(jnp.bfloat16), wd.astype(jnp.bfloat16)
    out, count = sparse_ffn.sparse_ffn(x, wg, wu, wd, activation="relu", implementation="cpu_ffi")
    ref, ref_count = sparse_ffn.sparse_ffn(x, wg, wu, wd, activation="relu", implementation="cpu_gather")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    assert int(count) == int(ref_count)


def _call(B=2, F_coeff=F, F_active=F, up_rows=F, active=(3, 5)):
    """gather_down on random inputs with the given (possibly inconsistent) shapes, ``active`` neurons on."""
    rng = np.random.default_rng(0)

    def r(*shape):
        return jnp.asarray(rng.normal(size=shape).astype(np.float32))
    active_F = np.zeros(F_active, bool)
    active_F[list(active)] = True
    return np.asarray(cpu_ffi.gather_down(r(B, D), r(B, F_coeff), active_F, r(up_rows, D), r(F, D), read_up=True,
                                          drelu=False))


# XLA's INVALID_ARGUMENT arrives as JaxRuntimeError, or as ValueError from an executable already in jit's cache.
RUNTIME_ERRORS = (jax.errors.JaxRuntimeError, ValueError)


def test_bad_shapes_error():
    _call()  # consistent: runs
    with pytest.raises(RUNTIME_ERRORS, match="shapes disagree"):
        _call(F_coeff=F + 1)
    with pytest.raises(RUNTIME_ERRORS, match="shapes disagree"):
        _call(up_rows=F - 1)
    with pytest.raises(RUNTIME_ERRORS, match="shapes disagree"):
        _call(F_active=F - 1)


def test_no_active_neuron_gives_zeros():
    np.testing.assert_array_equal(_call(active=()), 0.0)


def test_build_is_cached():
    path = cpu_ffi.build()
    mtime = os.stat(path).st_mtime_ns
    assert cpu_ffi.available()
    assert cpu_ffi.build() == path and os.stat(path).st_mtime_ns == mtime  # not recompiled
    assert cpu_ffi.library_path(source="// another kernel") != path  # a changed source builds a new file


@pytest.mark.parametrize("cxx,why", [("false", "failed"), ("/nonexistent/g++", "not found")])
def test_a_failed_build_names_the_fix(monkeypatch, tmp_path, cxx, why):
    monkeypatch.setenv("PROSPARSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", cxx)
    with pytest.raises(errors.KernelUnavailableError, match=why) as e:
        cpu_ffi.build()
    assert "apt-get install g++" in str(e.value) and "implementation='cpu_gather'" in str(e.value)
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind


def test_an_unbuildable_kernel_is_unavailable_and_its_call_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("PROSPARSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    assert not cpu_ffi.available()
    assert "apt-get install g++" in cpu_ffi.unavailable_reason()
    x, wg, wu, wd = _weights(0.88, 1)
    with pytest.raises(errors.KernelUnavailableError, match="implementation='cpu_gather'"):
        sparse_ffn.sparse_ffn(x, wg, wu, wd, activation="relu", implementation="cpu_ffi")
    monkeypatch.undo()
    assert cpu_ffi.available()  # the real compiler and cache again: the kernel built before


def test_auto_falls_back_to_gather_with_one_warning(monkeypatch, tmp_path):
    assert sparse_ffn.resolve_implementation("auto", "cpu") == "cpu_ffi"  # this machine has g++
    monkeypatch.setenv("PROSPARSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.warns(UserWarning, match="'/nonexistent/g\\+\\+' .* was not found"):
        assert sparse_ffn.resolve_implementation("auto", "cpu") == "cpu_gather"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sparse_ffn.resolve_implementation("auto", "cpu") == "cpu_gather"  # warned once
