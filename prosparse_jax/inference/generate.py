r"""Generates text with a KV cache (:mod:`prosparse_jax.inference.decode`), with speed and per-layer sparsity stats
(command line: :mod:`prosparse_jax.main.generate`; docs/inference.md).

Sampling: temperature 0 is greedy; else softmax(logits / T) restricted to the top_k tokens (0 = all) and to the
smallest set whose probability reaches top_p (nucleus sampling, Holtzman et al. 2020, arXiv:1904.09751).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prosparse_jax import files
from prosparse_jax.config import ModelConfig
from prosparse_jax.data.corpus import EOS_TOKEN
from prosparse_jax.errors import UsageError
from prosparse_jax.inference import score
from prosparse_jax.inference import sparse_ffn as sparse_ffn_lib
from prosparse_jax.inference.decode import FFNImpl, KVCache, decode_step, dense_ffn, init_cache, prefill
from prosparse_jax.model import transformer as model
from prosparse_jax.model.activations import RELU_FAMILY
from prosparse_jax.training import checkpoint
from prosparse_jax.training.model_io import load_model

Array = jax.Array


@dataclass
class GenerateStats:
    """Speed and activation sparsity of one :func:`generate` call (compile time excluded)."""

    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    sparsity_per_layer: list[float]  # fraction of exact zeros of x1 over the decoded tokens x d_ff
    prefill_tokens: int
    decoded_tokens: int


@partial(jax.jit, static_argnames=("temperature", "top_k", "top_p"))
def sample(logits_BxV: Array, key: Array, *, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0) -> Array:
    """Next token per row, int32 [B]: argmax when ``temperature == 0``, else a top-k / top-p filtered sample."""
    if temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    z_BxV = logits_BxV.astype(jnp.float32) / temperature
    if top_k > 0:
        kth_Bx1 = jax.lax.top_k(z_BxV, min(top_k, z_BxV.shape[-1]))[0][:, -1:]
        z_BxV = jnp.where(z_BxV < kth_Bx1, -jnp.inf, z_BxV)
    if top_p < 1.0:
        sorted_BxV = jnp.sort(z_BxV, axis=-1)[:, ::-1]
        p_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        # keep a token iff the mass of the tokens before it is < top_p (the most likely token is always kept)
        before_BxV = jnp.cumsum(p_BxV, axis=-1) - p_BxV
        cut_Bx1 = jnp.min(jnp.where(before_BxV < top_p, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        z_BxV = jnp.where(z_BxV < cut_Bx1, -jnp.inf, z_BxV)
    return jax.random.categorical(key, z_BxV, axis=-1).astype(jnp.int32)


def left_pad(prompts_ids: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, P] int32 left-padded with ``pad_id``, padding count per row [B] int32); P = the longest prompt."""
    if not prompts_ids or any(len(p) == 0 for p in prompts_ids):
        raise ValueError("every prompt needs at least one token")
    P = max(len(p) for p in prompts_ids)
    ids_BxP = np.full((len(prompts_ids), P), pad_id, np.int32)
    for b, p in enumerate(prompts_ids):
        ids_BxP[b, P - len(p):] = p
    return ids_BxP, np.asarray([P - len(p) for p in prompts_ids], np.int32)


def _timed(fn: Any, *args: Any, **kw: Any) -> tuple[Any, Any, float]:
    """(compiled fn, its outputs, run seconds): compiles ahead of time so the timing excludes compilation."""
    compiled = fn.lower(*args, **kw).compile()
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    return compiled, out, time.perf_counter() - t0


def generate(params: model.Params, cfg: ModelConfig, prompts_ids: list[list[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id: int | None = None,
             ffn: FFNImpl | None = None) -> tuple[list[list[int]], GenerateStats]:
    """Continues every prompt by up to ``max_new_tokens`` tokens (a row stops after emitting ``eos_id``).

    Args:
      cfg: ``cfg.neuron_thresholds`` apply as in :func:`model.forward`.
      prompts_ids: token ids per prompt (different lengths are left-padded into one batch).
      temperature, top_k, top_p, seed: sampling (:func:`sample`); temperature 0 = greedy.
      eos_id: a row ends after producing this token (included in its output). None = never.
      ffn: the FFN hook of every layer in the decode steps (:data:`prosparse_jax.inference.decode.FFNImpl`); None =
        :func:`decode.dense_ffn`. The prefill always runs the dense FFN (with the same sparse-mode mask).

    Returns:
      (new tokens per prompt, :class:`GenerateStats`).
    """
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens: must be at least 1, got {max_new_tokens}")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise UsageError(f"sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got {temperature}, "
                         f"{top_k}, {top_p}")
    ffn = ffn or dense_ffn
    # per-layer layout: the decode step reads each layer's weights in place (a scan over stacked layers copies each
    # layer's slice every step). Params already per-layer (prepare_sparse_params, model.unstack_layers) are not copied.
    params = model.unstack_layers(params)
    ids_BxP, pad_B = left_pad(prompts_ids)
    B, P = ids_BxP.shape
    cache = init_cache(cfg, B, P + max_new_tokens, pad_B)
    _, (logits_BxV, cache), t_prefill = _timed(prefill, params, jnp.asarray(ids_BxP), cache, cfg=cfg)
    loop_args = (params, logits_BxV, cache, jax.random.key(seed))
    loop_kw = dict(cfg=cfg, ffn_impl=ffn, max_new_tokens=max_new_tokens, eos_id=eos_id, temperature=temperature,
                   top_k=top_k, top_p=top_p)
    _, (out_BxN, zeros_L, decoded), t_decode = _timed(decode_loop, *loop_args, **loop_kw)
    out, zeros_L, decoded = np.asarray(out_BxN), np.asarray(zeros_L), int(decoded)
    news = [list(out[b, :_length(out[b], eos_id)]) for b in range(B)]
    stats = GenerateStats(
        prefill_tokens_per_s=float(B * P / max(t_prefill, 1e-9)),
        decode_tokens_per_s=float(decoded / t_decode) if decoded and t_decode > 0 else 0.0,
        sparsity_per_layer=[float(z / max(decoded * cfg.d_ff, 1)) for z in zeros_L],
        prefill_tokens=int(B * P), decoded_tokens=decoded)
    return [[int(t) for t in n] for n in news], stats


@partial(jax.jit, static_argnames=("cfg", "ffn_impl", "max_new_tokens", "eos_id", "temperature", "top_k", "top_p"))
def decode_loop(params: model.Params, logits_BxV: Array, cache: KVCache, key: Array, *, cfg: ModelConfig,
                ffn_impl: FFNImpl, max_new_tokens: int, eos_id: int | None, temperature: float, top_k: int,
                top_p: float) -> tuple[Array, Array, Array]:
    """Samples up to ``max_new_tokens`` tokens per row after the prefill's ``logits_BxV`` in one on-device
    ``lax.while_loop`` of (:func:`decode_step`, :func:`sample`), until every row has emitted ``eos_id`` (the last
    sample runs no step).

    Returns:
      (tokens [B, max_new_tokens] int32, untrimmed after a row's EOS; zeros of x1 per layer summed over the active
      rows of every step [L] float32; decoded tokens (steps x active rows) int32).
    """
    B = logits_BxV.shape[0]

    def draw(logits: Array, key: Array, i: Array, out: Array, active: Array) -> tuple[Array, ...]:
        key, sub = jax.random.split(key)
        tok_B = sample(logits, sub, temperature=temperature, top_k=top_k, top_p=top_p)
        active = active & (tok_B != eos_id) if eos_id is not None else active
        return key, tok_B, out.at[:, i].set(tok_B), active

    key, tok_B, out, active = draw(logits_BxV, key, jnp.int32(0), jnp.zeros((B, max_new_tokens), jnp.int32),
                                   jnp.ones((B,), bool))

    def cond(c: tuple[Any, ...]) -> Array:
        i, _, _, _, active, *_ = c
        return (i < max_new_tokens) & jnp.any(active)

    def body(c: tuple[Any, ...]) -> tuple[Any, ...]:
        i, key, tok_B, cache, active, out, zeros_L, decoded = c
        logits, cache, z_L = decode_step(params, tok_B, cache, active, cfg=cfg, ffn_impl=ffn_impl)
        decoded = decoded + jnp.sum(active, dtype=jnp.int32)
        key, tok_B, out, active = draw(logits, key, i, out, active)
        return i + 1, key, tok_B, cache, active, out, zeros_L + z_L, decoded

    c0 = (jnp.int32(1), key, tok_B, cache, active, out, jnp.zeros((cfg.n_layers,), jnp.float32), jnp.int32(0))
    _, _, _, _, _, out, zeros_L, decoded = jax.lax.while_loop(cond, body, c0)
    return out, zeros_L, decoded


def _length(row: np.ndarray, eos_id: int | None) -> int:
    """Tokens of a generated row up to and including its first EOS."""
    if eos_id is None:
        return len(row)
    hits = np.flatnonzero(row == eos_id)
    return int(hits[0]) + 1 if len(hits) else len(row)


def prepare_sparse_params(params: model.Params) -> model.Params:
    """``params`` plus W_up^T (``w_up_t_LxFxD``) and ||W_down[i, :]|| (``w_down_norms_LxF``), computed once instead of
    in every decode step, in the per-layer layout :func:`generate` decodes with."""
    params = model.stack_layers(params)
    layers = dict(params["layers"])
    layers["w_up_t_LxFxD"] = jnp.swapaxes(layers["w_up_LxDxF"], 1, 2)
    layers["w_down_norms_LxF"] = model.w_down_norms(params)
    return model.unstack_layers(dict(params, layers=layers))


def sparse_decode_ffn(params: model.Params, cfg: ModelConfig, implementation: str = "auto") -> Any:
    """The decode FFN hook (:data:`prosparse_jax.inference.decode.FFNImpl`) running the sparse FFN backend
    ``implementation`` (bind it with ``functools.partial``). Its zeros per token are d_ff minus the size of the batch's
    union active set (a lower bound of each row's own count when B > 1)."""
    del params
    taus_L = jnp.asarray(cfg.neuron_thresholds, jnp.float32) if cfg.neuron_thresholds else None

    def ffn(layer: jax.Array, x_BxTxD: jax.Array, lp: model.Params, valid_BxT: jax.Array
            ) -> tuple[jax.Array, jax.Array]:
        del valid_BxT
        B, T, _ = x_BxTxD.shape  # T == 1 in decode steps
        norms_F = lp["w_down_norms_F"] if "w_down_norms_F" in lp else \
            jnp.linalg.norm(lp["w_down_FxD"].astype(jnp.float32), axis=-1)
        out_BxD, count = sparse_ffn_lib.sparse_ffn(
            x_BxTxD.reshape(B * T, -1), lp["w_gate_DxF"], lp["w_up_DxF"], lp["w_down_FxD"],
            activation=cfg.activation, threshold=cfg.activation_threshold,
            taus=None if taus_L is None else taus_L[layer], w_down_norms_F=norms_F, w_up_FxD=lp.get("w_up_t_FxD"),
            implementation=implementation)
        zeros_BxT = jnp.broadcast_to((cfg.d_ff - count).astype(jnp.float32), (B, T))
        return out_BxD.reshape(B, T, -1).astype(x_BxTxD.dtype), zeros_BxT

    return ffn


def sparse_config(cfg: ModelConfig, sparse: bool) -> ModelConfig:
    """The config :func:`generate_text` decodes with: the sparse mode's thresholds with ``sparse``, else a dense FFN."""
    if not sparse:
        return cfg.replace(neuron_thresholds=())
    if not cfg.neuron_thresholds and cfg.activation not in RELU_FAMILY:
        raise UsageError(
            f"sparse: this {cfg.activation} model has no model.neuron_thresholds; get them with `python -m "
            "prosparse_jax.main.analyze --metric=pplp --value=1` and set model.neuron_thresholds (its "
            "sparse_mode.json)")
    return cfg


def generate_text(checkpoint_path: str, prompt: str, *, step: int | None = None, max_new_tokens: int = 64,
                  sparse: bool = False, implementation: str = "auto", temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0, seed: int = 0) -> tuple[str, dict[str, Any]]:
    """(continuation, stats) of ``prompt`` by the model of a workdir or HF folder (at ``step``, default latest).

    ``sparse`` decodes in the sparse mode with the sparse FFN ``implementation``; sampling as in :func:`generate`.
    The prompt must fit the model's context (:func:`prosparse_jax.inference.score.context_window`).
    """
    from tokenizers import Tokenizer

    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens: must be at least 1, got {max_new_tokens}")
    if not prompt:
        raise UsageError("prompt: empty; give the text to continue")
    files.check_model_path(checkpoint_path, "checkpoint")
    context, source = score.context_window(checkpoint_path)
    mcfg, params, tok_path = load_model(checkpoint_path, step)
    if tok_path is None:
        raise checkpoint.CheckpointError(
            f"{checkpoint_path} has no tokenizer.json; copy the tokenizer used for training next to config.json")
    mcfg = sparse_config(mcfg, sparse)
    tok = Tokenizer.from_file(str(tok_path))
    ids = tok.encode(prompt).ids
    if not ids:
        raise UsageError("prompt: encodes to zero tokens; give some text")
    if len(ids) > context:
        raise UsageError(f"prompt: {len(ids)} tokens, longer than the model's context of {context} ({source});"
                             " shorten it")
    eos = tok.token_to_id(EOS_TOKEN)
    if sparse:  # the sparse FFN kernel in every decode step, with its per-layer tensors prepared once
        params = prepare_sparse_params(params)
    news, stats = generate(params, mcfg, [ids], max_new_tokens=max_new_tokens, eos_id=eos,
                           ffn=functools.partial(sparse_decode_ffn, implementation=implementation) if sparse else None,
                           temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    return tok.decode(news[0]), {
        "prefill_tokens_per_s": stats.prefill_tokens_per_s, "decode_tokens_per_s": stats.decode_tokens_per_s,
        "sparsity_per_layer": stats.sparsity_per_layer, "prompt_tokens": len(ids),
        "new_tokens": len(news[0]), "sparse": sparse,
        "implementation": sparse_ffn_lib.resolve_implementation(implementation) if sparse else None}
