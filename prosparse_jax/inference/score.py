"""Scores a text with a model: per-token log-probabilities (command line: :mod:`prosparse_jax.main.score`).

``logprobs[i]`` = log p(t_i | t_<i), null for i = 0 (nothing conditions the first token). A text longer than the
model's context (:func:`context_window`) is scored in windows overlapping by half (:func:`window_logprobs`), so no
forward exceeds the context; ``context`` in the result records how.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prosparse_jax import files
from prosparse_jax.config import ModelConfig
from prosparse_jax.errors import InputError, UsageError
from prosparse_jax.model import transformer as model
from prosparse_jax.training import checkpoint, model_io
from prosparse_jax.training.model_io import load_model

DEFAULT_WINDOW = 2048  # tokens; the context of a model whose config records none


def context_window(checkpoint_path: str | os.PathLike) -> tuple[int, str]:
    """(tokens, where that number comes from) of the context a model was trained / configured for
    (:func:`prosparse_jax.training.model_io.model_context`; a workdir's lost config.json is restored first)."""
    tokens = model_io.model_context(checkpoint_path)
    if tokens is not None:
        hf = model_io.is_hf_folder(checkpoint_path)
        return tokens, "the HF config's max_position_embeddings" if hf else "the run's data.seq_len"
    return DEFAULT_WINDOW, "the default: the model's context is not recorded"


def window_logprobs(params: model.Params, mcfg: ModelConfig, ids: list[int], window: int
                    ) -> tuple[list[float | None], int]:
    """(log p(t_i | t_<i) per token, None for the first; number of forwards), at most ``window`` tokens per forward.

    Windows of ``window`` tokens overlap by ``window // 2``: the first scores its tokens with all the context before
    them, every later one scores only its tokens not scored yet, each conditioned on at least ``window // 2``
    preceding tokens. The last window ends at the last token (one compiled shape for all but a short text).
    """
    fwd = jax.jit(model.forward, static_argnums=2)
    n, overlap = len(ids), window // 2
    lps: list[float | None] = [None] * n
    start, done, forwards = 0, 1, 0  # done: the first position not scored yet (position 0 never is)
    while done < n:
        end = min(start + window, n)
        start = max(end - window, 0)
        logits_1xTxV, _ = fwd(params, jnp.asarray([ids[start:end]], jnp.int32), mcfg)
        logp_TxV = np.asarray(jax.nn.log_softmax(logits_1xTxV[0].astype(jnp.float32), axis=-1))
        pos = np.arange(done, end)
        lps[done:end] = [float(x) for x in logp_TxV[pos - start - 1, np.asarray(ids)[pos]]]
        done, forwards = end, forwards + 1
        start = end - overlap
    return lps, forwards


def score(checkpoint_path: str | os.PathLike, text: str, *, step: int | None = None,
          window: int | None = None) -> dict[str, Any]:
    """The per-token log-probabilities of ``text`` under the checkpoint's model and tokenizer.json, scored in
    windows of ``window`` tokens (default: :func:`context_window`) when longer."""
    from tokenizers import Tokenizer

    if window is not None and window < 2:
        raise UsageError(f"window: must be at least 2 tokens, got {window}")
    files.check_model_path(checkpoint_path, "checkpoint")
    win, source = (window, "the window argument") if window is not None else context_window(checkpoint_path)
    mcfg, params, tok_path = load_model(checkpoint_path, step)
    if tok_path is None:
        raise checkpoint.CheckpointError(
            f"{checkpoint_path} has no tokenizer.json; copy the tokenizer used for training next to config.json")
    tok = Tokenizer.from_file(str(tok_path))
    ids = tok.encode(text).ids
    if not ids:
        raise UsageError("text: encodes to zero tokens; nothing to score")
    if max(ids) >= mcfg.vocab_size:
        raise InputError(f"tokenizer id {max(ids)} >= model vocab_size {mcfg.vocab_size}: tokenizer and model differ")
    lps, forwards = window_logprobs(params, mcfg, ids, win)
    policy = ("whole text in one forward" if forwards == 1 else
              f"{forwards} windows of {win} tokens overlapping by {win // 2}: every token after the first {win} is "
              f"conditioned on its {win // 2} to {win - 1} previous tokens only")
    return {
        "token_ids": [int(t) for t in ids],
        "tokens": [tok.id_to_token(t) for t in ids],
        "logprobs": lps,
        "total_logprob": float(sum(lp for lp in lps if lp is not None)),
        "num_tokens": len(ids),
        "context": {"window": win, "window_source": source, "windows": forwards, "policy": policy},
    }
