r"""Generates text with a KV cache (:mod:`prosparse_jax.inference.decode`), with speed and per-layer sparsity stats
(command line: :mod:`prosparse_jax.main.generate`; docs/inference.md).

Sampling: temperature 0 is greedy; else softmax(logits / T) restricted to the top_k tokens (0 = all) and to the
smallest set whose probability reaches top_p (nucleus sampling, Holtzman et al. 2020, arXiv:1904.09751).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from prosparse_jax import files
from prosparse_jax.config import ModelConfig
from prosparse_jax.data.corpus import EOS_TOKEN
from prosparse_jax.errors import ConfigError, UsageError
from prosparse_jax.inference import score
from prosparse_jax.inference import sparse_ffn as sparse_ffn_lib
from prosparse_jax.inference.decode import (
    HOOK_AUX,
    FFNImpl,
    KVCache,
    decode_step,
    dense_ffn,
    hooked_ffn,
    init_cache,
    prefill,
)
from prosparse_jax.model import transformer as model
from prosparse_jax.model.activations import RELU_FAMILY
from prosparse_jax.predictor import core as predictor_core
from prosparse_jax.predictor import io as predictor_io
from prosparse_jax.training import checkpoint
from prosparse_jax.training.model_io import load_model, read_thresholds

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


def left_pad(prompts_ids: list[list[int]], pad_id: int = 0, pad_to: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, P] int32 left-padded with ``pad_id``, padding count per row [B] int32); P = the longest prompt, or
    ``pad_to`` if longer."""
    if not prompts_ids or any(len(p) == 0 for p in prompts_ids):
        raise ValueError("every prompt needs at least one token")
    P = max(pad_to, *(len(p) for p in prompts_ids))
    ids_BxP = np.full((len(prompts_ids), P), pad_id, np.int32)
    for b, p in enumerate(prompts_ids):
        ids_BxP[b, P - len(p):] = p
    return ids_BxP, np.asarray([P - len(p) for p in prompts_ids], np.int32)


@contextlib.contextmanager
def _ctrl_c_held() -> Iterator[list[int]]:
    """Within the block Ctrl-C only appends to the yielded list, which the code checks where it can stop cleanly: a
    KeyboardInterrupt cuts an XLA compilation (the process then crashes at exit, jax 0.10) and is lost when it lands
    in a gc callback. Changes nothing off the main thread or where SIGINT has another handler than Python's default."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield []
        return
    got: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    try:
        yield got
    finally:
        signal.signal(signal.SIGINT, previous)


def _timed(fn: Any, *args: Any, **kw: Any) -> tuple[Any, Any, float]:
    """(compiled fn, its outputs, run seconds): compiles ahead of time so the timing excludes compilation."""
    compiled = fn.lower(*args, **kw).compile()
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    return compiled, out, time.perf_counter() - t0


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """A :class:`UsageError` unless temperature is finite and >= 0, top_k >= 0 and 0 < top_p <= 1 (NaN fails)."""
    if not (math.isfinite(temperature) and temperature >= 0 and top_k >= 0 and 0 < top_p <= 1):
        raise UsageError(f"sampling needs a finite temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got temperature="
                         f"{temperature}, top_k={top_k}, top_p={top_p}")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`generate`: ``tokens`` of the ``max_new_tokens`` per row were sampled by then (dropped)."""

    def __init__(self, tokens: int, max_new_tokens: int) -> None:
        super().__init__(f"interrupted after {tokens} of {max_new_tokens} new tokens")
        self.tokens, self.max_new_tokens = tokens, max_new_tokens


def generate(params: model.Params, cfg: ModelConfig, prompts_ids: list[list[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id: int | None = None,
             ffn: FFNImpl | None = None, chunk_tokens: int | None = None,
             x1_hook: Callable[[model.Params, Any], model.X1Mask] | None = None, x1_hook_aux: Any = None,
             stop: Callable[[list[list[int]]], bool] | None = None, pad_to: int = 0
             ) -> tuple[list[list[int]], GenerateStats]:
    """Continues every prompt by up to ``max_new_tokens`` tokens (a row stops after emitting ``eos_id``).

    Args:
      cfg: ``cfg.neuron_thresholds`` apply as in :func:`model.forward`.
      prompts_ids: token ids per prompt (different lengths are left-padded into one batch).
      temperature, top_k, top_p, seed: sampling (:func:`sample`); temperature 0 = greedy.
      eos_id: a row ends after producing this token (included in its output). None = never.
      ffn: the FFN hook of every layer in the decode steps (:data:`prosparse_jax.inference.decode.FFNImpl`); None =
        :func:`decode.dense_ffn`. The prefill always runs the dense FFN (with the same sparse-mode mask).
      chunk_tokens: decode steps per on-device loop call (:func:`decode_chunk`); the host checks for Ctrl-C and EOS
        between calls. None sizes each call to about :data:`CHUNK_SECONDS`: the first from the prefill's time (1 step
        with a non-default ``ffn``), the next ones from the measured speed. The tokens do not depend on it.
      x1_hook, x1_hook_aux: a sparse mode the config cannot express, as :func:`model.forward`'s x1 hook
        ``x1_hook(params, x1_hook_aux)`` (:func:`decode.hooked_ffn`), in the prefill and every decode step; not with
        ``ffn``. ``x1_hook_aux`` (its arrays) travels with the params, so another value of it compiles nothing.
      stop: called with every row's new tokens so far after each decode call; True ends the generation there (e.g.
        every row has produced a stop sequence). Rows may then hold tokens past their stop (cut them); the tokens
        before it are those of a generation without ``stop``. With ``stop`` one call is in flight at a time.
      pad_to: left-pad the prompts to at least this many tokens (the same tokens: padding is masked), so calls with
        prompts of different lengths share compiled shapes.

    Returns:
      (new tokens per prompt, :class:`GenerateStats`).

    Raises:
      Interrupted: Ctrl-C (SIGINT, with Python's default handler) in the call: it stops after the compilation or
        prefill under way, or within two chunks of the decode loop.
    """
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens: must be at least 1, got {max_new_tokens}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise UsageError(f"chunk_tokens: must be at least 1 (or None), got {chunk_tokens}")
    check_sampling(temperature, top_k, top_p)
    prefill_ffn = dense_ffn
    if x1_hook is not None:
        if ffn is not None:
            raise UsageError("generate: pass an FFN hook (ffn) or an x1 hook (x1_hook), not both")
        params = dict(params, **{HOOK_AUX: x1_hook_aux})
        ffn = prefill_ffn = hooked_ffn(x1_hook)
    ffn = ffn or dense_ffn
    # per-layer layout: the decode step reads each layer's weights in place (a scan over stacked layers copies each
    # layer's slice every step). Params already per-layer (prepare_sparse_params, model.unstack_layers) are not copied.
    params = cast_weights(model.unstack_layers(params), cfg)
    ids_BxP, pad_B = left_pad(prompts_ids, pad_to=pad_to)
    B, P = ids_BxP.shape
    with _ctrl_c_held() as ctrl_c:
        state, t_prefill, t_decode = _prefill_and_decode(
            params, jnp.asarray(ids_BxP), init_cache(cfg, B, P + max_new_tokens, pad_B), jax.random.key(seed),
            max_new_tokens=max_new_tokens, cfg=cfg, ffn_impl=ffn, prefill_ffn=prefill_ffn, chunk_tokens=chunk_tokens,
            ctrl_c=ctrl_c, stop=stop, sampling=dict(eos_id=eos_id, temperature=temperature, top_k=top_k, top_p=top_p))
    out, zeros_L, decoded = np.asarray(state.out_BxN), np.asarray(state.zeros_L), int(state.decoded)
    out = out[:, :int(state.i)]  # the tokens sampled (fewer than max_new_tokens when stop ended the loop)
    news = [list(out[b, :_length(out[b], eos_id)]) for b in range(B)]
    stats = GenerateStats(
        prefill_tokens_per_s=float(B * P / max(t_prefill, 1e-9)),
        decode_tokens_per_s=float(decoded / t_decode) if decoded and t_decode > 0 else 0.0,
        sparsity_per_layer=[float(z / max(decoded * cfg.d_ff, 1)) for z in zeros_L],
        prefill_tokens=int(B * P), decoded_tokens=decoded)
    return [[int(t) for t in n] for n in news], stats


#: Parameters decode reads only through matmuls in the compute dtype (attention, the FFN, the LM head, and the
#: transposed copies of :func:`prepare_sparse_params`): :func:`cast_weights` casts them once. Norm weights and
#: embeddings (used in float32) and the float32 neuron norms and predictor arrays keep their dtype.
MATMUL_WEIGHTS = ("wq_", "wk_", "wv_", "wo_", "w_gate_", "w_up_", "w_down_", "lm_head_")
KEEP_FLOAT32 = ("w_down_norms_",)


def cast_weights(params: model.Params, cfg: ModelConfig) -> model.Params:
    """``params`` with the matmul weights (:data:`MATMUL_WEIGHTS`) in the compute dtype ``cfg.dtype``, cast once
    before decoding: the model casts them at every use (``x @ w.astype(dt)``), which inside the decode loop converts
    every weight of a float32 checkpoint in every step. The same numbers: a cast of an already cast weight is
    exact."""
    dt = jnp.dtype(cfg.dtype)
    if dt == jnp.float32:
        return params

    def cast(path: tuple[Any, ...], v: Any) -> Any:
        name = str(getattr(path[-1], "key", ""))
        if name.startswith(MATMUL_WEIGHTS) and not name.startswith(KEEP_FLOAT32) and jnp.issubdtype(v.dtype,
                                                                                                    jnp.floating):
            return v.astype(dt)
        return v

    return jax.tree_util.tree_map_with_path(cast, params)


CHUNK_SECONDS = 0.1  # target run time of one decode_chunk call when chunk_tokens is None: the Ctrl-C latency


def _prefill_and_decode(params: model.Params, ids_BxP: Array, cache: KVCache, key: Array, *, max_new_tokens: int,
                        cfg: ModelConfig, ffn_impl: FFNImpl, prefill_ffn: FFNImpl, sampling: dict[str, Any],
                        chunk_tokens: int | None, ctrl_c: list[int], stop: Callable[[list[list[int]]], bool] | None
                        ) -> tuple[DecodeState, float, float]:
    """:func:`prefill`, :func:`decode_start`, then :func:`decode_chunk` until every row has emitted EOS, ``stop``
    says so or ``max_new_tokens`` are sampled: (final state, prefill seconds, decode seconds), compilation excluded.

    Two calls are in flight at a time: the host waits for one while the next runs, so the device does not idle
    between chunks; a non-empty ``ctrl_c`` raises :class:`Interrupted` after the call waited for. Without
    ``chunk_tokens`` the first call runs alone, its tokens from the prefill's time (a dense decode step runs the
    prefill's weights and cache for 1 token instead of P; another FFN hook may be far slower, e.g. an interpreted
    kernel: 1 token), and every later one decodes about :data:`CHUNK_SECONDS` at the mean speed so far (a step costs
    the same all along: it attends over the whole cache).
    """
    def stop_if_ctrl_c() -> None:  # between compilations: each takes seconds on a large model
        if ctrl_c:
            raise Interrupted(0, max_new_tokens)

    _, (logits_BxV, cache), t_prefill = _timed(prefill, params, ids_BxP, cache, cfg=cfg, ffn_impl=prefill_ffn)
    stop_if_ctrl_c()
    start = decode_start.lower(logits_BxV, cache, key, max_new_tokens=max_new_tokens, **sampling).compile()
    stop_if_ctrl_c()
    state_shapes = jax.eval_shape(functools.partial(decode_start, max_new_tokens=max_new_tokens, **sampling),
                                  logits_BxV, cache, key)
    chunk = decode_chunk.lower(params, state_shapes, np.int32(1), cfg=cfg, ffn_impl=ffn_impl, **sampling).compile()
    stop_if_ctrl_c()
    adapt = chunk_tokens is None
    if chunk_tokens is None:
        chunk_tokens = max(1, min(64, int(CHUNK_SECONDS / max(t_prefill, 1e-9)))) if ffn_impl is dense_ffn else 1
    t0 = time.perf_counter()
    state = start(logits_BxV, cache, key)
    del logits_BxV, cache  # the stacked cache is freed once the state holds its per-layer copy
    done = end = 1  # tokens per row sampled once the calls waited for / dispatched are done
    n = chunk_tokens
    pending: collections.deque[tuple[int, Array]] = collections.deque()  # (end, finished) per call in flight
    while True:
        while len(pending) < (1 if stop is not None or (adapt and done == 1) else 2) and end < max_new_tokens:
            end = min(end + n, max_new_tokens)
            state, finished = chunk(params, state, np.int32(end))
            pending.append((end, finished))
        if not pending:
            break
        call_end, finished = pending.popleft()
        if bool(finished):  # every row has emitted EOS: a call still in flight runs no step
            break
        done = call_end
        if ctrl_c:
            raise Interrupted(done, max_new_tokens)
        if stop is not None and stop([list(row) for row in np.asarray(state.out_BxN[:, :done])]):
            break
        if adapt:  # the mean speed so far (start and dispatch included: never overestimated)
            n = max(1, int(CHUNK_SECONDS * (done - 1) / max(time.perf_counter() - t0, 1e-9)))
    state = jax.block_until_ready(state)
    return state, t_prefill, time.perf_counter() - t0


class DecodeState(NamedTuple):
    """The carry of the decode loop: ``i`` tokens per row sampled so far (in ``out_BxN[:, :i]``), the last one
    ``tok_B`` (not yet run through the model), the KV cache, the rows still generating, the zeros of x1 per layer
    summed over the active rows of every step (float32), the decoded tokens (steps x active rows) and the RNG key.

    The cache's k and v are tuples of per-layer [B, S, K, H] arrays: :func:`decode_step` slices a stacked cache per
    layer and stacks the result, and on a per-layer carry XLA drops that copy of the whole cache in every step.
    """

    i: Array
    key: Array
    tok_B: Array  # noqa: N815
    cache: KVCache
    active_B: Array  # noqa: N815
    out_BxN: Array  # noqa: N815
    zeros_L: Array  # noqa: N815
    decoded: Array


def _draw(logits_BxV: Array, state: DecodeState, *, eos_id: int | None, temperature: float, top_k: int,
          top_p: float) -> DecodeState:
    """Samples token ``state.i`` of every row from ``logits_BxV`` (a row that emits ``eos_id`` stops)."""
    # greedy draws no randomness: splitting the key anyway costs a threefry per step (the key leaves every call)
    key, sub = (state.key, state.key) if temperature == 0.0 else jax.random.split(state.key)
    tok_B = sample(logits_BxV, sub, temperature=temperature, top_k=top_k, top_p=top_p)
    active_B = state.active_B & (tok_B != eos_id) if eos_id is not None else state.active_B
    return state._replace(i=state.i + 1, key=key, tok_B=tok_B, active_B=active_B,
                          out_BxN=state.out_BxN.at[:, state.i].set(tok_B))


@partial(jax.jit, static_argnames=("max_new_tokens", "eos_id", "temperature", "top_k", "top_p"))
def decode_start(logits_BxV: Array, cache: KVCache, key: Array, *, max_new_tokens: int, eos_id: int | None,
                 temperature: float, top_k: int, top_p: float) -> DecodeState:
    """The loop's first state: the first token sampled from the prefill's ``logits_BxV``, room for
    ``max_new_tokens``."""
    B, L = logits_BxV.shape[0], cache.k_LxBxSxKxH.shape[0]
    per_layer = cache._replace(k_LxBxSxKxH=tuple(cache.k_LxBxSxKxH[l] for l in range(L)),
                               v_LxBxSxKxH=tuple(cache.v_LxBxSxKxH[l] for l in range(L)))
    empty = DecodeState(jnp.int32(0), key, jnp.zeros((B,), jnp.int32), per_layer, jnp.ones((B,), bool),
                        jnp.zeros((B, max_new_tokens), jnp.int32), jnp.zeros((L,), jnp.float32), jnp.int32(0))
    return _draw(logits_BxV, empty, eos_id=eos_id, temperature=temperature, top_k=top_k, top_p=top_p)


@partial(jax.jit, static_argnames=("cfg", "ffn_impl", "eos_id", "temperature", "top_k", "top_p"),
         donate_argnames=("state",))
def decode_chunk(params: model.Params, state: DecodeState, end: Array, *, cfg: ModelConfig, ffn_impl: FFNImpl,
                 eos_id: int | None, temperature: float, top_k: int, top_p: float) -> tuple[DecodeState, Array]:
    """One on-device ``lax.while_loop`` of (:func:`decode_step`, :func:`sample`) from ``state`` until ``end`` tokens
    per row are sampled or every row has emitted ``eos_id``: (the state, whether every row has).

    Calls ending at e1 < e2 < ... < max_new_tokens sample the same tokens as one call ending at max_new_tokens.
    """
    def cond(s: DecodeState) -> Array:
        return (s.i < end) & jnp.any(s.active_B)

    def body(s: DecodeState) -> DecodeState:
        stacked = s.cache._replace(k_LxBxSxKxH=jnp.stack(s.cache.k_LxBxSxKxH),
                                   v_LxBxSxKxH=jnp.stack(s.cache.v_LxBxSxKxH))
        logits_BxV, cache, z_L = decode_step(params, s.tok_B, stacked, s.active_B, cfg=cfg, ffn_impl=ffn_impl)
        L = cache.k_LxBxSxKxH.shape[0]
        cache = cache._replace(k_LxBxSxKxH=tuple(cache.k_LxBxSxKxH[l] for l in range(L)),
                               v_LxBxSxKxH=tuple(cache.v_LxBxSxKxH[l] for l in range(L)))
        s = s._replace(cache=cache, zeros_L=s.zeros_L + z_L, decoded=s.decoded + jnp.sum(s.active_B, dtype=jnp.int32))
        return _draw(logits_BxV, s, eos_id=eos_id, temperature=temperature, top_k=top_k, top_p=top_p)

    state = jax.lax.while_loop(cond, body, state)
    return state, ~jnp.any(state.active_B)


def _length(row: np.ndarray, eos_id: int | None) -> int:
    """Tokens of a generated row up to and including its first EOS."""
    if eos_id is None:
        return len(row)
    hits = np.flatnonzero(row == eos_id)
    return int(hits[0]) + 1 if len(hits) else len(row)


#: The keys :func:`prepare_sparse_params` stores a predictor under in the layers (``pred_threshold_Lx1``: [L, 1], so
#: one layer's slice is a [1] array), from the predictor's own names (:mod:`prosparse_jax.predictor.core`).
PREDICTOR_KEYS = {"w1_LxDxR": "pred_w1_LxDxR", "w2_LxRxF": "pred_w2_LxRxF", "b2_LxF": "pred_b2_LxF"}


def prepare_sparse_params(params: model.Params, predictor: predictor_core.Predictor | None = None) -> model.Params:
    """``params`` plus W_up^T (``w_up_t_LxFxD``) and ||W_down[i, :]|| (``w_down_norms_LxF``), computed once instead of
    in every decode step, in the per-layer layout :func:`generate` decodes with. With ``predictor`` (stacked over
    layers, checked against the model by the caller), also W_gate^T (``w_gate_t_LxFxD``) and the predictor's arrays,
    so :func:`sparse_decode_ffn` decodes with it in every layer."""
    params = model.stack_layers(params)
    layers = dict(params["layers"])
    layers["w_up_t_LxFxD"] = jnp.swapaxes(layers["w_up_LxDxF"], 1, 2)
    layers["w_down_norms_LxF"] = model.w_down_norms(params)
    if predictor is not None:
        layers["w_gate_t_LxFxD"] = jnp.swapaxes(layers["w_gate_LxDxF"], 1, 2)
        for name, key in PREDICTOR_KEYS.items():
            layers[key] = jnp.asarray(predictor[name], jnp.float32)
        layers["pred_threshold_Lx1"] = jnp.asarray(predictor["threshold_L"], jnp.float32)[:, None]
    return model.unstack_layers(dict(params, layers=layers))


def _layer_predictor(lp: model.Params) -> sparse_ffn_lib.LayerPredictor | None:
    """The predictor :func:`prepare_sparse_params` stored in one layer's params (in-layer names), or None."""
    if "pred_w1_DxR" not in lp:
        return None
    return sparse_ffn_lib.LayerPredictor(lp["pred_w1_DxR"], lp["pred_w2_RxF"], lp["pred_b2_F"],
                                         lp["pred_threshold_1"][0])


def sparse_decode_ffn(params: model.Params, cfg: ModelConfig, implementation: str = "auto") -> Any:
    """The decode FFN hook (:data:`prosparse_jax.inference.decode.FFNImpl`) running the sparse FFN backend
    ``implementation`` (bind it with ``functools.partial``), with the layer's activation predictor where
    :func:`prepare_sparse_params` stored one. Its zeros per token are d_ff minus the size of the batch's union active
    set (a lower bound of each row's own count when B > 1)."""
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
            predictor=_layer_predictor(lp), w_gate_FxD=lp.get("w_gate_t_FxD"), implementation=implementation)
        zeros_BxT = jnp.broadcast_to((cfg.d_ff - count).astype(jnp.float32), (B, T))
        return out_BxD.reshape(B, T, -1).astype(x_BxTxD.dtype), zeros_BxT

    return ffn


def sparse_config(cfg: ModelConfig, sparse: bool, predictor: bool = False) -> ModelConfig:
    """The config :func:`generate_text` decodes with: the sparse mode's thresholds with ``sparse``, else a dense FFN.
    With a ``predictor`` a model without exact zeros needs no thresholds (the predictor's set is its sparse mode)."""
    if not sparse:
        return cfg.replace(neuron_thresholds=())
    if not cfg.neuron_thresholds and cfg.activation not in RELU_FAMILY and not predictor:
        raise UsageError(
            f"sparse: this {cfg.activation} model has no sparse-mode thresholds (model.neuron_thresholds); `python -m "
            "prosparse_jax.main.analyze --checkpoint=<it> --metric=pplp --value=1 --out=<dir>` finds them: pass "
            "generate --thresholds=<dir>/sparse_mode.json, or set model.neuron_thresholds in its config.json (or "
            "decode with an activation predictor: --predictor=<dir>)")
    return cfg


def check_prompt(prompt: str) -> None:
    """A :class:`UsageError` for an empty prompt or one that is not valid UTF-8 (bytes a command line could not
    decode reach Python as lone surrogates)."""
    if not prompt:
        raise UsageError("prompt: empty; give the text to continue")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(prompt[e.start])
        what = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"U+{c:04X}"
        raise UsageError(f"prompt: not valid UTF-8 text ({what} at character {e.start}); pass UTF-8 text") from None


def check_length(prompt_tokens: int, max_new_tokens: int, context: int, source: str) -> None:
    """A :class:`UsageError` unless the prompt plus ``max_new_tokens`` fit the model's ``context`` (from
    ``source``): the KV cache holds them all, and the model has not seen positions past its context."""
    if prompt_tokens >= context:
        than = "longer than" if prompt_tokens > context else "as long as"
        raise UsageError(f"prompt: {prompt_tokens} tokens, {than} the model's context of {context} ({source}); "
                         "shorten it to leave room for the new tokens")
    if prompt_tokens + max_new_tokens > context:
        raise UsageError(f"max_new_tokens: {max_new_tokens} new tokens after a prompt of {prompt_tokens} exceed the "
                         f"model's context of {context} tokens ({source}); ask for at most {context - prompt_tokens}")


DEFAULT_NEW_TOKENS = 64  # generate_text's max_new_tokens when none is given (fewer where the context is full)


def generate_text(checkpoint_path: str, prompt: str, *, step: int | None = None, max_new_tokens: int | None = None,
                  sparse: bool = False, implementation: str = "auto", temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0, seed: int = 0, thresholds: str | os.PathLike | None = None,
                  predictor: str | os.PathLike | None = None,
                  chunk_tokens: int | None = None) -> tuple[str, dict[str, Any]]:
    """(continuation, stats) of ``prompt`` by the model of a workdir or HF folder (at ``step``, default latest).

    ``sparse`` decodes in the sparse mode with the sparse FFN ``implementation``, with the model's
    ``model.neuron_thresholds`` or those of the sparse_mode.json ``thresholds`` (:func:`read_thresholds`); sampling
    and ``chunk_tokens`` as in :func:`generate`. ``predictor``: a saved activation predictor of this model
    (:func:`prosparse_jax.predictor.io.load_predictor`), used in every layer's decode FFN; it implies ``sparse``. The
    prompt plus ``max_new_tokens`` must fit the model's context (:func:`prosparse_jax.inference.score.context_window`):
    checked, with every argument, before the model is loaded.
    None: :data:`DEFAULT_NEW_TOKENS`, or as many as the context leaves.
    """
    from tokenizers import Tokenizer

    if max_new_tokens is not None and max_new_tokens < 1:
        raise UsageError(f"max_new_tokens: must be at least 1, got {max_new_tokens}")
    check_prompt(prompt)
    check_sampling(temperature, top_k, top_p)
    sparse = sparse or predictor is not None
    if thresholds is not None and not sparse:
        raise UsageError("thresholds: set the sparse mode, which the dense decode does not use; add --sparse")
    if predictor is not None:
        predictor_io.read_record(predictor)  # no predictor there: refused before the model is loaded
    files.check_model_path(checkpoint_path, "checkpoint")
    context, source = score.context_window(checkpoint_path)
    tok_path = Path(checkpoint_path) / "tokenizer.json"  # where load_model finds it, in a workdir or HF folder
    if not tok_path.is_file():
        raise checkpoint.CheckpointError(
            f"{checkpoint_path} has no tokenizer.json; copy the tokenizer used for training next to config.json")
    tok = Tokenizer.from_file(str(tok_path))
    ids = tok.encode(prompt).ids
    if not ids:
        raise UsageError("prompt: encodes to zero tokens; give some text")
    if max_new_tokens is None:
        max_new_tokens = max(1, min(DEFAULT_NEW_TOKENS, context - len(ids)))
    check_length(len(ids), max_new_tokens, context, source)
    taus = read_thresholds(thresholds) if thresholds is not None else None
    mcfg, params, _ = load_model(checkpoint_path, step)
    if taus is not None:
        try:
            mcfg = mcfg.replace(neuron_thresholds=taus)
        except ConfigError as e:
            raise UsageError(f"thresholds: {thresholds}: {e} (is it the analysis of another model?)") from None
    mcfg = sparse_config(mcfg, sparse, predictor is not None)
    pred = None
    if predictor is not None:
        pred, _ = predictor_io.load_predictor(Path(predictor), mcfg)  # another model's: refused, naming the mismatch
    eos = tok.token_to_id(EOS_TOKEN)
    if sparse:  # the sparse FFN kernel in every decode step, with its per-layer tensors prepared once
        params = prepare_sparse_params(params, pred)
    news, stats = generate(params, mcfg, [ids], max_new_tokens=max_new_tokens, eos_id=eos,
                           ffn=functools.partial(sparse_decode_ffn, implementation=implementation) if sparse else None,
                           temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, chunk_tokens=chunk_tokens)
    return tok.decode(news[0]), {
        "prefill_tokens_per_s": stats.prefill_tokens_per_s, "decode_tokens_per_s": stats.decode_tokens_per_s,
        "sparsity_per_layer": stats.sparsity_per_layer, "prompt_tokens": len(ids),
        "new_tokens": len(news[0]), "sparse": sparse, "predictor": None if predictor is None else str(predictor),
        "implementation": sparse_ffn_lib.resolve_implementation(implementation) if sparse else None}
