"""The sparsity-loss frontier: Pareto front, loss gap at a target sparsity, sparsity within a PPL budget, mean ± sd
precision, and the FATReLU / CETT points against the model's own sparse forward."""

import math

import jax
import numpy as np
import pytest
from conftest import random_params, tiny_model_config

from prosparse_jax.analysis import frontier
from prosparse_jax.analysis.frontier import Point
from prosparse_jax.training.step import make_evaluate

# B, C, E, G are the front; A (beaten by B), D (same sparsity as C, higher gap) and F (beaten by E) are not.
POINTS = [Point(0.75, 0.001), Point(0.80, 0.000), Point(0.90, 0.004), Point(0.90, 0.006), Point(0.96, 0.020),
          Point(0.94, 0.030), Point(0.99, 0.100)]


def test_pareto_front_keeps_the_unbeaten_points_in_sparsity_order():
    front = frontier.pareto_front(POINTS)
    assert [(p.sparsity, p.dloss) for p in front] == [(0.80, 0.0), (0.90, 0.004), (0.96, 0.020), (0.99, 0.100)]
    with pytest.raises(ValueError, match="no points"):
        frontier.pareto_front([])
    with pytest.raises(ValueError, match="non-finite"):
        frontier.pareto_front([Point(0.5, math.nan)])


@pytest.mark.parametrize("target, value, kind", [
    (0.50, 0.0, "measured"),  # below the least sparse front point: that point (sparser than asked) is the answer
    (0.88, 0.0032, "interpolated"),  # 0.8 of the way from (0.80, 0) to (0.90, 0.004)
    (0.95, 0.004 + 0.016 * 5 / 6, "interpolated"),
    (0.96, 0.020, "measured"),
    (0.99, 0.100, "measured"),
    (0.995, None, "unreached"),
])
def test_best_dloss_at_a_target_sparsity(target, value, kind):
    r = frontier.best_dloss_at(POINTS, target)
    assert r.kind == kind
    assert (r.value is None) if value is None else r.value == pytest.approx(value, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("budget, value, kind", [
    (math.log(1.01), 0.90 + (math.log(1.01) - 0.004) / 0.016 * 0.06, "interpolated"),  # crosses between C and E
    (0.020, 0.96, "measured"),  # exactly at a front point
    (0.2, 0.99, "measured"),  # the sparsest point is inside
    (-0.001, None, "unreached"),
])
def test_max_sparsity_within_a_loss_budget(budget, value, kind):
    r = frontier.max_sparsity_within(POINTS, budget)
    assert r.kind == kind
    assert (r.value is None) if value is None else r.value == pytest.approx(value, rel=1e-12)


def test_loss_budget_of_one_percent_perplexity():
    assert frontier.loss_budget(0.01) == pytest.approx(math.log(1.01), rel=1e-15)


@pytest.mark.parametrize("values, scale, text", [
    ([1.0, 1.2, 1.4], 1.0, "1.2 ± 0.2"),
    ([0.0153, 0.0161, 0.0149], 1.0, "0.0154 ± 0.0006"),
    ([0.010, 0.0112, 0.0124], 1.0, "0.0112 ± 0.0012"),  # sd starting with 1: two digits
    ([0.9512, 0.9498, 0.9530], 100.0, "95.13 ± 0.16"),
    ([0.9512, 0.9478, 0.9560], 100.0, "95.2 ± 0.4"),
    ([2.0], 1.0, "2.0000 ± 0.0000"),  # one value: no spread, shown at max_decimals
])
def test_mean_sd_is_quoted_to_the_precision_of_the_spread(values, scale, text):
    assert frontier.format_mean_sd(values, scale) == text


@pytest.fixture(scope="module")
def model_and_batches():
    cfg = tiny_model_config(activation="relu", n_layers=2)
    params = random_params(cfg, seed=3)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(2):
        tokens = rng.integers(1, cfg.vocab_size, size=(2, 17))
        batches.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((2, 16), np.float32),
                        "segment_ids": np.ones((2, 16), np.int32), "positions": np.tile(np.arange(16), (2, 1))})
    return cfg, params, batches


def test_fatrelu_points_match_the_models_own_fatrelu(model_and_batches):
    cfg, params, batches = model_and_batches
    scale = frontier.positive_gate_mean(params, cfg, batches)
    assert scale > 0
    control = 1.5
    rows = frontier.with_gaps(frontier.fatrelu_points(params, cfg, batches, [0.0, 0.5 * scale, 2 * scale]), control)
    dense = make_evaluate(cfg)(params, batches)
    assert rows[0]["loss"] == pytest.approx(dense["eval_loss"], rel=1e-5)
    assert rows[0]["sparsity"] == pytest.approx(dense["eval_sparsity"], rel=1e-6)
    for r in rows[1:]:  # the reference: the model run with activation fatrelu at that threshold
        ref = make_evaluate(cfg.replace(activation="fatrelu", activation_threshold=r["threshold"]))(params, batches)
        assert r["loss"] == pytest.approx(ref["eval_loss"], rel=1e-5)
        assert r["sparsity"] == pytest.approx(ref["eval_sparsity"], rel=1e-6)
        assert r["dloss"] == pytest.approx(r["loss"] - control, rel=1e-12)
    assert rows[0]["sparsity"] < rows[1]["sparsity"] < rows[2]["sparsity"]


def test_cett_points_drop_more_neurons_as_the_target_grows(model_and_batches):
    cfg, params, batches = model_and_batches
    cfg = cfg.replace(activation="silu")
    rows = frontier.cett_points(params, cfg, batches, [0.0, 0.05, 0.3])
    assert rows[0]["sparsity"] == pytest.approx(0.0, abs=1e-6)  # SiLU: no exact zeros, target 0 drops nothing
    assert rows[0]["sparsity"] < rows[1]["sparsity"] < rows[2]["sparsity"] < 1
    assert jax.numpy.isfinite(rows[2]["loss"])
    assert all(r["cett"] <= t for r, t in zip(rows, [0.0, 0.05, 0.3], strict=True))  # bisection ends below
    assert rows[2]["cett"] > 0.25


def test_cett_points_calibrated_on_other_batches_measure_on_their_own(model_and_batches):
    """Taus bisected on a calibration subset, measured on every batch: the same taus as bisecting on that subset."""
    cfg, params, batches = model_and_batches
    cfg = cfg.replace(activation="silu")
    sub = frontier.cett_points(params, cfg, batches[:1], [0.2])[0]
    calibrated = frontier.cett_points(params, cfg, batches, [0.2], calibration=batches[:1])[0]
    full = frontier.cett_points(params, cfg, batches, [0.2])[0]
    assert calibrated["cett"] == sub["cett"]  # same calibration data, same taus
    assert calibrated["loss"] != sub["loss"]  # measured on both batches
    assert calibrated["cett"] != full["cett"]
