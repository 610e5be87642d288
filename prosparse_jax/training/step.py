"""The jitted pieces of ProSparse training: the objective, the train step and its state, and evaluation.

Objective (ProSparse Eq. 2; docs/training.md): loss = CE(next token) + lambda(t) * sum_l L1_l, the L1 term in the
unit ``sparsity.l1_reduction`` names; lambda(t) evaluated inside the step from the state's step counter, so a resumed
run continues it exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from prosparse_jax.config import L1_REDUCTIONS, ModelConfig, RunConfig
from prosparse_jax.model.transformer import (
    Params,
    abstract_params,
    cross_entropy,
    forward,
    perplexity,
    stack_layers,
    unstack_layers,
)
from prosparse_jax.training import schedules
from prosparse_jax.training import sharding as shard_lib

# ---------------------------------------------------------------------------------------------------------------
# Objective and step
# ---------------------------------------------------------------------------------------------------------------
#: BlockFFN's L1 scale: its term is 1e-8 x the sum of |x1| over every token of a micro-batch, d_ff and layers
#: (thunlp/BlockFFN ``pretrain/cpm/dragonfly/activation_context.py``, ``l1_regularization``).
BLOCKFFN_L1_SCALE = 1e-8


def l1_term(mean_abs_x1_L: jax.Array, d_ff: int, valid_tokens: jax.Array, l1_reduction: str) -> jax.Array:
    """The L1 term of one micro-batch, summed over layers, before lambda (docs/training.md, "The λ unit").

    ``mean_abs_x1_L``: mean |x1| per layer over the micro-batch's ``valid_tokens`` x d_ff. ``"sum"``: ||x1||_1 per
    token, mean over valid tokens; ``"mean"``: that / d_ff; ``"blockffn"``: 1e-8 x ||x1||_1 summed over the valid
    tokens (= ``"sum"`` x 1e-8 x valid_tokens).
    """
    per_element = jnp.sum(mean_abs_x1_L)
    if l1_reduction == "mean":
        return per_element
    if l1_reduction == "sum":
        return per_element * d_ff
    if l1_reduction == "blockffn":
        return BLOCKFFN_L1_SCALE * valid_tokens * (per_element * d_ff)
    raise ValueError(f"unknown l1_reduction {l1_reduction!r}; choose one of: {', '.join(L1_REDUCTIONS)}")


def loss_fn(params: Params, batch: dict[str, jax.Array], cfg: ModelConfig, reg_factor: jax.Array,
            l1_reduction: str = "sum") -> tuple[jax.Array, dict[str, jax.Array]]:
    """lm_loss + reg_factor * :func:`l1_term` of ``batch`` (one micro-batch) under ``l1_reduction``."""
    logits, stats = forward(params, batch["inputs"], cfg, segment_ids_BxT=batch["segment_ids"],
                            positions_BxT=batch["positions"])
    lm_loss = cross_entropy(logits, batch["targets"], batch["weights"])
    valid_tokens = jnp.sum((batch["segment_ids"] != 0).astype(jnp.float32))
    reg_loss = reg_factor * l1_term(stats.mean_abs_x1, cfg.d_ff, valid_tokens, l1_reduction)
    return lm_loss + reg_loss, {"lm_loss": lm_loss, "reg_loss": reg_loss, "sparsity_per_layer": stats.zero_frac,
                                "mean_abs_x1_per_layer": stats.mean_abs_x1}


def accumulate_grads(params: Params, batch: dict[str, jax.Array], cfg: ModelConfig, reg_factor: jax.Array,
                     l1_reduction: str = "sum") -> tuple[dict[str, jax.Array], Params]:
    """Metrics and gradients of the objective over all micro-batches of ``batch`` (leaves [A, micro_batch, T]).

    The LM loss is the mean over all target tokens of the step, and under ``"sum"`` / ``"mean"`` the L1 term the
    mean over all its valid tokens: the objective of a single batch holding every micro-batch's rows (each
    micro-batch weighs by its share of the tokens, not 1/A: micro-batches of packed data hold different numbers of
    valid tokens). Under ``"blockffn"`` the L1 term is the mean over the A micro-batches of each one's token sum, as
    BlockFFN divides each micro-batch's term by its accumulation count. Statistics weigh by valid tokens.
    """
    n = batch["inputs"].shape[0]
    if n == 1:  # no accumulation buffers (zeros + g == g): saves a pass over the parameters
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, jax.tree.map(lambda x: x[0], batch), cfg, reg_factor, l1_reduction)
        return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), dict(aux, loss=loss)), grads
    w_A = jnp.sum(batch["weights"].astype(jnp.float32), axis=(1, 2))  # CE target tokens per micro-batch
    v_A = jnp.sum((batch["segment_ids"] != 0).astype(jnp.float32), axis=(1, 2))  # valid tokens (the L1 mean's)
    stat_share = v_A / jnp.maximum(v_A.sum(), 1.0)
    reg_share = jnp.full((n,), 1.0 / n, jnp.float32) if l1_reduction == "blockffn" else stat_share
    shares = (w_A / jnp.maximum(w_A.sum(), 1.0), reg_share, stat_share)

    def weighted(p: Params, mb: dict[str, jax.Array], ce_share: jax.Array, reg_share: jax.Array,
                 stat_share: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        _, aux = loss_fn(p, mb, cfg, reg_factor, l1_reduction)
        out = {"lm_loss": aux["lm_loss"] * ce_share, "reg_loss": aux["reg_loss"] * reg_share,
               "sparsity_per_layer": aux["sparsity_per_layer"] * stat_share,
               "mean_abs_x1_per_layer": aux["mean_abs_x1_per_layer"] * stat_share}
        return out["lm_loss"] + out["reg_loss"], out

    grad_fn = jax.value_and_grad(weighted, has_aux=True)

    def micro(carry: Any, xs: Any) -> tuple[Any, None]:
        g_acc, aux_acc = carry
        mb, *mb_shares = xs
        (loss, aux), g = grad_fn(params, mb, *mb_shares)
        aux = dict(aux, loss=loss)
        return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, aux_acc, aux)), None

    zeros_aux = {"loss": 0.0, "lm_loss": 0.0, "reg_loss": 0.0,
                 "sparsity_per_layer": jnp.zeros(cfg.n_layers), "mean_abs_x1_per_layer": jnp.zeros(cfg.n_layers)}
    zeros_aux = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), zeros_aux)
    (grads, aux), _ = jax.lax.scan(micro, (jax.tree.map(jnp.zeros_like, params), zeros_aux), (batch, *shares))
    return aux, grads


def make_train_step(rc: RunConfig, tx: Any, lr_fn: Any, reg_factor_fn: Any):
    """Builds ``step(state, batch) -> (state, metrics)``; batch leaves are [grad_accum, micro_batch, T]."""
    cfg = rc.model

    def step(state: dict[str, Any], batch: dict[str, jax.Array]) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        t = state["step"]
        reg_factor = reg_factor_fn(t)
        aux, grads = accumulate_grads(state["params"], batch, cfg, reg_factor, rc.sparsity.l1_reduction)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(aux["loss"]) & jnp.isfinite(grad_norm)

        def apply(operands: tuple[Any, Any, Any]) -> tuple[Any, Any]:
            params, opt_state, grads = operands
            updates, new_opt = tx.update(grads, opt_state, params)
            return jax.tree.map(lambda p, u: p + u, params, updates), new_opt

        # A non-finite step is not applied: the state stays the last good one and the host stops the run.
        new_params, new_opt = jax.lax.cond(finite, apply, lambda ops: (ops[0], ops[1]),
                                           (state["params"], state["opt_state"], grads))
        new_state = {"params": new_params, "opt_state": new_opt, "step": jnp.where(finite, t + 1, t)}
        metrics = dict(aux, reg_factor=reg_factor, lr=lr_fn(t), grad_norm=grad_norm, finite=finite,
                       sparsity=jnp.mean(aux["sparsity_per_layer"]))
        return new_state, metrics

    return step


def jit_train_step(rc: RunConfig, tx: Any, lr_fn: Any, state: dict[str, Any], mesh: jax.sharding.Mesh) -> Any:
    """The train step as training runs it, jitted for a ``state`` shaped and placed like :func:`place_state`'s (real
    or :func:`abstract_train_state`).

    The state is donated and comes back with the shardings it went in with (else XLA picks others for the outputs:
    the donation fails and the second step compiles again); the metrics come back replicated, readable on every
    process.
    """
    out_shardings = (jax.tree.map(lambda x: x.sharding, state), NamedSharding(mesh, PartitionSpec()))
    step = make_train_step(rc, tx, lr_fn, schedules.reg_factor_schedule(rc.sparsity.stages))
    return jax.jit(step, donate_argnums=(0,), out_shardings=out_shardings)


# ---------------------------------------------------------------------------------------------------------------
# Train state layout
# ---------------------------------------------------------------------------------------------------------------
def _sharded(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """ShapeDtypeStructs of ``tree``'s leaves carrying the FSDP shardings of :func:`sharding.shardings_like`."""
    with_sh = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
    return jax.tree.map(with_sh, tree, shard_lib.shardings_like(tree, mesh))


def abstract_state(cfg: ModelConfig, tx: Any, mesh: jax.sharding.Mesh) -> tuple[Params, Any]:
    """(params, optimizer state) of ``cfg`` as sharded ShapeDtypeStructs in the stacked layout of the checkpoints:
    the targets of a restore and the shardings of a fresh initialisation."""
    params = abstract_params(cfg)
    return _sharded((params, jax.eval_shape(tx.init, params)), mesh)


def abstract_train_state(cfg: ModelConfig, tx: Any, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """The train state the jitted step receives (what :func:`place_state` builds), as ShapeDtypeStructs."""
    tree = abstract_state(cfg, tx, mesh)
    if not cfg.scan_layers:
        tree = _sharded(jax.eval_shape(unstack_layers, tree), mesh)
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))
    return {"params": tree[0], "opt_state": tree[1], "step": step}


def place_state(params: Params, opt_state: Any, step: int, cfg: ModelConfig, mesh: jax.sharding.Mesh
                ) -> dict[str, Any]:
    """The train state for the jitted step from stacked params and optimizer state.

    Parameters and optimizer state get their FSDP shardings (a no-op when already placed) and the per-layer layout
    when ``cfg.scan_layers`` is False (checkpoints stay stacked); the step counter is replicated on the mesh.
    """
    params = jax.device_put(params, shard_lib.shardings_like(params, mesh))
    opt_state = jax.device_put(opt_state, shard_lib.shardings_like(opt_state, mesh))
    if not cfg.scan_layers:
        params, opt_state = to_per_layer((params, opt_state), mesh)
    step_arr = jax.device_put(np.int32(step), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return {"params": params, "opt_state": opt_state, "step": step_arr}


def to_per_layer(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """The per-layer layout (``model.scan_layers = False``) of stacked params / optimizer state, FSDP rules kept."""
    out_sh = shard_lib.shardings_like(jax.eval_shape(unstack_layers, tree), mesh)
    return jax.jit(unstack_layers, out_shardings=out_sh)(tree)


@jax.jit
def stack_layers_jit(params: Params, opt_state: Any) -> tuple[Params, Any]:
    """Stacked copies of per-layer params and optimizer state, for a checkpoint (the state itself is unchanged)."""
    return stack_layers(params), stack_layers(opt_state)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------
def make_evaluate(cfg: ModelConfig) -> Callable[[Params, list[dict[str, Any]]], dict[str, Any]]:
    """``evaluate(params, batches)``: held-out loss, perplexity and activation sparsity (mean over layers and per
    layer) of model ``cfg``, its forward jitted once for all calls."""

    @jax.jit
    def sums(params: Params, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        logits, stats = forward(params, batch["inputs"], cfg, segment_ids_BxT=batch["segment_ids"],
                                positions_BxT=batch["positions"])
        w = batch["weights"]
        return {"nll_sum": cross_entropy(logits, batch["targets"], w) * jnp.maximum(w.sum(), 1.0),
                "tokens": w.sum(), "zero_frac": stats.zero_frac}

    def evaluate(params: Params, batches: list[dict[str, Any]]) -> dict[str, Any]:
        nll, tok, zf = 0.0, 0.0, np.zeros(cfg.n_layers)
        for b in batches:
            out = jax.device_get(sums(params, b))
            nll += float(out["nll_sum"])
            tok += float(out["tokens"])
            zf += np.asarray(out["zero_frac"])
        zf /= max(len(batches), 1)
        loss = nll / max(tok, 1.0)
        return {"eval_loss": loss, "eval_ppl": perplexity(loss), "eval_sparsity": float(zf.mean()),
                "eval_sparsity_per_layer": [float(x) for x in zf], "eval_tokens": int(tok)}

    return evaluate
