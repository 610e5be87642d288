"""KV-cache inference with the training model's blocks: prefill of left-padded prompts, one-token decode steps.

No second decoder: a layer here is :func:`model.project_qkv` (projections + RoPE) -> cache write ->
:func:`model.attend` (the training attention, over the cache) -> an FFN hook -> :func:`model.head_logits`, with
the RMSNorms and MiniCPM scales of :func:`model.decoder_layer`.

Cache layout: k and v are [L, B, S, K, H] (S = a fixed maximum length). The prompts of a batch are left-padded to a
common length P, so every row writes its t-th token to slot t; row b has ``pad_B[b]`` padding slots and its token at
slot s has RoPE position s - pad_B[b] (the positions a full forward of the unpadded row uses). Padding slots and slots
not written yet are masked out of every query's keys.

FFN hook (:data:`FFNImpl`): ``ffn_impl(params, cfg) -> ffn`` is called inside the jitted step with the (traced)
parameters and returns ``ffn(layer, x_BxTxD, lp, valid_BxT) -> (out_BxTxD, zeros_BxT)``: the FFN output of the
normed hidden states and the number of exact zeros of x1 per token (activation sparsity). :func:`dense_ffn` is the
default: ``model.ffn_hidden``, the config's sparse-mode mask (``cfg.neuron_thresholds``, exactly as
:func:`model.forward`), ``model.ffn_down``; a sparse FFN kernel plugs in with the same signature.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from prosparse_jax.config import ModelConfig
from prosparse_jax.model import transformer as model

Array = jax.Array
Params = model.Params
FFN = Callable[[Array, Array, Params, Array], tuple[Array, Array]]
FFNImpl = Callable[[Params, ModelConfig], FFN]


class KVCache(NamedTuple):
    """Keys / values of every layer plus what says which slots hold tokens.

    k_LxBxSxKxH / v_LxBxSxKxH: RoPE'd keys and values per slot. pad_B: int32 left-padding slots per row.
    length: int32 scalar, the number of slots written (the next token goes to slot ``length``).
    """

    k_LxBxSxKxH: Array  # noqa: N815
    v_LxBxSxKxH: Array  # noqa: N815
    pad_B: Array  # noqa: N815
    length: Array


def init_cache(cfg: ModelConfig, batch: int, max_len: int, pad_B: Array) -> KVCache:
    """An empty cache of ``max_len`` slots for ``batch`` rows with ``pad_B`` left-padding slots each."""
    shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    dt = jnp.dtype(cfg.dtype)
    return KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt), jnp.asarray(pad_B, jnp.int32),
                   jnp.zeros((), jnp.int32))


def dense_ffn(params: Params, cfg: ModelConfig) -> FFN:
    """The default FFN hook: the training FFN with the config's sparse-mode mask (as :func:`model.forward`)."""
    x1_mask = model.neuron_norm_mask(params, cfg.neuron_thresholds) if cfg.neuron_thresholds else None

    def ffn(layer: Array, x_BxTxD: Array, lp: Params, valid_BxT: Array) -> tuple[Array, Array]:
        x1_BxTxF, act_BxTxF = model.ffn_hidden(x_BxTxD, lp, cfg)
        if x1_mask is not None:
            x1_BxTxF = x1_mask(layer, x1_BxTxF, act_BxTxF, valid_BxT)
        return model.ffn_down(x1_BxTxF, lp), jnp.sum((x1_BxTxF == 0).astype(jnp.float32), axis=-1)

    return ffn


def _layers(params: Params, h_BxTxD: Array, cache: KVCache, slot0: Array, pos_BxT: Array,
            bias_blocks: list[tuple[int, int, Array]], valid_BxT: Array, cfg: ModelConfig,
            ffn: FFN) -> tuple[Array, Array, Array, Array]:
    """All layers over T new tokens written at slots slot0..slot0+T-1: (h, new k, new v, zeros [L, B, T])."""
    dt, r = h_BxTxD.dtype, cfg.residual_scale
    rope_cs = model.rope_tables(pos_BxT, cfg.head_dim, cfg.rope_theta)

    def layer(h_BxTxD: Array, xs: tuple[Params, Array, Array, Array]) -> tuple[Array, tuple[Array, ...]]:
        lp, k_BxSxKxH, v_BxSxKxH, i = xs
        q, k, v = model.project_qkv(model.rms_norm(h_BxTxD, lp["attn_norm_LxD"], cfg.norm_eps), lp, rope_cs, cfg)
        k_BxSxKxH = jax.lax.dynamic_update_slice(k_BxSxKxH, k.astype(k_BxSxKxH.dtype), (0, slot0, 0, 0))
        v_BxSxKxH = jax.lax.dynamic_update_slice(v_BxSxKxH, v.astype(v_BxSxKxH.dtype), (0, slot0, 0, 0))
        a = model.attend(q, k_BxSxKxH.astype(dt), v_BxSxKxH.astype(dt), lp, bias_blocks, cfg)
        h_BxTxD = h_BxTxD + (a * r).astype(dt)
        out, zeros_BxT = ffn(i, model.rms_norm(h_BxTxD, lp["ffn_norm_LxD"], cfg.norm_eps), lp, valid_BxT)
        return h_BxTxD + (out * r).astype(dt), (k_BxSxKxH, v_BxSxKxH, zeros_BxT)

    if isinstance(params["layers"], (list, tuple)):  # per-layer layout: unrolled, each layer's weights read in place
        outs = []
        for i, group in enumerate(params["layers"]):
            lp = jax.tree.map(lambda x: x[0], group)
            h_BxTxD, o = layer(h_BxTxD, (lp, cache.k_LxBxSxKxH[i], cache.v_LxBxSxKxH[i], jnp.int32(i)))
            outs.append(o)
        k, v, zeros = (jnp.stack(z) for z in zip(*outs, strict=True))
        return h_BxTxD, k, v, zeros
    idx = jnp.arange(cfg.n_layers, dtype=jnp.int32)
    h_BxTxD, (k, v, zeros) = jax.lax.scan(layer, h_BxTxD, (params["layers"], cache.k_LxBxSxKxH,
                                                           cache.v_LxBxSxKxH, idx))
    return h_BxTxD, k, v, zeros


@partial(jax.jit, static_argnames=("cfg", "ffn_impl"), donate_argnames=("cache",))
def prefill(params: Params, ids_BxP: Array, cache: KVCache, cfg: ModelConfig,
            ffn_impl: FFNImpl = dense_ffn) -> tuple[Array, KVCache]:
    """Runs the left-padded prompts ``ids_BxP`` into an empty cache (slots 0..P-1).

    Returns (float32 logits [B, V] of each row's last prompt token, the cache with ``length = P``).
    """
    B, P = ids_BxP.shape
    t_BxP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    valid_BxP = t_BxP >= cache.pad_B[:, None]
    pos_BxP = jnp.maximum(t_BxP - cache.pad_B[:, None], 0)
    # prompt tokens attend causally to the prompt tokens of their row (padding is segment 0, a segment of its own)
    bias_blocks = model.attention_bias_blocks(valid_BxP.astype(jnp.int32), P, B)
    h_BxPxD = (params["embed_VxD"][ids_BxP] * cfg.scale_emb).astype(jnp.dtype(cfg.dtype))
    h_BxPxD, k, v, _ = _layers(params, h_BxPxD, cache, jnp.zeros((), jnp.int32), pos_BxP, bias_blocks,
                               valid_BxP, cfg, ffn_impl(params, cfg))
    logits_Bx1xV = model.head_logits(params, h_BxPxD[:, -1:], cfg)
    return logits_Bx1xV[:, 0], KVCache(k, v, cache.pad_B, jnp.asarray(P, jnp.int32))


@partial(jax.jit, static_argnames=("cfg", "ffn_impl"), donate_argnames=("cache",))
def decode_step(params: Params, tok_B: Array, cache: KVCache, active_B: Array, cfg: ModelConfig,
                ffn_impl: FFNImpl = dense_ffn) -> tuple[Array, KVCache, Array]:
    """One token per row: writes ``tok_B`` at slot ``cache.length`` and returns its next-token logits.

    Args:
      params: model parameters (either layer layout).
      tok_B: int token ids, the last sampled token of each row.
      cache: the cache (donated: its buffers are reused for the returned one).
      active_B: bool, rows still generating (the sparsity counts only these).
      cfg: model config.
      ffn_impl: the FFN hook (:data:`FFNImpl`).

    Returns:
      (float32 logits [B, V], updated cache, zeros of x1 per layer summed over the active rows [L] float32).
    """
    S = cache.k_LxBxSxKxH.shape[2]
    slot = cache.length
    pos_Bx1 = (slot - cache.pad_B)[:, None]
    s_S = jnp.arange(S, dtype=jnp.int32)
    allowed_BxS = (s_S[None, :] >= cache.pad_B[:, None]) & (s_S[None, :] <= slot)
    bias_blocks = [(0, 1, jnp.where(allowed_BxS, 0.0, model._NEG_INF).astype(jnp.float32)[:, None, :])]
    h_Bx1xD = (params["embed_VxD"][tok_B[:, None]] * cfg.scale_emb).astype(jnp.dtype(cfg.dtype))
    h_Bx1xD, k, v, zeros_LxBx1 = _layers(params, h_Bx1xD, cache, slot, pos_Bx1, bias_blocks, active_B[:, None],
                                         cfg, ffn_impl(params, cfg))
    logits_BxV = model.head_logits(params, h_Bx1xD, cfg)[:, 0]
    zeros_L = jnp.sum(zeros_LxBx1[..., 0] * active_B.astype(jnp.float32), axis=-1)
    return logits_BxV, KVCache(k, v, cache.pad_B, slot + 1), zeros_L
