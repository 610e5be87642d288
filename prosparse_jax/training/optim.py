"""AdamW with a learning-rate schedule, global-norm clipping, weight-decay masks and MiniCPM µP.

The transformation is ``clip_by_global_norm -> scale_by_adam -> add_decayed_weights (matrices only) ->
scale_by_learning_rate(schedule) -> µP scale of the matrix updates``. Parameter groups come from the leaf names of
the parameter pytree (:mod:`prosparse_jax.model.transformer`):

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

Step convention (as in :mod:`prosparse_jax.training.schedules`): update ``t`` (0-based, = updates already applied) uses
``lr(t)``.

Gradient accumulation is the training step's job, not the optimizer's: it averages the micro-batch gradients and
calls ``update`` once per optimizer step, so the count (and the schedules) advance once per global batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from prosparse_jax.config import ConfigError, OptimConfig
from prosparse_jax.training.schedules import Schedule, make_lr_schedule

PARAM_GROUPS = ("norm", "embedding", "matrix")


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
    raise ValueError("opt_state has no schedule count; was it built by prosparse_jax.training.optim.make_optimizer?")
