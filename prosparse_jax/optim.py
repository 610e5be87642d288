"""AdamW with a learning-rate schedule, global-norm clipping, weight-decay masks and MiniCPM µP.

The transformation is ``clip_by_global_norm -> scale_by_adam -> add_decayed_weights (matrices only) ->
scale_by_learning_rate(schedule) -> µP scale of the matrix updates``. Parameter groups come from the leaf names of
the parameter pytree (:mod:`prosparse_jax.model`):

* norms: leaves whose name contains ``norm`` -- no weight decay, LR not µP-scaled;
* embeddings: ``embed_VxD`` (the tied output head too) -- no weight decay, LR not µP-scaled;
* matrices: everything else (wq, wk, wv, wo, w_gate, w_up, w_down, lm_head) -- weight decay, and with ``mup`` their
  update (weight-decay term included) is multiplied by ``mup_base_dim / d_model``, which equals MiniCPM's per-group
  LR ``lr / (d_model / 256)``.

Masks are callables of the parameter pytree, so the optimizer is built without concrete parameters. The optimizer
state is a plain pytree of arrays (optax NamedTuples of ``count``, ``mu``, ``nu``); the learning rate depends only on
the update count stored in it, so a restored state continues the schedule with no injected hyper-parameters. Its
structure does not depend on the config (disabled parts are stateless identities), so ``clip_norm``, ``mup`` and
``weight_decay`` can change across a resume.

Step convention (as in :mod:`prosparse_jax.schedules`): update ``t`` (0-based, = updates already applied) uses
``lr(t)``.

Gradient accumulation is the training step's job, not the optimizer's: it averages the micro-batch gradients and
calls ``update`` once per optimizer step, so the count (and the schedules) advance once per global batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from prosparse_jax.config import ConfigError, section_items
from prosparse_jax.schedules import LR_SCHEDULES, Schedule, make_lr_schedule

PARAM_GROUPS = ("norm", "embedding", "matrix")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer hyper-parameters (validated on construction; every error names the ``optim.<field>``)."""

    lr: float = 1e-3  # peak learning rate
    schedule: str = "cosine"  # 'cosine' | 'wsd' | 'constant'
    warmup_steps: int = 100  # linear warmup 0 -> lr over this many updates
    decay_fraction: float = 0.1  # wsd: fraction of total steps spent decaying
    min_lr_ratio: float = 0.1  # final LR / peak (cosine, wsd)
    b1: float = 0.9  # Adam first-moment decay
    b2: float = 0.95  # Adam second-moment decay
    eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.1  # decoupled (AdamW); not applied to norms and embeddings
    clip_norm: float = 1.0  # global-norm gradient clipping; 0 disables
    mup: bool = False  # MiniCPM µP: LR of matrices (not embeddings, not norms) x mup_base_dim / d_model
    mup_base_dim: int = 256  # µP base width (MiniCPM dim_model_base)

    def __post_init__(self) -> None:
        _validate(self)

    def replace(self, **kw: Any) -> OptimConfig:
        return dataclasses.replace(self, **kw)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _validate(c: OptimConfig) -> None:
    def bad(field: str, msg: str) -> None:
        raise ConfigError(f"optim.{field}: {msg}")

    for f in ("lr", "decay_fraction", "min_lr_ratio", "b1", "b2", "eps", "weight_decay", "clip_norm"):
        v = getattr(c, f)
        if not _is_number(v) or not math.isfinite(v):
            bad(f, f"must be a finite number, got {v!r}")
    if c.lr <= 0:
        bad("lr", f"must be > 0, got {c.lr}")
    if c.schedule not in LR_SCHEDULES:
        bad("schedule", f"unknown schedule {c.schedule!r}; choose one of: {', '.join(LR_SCHEDULES)}")
    if not isinstance(c.warmup_steps, int) or isinstance(c.warmup_steps, bool) or c.warmup_steps < 0:
        bad("warmup_steps", f"must be an integer >= 0, got {c.warmup_steps!r}")
    if not 0 <= c.decay_fraction <= 1:
        bad("decay_fraction", f"must be in [0, 1], got {c.decay_fraction}")
    if not 0 <= c.min_lr_ratio <= 1:
        bad("min_lr_ratio", f"must be in [0, 1], got {c.min_lr_ratio}")
    if c.schedule == "wsd" and c.min_lr_ratio <= 0:
        bad("min_lr_ratio", "the wsd decay is exponential and needs a ratio > 0 (e.g. 0.01), got 0")
    for f in ("b1", "b2"):
        if not 0 <= getattr(c, f) < 1:
            bad(f, f"must be in [0, 1), got {getattr(c, f)}")
    if c.eps <= 0:
        bad("eps", f"must be > 0, got {c.eps}")
    if c.weight_decay < 0:
        bad("weight_decay", f"must be >= 0, got {c.weight_decay}")
    if c.clip_norm < 0:
        bad("clip_norm", f"must be >= 0 (0 disables clipping), got {c.clip_norm}")
    if not isinstance(c.mup, bool):
        bad("mup", f"must be true or false, got {c.mup!r}")
    if not isinstance(c.mup_base_dim, int) or isinstance(c.mup_base_dim, bool) or c.mup_base_dim <= 0:
        bad("mup_base_dim", f"must be a positive integer, got {c.mup_base_dim!r}")


def optim_config_from_dict(d: Any) -> OptimConfig:
    """Builds a validated OptimConfig from a ConfigDict / dict; unknown keys are an error naming them."""
    return OptimConfig(**section_items(OptimConfig, "optim", d))


def optim_config_to_dict(c: OptimConfig) -> dict[str, Any]:
    """The config as a JSON-serialisable dict (inverse of :func:`optim_config_from_dict`)."""
    return dataclasses.asdict(c)


# ---------------------------------------------------------------------------------------------------------------
# Parameter groups
# ---------------------------------------------------------------------------------------------------------------
def param_group(name: str) -> str:
    """Group of a parameter leaf from its name: 'norm', 'embedding' or 'matrix'."""
    if "norm" in name:
        return "norm"
    if name.startswith("embed"):
        return "embedding"
    return "matrix"


def _leaf_name(path: tuple[Any, ...]) -> str:
    if not path:
        return ""
    k = path[-1]
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def param_groups(params: Any) -> Any:
    """A pytree like ``params`` whose leaves are the group names ('norm' / 'embedding' / 'matrix')."""
    return jax.tree_util.tree_map_with_path(lambda p, _: param_group(_leaf_name(p)), params)


def matrix_mask(params: Any) -> Any:
    """Boolean pytree: True on matrices (weight decay, µP LR scale), False on norms and embeddings."""
    return jax.tree_util.tree_map_with_path(lambda p, _: param_group(_leaf_name(p)) == "matrix", params)


def scale_matrices(factor: float) -> optax.GradientTransformation:
    """Multiplies the updates of matrix leaves by ``factor`` (µP per-group LR); stateless."""

    def init_fn(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        del params
        if factor == 1.0:
            return updates, state
        scaled = jax.tree_util.tree_map_with_path(
            lambda p, u: u * jnp.asarray(factor, u.dtype) if param_group(_leaf_name(p)) == "matrix" else u, updates
        )
        return scaled, state

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------------------------
_SCHEDULE_ARG_TO_FIELD = {"peak": "lr", "min_ratio": "min_lr_ratio"}


def make_optimizer(cfg: OptimConfig, total_steps: int,
                   d_model: int) -> tuple[optax.GradientTransformation, Callable[[Any], jax.Array]]:
    """Builds the AdamW chain and its learning-rate schedule.

    Args:
        cfg: optimizer hyper-parameters.
        total_steps: number of optimizer updates of the run (end of the cosine / wsd decay).
        d_model: model width, for the µP factor ``cfg.mup_base_dim / d_model``.

    Returns:
        ``(tx, lr_fn)``: the optax transformation and ``lr_fn(step)``, the LR of norms and embeddings at update
        ``step`` (matrices use ``lr_fn(step) * mup_base_dim / d_model`` when ``cfg.mup``).

    Raises:
        ConfigError: if the schedule cannot be built for ``total_steps`` (e.g. warmup longer than the run).
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
        raise ConfigError(f"total_steps: must be a positive integer, got {total_steps!r}")
    if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model <= 0:
        raise ConfigError(f"model.d_model: must be a positive integer, got {d_model!r}")
    try:
        lr_fn: Schedule = make_lr_schedule(
            cfg.schedule, peak=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=total_steps,
            decay_fraction=cfg.decay_fraction, min_ratio=cfg.min_lr_ratio,
        )
    except ValueError as e:
        field, _, rest = str(e).partition(":")
        raise ConfigError(f"optim.{_SCHEDULE_ARG_TO_FIELD.get(field, field)}:{rest}") from None

    tx = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity(),
        optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay, mask=matrix_mask),
        optax.scale_by_learning_rate(lr_fn),
        scale_matrices(cfg.mup_base_dim / d_model if cfg.mup else 1.0),
    )
    return tx, lr_fn


def update_count(opt_state: Any) -> jax.Array:
    """Number of updates already applied (the step index of the next update), read from the optimizer state."""
    leaves = jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState)
    )
    for leaf in leaves:
        if isinstance(leaf, optax.ScaleByScheduleState):
            return leaf.count
    raise ValueError("opt_state has no schedule count; was it built by prosparse_jax.optim.make_optimizer?")
