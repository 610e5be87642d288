"""Step schedules: the ProSparse regularisation factor lambda(t) and the learning rate.

Every schedule is an optax-style ``Callable[[step], scalar]`` that is jit-traceable: inside a jitted train step the
step is a traced int32 scalar. Plain-python references (``reg_factor_numpy``) sit next to them for tests and plots.

Step convention (used by every schedule here and by :mod:`prosparse_jax.training.optim`): ``t`` is the number of optimizer
updates already applied, i.e. the 0-based index of the update being computed. The first update uses ``t = 0``; this
is the ``count`` that optax keeps in the optimizer state, so a resumed run continues the schedules exactly. A table
entry ``(lambda_i, T_i)`` means "stage i ends with update index T_i": ``lambda(T_i)`` is the stage-i formula evaluated
at its right end (``t <= T_i`` belongs to stage i).

ProSparse lambda(t) (ProSparse §3.2, Eq. 2), stages ``[(lambda_0, T_0), (lambda_1, T_1), ...]`` with cumulative ``T_i``:

* ``t <= T_0``: ``lambda_0`` (normally 0: activation substitution only);
* ``T_0 < t <= T_1`` (warmup): ``lambda_1``, constant;
* ``T_{i-1} < t <= T_i`` for ``i >= 2``: ``eta = (sin(-pi/2 + pi (t - T_{i-1}) / (T_i - T_{i-1})) + 1) / 2`` and
  ``lambda = lambda_{i-1} + eta (lambda_i - lambda_{i-1})`` (zero slope at both ends; equal factors = constant stage);
* ``t > T_last``: ``lambda_last``.

lambda jumps from lambda_0 to lambda_1 after T_0 and is continuous everywhere else.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from prosparse_jax.config import LR_SCHEDULES, ConfigError, Stages, validate_stages

Schedule = Callable[[Any], jax.Array]

# ---------------------------------------------------------------------------------------------------------------
# ProSparse stage tables (ProSparse §4.1 and App. for MiniCPM): (lambda_i, cumulative T_i), stage 0 first.
# ---------------------------------------------------------------------------------------------------------------
PROSPARSE_STAGES: dict[str, Stages] = {
    "llama2-7b": [(0.0, 5000), (5e-3, 6000), (5e-2, 10000), (5e-2, 12000), (2e-1, 16000), (2e-1, 16500)],
    "llama2-13b": [(0.0, 5500), (5e-3, 6750), (1e-2, 10750), (1e-2, 11000), (2e-2, 15000), (2e-2, 16000)],
    # MiniCPM-1B: the table lists stages 0..4 and then "decay 5e-2 to 95000; SFT 1e-2 to 101000". We read "decay" as
    # MiniCPM's WSD learning-rate decay phase, during which lambda stays at 5e-2: a constant stage (5e-2, 95000).
    # The "SFT 1e-2 to 101000" part is a separate supervised fine-tuning run (steps 95000..101000) with a constant
    # lambda = 1e-2; it is not part of this pre-training schedule (an SFT run would use e.g. [(1e-2, 6000)]).
    "minicpm-1b": [(0.0, 10000), (1e-3, 15000), (5e-3, 20000), (5e-3, 25000), (5e-2, 35000), (5e-2, 95000)],
}


def scale_stages(stages: Sequence[Sequence[float]], total_steps: int, *, merge: bool = False) -> Stages:
    """Rescales the cumulative steps proportionally so that the last one equals ``total_steps``.

    For shortened (or lengthened) runs: ``T_i' = round(T_i * total_steps / T_last)``; the factors are unchanged.
    With ``merge=True`` (quick checks far shorter than the table) stages whose scaled ends collide are merged: at each
    end step only the last stage ending there is kept, and stages ending at step 0 are dropped.

    Raises:
        ConfigError: if the table is invalid or (without ``merge``) ``total_steps`` is too small to keep the steps
            distinct and positive.
    """
    st = validate_stages(stages)
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
        raise ConfigError(f"sparsity.stages: total_steps must be a positive integer, got {total_steps!r}")
    last = st[-1][1]
    # Round half up in exact integer arithmetic.
    scaled = [(reg, (2 * T * total_steps + last) // (2 * last)) for reg, T in st]
    steps = [T for _, T in scaled]
    if merge:
        merged: Stages = []
        for reg, T in scaled:
            if T <= 0:
                continue
            if merged and merged[-1][1] == T:
                merged[-1] = (reg, T)
            else:
                merged.append((reg, T))
        return merged
    if steps[0] <= 0 or any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        # A scaled gap >= 1 before rounding keeps the rounded ends distinct, hence this sufficient bound.
        min_gap = min(b - a for a, b in zip([0] + [T for _, T in st], [T for _, T in st], strict=False))
        raise ConfigError(
            f"sparsity.stages: cannot scale {len(st)} stages ending at {last} to total_steps={total_steps}: the "
            f"stage ends would collide ({steps}); train for at least {math.ceil(last / min_gap)} steps or merge "
            "short stages"
        )
    return scaled


def reg_factor_numpy(stages: Sequence[Sequence[float]], t: float) -> float:
    """Plain-python lambda(t) for update index ``t`` (reference of :func:`reg_factor_schedule`, for tests and plots)."""
    st = validate_stages(stages)
    if t <= st[0][1]:
        return st[0][0]
    for i in range(1, len(st)):
        reg_prev, T_prev = st[i - 1]
        reg_i, T_i = st[i]
        if t <= T_i:
            if i == 1:
                return reg_i
            eta = 0.5 * (math.sin(-math.pi / 2 + math.pi * (t - T_prev) / (T_i - T_prev)) + 1.0)
            return reg_prev + eta * (reg_i - reg_prev)
    return st[-1][0]


def reg_factor_schedule(stages: Sequence[Sequence[float]]) -> Schedule:
    """The ProSparse factor lambda(t) as a jit-traceable schedule of the update index (see module docstring).

    Built from optax's own pieces: ``optax.join_schedules`` of constant stages (stage 0 and the warm-up) and sine
    ramps, each ramp ``lambda_i + (lambda_{i-1} - lambda_i) * optax.cosine_decay_schedule(1, span)``, which is
    ``lambda_{i-1} + eta (lambda_i - lambda_{i-1})`` with ``eta = (1 - cos(pi tau)) / 2``. A stage owns the steps
    ``T_{i-1} < t <= T_i``, so each piece starts at boundary ``T_{i-1} + 1`` and is evaluated at ``tau =
    (t - T_{i-1}) / span``. :func:`reg_factor_numpy` is the plain-python reference.

    Args:
        stages: ``(lambda_i, T_i)`` pairs, validated with :func:`validate_stages`.

    Returns:
        ``fn(step) -> float32 scalar``.
    """
    import optax

    st = validate_stages(stages)
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
# Learning-rate schedules (same step convention: lr(t) is used by update t, t = 0 first).
# ---------------------------------------------------------------------------------------------------------------
def _check_common(peak: float, warmup_steps: int) -> None:
    if not (math.isfinite(peak) and peak > 0):
        raise ValueError(f"peak: learning rate must be finite and > 0, got {peak!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps: must be an integer >= 0, got {warmup_steps!r}")


def _check_total(warmup_steps: int, total_steps: int, min_ratio: float) -> None:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
        raise ValueError(f"total_steps: must be a positive integer, got {total_steps!r}")
    if warmup_steps > total_steps:
        raise ValueError(
            f"warmup_steps: {warmup_steps} exceeds total_steps={total_steps}; lower warmup_steps or train longer"
        )
    if not 0 <= min_ratio <= 1:
        raise ValueError(f"min_ratio: must be in [0, 1], got {min_ratio!r}")


def _warmup(t: jax.Array, peak: float, warmup_steps: int) -> jax.Array:
    """Linear 0 -> peak: lr(0) = 0, lr(warmup_steps) = peak (peak from the start when warmup_steps = 0)."""
    if warmup_steps == 0:
        return jnp.full_like(t, peak)
    return peak * jnp.minimum(t / warmup_steps, 1.0)


def constant(peak: float, warmup_steps: int = 0) -> Schedule:
    """Linear warmup from 0 to ``peak`` over ``warmup_steps`` updates, then ``peak``."""
    _check_common(peak, warmup_steps)

    def fn(step: Any) -> jax.Array:
        t = jnp.asarray(step, jnp.float32)
        return _warmup(t, peak, warmup_steps).astype(jnp.float32)

    return fn


def cosine(peak: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> Schedule:
    """Linear warmup to ``peak``, then cosine decay to ``min_ratio * peak`` at ``total_steps`` (held after)."""
    _check_common(peak, warmup_steps)
    _check_total(warmup_steps, total_steps, min_ratio)
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

    The decay spans the last ``D = round(decay_fraction * total_steps)`` updates, starting at ``S = total_steps - D``,
    and is linear in log-space (MiniCPM's exponential-style decay): ``lr(t) = peak * min_ratio ** ((t - S) / D)``,
    so ``lr(S) = peak`` and ``lr(total_steps) = min_ratio * peak`` (held after). This needs ``min_ratio > 0``.

    Raises:
        ValueError: naming the offending argument (warmup longer than the stable phase, ``min_ratio <= 0``, ...).
    """
    _check_common(peak, warmup_steps)
    _check_total(warmup_steps, total_steps, min_ratio)
    if not 0 <= decay_fraction <= 1:
        raise ValueError(f"decay_fraction: must be in [0, 1], got {decay_fraction!r}")
    if min_ratio <= 0:
        raise ValueError(
            f"min_ratio: the wsd decay is exponential and needs a final ratio > 0, got {min_ratio!r} "
            "(use e.g. 0.01, or the cosine schedule to decay to 0)"
        )
    decay_steps = round(decay_fraction * total_steps)
    start = total_steps - decay_steps
    if warmup_steps > start:
        raise ValueError(
            f"warmup_steps: {warmup_steps} overlaps the decay phase, which starts at update {start} "
            f"(= total_steps {total_steps} - decay_fraction {decay_fraction} * total_steps); lower warmup_steps "
            "or decay_fraction"
        )
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
    """Builds the learning-rate schedule called ``name`` (one of :data:`LR_SCHEDULES`).

    Arguments a schedule does not use are ignored (``constant`` ignores ``total_steps``, ``decay_fraction`` and
    ``min_ratio``; ``cosine`` ignores ``decay_fraction``).

    Raises:
        ValueError: for an unknown name (listing the choices) or invalid arguments.
    """
    if name == "cosine":
        return cosine(peak, warmup_steps, total_steps, min_ratio)
    if name == "wsd":
        return wsd(peak, warmup_steps, total_steps, decay_fraction, min_ratio)
    if name == "constant":
        return constant(peak, warmup_steps)
    raise ValueError(f"unknown learning-rate schedule {name!r}; choose one of: {', '.join(LR_SCHEDULES)}")
