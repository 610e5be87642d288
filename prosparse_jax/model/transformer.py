"""Functional LLaMA 2 / MiniCPM decoder with a gated FFN and per-layer activation statistics (docs/model.md).

The forward pass is MiniCPM's (arXiv 2404.06395; LLaMA 2 with every scale 1). :func:`decoder_block` and
:func:`run_layers` are the one block and the one layer loop: :func:`forward` and the KV-cache decoder
(:mod:`prosparse_jax.inference.decode`) differ only in the attention and the FFN they hand in. Layer parameters are
stacked, ``{name: [L, ...]}`` (canonical; ``lax.scan``), or per layer, ``[{name: [1, ...]}] * L`` (unrolled); inside a
layer the ``Lx`` of the names is gone (``w_gate_LxDxF`` is read as ``w_gate_DxF``).

Shape letters: B batch, T sequence, S keys, D d_model, N query heads, K kv heads, G = N / K, H head_dim, F d_ff,
V vocab, L layers.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from prosparse_jax.config import ModelConfig
from prosparse_jax.model import attention as attention_lib
from prosparse_jax.model.activations import ffn_product

Array = jax.Array
Params = dict[str, Any]


class FFNStats(NamedTuple):
    """Per-layer FFN statistics, each with a leading axis L, over valid tokens x d_ff.

    ``mean_abs_x1`` * d_ff is the layer's ProSparse Eq. 2 L1 term per token; ``zero_frac`` is the fraction of exact
    zeros of x1 (activation sparsity); ``x1`` / ``act_gate`` are the [L, B, T, F] tensors with ``capture=True``.
    """

    mean_abs_x1: Array
    zero_frac: Array
    x1: Array | None = None
    act_gate: Array | None = None


# ---------------------------------------------------------------------------------------------------------------
# Parameters and their two layer layouts
# ---------------------------------------------------------------------------------------------------------------
def init_params(cfg: ModelConfig, rng: Array) -> Params:
    """Random float32 parameters: matrices ~ N(0, init_std), norms = 1 (MiniCPM/µP style init)."""
    D, L, N, K, H, F, V = cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
    keys = iter(jax.random.split(rng, 9))

    def normal(shape: tuple[int, ...]) -> Array:
        return cfg.init_std * jax.random.normal(next(keys), shape, jnp.float32)

    params: Params = {
        "embed_VxD": normal((V, D)),
        "layers": {
            "attn_norm_LxD": jnp.ones((L, D), jnp.float32),
            "wq_LxDxNxH": normal((L, D, N, H)),
            "wk_LxDxKxH": normal((L, D, K, H)),
            "wv_LxDxKxH": normal((L, D, K, H)),
            "wo_LxNxHxD": normal((L, N, H, D)),
            "ffn_norm_LxD": jnp.ones((L, D), jnp.float32),
            "w_gate_LxDxF": normal((L, D, F)),
            "w_up_LxDxF": normal((L, D, F)),
            "w_down_LxFxD": normal((L, F, D)),
        },
        "final_norm_D": jnp.ones((D,), jnp.float32),
    }
    if not cfg.tie_embeddings:
        params["lm_head_DxV"] = normal((D, V))
    return params


def abstract_params(cfg: ModelConfig) -> Params:
    """Shapes and dtypes of the parameters without allocating them."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def is_per_layer(params: Params) -> bool:
    """True when ``params["layers"]`` is in the per-layer layout (a list of groups), False when stacked."""
    return isinstance(params["layers"], (list, tuple))


def _is_layers_holder(x: Any) -> bool:
    return isinstance(x, dict) and "layers" in x


def unstack_layers(tree: Any) -> Any:
    """Per-layer form of any pytree of params-shaped dicts (params, optimizer moments, shardings): every
    ``{"layers": {name: [L, ...]}}`` becomes ``{"layers": [{name: [1, ...]}] * L}``; per-layer trees pass as they are.
    """

    def split(node: Any) -> Any:
        if not _is_layers_holder(node) or is_per_layer(node):
            return node
        stacked = node["layers"]
        n = {jnp.shape(v)[0] for v in stacked.values()}
        if len(n) != 1:
            raise ValueError(f"stacked layer leaves disagree on the number of layers: {sorted(n)}")
        groups = [{k: v[i:i + 1] for k, v in stacked.items()} for i in range(n.pop())]
        return dict(node, layers=groups)

    return jax.tree.map(split, tree, is_leaf=_is_layers_holder)


def stack_layers(tree: Any) -> Any:
    """Inverse of :func:`unstack_layers`: the canonical stacked form (a no-op on stacked trees)."""

    def join(node: Any) -> Any:
        if not _is_layers_holder(node) or not is_per_layer(node):
            return node
        groups = node["layers"]
        return dict(node, layers={k: jnp.concatenate([g[k] for g in groups], axis=0) for k in groups[0]})

    return jax.tree.map(join, tree, is_leaf=_is_layers_holder)


def layer_param(params: Params, name: str) -> Array:
    """One stacked [L, ...] layer parameter from params in either layout."""
    if is_per_layer(params):
        return jnp.concatenate([g[name] for g in params["layers"]], axis=0)
    return params["layers"][name]


def _in_layer(lp_sliced: Params) -> Params:
    """One layer's leaves, their L axis taken, under their in-layer names (``w_gate_LxDxF`` -> ``w_gate_DxF``)."""
    return {k.replace("_Lx", "_", 1): v for k, v in lp_sliced.items()}


# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------
def embed(params: Params, ids_BxT: Array, cfg: ModelConfig) -> Array:
    """The first hidden states, embed(ids) * scale_emb, [B, T, D] in ``cfg.dtype``."""
    return (params["embed_VxD"][ids_BxT] * cfg.scale_emb).astype(jnp.dtype(cfg.dtype))


def rms_norm(x: Array, w: Array, eps: float) -> Array:
    """RMSNorm computed in float32, cast back to the input dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def rope_tables(positions_BxT: Array, H: int, theta: float) -> tuple[Array, Array]:
    """cos / sin of the half-split rotary embedding, [B, T, 1, H/2] float32, for every layer of a forward pass."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
    ang_BxTxH2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
    cs_2xBxTxH2 = jnp.stack([jnp.cos(ang_BxTxH2), jnp.sin(ang_BxTxH2)])
    # Materialised by an exact product with the identity: otherwise XLA fuses cos/sin into each consumer and evaluates
    # them for every element of [B, T, N, H/2], in every layer and again in the backward pass.
    cs_2xBxTxH2 = jnp.einsum("cbth,hk->cbtk", cs_2xBxTxH2, jnp.eye(H // 2, dtype=jnp.float32),
                             precision=jax.lax.Precision.HIGHEST)
    return cs_2xBxTxH2[0][:, :, None, :], cs_2xBxTxH2[1][:, :, None, :]


def apply_rope(x_BxTxNxH: Array, cos_BxTx1xH2: Array, sin_BxTx1xH2: Array) -> Array:
    """Half-split rotary embedding (HF ``rotate_half``): pairs (i, i + H/2), in float32."""
    H = x_BxTxNxH.shape[-1]
    x32 = x_BxTxNxH.astype(jnp.float32)
    x1, x2 = x32[..., : H // 2], x32[..., H // 2 :]
    out = jnp.concatenate([x1 * cos_BxTx1xH2 - x2 * sin_BxTx1xH2, x2 * cos_BxTx1xH2 + x1 * sin_BxTx1xH2], axis=-1)
    return out.astype(x_BxTxNxH.dtype)


def project_qkv(x_BxTxD: Array, lp: Params, rope_cs: tuple[Array, Array], cfg: ModelConfig
                ) -> tuple[Array, Array, Array]:
    """(q * H^-0.5, k, v) of one layer, RoPE applied: [B, T, N, H], [B, T, K, H], [B, T, K, H]."""
    dt = x_BxTxD.dtype
    B, T, D = x_BxTxD.shape
    N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    x_MxD = x_BxTxD.reshape(B * T, D)  # 2-D GEMMs: XLA:CPU emits no transposes for their gradients
    q_BxTxNxH = (x_MxD @ lp["wq_DxNxH"].reshape(D, N * H).astype(dt)).reshape(B, T, N, H)
    k_BxTxKxH = (x_MxD @ lp["wk_DxKxH"].reshape(D, K * H).astype(dt)).reshape(B, T, K, H)
    v_BxTxKxH = (x_MxD @ lp["wv_DxKxH"].reshape(D, K * H).astype(dt)).reshape(B, T, K, H)
    return apply_rope(q_BxTxNxH, *rope_cs) * jnp.asarray(H**-0.5, dt), apply_rope(k_BxTxKxH, *rope_cs), v_BxTxKxH


def attention_output(o_BxTxNxH: Array, lp: Params) -> Array:
    """The attention's output projection, [B, T, D]."""
    B, T, N, H = o_BxTxNxH.shape
    o_MxNH = o_BxTxNxH.reshape(B * T, N * H)
    return (o_MxNH @ lp["wo_NxHxD"].reshape(N * H, -1).astype(o_BxTxNxH.dtype)).reshape(B, T, -1)


# The x1 hook (x1 = act(x W_gate) * (x W_up), ProSparse Eq. 1): ``x1_mask(layer, x1_BxTxF, act_gate_BxTxF,
# valid_BxT[, x_BxTxD]) -> x1_BxTxF`` returns x1 with the dropped neurons zeroed. ``layer`` is an int32 scalar, traced
# under ``lax.scan`` (index per-layer parameters with it); ``valid_BxT`` is False on padding; a hook with a fifth
# positional parameter also gets ``x_BxTxD``, the FFN's input after its RMSNorm (what the gate projection reads: an
# activation predictor's input, :mod:`prosparse_jax.predictor`).
X1Mask = Callable[..., Array]


def takes_ffn_input(x1_mask: X1Mask) -> bool:
    """Whether the x1 hook ``x1_mask`` takes the FFN input ``x_BxTxD`` (a fifth positional parameter, or ``*args``)."""
    try:
        params = inspect.signature(x1_mask).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: the four-argument form
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 5 or any(p.kind == p.VAR_POSITIONAL for p in params)


def ffn_hidden(x_BxTxD: Array, lp: Params, activation: str, threshold: float = 0.0) -> tuple[Array, Array]:
    """(x1, act(gate)), both [B, T, F], from one layer's ``w_gate_DxF`` / ``w_up_DxF`` (``ffn_product``)."""
    dt = x_BxTxD.dtype
    B, T, D = x_BxTxD.shape
    x_MxD = x_BxTxD.reshape(B * T, D)  # 2-D GEMMs: XLA:CPU emits no transposes for their gradients
    gate_BxTxF = (x_MxD @ lp["w_gate_DxF"].astype(dt)).reshape(B, T, -1)
    up_BxTxF = (x_MxD @ lp["w_up_DxF"].astype(dt)).reshape(B, T, -1)
    return ffn_product(activation, gate_BxTxF, up_BxTxF, threshold)


def ffn_down(x1_BxTxF: Array, lp: Params) -> Array:
    """The FFN's down projection x1 @ W_down, [B, T, D]."""
    B, T, F = x1_BxTxF.shape
    return (x1_BxTxF.reshape(B * T, F) @ lp["w_down_FxD"].astype(x1_BxTxF.dtype)).reshape(B, T, -1)


def gated_ffn(x_BxTxD: Array, lp: Params, layer: Array, valid_BxT: Array, cfg: ModelConfig,
              x1_mask: X1Mask | None) -> tuple[Array, Array, Array]:
    """The model's FFN of one layer with the x1 hook applied: (output [B, T, D], x1 [B, T, F], act(gate) [B, T, F])."""
    x1_BxTxF, act_BxTxF = ffn_hidden(x_BxTxD, lp, cfg.activation, cfg.activation_threshold)
    if x1_mask is not None:
        ffn_input = (x_BxTxD,) if takes_ffn_input(x1_mask) else ()
        x1_BxTxF = x1_mask(layer, x1_BxTxF, act_BxTxF, valid_BxT, *ffn_input)
    return ffn_down(x1_BxTxF, lp), x1_BxTxF, act_BxTxF


def neuron_output_norms(x1_BxTxF: Array, w_down_norms_F: Array) -> Array:
    """n_i = |x1_i| * ||W_down[i, :]|| (float32, [B, T, F]): the norm of neuron i's contribution to the FFN output."""
    return jnp.abs(x1_BxTxF.astype(jnp.float32)) * w_down_norms_F


def w_down_norms(params: Params) -> Array:
    """||W_down[i, :]|| per layer and neuron, [L, F] float32 (params in either layer layout)."""
    return jnp.linalg.norm(layer_param(params, "w_down_LxFxD").astype(jnp.float32), axis=-1)


def neuron_norm_mask(params: Params, taus_L: Any) -> X1Mask:
    """The sparse mode's hook (CETT, Sparsing Law §4.1): neuron i of layer l is dropped iff n_i <= tau_l, the rule
    of :func:`prosparse_jax.analysis.sparsity.cett`'s tail, so the sparse mode runs what it measured."""
    norms_LxF = w_down_norms(params)
    taus = jnp.asarray(taus_L, jnp.float32)

    def mask(layer: Array, x1_BxTxF: Array, act_gate_BxTxF: Array, valid_BxT: Array, x_BxTxD: Array | None = None
             ) -> Array:
        del act_gate_BxTxF, valid_BxT, x_BxTxD
        dropped_BxTxF = neuron_output_norms(x1_BxTxF, norms_LxF[layer]) <= taus[layer]
        return jnp.where(dropped_BxTxF, jnp.zeros_like(x1_BxTxF), x1_BxTxF)

    return mask


def sparse_mode_mask(params: Params, cfg: ModelConfig) -> X1Mask | None:
    """The config's sparse mode (``cfg.neuron_thresholds``, :func:`neuron_norm_mask`), or None when dense."""
    return neuron_norm_mask(params, cfg.neuron_thresholds) if cfg.neuron_thresholds else None


def layer_stats(x1_BxTxF: Array, valid_BxT: Array) -> tuple[Array, Array]:
    """(mean |x1|, fraction of exact zeros), each over valid tokens x d_ff, float32 scalars."""
    w_BxTx1 = valid_BxT.astype(jnp.float32)[..., None]
    n = jnp.maximum(jnp.sum(w_BxTx1), 1.0) * x1_BxTxF.shape[-1]
    mean_abs = jnp.sum(jnp.abs(x1_BxTxF).astype(jnp.float32) * w_BxTx1) / n
    zeros = jnp.sum((x1_BxTxF == 0).astype(jnp.float32) * w_BxTx1) / n
    return mean_abs, zeros


# ---------------------------------------------------------------------------------------------------------------
# The decoder block and the layer loop
# ---------------------------------------------------------------------------------------------------------------
# The attention of one layer: ``attend(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH) -> (o_BxTxNxH, aux)`` over the layer's new
# queries (RoPE'd, pre-scaled by H^-0.5), keys (RoPE'd) and values: causal self-attention in :func:`forward`; a KV
# cache write and the attention over the cache in decoding (``aux``: the layer's updated cache).
LayerAttention = Callable[[Array, Array, Array], tuple[Array, Any]]
# The FFN of one layer: ``ffn(x_BxTxD, lp) -> (out_BxTxD, aux)`` of the normed hidden states (``aux``: statistics).
LayerFFN = Callable[[Array, Params], tuple[Array, Any]]
# One layer of :func:`run_layers`: ``layer_fn(h_BxTxD, lp, layer, inputs) -> (h_BxTxD, out)``.
LayerFn = Callable[[Array, Params, Array, Any], tuple[Array, Any]]


def decoder_block(h_BxTxD: Array, lp: Params, rope_cs: tuple[Array, Array], attend: LayerAttention, ffn: LayerFFN,
                  cfg: ModelConfig) -> tuple[Array, tuple[Any, Any]]:
    """One pre-norm block: h += attn(norm(h)) * r; h += ffn(norm(h)) * r. Returns (h, (attend's aux, ffn's aux))."""
    dt, r = h_BxTxD.dtype, cfg.residual_scale
    q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = project_qkv(rms_norm(h_BxTxD, lp["attn_norm_D"], cfg.norm_eps), lp, rope_cs,
                                                  cfg)
    o_BxTxNxH, attend_aux = attend(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH)
    h_BxTxD = h_BxTxD + (attention_output(o_BxTxNxH, lp) * r).astype(dt)
    out_BxTxD, ffn_aux = ffn(rms_norm(h_BxTxD, lp["ffn_norm_D"], cfg.norm_eps), lp)
    return h_BxTxD + (out_BxTxD * r).astype(dt), (attend_aux, ffn_aux)


def run_layers(params: Params, h_BxTxD: Array, layer_fn: LayerFn, per_layer_inputs: Any = ()
               ) -> tuple[Array, Any]:
    """Runs ``layer_fn`` over every layer: ``lax.scan`` over the stacked layout, unrolled over the per-layer one.

    ``layer_fn`` gets the layer's parameters under their in-layer names, its int32 index and its slice of
    ``per_layer_inputs`` (a pytree of [L, ...] leaves). Returns (h, the layers' outputs stacked on a leading [L]).
    """
    if is_per_layer(params):
        outs = []
        for i, group in enumerate(params["layers"]):
            lp = _in_layer(jax.tree.map(lambda x: x[0], group))
            h_BxTxD, out = layer_fn(h_BxTxD, lp, jnp.int32(i), jax.tree.map(lambda x, i=i: x[i], per_layer_inputs))
            outs.append(out)
        return h_BxTxD, jax.tree.map(lambda *z: jnp.stack(z), *outs)

    def body(h_BxTxD: Array, xs: tuple[Params, Array, Any]) -> tuple[Array, Any]:
        lp, layer, inputs = xs
        return layer_fn(h_BxTxD, _in_layer(lp), layer, inputs)

    n_layers = jax.tree.leaves(params["layers"])[0].shape[0]
    return jax.lax.scan(body, h_BxTxD, (params["layers"], jnp.arange(n_layers, dtype=jnp.int32), per_layer_inputs))


def forward(
    params: Params, ids_BxT: Array, cfg: ModelConfig, *, segment_ids_BxT: Array | None = None,
    positions_BxT: Array | None = None, x1_mask: X1Mask | None = None, capture: bool = False,
    attn_block: int = attention_lib.ATTN_BLOCK, logits_at_BxK: Array | None = None,
) -> tuple[Array, FFNStats]:
    """Runs the decoder.

    Args:
      params: from :func:`init_params`, in either layer layout.
      segment_ids_BxT: packed-sequence ids; attention stays within a segment; id 0 marks padding (excluded from the
        statistics). None = one sequence per row.
      positions_BxT: RoPE positions (restart at 0 per segment when packing). None = 0..T-1.
      x1_mask: a hook that masks x1 in every layer (:data:`X1Mask`). None = the config's sparse mode
        (:func:`sparse_mode_mask`) when set, else dense; a given hook replaces it.
      capture: also return the full x1 and act(gate) tensors in the stats.
      attn_block: query rows per block of the ``xla_blocks`` attention.
      logits_at_BxK: int32 indices into T per row: the LM head runs on those positions only (scoring a few tokens
        of long rows skips the head, the largest matmul of a small model, elsewhere). None = every position.

    Returns:
      (float32 logits_BxTxV, or logits_BxKxV at ``logits_at_BxK``; :class:`FFNStats`).
    """
    B, T = ids_BxT.shape
    if positions_BxT is None:
        positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    valid_BxT = jnp.ones((B, T), bool) if segment_ids_BxT is None else segment_ids_BxT != 0
    mask = attention_lib.prepare(cfg.attention, segment_ids_BxT, B, T, dtype=jnp.dtype(cfg.dtype), block=attn_block)
    rope_cs = rope_tables(positions_BxT, cfg.head_dim, cfg.rope_theta)
    if x1_mask is None:
        x1_mask = sparse_mode_mask(params, cfg)

    def attend(q_BxTxNxH: Array, k_BxTxKxH: Array, v_BxTxKxH: Array) -> tuple[Array, tuple[()]]:
        return attention_lib.attend(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask), ()

    def layer(h_BxTxD: Array, lp: Params, i: Array, _: Any) -> tuple[Array, tuple[Array, ...]]:
        def ffn(x_BxTxD: Array, lp: Params) -> tuple[Array, tuple[Array, ...]]:
            out_BxTxD, x1_BxTxF, act_BxTxF = gated_ffn(x_BxTxD, lp, i, valid_BxT, cfg, x1_mask)
            return out_BxTxD, layer_stats(x1_BxTxF, valid_BxT) + ((x1_BxTxF, act_BxTxF) if capture else ())

        h_BxTxD, (_, stats) = decoder_block(h_BxTxD, lp, rope_cs, attend, ffn, cfg)
        return h_BxTxD, stats

    if cfg.remat:
        layer = jax.checkpoint(layer, prevent_cse=False)
    h_BxTxD, stats = run_layers(params, embed(params, ids_BxT, cfg), layer)
    if logits_at_BxK is not None:
        h_BxTxD = jnp.take_along_axis(h_BxTxD, logits_at_BxK[..., None], axis=1)
    return head_logits(params, h_BxTxD, cfg), FFNStats(*stats)


def head_logits(params: Params, h_BxTxD: Array, cfg: ModelConfig) -> Array:
    """float32 logits [B, T, V] of the last hidden states: final RMSNorm, MiniCPM's divisor, LM head."""
    (B, T, _), dt = h_BxTxD.shape, h_BxTxD.dtype
    h_BxTxD = rms_norm(h_BxTxD, params["final_norm_D"], cfg.norm_eps) / jnp.asarray(cfg.logits_divisor, dt)
    head_DxV = params["embed_VxD"].T if cfg.tie_embeddings else params["lm_head_DxV"]
    return jnp.dot(h_BxTxD.reshape(B * T, -1), head_DxV.astype(dt),
                   preferred_element_type=jnp.float32).reshape(B, T, -1)


def cross_entropy(
    logits_BxTxV: Array, targets_BxT: Array, weights_BxT: Array | None = None
) -> Array:
    """Mean next-token cross-entropy (float32) over tokens with non-zero weight."""
    # Fused form: nll = logsumexp(z) - z[target]; the target logit is picked by a compare against an iota (its
    # gradient is an elementwise select, not a scatter into a [B, T, V] buffer of zeros).
    z_BxTxV = logits_BxTxV.astype(jnp.float32)
    m_BxT = jax.lax.stop_gradient(jnp.max(z_BxTxV, axis=-1))
    lse_BxT = jnp.log(jnp.sum(jnp.exp(z_BxTxV - m_BxT[..., None]), axis=-1)) + m_BxT
    hit_BxTxV = jax.lax.broadcasted_iota(jnp.int32, z_BxTxV.shape, 2) == targets_BxT[..., None]
    nll_BxT = lse_BxT - jnp.sum(jnp.where(hit_BxTxV, z_BxTxV, 0.0), axis=-1)
    if weights_BxT is None:
        return nll_BxT.mean()
    w = weights_BxT.astype(jnp.float32)
    return jnp.sum(nll_BxT * w) / jnp.maximum(w.sum(), 1.0)


MAX_LOG_PPL = 50.0  # perplexities are reported as exp(min(loss, 50)): a diverged loss stays a finite number


def perplexity(loss: float) -> float:
    """exp(loss) of a mean next-token cross-entropy (exponent capped at :data:`MAX_LOG_PPL`)."""
    return float(math.exp(min(float(loss), MAX_LOG_PPL)))


def ppl_ratio(loss: float, ref_loss: float) -> float:
    """The perplexity ratio exp(loss - ref_loss) of a model run against a reference run of it (capped likewise)."""
    return float(math.exp(min(float(loss) - float(ref_loss), MAX_LOG_PPL)))


def fold_minicpm_scales(params: Params, cfg: ModelConfig) -> tuple[Params, ModelConfig]:
    """The equivalent plain LLaMA model (all scales 1, untied head), so a MiniCPM model loads as LlamaForCausalLM:
    embed *= scale_emb; lm_head = head / (d_model / dim_model_base); wo and w_down *= scale_depth / sqrt(L)."""
    params = stack_layers(params)
    head_DxV = params["embed_VxD"].T if cfg.tie_embeddings else params["lm_head_DxV"]
    r = cfg.residual_scale
    layers = dict(params["layers"])
    layers["wo_LxNxHxD"] = layers["wo_LxNxHxD"] * r
    layers["w_down_LxFxD"] = layers["w_down_LxFxD"] * r
    folded = {
        "embed_VxD": params["embed_VxD"] * cfg.scale_emb,
        "layers": layers,
        "final_norm_D": params["final_norm_D"],
        "lm_head_DxV": head_DxV / cfg.logits_divisor,
    }
    # the sparse mode's thresholds are on |x1_i| * ||W_down[i]||, which the folding scales by r too
    return folded, cfg.replace(scale_emb=1.0, scale_depth=0.0, dim_model_base=0, tie_embeddings=False,
                               neuron_thresholds=tuple(t * r for t in cfg.neuron_thresholds))
