"""Step schedules: the ProSparse regularisation factor lambda(t) and the learning rate.

Every schedule is a jit-traceable ``Callable[[step], float32 scalar]`` of the update index ``t``: the number of
optimizer updates already applied (optax's ``count``; the first update uses ``t = 0``), so a resumed run continues the
schedules exactly.

ProSparse lambda(t) (arXiv 2402.13516 §3.2; docs/training.md): stage i of ``[(lambda_0, T_0), (lambda_1, T_1), ...]``
owns ``T_{i-1} < t <= T_i``. Stages 0 and 1 are constant; stage i >= 2 is ``lambda_{i-1} + eta (lambda_i -
lambda_{i-1})`` with ``eta = (1 - cos(pi (t - T_{i-1}) / (T_i - T_{i-1}))) / 2``; after ``T_last``: ``lambda_last``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from prosparse_jax.config import Stages, wsd_decay_steps

Schedule = Callable[[Any], jax.Array]

# ProSparse's stage tables (§4.1, and the appendix for MiniCPM): (lambda_i, cumulative T_i), stage 0 first.
PROSPARSE_STAGES: dict[str, Stages] = {
    "llama2-7b": [(0.0, 5000), (5e-3, 6000), (5e-2, 10000), (5e-2, 12000), (2e-1, 16000), (2e-1, 16500)],
    "llama2-13b": [(0.0, 5500), (5e-3, 6750), (1e-2, 10750), (1e-2, 11000), (2e-2, 15000), (2e-2, 16000)],
    # MiniCPM-1B's "decay 5e-2 to 95000" is read as the WSD learning-rate decay with lambda held at 5e-2; its
    # "SFT 1e-2 to 101000" is a separate fine-tuning run, not part of this table.
    "minicpm-1b": [(0.0, 10000), (1e-3, 15000), (5e-3, 20000), (5e-3, 25000), (5e-2, 35000), (5e-2, 95000)],
}


def reg_factor_schedule(stages: Sequence[Sequence[float]]) -> Schedule:
    """The ProSparse factor lambda(t) of ``stages`` (as :func:`prosparse_jax.config.validate_stages` returns them).

    ``optax.join_schedules`` of constant stages and ramps ``lambda_i + (lambda_{i-1} - lambda_i) *
    cosine_decay_schedule(1, span)``; as a stage owns ``T_{i-1} < t <= T_i``, each piece starts at ``T_{i-1} + 1``.
    """
    st = [(float(lam), int(t)) for lam, t in stages]
    pieces: list[Schedule] = [optax.constant_schedule(st[0][0])]
    if len(st) > 1:
        pieces.append(optax.constant_schedule(st[1][0]))
    for i in range(2, len(st)):
        (reg_prev, t_prev), (reg_i, t_i) = st[i - 1], st[i]
        ramp = optax.cosine_decay_schedule(1.0, t_i - t_prev)  # 1 -> 0 over the stage

        def piece(s: Any, ramp: Schedule = ramp, lo: float = reg_prev, hi: float = reg_i) -> jax.Array:
            return hi + (lo - hi) * ramp(s + 1)  # s = t - (T_{i-1} + 1): the stage's first update has tau = 1/span

        pieces.append(piece)
    pieces.append(optax.constant_schedule(st[-1][0]))  # after the last stage
    joined = optax.join_schedules(pieces, [t + 1 for _, t in st])

    def fn(step: Any) -> jax.Array:
        return jnp.asarray(joined(jnp.asarray(step, jnp.int32)), jnp.float32)

    return fn


# ---------------------------------------------------------------------------------------------------------------
# Learning rate: lr(t) is used by update t
# ---------------------------------------------------------------------------------------------------------------
def _warmup(t: jax.Array, peak: float, warmup_steps: int) -> jax.Array:
    """Linear 0 -> peak: lr(0) = 0, lr(warmup_steps) = peak (peak from the start when warmup_steps = 0)."""
    if warmup_steps == 0:
        return jnp.full_like(t, peak)
    return peak * jnp.minimum(t / warmup_steps, 1.0)


def constant(peak: float, warmup_steps: int = 0) -> Schedule:
    """Linear warmup from 0 to ``peak`` over ``warmup_steps`` updates, then ``peak``."""

    def fn(step: Any) -> jax.Array:
        t = jnp.asarray(step, jnp.float32)
        return _warmup(t, peak, warmup_steps).astype(jnp.float32)

    return fn


def cosine(peak: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> Schedule:
    """Linear warmup to ``peak``, then cosine decay to ``min_ratio * peak`` at ``total_steps`` (held after)."""
    lo = min_ratio * peak
    span = max(total_steps - warmup_steps, 1)

    def fn(step: Any) -> jax.Array:
        t = jnp.asarray(step, jnp.float32)
        tau = jnp.clip((t - warmup_steps) / span, 0.0, 1.0)
        decay = lo + (peak - lo) * 0.5 * (1.0 + jnp.cos(jnp.pi * tau))
        return jnp.where(t < warmup_steps, _warmup(t, peak, warmup_steps), decay).astype(jnp.float32)

    return fn


def wsd(peak: float, warmup_steps: int, total_steps: int, decay_fraction: float = 0.1,
        min_ratio: float = 0.1) -> Schedule:
    """Warmup-stable-decay (MiniCPM): linear warmup, constant ``peak``, exponential decay over the last steps.

    The decay spans the last ``D = wsd_decay_steps(total_steps, decay_fraction)`` updates, starting at
    ``S = total_steps - D``, and is linear in log-space: ``lr(t) = peak * min_ratio ** ((t - S) / D)``, so
    ``lr(S) = peak`` and ``lr(total_steps) = min_ratio * peak`` (held after). This needs ``min_ratio > 0``.
    """
    decay_steps = wsd_decay_steps(total_steps, decay_fraction)
    start = total_steps - decay_steps
    log_ratio = math.log(min_ratio)

    def fn(step: Any) -> jax.Array:
        t = jnp.asarray(step, jnp.float32)
        tau = jnp.clip((t - start) / max(decay_steps, 1), 0.0, 1.0)
        decay = peak * jnp.exp(log_ratio * tau)
        if decay_steps == 0:
            decay = jnp.full_like(t, peak)
        return jnp.where(t < warmup_steps, _warmup(t, peak, warmup_steps), decay).astype(jnp.float32)

    return fn


def make_lr_schedule(name: str, *, peak: float, warmup_steps: int, total_steps: int, decay_fraction: float = 0.1,
                     min_ratio: float = 0.1) -> Schedule:
    """The learning-rate schedule ``name`` (one of ``config.LR_SCHEDULES``); arguments it does not use are ignored."""
    builders = {
        "cosine": lambda: cosine(peak, warmup_steps, total_steps, min_ratio),
        "wsd": lambda: wsd(peak, warmup_steps, total_steps, decay_fraction, min_ratio),
        "constant": lambda: constant(peak, warmup_steps),
    }
    return builders[name]()
