"""The timing helpers of experiments/bench_pallas_ffn.py on CPU: slope arithmetic, distinct layers, no merged calls,
the CUPTI fallback, and the --interpret dry run's table and JSON."""

import importlib
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

bench = importlib.import_module("experiments.bench_pallas_ffn")


def test_slope_recovers_a_known_per_call_cost():
    fixed_s, per_call_s = 0.015, 0.003

    def run_k(k):
        return lambda: time.sleep(fixed_s + k * per_call_s)

    r = bench.slope_us(run_k, ks=(4, 12), runs=2)
    assert r["us"] == pytest.approx(per_call_s * 1e6, rel=0.25)
    assert r["t_us"][12] > r["t_us"][4] >= (fixed_s + 4 * per_call_s) * 1e6


def test_slope_rejects_bad_call_counts():
    with pytest.raises(ValueError, match="k1 < k2"):
        bench.slope_us(lambda k: (lambda: None), ks=(8, 8))


def _gates(layer):
    return np.asarray(lax.dot(layer["x_1xD"], layer["w_gate_DxF"], precision=lax.Precision.HIGHEST))[0]


def test_layers_are_distinct_with_the_requested_active_count():
    D, F, s = 64, 96, 0.75
    layers = bench.make_layers(D, F, s, "float32", 3)
    n_active = round((1 - s) * F)
    actives = []
    for layer in layers:
        assert layer["x_1xD"].shape == (1, D) and layer["w_up_FxD"].shape == (F, D)
        assert int(np.sum(_gates(layer) > 0)) == n_active
        x1_active = np.asarray(layer["x1_1xF"])[0] != 0
        np.testing.assert_array_equal(x1_active, _gates(layer) > 0)  # S3's input has the layer's active set
        actives.append(x1_active)
    for i in range(3):
        for j in range(i + 1, 3):
            for name in ("x_1xD", "w_gate_DxF", "w_up_FxD", "w_down_FxD"):
                assert not np.array_equal(np.asarray(layers[i][name]), np.asarray(layers[j][name])), name
            assert not np.array_equal(actives[i], actives[j])


def test_call_args_rotate_layers_with_distinct_inputs_and_unchanged_active_sets():
    layers = bench.make_layers(32, 48, 0.5, "bfloat16", 2)
    layer_args = [(ly["x_1xD"], ly["w_gate_DxF"]) for ly in layers]
    calls = bench.call_args(layer_args, 7)
    assert len(calls) == 7
    firsts = [np.asarray(c[0], np.float32) for c in calls]
    for i in range(7):
        assert calls[i][1] is layer_args[i % 2][1]  # the weights are the layer's own arrays, not copies
        assert calls[i][0].dtype == jnp.bfloat16
        for j in range(i + 1, 7):
            assert not np.array_equal(firsts[i], firsts[j])
        base = np.asarray(layer_args[i % 2][0], np.float32)
        ratio = firsts[i] / base  # a power of two: every sign and zero kept exactly
        assert np.all(ratio == ratio[0, 0]) and np.log2(ratio[0, 0]) == round(np.log2(ratio[0, 0]))
    assert [bench.scale_factor(j) for j in range(5)] == [1.0, 2.0, 0.5, 4.0, 0.25]


def test_chained_keeps_every_call_and_returns_each_result():
    rng = np.random.default_rng(0)
    layer_args = [(jnp.asarray(rng.standard_normal((1, 16)), jnp.float32),
                   jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)) for _ in range(2)]
    calls = bench.call_args(layer_args, 6)
    fn = bench.chained(lambda x, w: x @ w, 6)
    hlo = fn.lower(calls).compile().as_text()
    assert hlo.count(" dot(") == 6  # neither merged (CSE) nor dropped
    outs = fn(calls)
    for out, (x, w) in zip(outs, calls, strict=True):
        np.testing.assert_allclose(np.asarray(out), np.asarray(x, np.float64) @ np.asarray(w, np.float64),
                                   rtol=1e-5, atol=1e-5 * np.abs(np.asarray(out)).max())


def test_cupti_falls_back_on_cpu_and_says_why():
    assert jax.default_backend() == "cpu"
    why = bench.cupti_unavailable()
    assert "no CUDA GPU" in why
    timer = bench.Timer(["cupti", "slope", "dispatch"], reps=1, runs=1, ks=(1, 2), log=lambda *a: None)
    assert timer.skipped == {"cupti": why}
    x, w = jnp.ones((1, 8)), jnp.ones((8, 4))
    times = timer.time(lambda x, w: x @ w, [(x, w)])
    assert "cupti" not in times and {"slope", "dispatch"} <= set(times)
    assert bench.primary(times)[0] == "slope"
    assert bench.primary({"dispatch": 3.0}) == ("dispatch", 3.0)


def test_refuses_to_time_on_cpu_without_interpret(capsys):
    assert bench.main(["--shapes=64x96"]) == 1
    assert "no GPU or TPU" in capsys.readouterr().err


def test_interpret_dry_run_prints_its_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--interpret", "--shapes=64x96", "--reps=1", "--dtype=float32", f"--out={out}"]) == 0
    text = capsys.readouterr().out
    for label in bench.OP_LABELS.values():
        assert label in text
    assert "cupti: skipped (no CUDA GPU" in text
    assert "ceiling: elementwise copy" in text and "(slope)" in text
    assert "speedup S2 without gate" in text and "speedup S2 with gate" in text
    assert "ProSparse published (A100, gate excluded, host-timed): 4096x11008 S2 2.00x, S3 1.51x" in text
    res = json.loads(out.read_text())
    assert res["skipped"]["cupti"].startswith("no CUDA GPU") and res["layers"] == 2
    row = res["rows"][0]
    assert row["shape"] == "64x96" and len(row["active_per_layer"]) == 2
    assert abs(row["sparsity"] - 0.88) < 0.02
    for op in row["ops"].values():
        assert op["method"] == "slope" and set(op["times"]) >= {"slope", "dispatch"}
    assert row["ops"]["step2_sparse"]["times"]["slope"] == pytest.approx(
        row["ops"]["s2_sparse"]["times"]["slope"] - row["ops"]["gate"]["times"]["slope"])
    assert row["s2_rel_err"] < 1e-5 and row["s3_rel_err"] < 1e-5
    assert res["copy_ceiling"]["method"] == "slope" and res["copy_ceiling"]["bytes"] == 2 * 4 * 2**20


def test_cupti_timings_are_summed_per_iteration_and_per_kernel(monkeypatch):
    from jax.experimental.mosaic.gpu import profiler

    # what profiler.measure(f, aggregate=False, iterations=3) returns: per iteration, (kernel name, ms) per launch
    timings = [[("gemv", 0.020), ("prosparse_s2", 0.006), ("gemv", 0.022), ("prosparse_s2", 0.004)],
               [("gemv", 0.030), ("prosparse_s2", 0.010), ("gemv", 0.030), ("prosparse_s2", 0.010)],
               [("gemv", 0.021), ("prosparse_s2", 0.005), ("gemv", 0.021), ("prosparse_s2", 0.005)]]
    seen = {}

    def fake_measure(f, *, aggregate=True, iterations=1):
        seen.update(aggregate=aggregate, iterations=iterations)
        return lambda *args: (f(*args), timings)

    monkeypatch.setattr(profiler, "measure", fake_measure)
    r = bench.cupti_us(lambda x: x + 1, (jnp.ones(3),), n_calls=2, iterations=3)
    assert seen == {"aggregate": False, "iterations": 3}
    assert r["us"] == pytest.approx(52 / 2)  # median of the per-iteration sums 52, 80, 52 us, over 2 calls
    assert [name for name, _ in r["kernels"]] == ["gemv", "prosparse_s2"]
    assert dict(r["kernels"]) == pytest.approx({"gemv": 42 / 2, "prosparse_s2": 10 / 2})


def test_unknown_implementation_is_refused_with_the_choices(capsys):
    assert bench.main(["--interpret", "--implementation=pallas_nope"]) == 1
    err = capsys.readouterr().err
    assert "pallas_nope" in err and "pallas_triton" in err


def test_cupti_path_end_to_end_with_a_stand_in_profiler(monkeypatch, tmp_path, capsys):
    """The GPU path's bookkeeping (device-time column, per-kernel lines, speedups by CUPTI) with the profiler
    replaced by one that runs the function and reports a fixed kernel time per call it makes."""
    from jax.experimental.mosaic.gpu import profiler

    def fake_measure(f, *, aggregate=True, iterations=1):
        assert aggregate is False

        def wrapper(*args):
            out = f(*args)
            n_calls = len(out) if isinstance(out, list) else 1
            return out, [[("stand_in_kernel", 0.004)] * n_calls for _ in range(iterations)]
        return wrapper

    monkeypatch.setattr(profiler, "measure", fake_measure)
    monkeypatch.setattr(bench, "cupti_unavailable", lambda: "")
    out = tmp_path / "bench.json"
    assert bench.main(["--interpret", "--shapes=64x96", "--reps=1", "--timing=cupti,dispatch", f"--out={out}"]) == 0
    text = capsys.readouterr().out
    assert "cupti us" in text and "kernel stand_in_kernel" in text
    row = json.loads(out.read_text())["rows"][0]
    for name in ("gate", "s2_dense", "s2_sparse", "step2_dense", "s3_dense", "s3_sparse"):
        assert row["ops"][name]["method"] == "cupti" and row["ops"][name]["us"] == pytest.approx(4.0)
    assert row["speedup"]["s3"]["method"] == "cupti" and row["speedup"]["s3"]["x"] == pytest.approx(1.0)
    assert set(row["speedup"]["s3"]["by"]) == {"cupti", "dispatch"}
