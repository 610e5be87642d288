"""ProSparse for Flax NNX models: a gated-FFN layer that records the L1 statistic, its penalty, sparse inference.

:class:`GatedFFN` is the functional model's FFN and records each call's statistics, so the ProSparse objective (Eq. 2,
as in ``step.loss_fn``) is ``task_loss + reg_factor * l1_penalty(model)`` (docs/model.md, "Flax NNX layer"):

    import jax.numpy as jnp, optax
    from flax import nnx
    from prosparse_jax import nnx as psnnx

    class Block(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.norm = nnx.RMSNorm(32, rngs=rngs)
            self.ffn = psnnx.GatedFFN(32, 64, activation="relu", rngs=rngs)
        def __call__(self, x_BxTxD):
            return x_BxTxD + self.ffn(self.norm(x_BxTxD))

    model = Block(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x_BxTxD, y_BxTxD, reg_factor):
        def loss_fn(model):  # task loss + λ · sum over GatedFFNs of the L1 term
            return jnp.mean((model(x_BxTxD) - y_BxTxD) ** 2) + reg_factor * psnnx.l1_penalty(model)
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    x_BxTxD = jnp.ones((2, 8, 32))
    loss = train_step(model, optimizer, x_BxTxD, 0.5 * x_BxTxD, 1e-3)
    sparsity = psnnx.activation_sparsity(model)  # fraction of exact zeros of x1, mean over GatedFFNs
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from prosparse_jax.config import L1_REDUCTIONS
from prosparse_jax.inference.sparse_ffn import GATE_MASK_ACTIVATIONS, prepare_weights, sparse_ffn
from prosparse_jax.model import transformer as model
from prosparse_jax.model.activations import check_activation
from prosparse_jax.training.step import l1_term

Array = jax.Array

#: Most tokens (B * T) a ``sparse=True`` call takes: the sparse FFN reads the union of the rows' active neurons, so
#: its gain vanishes with larger batches (use the dense path for prefill and training).
MAX_SPARSE_TOKENS = 8

#: The FFN weights: their names inside one layer of the functional model (the attributes) -> their stacked names.
PARAM_NAMES = {"w_gate_DxF": "w_gate_LxDxF", "w_up_DxF": "w_up_LxDxF", "w_down_FxD": "w_down_LxFxD"}

#: The functional model's matrix init, N(0, 0.02) (``ModelConfig.init_std``'s default).
DEFAULT_KERNEL_INIT = nnx.initializers.normal(0.02)


class FFNStat(nnx.Variable):
    """A statistic of a :class:`GatedFFN`'s last call (float32 scalar; NaN before any call).
    Not an ``nnx.Param``, so ``wrt=nnx.Param`` optimizers leave it alone; a loss that reads it inside ``nnx.grad``
    still differentiates through it to the weights."""


class PreparedWeight(nnx.Variable):
    """A tensor derived from the weights for sparse inference (:meth:`GatedFFN.prepare_sparse`); a snapshot."""


class GatedFFN(nnx.Module):
    """The functional model's gated FFN, act(x W_gate) * (x W_up) @ W_down, as a Flax NNX module.

    The weights are ``nnx.Param``s named as in one layer of the functional params; ``mean_abs_x1`` and ``zero_frac``
    (:class:`FFNStat`) hold the last call's ``model.FFNStats`` entries.
    """

    def __init__(self, d_model: int, d_ff: int, *, activation: str = "relu", activation_threshold: float = 0.0,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 kernel_init: Callable[..., Array] = DEFAULT_KERNEL_INIT, rngs: nnx.Rngs) -> None:
        """Creates the layer with random weights from the ``params`` stream of ``rngs``.

        Args:
          activation: a key of ``prosparse_jax.model.activations.ACTIVATIONS``.
          activation_threshold: FATReLU threshold t >= 0 (ignored by the other activations).
          dtype: compute dtype (the input is cast to it); None computes in the input's dtype.
          kernel_init: called as ``kernel_init(key, shape, param_dtype)`` for each of the three matrices.

        Raises:
          ValueError: unknown activation, negative or non-finite threshold.
        """
        check_activation(activation)
        if not (math.isfinite(activation_threshold) and activation_threshold >= 0):
            raise ValueError(f"activation_threshold must be a finite number >= 0 (FATReLU keeps z >= t), "
                             f"got {activation_threshold!r}")
        self.d_model, self.d_ff = d_model, d_ff
        self.activation, self.activation_threshold = activation, float(activation_threshold)
        self.dtype, self.param_dtype = dtype, param_dtype
        self.w_gate_DxF = nnx.Param(kernel_init(rngs.params(), (d_model, d_ff), param_dtype))
        self.w_up_DxF = nnx.Param(kernel_init(rngs.params(), (d_model, d_ff), param_dtype))
        self.w_down_FxD = nnx.Param(kernel_init(rngs.params(), (d_ff, d_model), param_dtype))
        self._init_stats()
        self.clear_sparse()

    def _init_stats(self) -> None:
        self.mean_abs_x1 = FFNStat(jnp.full((), jnp.nan, jnp.float32))
        self.zero_frac = FFNStat(jnp.full((), jnp.nan, jnp.float32))

    # ---- weights to and from the functional model ----------------------------------------------------------------
    @classmethod
    def from_params(cls, params: dict[str, Any], *, layer: int | None = None, activation: str,
                    activation_threshold: float = 0.0, dtype: Any = jnp.float32,
                    param_dtype: Any = jnp.float32) -> GatedFFN:
        """A GatedFFN holding one layer's FFN weights of the functional model (no random initialization).

        Args:
          params: any of: the full params (``model.init_params``, either layer layout); ``params["layers"]`` stacked
            or a per-layer group (``{"w_gate_LxDxF": [L, D, F], ...}``); or one layer's weights under their in-layer
            names (``{"w_gate_DxF": [D, F], ...}``, what ``model.ffn_hidden`` reads and :meth:`to_params` returns).
            Other keys are ignored.
          layer: the layer index of stacked weights; may be omitted when they hold one layer.
          activation, activation_threshold, dtype, param_dtype: as in :meth:`__init__` (the params do not hold them:
            pass ``cfg.activation`` / ``cfg.activation_threshold``).

        Raises:
          ValueError: missing keys, inconsistent shapes, or a layer index missing or out of range.
        """
        if "layers" in params:
            arrays = {attr: model.layer_param(params, key) for attr, key in PARAM_NAMES.items()}
        elif all(key in params for key in PARAM_NAMES.values()):
            arrays = {attr: jnp.asarray(params[key]) for attr, key in PARAM_NAMES.items()}
        elif all(attr in params for attr in PARAM_NAMES):
            if layer is not None:
                raise ValueError("layer= given but the params hold one layer's weights; drop layer=")
            arrays = {attr: jnp.asarray(params[attr])[None] for attr in PARAM_NAMES}
        else:
            raise ValueError(f"params lack the FFN weights; pass the functional params, params['layers'] (keys "
                             f"{list(PARAM_NAMES.values())}) or one layer's (keys {list(PARAM_NAMES)})")
        if {a.ndim for a in arrays.values()} != {3}:
            raise ValueError(f"FFN weights must be [D, F] / [F, D] in a layer or stacked [L, ...], got shapes "
                             f"{ {k: a.shape for k, a in arrays.items()} }")
        n = arrays["w_gate_DxF"].shape[0]
        if layer is None and n != 1:
            raise ValueError(f"the params hold {n} stacked layers; pass layer= (0..{n - 1})")
        layer = 0 if layer is None else layer
        if not -n <= layer < n:
            raise ValueError(f"layer={layer} out of range for {n} layers")
        arrays = {attr: a[layer] for attr, a in arrays.items()}
        D, F = arrays["w_gate_DxF"].shape
        if arrays["w_up_DxF"].shape != (D, F) or arrays["w_down_FxD"].shape != (F, D):
            raise ValueError(f"inconsistent FFN shapes { {k: a.shape for k, a in arrays.items()} }; expected "
                             f"w_gate/w_up [D, F] and w_down [F, D]")
        ffn = nnx.eval_shape(lambda: cls(D, F, activation=activation, activation_threshold=activation_threshold,
                                         dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
        for attr in PARAM_NAMES:
            getattr(ffn, attr).set_value(jnp.asarray(arrays[attr], param_dtype))
        ffn._init_stats()
        return ffn

    def to_params(self, *, layer_axis: bool = False) -> dict[str, Array]:
        """The weights as the functional model holds them: one layer's (``w_gate_DxF``, ...: ``model.ffn_hidden``'s
        ``lp``), or with ``layer_axis`` a per-layer group (``w_gate_LxDxF`` [1, D, F], ...; ``jnp.concatenate``
        groups along axis 0 for the stacked form)."""
        if layer_axis:
            return {key: getattr(self, attr)[...][None] for attr, key in PARAM_NAMES.items()}
        return {attr: getattr(self, attr)[...] for attr in PARAM_NAMES}

    # ---- sparse inference ------------------------------------------------------------------------------------------
    def prepare_sparse(self) -> GatedFFN:
        """Caches W_up^T and ||W_down[i, :]|| (``sparse_ffn.prepare_weights``) for ``sparse=True`` calls; returns self.
        Without it every sparse call transposes W_up, which costs more than the sparse FFN saves. The cache is a
        snapshot: call again after the weights change, or :meth:`clear_sparse`.
        """
        prepared = prepare_weights(self.w_up_DxF[...], self.w_down_FxD[...])
        self.w_up_FxD = nnx.data(PreparedWeight(prepared["w_up_FxD"]))
        self.w_down_norms_F = nnx.data(PreparedWeight(prepared["w_down_norms_F"]))
        return self

    def clear_sparse(self) -> None:
        """Drops the tensors cached by :meth:`prepare_sparse`."""
        self.w_up_FxD = nnx.data(None)
        self.w_down_norms_F = nnx.data(None)

    # ---- forward -----------------------------------------------------------------------------------------------
    def __call__(self, x_BxTxD: Array, *, valid_BxT: Array | None = None, sparse: bool = False,
                 implementation: str = "auto", tau: Any = None) -> Array:
        """The FFN output in the compute dtype; records ``mean_abs_x1`` and ``zero_frac`` of this call.

        Args:
          valid_BxT: False on padding tokens, which the statistics exclude (the output covers every token). None =
            all valid.
          sparse: run :func:`prosparse_jax.inference.sparse_ffn.sparse_ffn` (at most :data:`MAX_SPARSE_TOKENS` tokens
            B * T). Its ``mean_abs_x1`` is NaN (x1 is not formed for the skipped neurons) and ``zero_frac`` is
            1 - (union of the tokens' active neurons) / F.
          implementation: the sparse backend: ``auto`` (by platform) or a key of ``sparse_ffn.IMPLEMENTATIONS``.
          tau: this layer's neuron-norm threshold (``model.neuron_norm_mask``: neuron i dropped iff
            |x1_i| * ||W_down[i, :]|| <= tau), dense path included; ``sparse=True`` needs it for silu / gelu.

        Raises:
          ValueError: wrong input width or mask shape, too many tokens for ``sparse``, a sparse silu / gelu call
            without ``tau``, an unknown implementation.
        """
        B, T, D = x_BxTxD.shape
        if self.d_model != D:
            raise ValueError(f"input width {D} != d_model={self.d_model} of this GatedFFN; pass x_BxTxD with "
                             f"last axis {self.d_model}")
        if valid_BxT is not None and tuple(valid_BxT.shape) != (B, T):
            raise ValueError(f"valid_BxT has shape {tuple(valid_BxT.shape)}; expected {(B, T)} (the input's B, T)")
        x_BxTxD = x_BxTxD.astype(self.dtype or x_BxTxD.dtype)
        if sparse:
            return self._sparse_call(x_BxTxD, implementation, tau)
        lp = self.to_params()
        x1_BxTxF, act_BxTxF = model.ffn_hidden(x_BxTxD, lp, self.activation, self.activation_threshold)
        valid_BxT = jnp.ones((B, T), bool) if valid_BxT is None else valid_BxT.astype(bool)
        if tau is not None:
            mask = model.neuron_norm_mask({"layers": {"w_down_LxFxD": lp["w_down_FxD"][None]}},
                                          jnp.reshape(jnp.asarray(tau, jnp.float32), (1,)))
            x1_BxTxF = mask(jnp.int32(0), x1_BxTxF, act_BxTxF, valid_BxT)
        mean_abs, zeros = model.layer_stats(x1_BxTxF, valid_BxT)
        self.mean_abs_x1[...] = mean_abs
        self.zero_frac[...] = zeros
        return model.ffn_down(x1_BxTxF, lp)

    def _sparse_call(self, x_BxTxD: Array, implementation: str, tau: Any) -> Array:
        B, T, D = x_BxTxD.shape
        if B * T > MAX_SPARSE_TOKENS:
            raise ValueError(f"sparse=True takes at most {MAX_SPARSE_TOKENS} decode tokens (B * T), got {B * T}; use "
                             "sparse=False for prefill and training")
        if tau is None and self.activation not in GATE_MASK_ACTIVATIONS:
            raise ValueError(
                f"activation {self.activation!r} has no exact zeros, so sparse=True needs tau, this layer's "
                "neuron-norm threshold; get thresholds with `python -m prosparse_jax.main.analyze --metric=pplp "
                "--value=1` "
                f"(its sparse_mode.json), or use an activation of {sorted(GATE_MASK_ACTIVATIONS)}, or sparse=False")
        w_up_FxD = None if self.w_up_FxD is None else self.w_up_FxD[...]
        norms_F = None
        if tau is not None:
            norms_F = self.w_down_norms_F[...] if self.w_down_norms_F is not None else \
                jnp.linalg.norm(self.w_down_FxD[...].astype(jnp.float32), axis=-1)
        out_MxD, count = sparse_ffn(
            x_BxTxD.reshape(B * T, D), self.w_gate_DxF[...], self.w_up_DxF[...], self.w_down_FxD[...],
            activation=self.activation, threshold=self.activation_threshold, taus=tau, w_down_norms_F=norms_F,
            w_up_FxD=w_up_FxD, implementation=implementation)
        self.mean_abs_x1[...] = jnp.full((), jnp.nan, jnp.float32)
        self.zero_frac[...] = 1.0 - count.astype(jnp.float32) / self.d_ff
        return out_MxD.reshape(B, T, D).astype(x_BxTxD.dtype)


# ---------------------------------------------------------------------------------------------------------------
# The objective's pieces over a module tree
# ---------------------------------------------------------------------------------------------------------------
def gated_ffns(module: nnx.Module) -> list[GatedFFN]:
    """Every :class:`GatedFFN` in ``module`` (itself included), in ``nnx.iter_modules`` order; ValueError if none."""
    found = [m for _, m in nnx.iter_modules(module) if isinstance(m, GatedFFN)]
    if not found:
        raise ValueError(f"{type(module).__name__} holds no prosparse_jax.nnx.GatedFFN; use GatedFFN for the FFNs "
                         "whose activations ProSparse regularizes")
    return found


def ffn_stats(module: nnx.Module) -> model.FFNStats:
    """The recorded statistics of every GatedFFN in ``module``, [L]-shaped like the functional ``FFNStats``."""
    ffns = gated_ffns(module)
    return model.FFNStats(mean_abs_x1=jnp.stack([f.mean_abs_x1[...] for f in ffns]),
                          zero_frac=jnp.stack([f.zero_frac[...] for f in ffns]))


def l1_penalty(module: nnx.Module, *, l1_reduction: str = "sum", valid_tokens: Array | float | None = None) -> Array:
    """The ProSparse L1 term summed over the called GatedFFNs of ``module``, as ``step.loss_fn`` combines layers:
    multiply by λ (``reg_factor``) and add to the task loss inside the function that ran the forward pass.

    Args:
      l1_reduction: a reading of λ's unit (:data:`prosparse_jax.config.L1_REDUCTIONS`, formulas in
        :func:`prosparse_jax.training.step.l1_term`; docs/training.md, "The λ unit").
      valid_tokens: the micro-batch's non-padding token count; needed by ``"blockffn"`` (a sum over tokens).

    Raises:
      ValueError: unknown ``l1_reduction``, ``"blockffn"`` without ``valid_tokens``, or no GatedFFN in ``module``.
    """
    if l1_reduction not in L1_REDUCTIONS:
        raise ValueError(f"l1_reduction {l1_reduction!r}; choose one of: {', '.join(L1_REDUCTIONS)}")
    if l1_reduction == "blockffn" and valid_tokens is None:
        raise ValueError("l1_reduction 'blockffn' sums |x1| over the micro-batch's tokens: pass valid_tokens")
    tokens = jnp.asarray(0.0 if valid_tokens is None else valid_tokens, jnp.float32)
    terms = [l1_term(f.mean_abs_x1[...][None], f.d_ff, tokens, l1_reduction) for f in gated_ffns(module)]
    return jnp.sum(jnp.stack(terms))


def activation_sparsity(module: nnx.Module) -> Array:
    """Fraction of exact zeros of x1, mean over the GatedFFNs of ``module`` (the train step's ``sparsity``)."""
    return jnp.mean(ffn_stats(module).zero_frac)
