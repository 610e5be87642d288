"""Tests of the ProSparse lambda(t) schedule and the learning-rate schedules."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prosparse_jax.config import validate_stages
from prosparse_jax.training.schedules import (
    PROSPARSE_STAGES,
    constant,
    cosine,
    make_lr_schedule,
    reg_factor_numpy,
    reg_factor_schedule,
    scale_stages,
    wsd,
)

TABLES = sorted(PROSPARSE_STAGES)


def _jit_lambda(stages):
    return jax.jit(reg_factor_schedule(stages))


# ---------------------------------------------------------------------------------------------------------------
# lambda(t)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TABLES)
def test_lambda_at_boundaries_midpoints_and_beyond(name: str) -> None:
    st = PROSPARSE_STAGES[name]
    lam = _jit_lambda(st)
    assert float(lam(0)) == st[0][0] == 0.0
    for i, (lam_i, T_i) in enumerate(st):
        # exactly at T_i the stage-i formula gives lambda_i (eta = 1), stage 0 and 1 are constant
        np.testing.assert_allclose(float(lam(T_i)), lam_i, rtol=1e-6, atol=0)
        np.testing.assert_allclose(reg_factor_numpy(st, T_i), lam_i, rtol=1e-12)
        if i == 1:  # warmup stage: constant lambda_1 right after T_0
            np.testing.assert_allclose(float(lam(st[0][1] + 1)), lam_i, rtol=1e-6)
        if i >= 2:
            lam_prev, T_prev = st[i - 1]
            if (T_i - T_prev) % 2 == 0:  # integer midpoint: eta = 1/2
                mid = (T_prev + T_i) // 2
                half = 0.5 * (lam_prev + lam_i)
                np.testing.assert_allclose(float(lam(mid)), half, rtol=1e-6, atol=1e-9)
                np.testing.assert_allclose(reg_factor_numpy(st, mid), half, rtol=1e-12, atol=1e-15)
    last = st[-1]
    for t in (last[1] + 1, last[1] + 1000, 10**7):
        np.testing.assert_allclose(float(lam(t)), last[0], rtol=1e-6)
        assert reg_factor_numpy(st, t) == last[0]


def test_lambda_llama2_7b_values() -> None:
    st = PROSPARSE_STAGES["llama2-7b"]
    assert reg_factor_numpy(st, 5000) == 0.0
    assert reg_factor_numpy(st, 5001) == 5e-3
    assert reg_factor_numpy(st, 8000) == pytest.approx(0.5 * (5e-3 + 5e-2))
    assert reg_factor_numpy(st, 11000) == pytest.approx(5e-2)  # constant stage 3
    assert reg_factor_numpy(st, 14000) == pytest.approx(0.5 * (5e-2 + 2e-1))
    # quarter point: eta = (1 - cos(pi / 4)) / 2
    eta = (1 - math.cos(math.pi / 4)) / 2
    assert reg_factor_numpy(st, 7000) == pytest.approx(5e-3 + eta * (5e-2 - 5e-3))


@pytest.mark.parametrize("name", TABLES)
def test_jit_matches_numpy(name: str) -> None:
    st = PROSPARSE_STAGES[name]
    last = st[-1][1]
    ts = np.unique(np.concatenate([
        np.linspace(0, last + 500, 397).astype(np.int32),
        np.array([T + d for _, T in st for d in (-1, 0, 1)], np.int32),
    ]))
    got = np.asarray(jax.jit(jax.vmap(reg_factor_schedule(st)))(jnp.asarray(ts, jnp.int32)))
    want = np.array([reg_factor_numpy(st, int(t)) for t in ts])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    assert got.dtype == np.float32


@pytest.mark.parametrize("name", TABLES)
def test_continuity(name: str) -> None:
    """Continuous everywhere except the stage 0 -> 1 jump; zero slope at the ends of the sine stages."""
    st = PROSPARSE_STAGES[name]
    (lam0, T0), (lam1, _) = st[0], st[1]
    assert reg_factor_numpy(st, T0) == lam0 and reg_factor_numpy(st, T0 + 1e-9) == lam1  # the jump
    for i in range(1, len(st)):
        T_i = st[i][1]
        left, right = reg_factor_numpy(st, T_i - 1e-6), reg_factor_numpy(st, T_i + 1e-6)
        assert abs(right - left) < 1e-9, (name, i)
        assert abs(reg_factor_numpy(st, T_i) - left) < 1e-9, (name, i)


def test_stage_zero_only_and_two_stages() -> None:
    assert reg_factor_numpy([(0.0, 10)], 5) == 0.0 and reg_factor_numpy([(0.0, 10)], 50) == 0.0
    lam = _jit_lambda([(0.0, 10), (0.3, 20)])
    assert float(lam(10)) == 0.0
    np.testing.assert_allclose([float(lam(11)), float(lam(20)), float(lam(99))], 0.3, rtol=1e-6)


def test_scale_stages_keeps_shape() -> None:
    st = PROSPARSE_STAGES["llama2-7b"]
    scaled = scale_stages(st, 1650)
    assert scaled == [(lam, T // 10) for lam, T in st]
    scaled = scale_stages(st, 300)
    assert [lam for lam, _ in scaled] == [lam for lam, _ in st]
    assert scaled[-1][1] == 300
    steps = [T for _, T in scaled]
    assert all(b > a for a, b in zip(steps, steps[1:], strict=False))
    for (_, T), (_, Ts) in zip(st, scaled, strict=True):
        assert abs(Ts - T * 300 / 16500) <= 0.5
    # shape of the curve is preserved: lambda at a fraction of the run matches
    assert reg_factor_numpy(scaled, 0.5 * 300) == pytest.approx(reg_factor_numpy(st, 0.5 * 16500), rel=0.05)


def test_scale_stages_too_short() -> None:
    with pytest.raises(ValueError, match=r"sparsity\.stages: cannot scale .* at least \d+ steps"):
        scale_stages(PROSPARSE_STAGES["llama2-13b"], 10)  # stage 3 is only 250 / 16000 of the run
    scale_stages(PROSPARSE_STAGES["llama2-13b"], 64)  # 16000 / 250 = 64 is enough


@pytest.mark.parametrize(
    "stages, match",
    [
        ([], "at least one"),
        ([(0.0, 10), (1e-2, 10)], "strictly increasing"),
        ([(0.0, 10), (1e-2, 5)], "strictly increasing"),
        ([(-1e-3, 10)], "finite and >= 0"),
        ([(0.0, 10), (float("nan"), 20)], "finite and >= 0"),
        ([(0.0, 10), (float("inf"), 20)], "finite and >= 0"),
        ([(0.0, 0)], "positive integer"),
        ([(0.0, 10.5)], "positive integer"),
        ([(0.0, True)], "positive integer"),
        ([(0.0, 10, 3)], "pair"),
        (5, "list of"),
    ],
)
def test_validation_errors(stages, match: str) -> None:
    with pytest.raises(ValueError, match=r"sparsity\.stages: .*" + match):
        validate_stages(stages)
    with pytest.raises(ValueError, match=r"sparsity\.stages"):
        reg_factor_schedule(stages)


def test_validate_normalises() -> None:
    assert validate_stages([[0, 5e3], (np.float64(1e-2), np.int64(6000))]) == [(0.0, 5000), (1e-2, 6000)]


# ---------------------------------------------------------------------------------------------------------------
# Learning rate
# ---------------------------------------------------------------------------------------------------------------
PEAK, WARM, TOTAL = 3e-4, 10, 200


def _values(fn, ts) -> np.ndarray:
    return np.asarray(jax.jit(jax.vmap(fn))(jnp.asarray(ts, jnp.int32)))


@pytest.mark.parametrize("name", ["cosine", "wsd", "constant"])
def test_warmup_and_peak(name: str) -> None:
    fn = make_lr_schedule(name, peak=PEAK, warmup_steps=WARM, total_steps=TOTAL, decay_fraction=0.2, min_ratio=0.1)
    v = _values(fn, np.arange(WARM + 1))
    assert v[0] == 0.0
    np.testing.assert_allclose(v[WARM // 2], PEAK / 2, rtol=1e-6)
    np.testing.assert_allclose(v[WARM], PEAK, rtol=1e-6)
    assert np.all(np.diff(v) > 0)
    assert float(jnp.max(_values(fn, np.arange(TOTAL + 20)))) == pytest.approx(PEAK, rel=1e-6)


@pytest.mark.parametrize("name", ["cosine", "wsd"])
def test_decay_end_and_monotone(name: str) -> None:
    fn = make_lr_schedule(name, peak=PEAK, warmup_steps=WARM, total_steps=TOTAL, decay_fraction=0.2, min_ratio=0.1)
    v = _values(fn, np.arange(TOTAL + 50))
    np.testing.assert_allclose(v[TOTAL], 0.1 * PEAK, rtol=1e-5)
    np.testing.assert_allclose(v[TOTAL:], 0.1 * PEAK, rtol=1e-5)  # held after the end
    decay = v[WARM: TOTAL + 1]
    assert np.all(np.diff(decay) <= 0)


def test_wsd_shape() -> None:
    fn = wsd(PEAK, WARM, TOTAL, decay_fraction=0.2, min_ratio=0.01)
    v = _values(fn, np.arange(TOTAL + 1))
    np.testing.assert_allclose(v[WARM:160 + 1], PEAK, rtol=1e-6)  # stable until the decay starts at 200 - 40
    assert v[161] < PEAK
    np.testing.assert_allclose(v[180], PEAK * 0.1, rtol=1e-5)  # log-linear: half-way in log space
    np.testing.assert_allclose(v[TOTAL], PEAK * 0.01, rtol=1e-5)
    assert np.all(np.diff(v[160:]) < 0)


def test_cosine_midpoint_and_constant() -> None:
    v = _values(cosine(PEAK, WARM, TOTAL, 0.0), [WARM + (TOTAL - WARM) // 2, TOTAL])
    # the end value is PEAK * (1 + cos(pi)) / 2: float32 cos round-off there is relative to PEAK, not a fixed 1e-12
    np.testing.assert_allclose(v, [PEAK / 2, 0.0], rtol=1e-6, atol=1e-6 * PEAK)
    np.testing.assert_allclose(_values(constant(PEAK, 0), [0, 5, 10**6]), PEAK, rtol=1e-7)


def test_lr_errors() -> None:
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'cosin'; choose one of: cosine, wsd"):
        make_lr_schedule("cosin", peak=PEAK, warmup_steps=WARM, total_steps=TOTAL)
    with pytest.raises(ValueError, match="warmup_steps: 300 exceeds total_steps=200"):
        cosine(PEAK, 300, TOTAL)
    with pytest.raises(ValueError, match="warmup_steps: .* overlaps the decay phase"):
        wsd(PEAK, 190, TOTAL, decay_fraction=0.2)
    with pytest.raises(ValueError, match="min_ratio"):
        wsd(PEAK, WARM, TOTAL, min_ratio=0.0)
    with pytest.raises(ValueError, match="peak"):
        constant(-1.0)


def test_scale_stages_merge_for_very_short_runs():
    from prosparse_jax.training.schedules import scale_stages

    table = [(0.0, 40), (0.05, 80), (0.2, 160), (0.2, 200), (0.5, 300)]
    # ends 40..300 -> 0.4, 0.8, 1.6, 2, 3 -> rounded 0, 1, 2, 2, 3: the step-0 stage is dropped, the two stages
    # ending at 2 merge into the later one
    assert scale_stages(table, 3, merge=True) == [(0.05, 1), (0.2, 2), (0.5, 3)]
    with pytest.raises(ValueError, match="collide"):
        scale_stages(table, 3)
    # without collisions merge changes nothing
    assert scale_stages(table, 300, merge=True) == scale_stages(table, 300)
