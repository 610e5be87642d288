r"""Scores a text with a model: per-token log-probabilities as one JSON object.

    python -m prosparse_jax.main.score --checkpoint=<workdir or HF folder> (--text="..." | --input=file.txt) \
        [--step=N --window=N]

A text longer than the model's context (--window; default the run's data.seq_len, else the HF config's
max_position_embeddings) is scored in windows overlapping by half a window, with a warning on stderr. Output and
windows: :mod:`prosparse_jax.inference.score`.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from prosparse_jax import files
from prosparse_jax.inference.score import DEFAULT_WINDOW, score
from prosparse_jax.main import common


def _flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_string("checkpoint", None, "Workdir or HF model folder.", flag_values=fv)
    flags.DEFINE_integer("step", None, "Checkpoint step of a workdir; default: the latest.", flag_values=fv)
    flags.DEFINE_string("text", None, "Text to score.", flag_values=fv)
    flags.DEFINE_string("input", None, "File whose contents are scored (instead of --text).", flag_values=fv)
    flags.DEFINE_integer("window", None, "Context window in tokens; a longer text is scored in overlapping windows. "
                         "Default: the run's data.seq_len, else the HF config's max_position_embeddings, else "
                         f"{DEFAULT_WINDOW}.", flag_values=fv)
    flags.mark_flags_as_required(["checkpoint"], flag_values=fv)
    flags.mark_flags_as_mutual_exclusive(["text", "input"], required=True, flag_values=fv)
    return fv


def main(argv: list[str] | None = None) -> int:
    """Prints :func:`prosparse_jax.inference.score.score` as JSON; returns the exit code."""
    fv = _flags()

    def body() -> str:
        text = fv.text if fv.text is not None else files.read_text(fv.input, "--input")
        res = score(fv.checkpoint, text, step=fv.step, window=fv.window)
        ctx = res["context"]
        if ctx["windows"] > 1:
            print(f"score: warning: the text is {res['num_tokens']} tokens, longer than the context of "
                  f"{ctx['window']} tokens ({ctx['window_source']}); scored in {ctx['policy']} (--window to change)",
                  file=sys.stderr)
        return json.dumps(res)

    return common.run("score", fv, argv, body, __doc__)


if __name__ == "__main__":
    sys.exit(main())
