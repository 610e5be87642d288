"""The C++ sparse FFN kernel (``cpu_ffi``) equals the dense FFN, keeps jit's cache and rejects bad shapes; its build
is cached, verified before loading (a damaged library is rebuilt, never loaded), loadable by other users, and every
failure is one line (``auto`` falls back to ``cpu_gather`` with one warning).

The module builds the kernel once into its own cache directory (never ``~/.cache``). A process registers one kernel,
so the failure cases run in subprocesses: that also keeps a crash (SIGBUS from a truncated library) out of pytest.
"""

import functools
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import gated_ffn_weights

from prosparse_jax import errors
from prosparse_jax.inference import cpu_ffi, sparse_ffn
from prosparse_jax.inference.sparse_ffn import prepare_weights
from prosparse_jax.model import transformer as model
from prosparse_jax.predictor import core as predictor_core

D, F = 100, 333  # neither a multiple of the kernel's 16-float vectors nor of its chunk of neurons
SPARSITIES = (0.0, 0.5, 0.88, 0.99, 1.0)
FAT_T = 0.05
REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534


@pytest.fixture(scope="module", autouse=True)
def built(tmp_path_factory: pytest.TempPathFactory):
    """The kernel built once, with umask 022, into this module's cache directory (``$PROSPARSE_CACHE_DIR`` while the
    module runs); yields the library's path."""
    cache = tmp_path_factory.mktemp("kernel_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PROSPARSE_CACHE_DIR", str(cache))
        mp.delenv("CXX", raising=False)
        umask = os.umask(0o022)
        try:
            path = cpu_ffi.build()
        finally:
            os.umask(umask)
        yield path


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


# ---------------------------------------------------------------------------------------------------------------
# The predictor path: the predictor's logits and the gate rows of its set in C++ (predict_gate), then gather_down
# ---------------------------------------------------------------------------------------------------------------
PRED_RANK = 24


def predictor_for(x0_D, predicted_F, rank: int = PRED_RANK, seed: int = 0, margin: float = 0.5):
    """A LayerPredictor whose set on every positive multiple of ``x0_D`` is exactly ``predicted_F``: random w1 and
    w2, the sign of w2's column i chosen so that h0 . w2[:, i] (h0 = relu(x0 w1)) is positive iff i is predicted, and
    b2 = +-margin with that sign, so every logit is at least ``margin`` away from the threshold 0."""
    rng = np.random.default_rng(seed)
    x0_D = np.asarray(x0_D, np.float32)
    D, F = x0_D.shape[0], predicted_F.shape[0]
    w1 = rng.normal(size=(D, rank)).astype(np.float32) / np.sqrt(D)
    w2 = rng.normal(size=(rank, F)).astype(np.float32) / np.sqrt(rank)
    h0 = np.maximum(x0_D @ w1, 0.0)
    w2 = w2 * np.where((h0 @ w2 > 0) == predicted_F, 1.0, -1.0).astype(np.float32)
    b2 = np.where(predicted_F, margin, -margin).astype(np.float32)
    return sparse_ffn.LayerPredictor(jnp.asarray(w1), jnp.asarray(w2), jnp.asarray(b2), jnp.float32(0.0))


def _predicted_case(sparsity: float, B: int, D: int = D, F: int = F, extra: float = 0.3, drop: int = 0,
                    rank: int = PRED_RANK):
    """(x, wg, wu, wd, the true active set, the predicted set, its predictor): the predicted set is the true one plus
    ``extra`` of its size (and 3) inactive neurons, less its first ``drop`` active ones."""
    x, wg, wu, wd = _weights(sparsity, B, D=D, F=F)
    on_F = np.asarray(x[0] @ wg) > 0
    off = np.flatnonzero(~on_F)
    pred_F = on_F.copy()
    pred_F[np.random.default_rng(7).choice(off, min(len(off), round(extra * on_F.sum()) + 3), replace=False)] = True
    pred_F[np.flatnonzero(on_F)[:drop]] = False
    return x, wg, wu, wd, on_F, pred_F, predictor_for(x[0], pred_F, rank)


def _reference_on_set(x, wg, wu, wd, activation, threshold, pred):
    """The model's dense FFN with x1 zeroed outside the predictor's set (the set from predictor.core's formula)."""
    logits = predictor_core.layer_logits(pred.w1_DxR, pred.w2_RxF, pred.b2_F, x)
    keep_F = np.any(np.asarray(logits) > float(pred.threshold), axis=0)
    x1, _ = model.ffn_hidden(x[:, None, :], {"w_gate_DxF": wg, "w_up_DxF": wu}, activation, threshold)
    x1 = np.where(keep_F, np.asarray(x1)[:, 0], 0.0)
    return model.ffn_down(jnp.asarray(x1)[:, None], {"w_down_FxD": wd})[:, 0], keep_F


@functools.cache
def _pred_jitted(activation: str, threshold: float, implementation: str = "cpu_ffi", buckets=(F,)):
    def f(x, wg, wu, wd, wut, wgt, pred):
        return sparse_ffn.sparse_ffn(x, wg, wu, wd, activation=activation, threshold=threshold, w_up_FxD=wut,
                                     w_gate_FxD=wgt, predictor=pred, implementation=implementation, buckets=buckets)
    return jax.jit(f)


def _with_threshold(pred, t):
    return pred._replace(threshold=jnp.float32(t))


@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("activation,threshold", [("relu", 0.0), ("fatrelu", FAT_T), ("drelu", 0.0)])
def test_predictor_path_equals_the_reference_on_the_predicted_set(activation, threshold, B):
    """At every sparsity (the predicted set 1.3x the true one, plus 3): the FFN computed on the predicted set only,
    and the active count is that of the predicted active neurons."""
    f = _pred_jitted(activation, threshold)
    for s in SPARSITIES:
        x, wg, wu, wd, on_F, pred_F, pred = _predicted_case(s, B)
        prep = prepare_weights(wu, wd, wg)
        out, count = f(x, wg, wu, wd, prep["w_up_FxD"], prep["w_gate_FxD"], pred)
        ref, keep_F = _reference_on_set(x, wg, wu, wd, activation, threshold, pred)
        np.testing.assert_array_equal(keep_F, pred_F)  # the construction gives the intended set
        _check(out, ref)
        assert int(count) == int(np.sum(on_F & pred_F))


@pytest.mark.parametrize("B", [1, 4])
def test_a_truly_active_neuron_the_predictor_misses_is_dropped_exactly(B):
    """The predicted set lacks one active neuron j: the output differs from the dense FFN by exactly j's term
    x1_j * W_down[j] (and by nothing else)."""
    x, wg, wu, wd, on_F, pred_F, pred = _predicted_case(0.88, B, drop=1)
    j = int(np.flatnonzero(on_F & ~pred_F)[0])
    prep = prepare_weights(wu, wd, wg)
    out, count = _pred_jitted("relu", 0.0)(x, wg, wu, wd, prep["w_up_FxD"], prep["w_gate_FxD"], pred)
    dense, dense_count = sparse_ffn.sparse_ffn(x, wg, wu, wd, activation="relu", implementation="dense")
    x1_j = np.maximum(np.asarray(x @ wg)[:, j], 0.0) * np.asarray(x @ wu)[:, j]
    term = x1_j[:, None] * np.asarray(wd)[j][None, :]
    assert np.max(np.abs(term)) > 1e-2 * np.max(np.abs(np.asarray(dense)))  # the lost term is visible
    _check(np.asarray(dense) - np.asarray(out), term)
    assert int(count) == int(dense_count) - 1


@pytest.mark.parametrize("B", [1, 4])
def test_a_predictor_of_threshold_minus_inf_is_the_sparse_ffn_without_one(B):
    f = _pred_jitted("fatrelu", FAT_T)
    g = _jitted("fatrelu", FAT_T, False, "cpu_ffi", (F,))
    for s in SPARSITIES:
        x, wg, wu, wd, _, _, pred = _predicted_case(s, B)
        prep = prepare_weights(wu, wd, wg)
        out, count = f(x, wg, wu, wd, prep["w_up_FxD"], prep["w_gate_FxD"], _with_threshold(pred, -np.inf))
        ref, ref_count = g(x, wg, wu, wd, 0.0, prep["w_down_norms_F"], prep["w_up_FxD"])
        _check(out, ref)
        assert int(count) == int(ref_count)


def test_predictor_path_when_the_work_is_split_over_threads():
    """Megabytes of W2 and gate rows: both passes of predict_gate and gather_down run on the pool."""
    for s in (0.0, 0.5):
        x, wg, wu, wd, on_F, pred_F, pred = _predicted_case(s, 5, D=1000, F=1500, rank=512)
        prep = prepare_weights(wu, wd, wg)
        out, count = _pred_jitted("relu", 0.0, buckets=(1500,))(x, wg, wu, wd, prep["w_up_FxD"], prep["w_gate_FxD"],
                                                                 pred)
        _check(out, _reference_on_set(x, wg, wu, wd, "relu", 0.0, pred)[0])
        assert int(count) == int(np.sum(on_F & pred_F))


def test_predict_gate_returns_the_set_and_its_gates_only():
    x, wg, _, _, _, pred_F, pred = _predicted_case(0.5, 3)
    h = jax.nn.relu(x @ pred.w1_DxR)
    gate, got_F = cpu_ffi.predict_gate(x, h, pred.w2_RxF, pred.b2_F, pred.threshold, jnp.asarray(wg.T))
    np.testing.assert_array_equal(np.asarray(got_F), pred_F)
    want = np.where(pred_F, np.asarray(x @ wg), 0.0)
    _check(gate, want)
    assert np.all(np.asarray(gate)[:, ~pred_F] == 0.0)


def test_silu_with_a_predictor_computes_its_set_exactly():
    """A model without exact zeros (SiLU) decodes with a predictor alone: its set is the sparse mode."""
    x, wg, wu, wd, _, pred_F, pred = _predicted_case(0.88, 2)
    prep = prepare_weights(wu, wd, wg)
    out, count = _pred_jitted("silu", 0.0)(x, wg, wu, wd, prep["w_up_FxD"], prep["w_gate_FxD"], pred)
    _check(out, _reference_on_set(x, wg, wu, wd, "silu", 0.0, pred)[0])
    assert int(count) == int(pred_F.sum())


BUSY_CORE = "import time\nend = time.time() + 60\nwhile time.time() < end: pass\n"


def test_results_stay_exact_while_another_process_is_busy_on_a_core():
    """With a process spinning on a core, a pool task may be preempted holding a chunk; the caller then computes the
    chunk itself and the task's late result is dropped: every call still equals the reference (no chunk lost or
    counted twice)."""
    x, wg, wu, wd, on_F, pred_F, pred = _predicted_case(0.5, 2, D=1000, F=1500, rank=512)
    prep = prepare_weights(wu, wd, wg)
    f = _pred_jitted("relu", 0.0, buckets=(1500,))
    ref = _reference_on_set(x, wg, wu, wd, "relu", 0.0, pred)[0]
    busy = subprocess.Popen([sys.executable, "-c", BUSY_CORE])
    try:
        for _ in range(150):
            out, count = f(x, wg, wu, wd, prep["w_up_FxD"], prep["w_gate_FxD"], pred)
            _check(out, ref)
            assert int(count) == int(np.sum(on_F & pred_F))
    finally:
        busy.kill()
        busy.wait()


def test_a_predictor_of_another_shape_is_refused():
    x, wg, wu, wd, _, _, pred = _predicted_case(0.5, 1)
    bad = pred._replace(b2_F=pred.b2_F[:-1])
    with pytest.raises(errors.UsageError, match=r"predictor b2_F has shape \(332,\), expected \(333,\)"):
        sparse_ffn.sparse_ffn(x, wg, wu, wd, activation="relu", predictor=bad, implementation="cpu_ffi")


def test_build_is_cached(built):
    mtime = os.stat(built).st_mtime_ns
    assert cpu_ffi.available()
    assert cpu_ffi.build() == built and os.stat(built).st_mtime_ns == mtime  # not recompiled
    assert cpu_ffi.library_path(source="// another kernel") != built  # a changed source builds a new file


def test_the_build_is_readable_by_every_user_and_carries_its_digest(built):
    """Another user of a shared cache must be able to load the library (it was 0711: mkstemp's 0600 plus x bits)."""
    assert stat.S_IMODE(os.stat(built).st_mode) == 0o755
    digest = cpu_ffi.digest_path(built)
    assert stat.S_IMODE(os.stat(digest).st_mode) == 0o644
    assert digest.read_text() == f"{hashlib.sha256(built.read_bytes()).hexdigest()}  {built.name}\n"  # sha256sum -c
    assert sorted(p.name for p in built.parent.iterdir()) == [built.name, digest.name]  # no temporary files


@pytest.mark.parametrize("cxx,why", [("false", "failed"), ("/nonexistent/g++", "not found")])
def test_a_failed_build_is_one_line_naming_the_fix(monkeypatch, tmp_path, cxx, why):
    monkeypatch.setenv("PROSPARSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", cxx)
    with pytest.raises(errors.KernelUnavailableError, match=why) as e:
        cpu_ffi.build()
    assert "\n" not in str(e.value)
    assert "apt-get install g++" in str(e.value) and "implementation='cpu_gather'" in str(e.value)
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind


def test_a_killed_builds_temporary_files_are_removed_by_the_next_build(monkeypatch, tmp_path):
    monkeypatch.setenv("PROSPARSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    name = cpu_ffi.library_path().name
    stale, fresh = tmp_path / f".{name}.dead1.so.tmp", tmp_path / f".{name}.live1.so.tmp"
    for p in (stale, fresh):
        p.write_bytes(b"\x7fELF")
    os.utime(stale, (0, 0))
    with pytest.raises(errors.KernelUnavailableError):
        cpu_ffi.build()
    assert sorted(tmp_path.iterdir()) == [fresh]  # another builder's file (younger than an hour) is kept


# ---------------------------------------------------------------------------------------------------------------
# In subprocesses: a fresh process per case (one registered kernel per process; a crash must not take pytest down)
# ---------------------------------------------------------------------------------------------------------------
#: For each scenario (environment variables to set), in order: ``auto`` resolved twice, the warnings it gave, and a
#: forced ``cpu_ffi`` call: its max error against the dense FFN, or its KernelUnavailableError's message.
PROBE = """
import json, os, sys, warnings
import jax, jax.numpy as jnp
from prosparse_jax import errors
from prosparse_jax.inference import sparse_ffn
k = jax.random.split(jax.random.key(0), 4)
x = jnp.abs(jax.random.normal(k[0], (2, 8)))
wg = jax.random.normal(k[1], (8, 16)).at[:, 4:].set(-1.0)  # 4 of 16 neurons active: the kernel runs
wu, wd = jax.random.normal(k[2], (8, 16)), jax.random.normal(k[3], (16, 8))
results = []
for env in json.loads(sys.argv[1]):
    os.environ.update(env)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = [sparse_ffn.resolve_implementation("auto", "cpu") for _ in range(2)]
    try:
        out = sparse_ffn.sparse_ffn(x, wg, wu, wd, activation="relu", implementation="cpu_ffi")[0]
        ref = sparse_ffn.sparse_ffn(x, wg, wu, wd, activation="relu", implementation="dense")[0]
        forced = float(jnp.max(jnp.abs(out - ref)))
    except errors.KernelUnavailableError as e:
        forced = str(e)
    results.append({"auto": auto, "warnings": [str(w.message) for w in caught], "forced": forced})
print(json.dumps(results))
"""


def _probe(*scenarios: dict[str, str], as_nobody: bool = False) -> list[dict]:
    """:data:`PROBE`'s results in a fresh process (umask 022; as ``nobody`` through setpriv if asked), which must
    exit 0: a signal (SIGBUS is 7) is a negative status."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    env.pop("CXX", None)
    nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] if as_nobody else []
    res = subprocess.run([*nobody, sys.executable, "-c", PROBE, json.dumps(list(scenarios))], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300, umask=0o022)
    assert res.returncode == 0, f"exit status {res.returncode}\n{res.stderr[-3000:]}"
    return json.loads(res.stdout.splitlines()[-1])


def _copy_build(built: Path, cache: Path, with_digest: bool = True) -> Path:
    """The module's build (and its digest file) copied into ``cache``; returns the copied library."""
    cache.mkdir(parents=True, exist_ok=True)
    for p in built.parent.glob(f"{built.name}*") if with_digest else [built]:
        shutil.copy2(p, cache / p.name)
    return cache / built.name


def _assert_fell_back(result: dict, *needles: str) -> None:
    """``auto`` ran cpu_gather with exactly one warning, a forced cpu_ffi raised one line; all name ``needles``."""
    assert result["auto"] == ["cpu_gather", "cpu_gather"]
    assert len(result["warnings"]) == 1, result["warnings"]
    assert isinstance(result["forced"], str) and "\n" not in result["forced"]  # the CLIs print `<prog>: error: ...`
    for needle in (*needles, "implementation='cpu_gather'"):
        assert needle in result["warnings"][0] and needle in result["forced"], (needle, result)


@pytest.fixture
def shared_tmp():
    """A directory every user can enter (pytest's tmp_path is private to its user)."""
    d = Path(tempfile.mkdtemp(prefix="prosparse_cpu_ffi_"))
    d.chmod(0o755)
    yield d
    for p in d.rglob("*"):
        if p.is_dir():
            p.chmod(0o755)
    shutil.rmtree(d)


def test_a_truncated_cached_library_is_rebuilt_never_loaded(built, tmp_path):
    """The library cut inside its program headers: loading it was SIGBUS on every run, no message, no fallback."""
    lib = _copy_build(built, tmp_path / "cache")
    with open(lib, "r+b") as f:
        f.truncate(4096)
    [result] = _probe({"PROSPARSE_CACHE_DIR": str(lib.parent)})
    assert result["auto"] == ["cpu_ffi", "cpu_ffi"] and result["warnings"] == []
    assert isinstance(result["forced"], float) and result["forced"] < 1e-4
    assert hashlib.sha256(lib.read_bytes()).hexdigest() == cpu_ffi.digest_path(lib).read_text().split()[0]
    assert stat.S_IMODE(os.stat(lib).st_mode) == 0o755


@pytest.fixture(scope="module")
def fallbacks(built, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """Caches where the kernel cannot be built or loaded, probed in one process (none of them registers a kernel):
    name -> (cache directory, probe result)."""
    root = tmp_path_factory.mktemp("fallbacks")
    no_gxx = root / "empty_bin"  # PATH without g++
    no_gxx.mkdir()
    truncated = _copy_build(built, root / "truncated")
    with open(truncated, "r+b") as f:
        f.truncate(60000)
    (root / "cachefile").write_text("x")
    caches = {"truncated": truncated.parent,
              "undigested": _copy_build(built, root / "undigested", with_digest=False).parent,
              "file": root / "cachefile", "below_a_file": root / "cachefile" / "sub"}
    results = _probe(*[{"PROSPARSE_CACHE_DIR": str(c), "PATH": str(no_gxx) if name in ("truncated", "undigested")
                        else os.environ["PATH"]} for name, c in caches.items()])
    return {name: (c, r) for (name, c), r in zip(caches.items(), results, strict=True)}


@pytest.mark.parametrize("case,needles", [("truncated", ("does not match its digest", "'g++'", "not found")),
                                          ("undigested", ("has no digest file", "'g++'", "not found"))])
def test_a_damaged_library_without_a_compiler_is_not_loaded_and_auto_falls_back(fallbacks, built, case, needles):
    """Truncated, or without the digest written with it: without g++ to rebuild, never loaded (the truncated one was
    SIGBUS); one line naming it."""
    cache, result = fallbacks[case]
    _assert_fell_back(result, str(cache / built.name), *needles)
    assert (cache / built.name).stat().st_size == (60000 if case == "truncated" else built.stat().st_size)


@pytest.mark.parametrize("case,needles", [("file", ("it is a file", "PROSPARSE_CACHE_DIR")),
                                          ("below_a_file", ("PROSPARSE_CACHE_DIR",))])
def test_an_unusable_cache_directory_falls_back_with_one_warning(fallbacks, case, needles):
    """A cache directory that is a file, or below one: one line naming it and PROSPARSE_CACHE_DIR (was a raw errno,
    and auto did not fall back)."""
    cache, result = fallbacks[case]
    _assert_fell_back(result, str(cache), *needles)


def test_a_read_only_cache_directory_falls_back_and_a_shared_build_loads_for_another_user(built, shared_tmp):
    """Read-only (0555) for the user: one warning, cpu_gather. Then a cache built by one user, loaded by another."""
    (shared_tmp / "ro").mkdir(mode=0o555)
    if os.geteuid() != 0:  # the current user is the other user: only the read-only half applies
        [result] = _probe({"PROSPARSE_CACHE_DIR": str(shared_tmp / "ro")})
        _assert_fell_back(result, str(shared_tmp / "ro"), "Permission denied", "PROSPARSE_CACHE_DIR")
        return
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: no other user to be")
    shared = _copy_build(built, shared_tmp / "shared").parent
    ro, loaded = _probe({"PROSPARSE_CACHE_DIR": str(shared_tmp / "ro"), "HOME": str(shared_tmp)},
                        {"PROSPARSE_CACHE_DIR": str(shared)}, as_nobody=True)
    _assert_fell_back(ro, str(shared_tmp / "ro"), "Permission denied", "PROSPARSE_CACHE_DIR")
    assert loaded["auto"] == ["cpu_ffi", "cpu_ffi"] and loaded["warnings"] == []
    assert isinstance(loaded["forced"], float) and loaded["forced"] < 1e-4
