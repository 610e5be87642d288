"""The rules every config section is checked by: :class:`ConfigError` and the field checks, and the ProSparse stage
table (ProSparse, arXiv 2402.13516, §3.2) with :func:`validate_stages`.

The sections themselves (dataclasses that call these in ``__post_init__``) are in :mod:`prosparse_jax.config`, which
re-exports :class:`ConfigError`, :data:`Stages` and :func:`validate_stages`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

Stages = list[tuple[float, int]]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def positive_int(v: Any) -> bool:
    """An int (not a bool) > 0."""
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def int_at_least(v: Any, lo: int) -> bool:
    """An int (not a bool) >= ``lo``."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def finite(v: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def require(ok: bool, section: str, field: str, msg: str) -> None:
    """Raise ``ConfigError("<section>.<field>: <msg>")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{section}.{field}: {msg}")


def as_int(v: Any) -> int | None:
    """``v`` as an int if it is an integer or an integral float (e.g. 5e3 from a config file), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, float):
        return int(v) if v.is_integer() else None
    try:
        return operator.index(v)
    except TypeError:
        return None


def validate_stages(stages: Sequence[Sequence[float]]) -> Stages:
    """Checks a stage table ``[(reg_factor_i, T_i), ...]`` (T_i cumulative updates) and returns it normalised.

    Raises:
        ConfigError: naming ``sparsity.stages`` when the table is empty, a pair is malformed, a factor is negative
            or not finite, or a step is not an integer (10.5 is an error, 5e3 is 5000) or not strictly increasing.
    """
    def bad(msg: str) -> ConfigError:
        return ConfigError(f"sparsity.stages: {msg}")

    try:
        pairs = [tuple(s) for s in stages]
    except TypeError:
        raise bad(f"must be a list of (lambda, steps) pairs, got {stages!r}") from None
    if not pairs:
        raise bad("needs at least one (lambda, steps) stage, got an empty list")
    out: Stages = []
    for i, pair in enumerate(pairs):
        if len(pair) != 2:
            raise bad(f"stage {i} must be a (lambda, steps) pair, got {pair!r}")
        reg, steps = pair
        if not finite(reg) or reg < 0:
            raise bad(f"stage {i}: lambda must be a number, finite and >= 0, got {reg!r}")
        steps_i = as_int(steps)
        if steps_i is None or steps_i <= 0:
            raise bad(f"stage {i}: steps must be a positive integer (cumulative update count), got {steps!r}")
        if out and steps_i <= out[-1][1]:
            raise bad(f"steps must be strictly increasing (they are cumulative), but stage {i} ends at {steps_i} "
                      f"<= stage {i - 1} end {out[-1][1]}")
        out.append((float(reg), steps_i))
    return out
