"""The ProSparse lambda(t) schedule training runs, and the learning-rate schedules, evaluated jitted."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prosparse_jax.training.schedules import (
    PROSPARSE_STAGES,
    constant,
    cosine,
    make_lr_schedule,
    reg_factor_schedule,
    wsd,
)

TABLES = sorted(PROSPARSE_STAGES)


def _values(fn, ts) -> np.ndarray:
    return np.asarray(jax.jit(jax.vmap(fn))(jnp.asarray(ts, jnp.int32)))


def _paper_lambda(stages, t: int) -> float:
    """ProSparse §3.2: lambda_0 up to T_0, lambda_1 up to T_1, then sine ramps; lambda_last after the table."""
    if t <= stages[0][1]:
        return stages[0][0]
    for i in range(1, len(stages)):
        (lam_prev, t_prev), (lam_i, t_i) = stages[i - 1], stages[i]
        if t <= t_i:
            if i == 1:
                return lam_i
            eta = (math.sin(-math.pi / 2 + math.pi * (t - t_prev) / (t_i - t_prev)) + 1) / 2
            return lam_prev + eta * (lam_i - lam_prev)
    return stages[-1][0]


# ---------------------------------------------------------------------------------------------------------------
# lambda(t)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TABLES)
def test_lambda_follows_the_paper_formula(name: str) -> None:
    st = PROSPARSE_STAGES[name]
    ts = np.unique(np.concatenate([np.linspace(0, st[-1][1] + 500, 397).astype(np.int32),
                                   [T + d for _, T in st for d in (-1, 0, 1)], [10**7]]))
    got = _values(reg_factor_schedule(st), ts)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [_paper_lambda(st, int(t)) for t in ts], rtol=1e-5, atol=1e-9)


def test_lambda_llama2_7b_values() -> None:
    lam = _values(reg_factor_schedule(PROSPARSE_STAGES["llama2-7b"]), [5000, 5001, 7000, 8000, 11000, 14000, 16500])
    eta = (1 - math.cos(math.pi / 4)) / 2  # a quarter into the 6000 -> 10000 ramp
    np.testing.assert_allclose(lam, [0.0, 5e-3, 5e-3 + eta * (5e-2 - 5e-3), (5e-3 + 5e-2) / 2, 5e-2,
                                     (5e-2 + 2e-1) / 2, 2e-1], rtol=1e-6)


@pytest.mark.parametrize("name", TABLES)
def test_lambda_jumps_once_and_is_flat_at_stage_ends(name: str) -> None:
    """A jump after T_0 only; every later stage end is reached with zero slope (one update changes lambda by ~0)."""
    st = PROSPARSE_STAGES[name]
    ends = [T for _, T in st]
    lam = _values(reg_factor_schedule(st), [t + d for t in ends for d in (0, 1)]).reshape(-1, 2)
    assert lam[0, 0] == st[0][0] and lam[0, 1] == pytest.approx(st[1][0])
    scale = max(v for v, _ in st)
    assert np.all(np.abs(lam[1:, 1] - lam[1:, 0]) < 1e-5 * scale)


def test_one_and_two_stage_tables() -> None:
    np.testing.assert_array_equal(_values(reg_factor_schedule([(0.0, 10)]), [0, 5, 50]), 0.0)
    np.testing.assert_allclose(_values(reg_factor_schedule([(0.0, 10), (0.3, 20)]), [10, 11, 20, 99]),
                               [0.0, 0.3, 0.3, 0.3], rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Learning rate
# ---------------------------------------------------------------------------------------------------------------
PEAK, WARM, TOTAL = 3e-4, 10, 200


@pytest.mark.parametrize("name", ["cosine", "wsd", "constant"])
def test_warmup_and_peak(name: str) -> None:
    fn = make_lr_schedule(name, peak=PEAK, warmup_steps=WARM, total_steps=TOTAL, decay_fraction=0.2, min_ratio=0.1)
    v = _values(fn, np.arange(TOTAL + 20))
    assert v[0] == 0.0
    np.testing.assert_allclose(v[WARM // 2], PEAK / 2, rtol=1e-6)
    np.testing.assert_allclose(v[WARM], PEAK, rtol=1e-6)
    assert np.all(np.diff(v[:WARM + 1]) > 0)
    assert float(np.max(v)) == pytest.approx(PEAK, rel=1e-6)


@pytest.mark.parametrize("name", ["cosine", "wsd"])
def test_decay_end_and_monotone(name: str) -> None:
    fn = make_lr_schedule(name, peak=PEAK, warmup_steps=WARM, total_steps=TOTAL, decay_fraction=0.2, min_ratio=0.1)
    v = _values(fn, np.arange(TOTAL + 50))
    np.testing.assert_allclose(v[TOTAL:], 0.1 * PEAK, rtol=1e-5)  # reached at the end, held after
    assert np.all(np.diff(v[WARM: TOTAL + 1]) <= 0)


def test_wsd_shape() -> None:
    v = _values(wsd(PEAK, WARM, TOTAL, decay_fraction=0.2, min_ratio=0.01), np.arange(TOTAL + 1))
    np.testing.assert_allclose(v[WARM:160 + 1], PEAK, rtol=1e-6)  # stable until the decay starts at 200 - 40
    np.testing.assert_allclose(v[180], PEAK * 0.1, rtol=1e-5)  # log-linear: half-way in log space
    np.testing.assert_allclose(v[TOTAL], PEAK * 0.01, rtol=1e-5)
    assert np.all(np.diff(v[160:]) < 0)


def test_cosine_midpoint_and_constant() -> None:
    v = _values(cosine(PEAK, WARM, TOTAL, 0.0), [WARM + (TOTAL - WARM) // 2, TOTAL])
    # the end value is PEAK * (1 + cos(pi)) / 2: float32 cos round-off there is relative to PEAK
    np.testing.assert_allclose(v, [PEAK / 2, 0.0], rtol=1e-6, atol=1e-6 * PEAK)
    np.testing.assert_allclose(_values(constant(PEAK, 0), [0, 5, 10**6]), PEAK, rtol=1e-7)
