"""KV-cache inference with the model's own block (:func:`model.decoder_block`, :func:`model.run_layers`): prefill of
left-padded prompts, then one-token decode steps, with an attention that writes the cache and attends over it.

Cache: k and v are [L, B, S, K, H], S a fixed maximum length. Prompts are left-padded to a common length P, so every
row writes its t-th token to slot t; row b has ``pad_B[b]`` padding slots and its token at slot s has RoPE position
s - pad_B[b] (as in a forward of the unpadded row). Padding and unwritten slots are masked out of every query's keys.

FFN hook (:data:`FFNImpl`): ``ffn_impl(params, cfg)``, called inside the jitted step with the traced parameters,
returns ``ffn(layer, x_BxTxD, lp, valid_BxT) -> (out_BxTxD, zeros_BxT)``: the FFN of the normed hidden states (``lp``
under in-layer names) and the number of exact zeros of x1 per token.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache, partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from prosparse_jax.config import ModelConfig
from prosparse_jax.model import attention
from prosparse_jax.model import transformer as model

Array = jax.Array
Params = model.Params
FFN = Callable[[Array, Array, Params, Array], tuple[Array, Array]]
FFNImpl = Callable[[Params, ModelConfig], FFN]


class KVCache(NamedTuple):
    """RoPE'd keys / values of every layer per slot, the left-padding slots per row and ``length``, the number of
    slots written (the next token goes to slot ``length``)."""

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


def _model_ffn(cfg: ModelConfig, x1_mask: model.X1Mask | None) -> FFN:
    """The model's FFN with the x1 hook ``x1_mask`` (as :func:`model.forward` runs it) and x1's zeros per token."""

    def ffn(layer: Array, x_BxTxD: Array, lp: Params, valid_BxT: Array) -> tuple[Array, Array]:
        out_BxTxD, x1_BxTxF, _ = model.gated_ffn(x_BxTxD, lp, layer, valid_BxT, cfg, x1_mask)
        return out_BxTxD, jnp.sum((x1_BxTxF == 0).astype(jnp.float32), axis=-1)

    return ffn


def dense_ffn(params: Params, cfg: ModelConfig) -> FFN:
    """The default FFN hook: the model's FFN with the config's sparse mode (as :func:`model.forward`)."""
    return _model_ffn(cfg, model.sparse_mode_mask(params, cfg))


#: The params key under which :func:`hooked_ffn` finds its x1 hook's arrays (traced with the params, not baked into
#: the program).
HOOK_AUX = "x1_hook_aux"


@cache
def hooked_ffn(x1_hook: Callable[[Params, Any], model.X1Mask]) -> FFNImpl:
    """The FFN hook running the model's FFN with the x1 hook ``x1_hook(params, params[HOOK_AUX])`` in every layer: a
    sparse mode the config cannot express (Top-k, an activation predictor), computed as :func:`model.forward` computes
    it, token by token. One FFN hook per ``x1_hook`` (a static argument of the jitted steps: cached, so a second
    generation with the same hook compiles nothing)."""

    def impl(params: Params, cfg: ModelConfig) -> FFN:
        return _model_ffn(cfg, x1_hook(params, params[HOOK_AUX]))

    return impl


def _layers(params: Params, h_BxTxD: Array, cache: KVCache, slot0: Array, pos_BxT: Array,
            bias_blocks: attention.BiasBlocks, valid_BxT: Array, cfg: ModelConfig,
            ffn: FFN) -> tuple[Array, Array, Array, Array]:
    """All layers over T new tokens written at slots slot0..slot0+T-1: (h, new k, new v, zeros [L, B, T])."""
    dt = h_BxTxD.dtype
    rope_cs = model.rope_tables(pos_BxT, cfg.head_dim, cfg.rope_theta)

    def layer(h_BxTxD: Array, lp: Params, i: Array, kv: tuple[Array, Array]) -> tuple[Array, Any]:
        def attend(q_BxTxNxH: Array, k_BxTxKxH: Array, v_BxTxKxH: Array) -> tuple[Array, tuple[Array, Array]]:
            k_BxSxKxH, v_BxSxKxH = (jax.lax.dynamic_update_slice(c, new.astype(c.dtype), (0, slot0, 0, 0))
                                    for c, new in zip(kv, (k_BxTxKxH, v_BxTxKxH), strict=True))
            o = attention.attend(q_BxTxNxH, k_BxSxKxH.astype(dt), v_BxSxKxH.astype(dt), bias_blocks)
            return o, (k_BxSxKxH, v_BxSxKxH)

        return model.decoder_block(h_BxTxD, lp, rope_cs, attend, lambda x, lp: ffn(i, x, lp, valid_BxT), cfg)

    h_BxTxD, ((k, v), zeros) = model.run_layers(params, h_BxTxD, layer, (cache.k_LxBxSxKxH, cache.v_LxBxSxKxH))
    return h_BxTxD, k, v, zeros


@partial(jax.jit, static_argnames=("cfg", "ffn_impl"), donate_argnames=("cache",))
def prefill(params: Params, ids_BxP: Array, cache: KVCache, cfg: ModelConfig,
            ffn_impl: FFNImpl = dense_ffn) -> tuple[Array, KVCache]:
    """Runs the left-padded prompts into slots 0..P-1 of an empty cache: (float32 logits_BxV of each row's last
    prompt token, the cache with ``length = P``)."""
    B, P = ids_BxP.shape
    t_BxP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    valid_BxP = t_BxP >= cache.pad_B[:, None]
    pos_BxP = jnp.maximum(t_BxP - cache.pad_B[:, None], 0)
    # prompt tokens attend causally to the prompt tokens of their row (padding is segment 0, a segment of its own)
    bias_blocks = attention.bias_blocks(valid_BxP.astype(jnp.int32), B, P)
    h_BxPxD, k, v, _ = _layers(params, model.embed(params, ids_BxP, cfg), cache, jnp.zeros((), jnp.int32), pos_BxP,
                               bias_blocks, valid_BxP, cfg, ffn_impl(params, cfg))
    logits_Bx1xV = model.head_logits(params, h_BxPxD[:, -1:], cfg)
    return logits_Bx1xV[:, 0], KVCache(k, v, cache.pad_B, jnp.asarray(P, jnp.int32))


@partial(jax.jit, static_argnames=("cfg", "ffn_impl"), donate_argnames=("cache",))
def decode_step(params: Params, tok_B: Array, cache: KVCache, active_B: Array, cfg: ModelConfig,
                ffn_impl: FFNImpl = dense_ffn) -> tuple[Array, KVCache, Array]:
    """One token per row: writes ``tok_B`` at slot ``cache.length`` and returns its next-token logits.

    Args:
      tok_B: the last sampled token of each row.
      cache: donated: its buffers are reused for the returned one.
      active_B: bool, rows still generating (the sparsity counts only these).

    Returns:
      (float32 logits [B, V], updated cache, zeros of x1 per layer summed over the active rows [L] float32).
    """
    S = cache.k_LxBxSxKxH.shape[2]
    slot = cache.length
    pos_Bx1 = (slot - cache.pad_B)[:, None]
    s_S = jnp.arange(S, dtype=jnp.int32)
    allowed_BxS = (s_S[None, :] >= cache.pad_B[:, None]) & (s_S[None, :] <= slot)
    bias_blocks = [(0, 1, jnp.where(allowed_BxS, 0.0, attention.NEG_INF).astype(jnp.float32)[:, None, :])]
    h_Bx1xD, k, v, zeros_LxBx1 = _layers(params, model.embed(params, tok_B[:, None], cfg), cache, slot, pos_Bx1,
                                         bias_blocks, active_B[:, None], cfg, ffn_impl(params, cfg))
    logits_BxV = model.head_logits(params, h_Bx1xD, cfg)[:, 0]
    zeros_L = jnp.sum(zeros_LxBx1[..., 0] * active_B.astype(jnp.float32), axis=-1)
    return logits_BxV, KVCache(k, v, cache.pad_B, slot + 1), zeros_L
