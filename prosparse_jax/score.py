"""Scores a text with a model: per-token log-probabilities as JSON.

    python -m prosparse_jax.score --checkpoint=<workdir or HF folder> (--text="..." | --input=file.txt) [--step=N]

Output: ``{"token_ids", "tokens", "logprobs", "total_logprob", "num_tokens"}``; ``logprobs[i]`` = log p(t_i | t_<i)
for i >= 1 and ``logprobs[0]`` is null (nothing conditions the first token); ``total_logprob`` sums the non-null ones.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from prosparse_jax import checkpoint, cli, model

FLAGS = flags.FlagValues()  # own flag set: the CLI modules can be imported together (tests)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir or HF model folder.", flag_values=FLAGS)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of a workdir; default: the latest.", flag_values=FLAGS)
_TEXT = flags.DEFINE_string("text", None, "Text to score.", flag_values=FLAGS)
_INPUT = flags.DEFINE_string("input", None, "File whose contents are scored (instead of --text).", flag_values=FLAGS)
flags.mark_flags_as_required(["checkpoint"], flag_values=FLAGS)
flags.mark_flags_as_mutual_exclusive(["text", "input"], required=True, flag_values=FLAGS)


def score(checkpoint_path: str | os.PathLike, text: str, *, step: int | None = None) -> dict[str, Any]:
    """Tokenizes ``text`` with the checkpoint's tokenizer.json and returns the per-token log-probabilities."""
    from tokenizers import Tokenizer

    mcfg, params, tok_path = checkpoint.load_model(checkpoint_path, step)
    if tok_path is None:
        raise checkpoint.CheckpointError(
            f"{checkpoint_path} has no tokenizer.json; copy the tokenizer used for training next to config.json")
    tok = Tokenizer.from_file(str(tok_path))
    ids = tok.encode(text).ids
    if not ids:
        raise ValueError("the text encodes to zero tokens; nothing to score")
    if max(ids) >= mcfg.vocab_size:
        raise ValueError(f"tokenizer id {max(ids)} >= model vocab_size {mcfg.vocab_size}: tokenizer and model differ")
    logits_1xTxV, _ = jax.jit(model.forward, static_argnums=2)(params, jnp.asarray([ids], jnp.int32), mcfg)
    logp_TxV = np.asarray(jax.nn.log_softmax(logits_1xTxV[0].astype(jnp.float32), axis=-1))
    lps = [None] + [float(logp_TxV[i - 1, t]) for i, t in enumerate(ids) if i >= 1]
    return {
        "token_ids": [int(t) for t in ids],
        "tokens": [tok.id_to_token(t) for t in ids],
        "logprobs": lps,
        "total_logprob": float(sum(lp for lp in lps if lp is not None)),
        "num_tokens": len(ids),
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: parses ``argv`` (default ``sys.argv``), prints the JSON; returns the exit code."""
    def body() -> str:
        text = _TEXT.value if _TEXT.value is not None else Path(_INPUT.value).read_text()
        return json.dumps(score(_CHECKPOINT.value, text, step=_STEP.value))

    return cli.run("score", FLAGS, argv, body, (OSError, ValueError, checkpoint.CheckpointError), __doc__)


if __name__ == "__main__":
    sys.exit(main())
