"""AdamW with a learning-rate schedule, global-norm clipping, weight-decay masks and MiniCPM µP (docs/training.md).

``clip_by_global_norm -> scale_by_adam -> add_decayed_weights -> scale_by_learning_rate -> µP scale``. Norms (names
containing ``norm``) and embeddings (``embed_VxD``, the tied head too) get neither weight decay nor the µP scale;
matrices get both, µP multiplying their update by ``mup_base_dim / d_model`` (MiniCPM's ``lr / (d_model / 256)``).
The state's structure does not depend on the config (disabled parts are stateless) and the LR only on its update
count, so a restored state continues the schedule and ``clip_norm``, ``mup``, ``weight_decay`` may change on resume.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from prosparse_jax.config import OptimConfig
from prosparse_jax.training.schedules import Schedule, make_lr_schedule


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


def make_optimizer(cfg: OptimConfig, total_steps: int,
                   d_model: int) -> tuple[optax.GradientTransformation, Callable[[Any], jax.Array]]:
    """Builds the AdamW chain and its learning-rate schedule.

    Args:
        total_steps: number of optimizer updates of the run (end of the cosine / wsd decay).
        d_model: model width, for the µP factor ``cfg.mup_base_dim / d_model``.

    Returns:
        ``(tx, lr_fn)``: the optax transformation and ``lr_fn(step)``, the LR of norms and embeddings at update
        ``step`` (matrices use ``lr_fn(step) * mup_base_dim / d_model`` when ``cfg.mup``).
    """
    lr_fn: Schedule = make_lr_schedule(
        cfg.schedule, peak=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=total_steps,
        decay_fraction=cfg.decay_fraction, min_ratio=cfg.min_lr_ratio,
    )
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity(),
        optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay, mask=matrix_mask),
        optax.scale_by_learning_rate(lr_fn),
        scale_matrices(cfg.mup_base_dim / d_model if cfg.mup else 1.0),
    )
    return tx, lr_fn
