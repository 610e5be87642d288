r"""Continues a prompt with a model (KV cache; greedy or sampled) and reports speed and activation sparsity.

    python -m prosparse_jax.main.generate --checkpoint=<workdir or HF folder> --prompt="..." [--max_new_tokens=N] \
        [--temperature=T --top_k=K --top_p=P --seed=S] [--sparse [--implementation=...] [--thresholds=...]] \
        [--predictor=<dir>] [--step=N]

Prints the continuation, then one JSON line: prefill and decode tokens/s (compile excluded) and the fraction of
exact zeros of x1 per layer during decoding. ``--sparse`` decodes in the sparse mode (the model's
``model.neuron_thresholds``, or ``--thresholds``: the sparse_mode.json of ``python -m prosparse_jax.main.analyze
--metric=pplp --value=1``) with a sparse FFN kernel; ``--predictor`` adds an activation predictor (``python -m
prosparse_jax.main.predictor train``'s output) to every layer's sparse FFN, so only its predicted neurons are computed
(it implies ``--sparse``). The prompt plus ``--max_new_tokens`` must fit the model's
context. Ctrl-C stops within a second or so and exits 130. Details: :mod:`prosparse_jax.inference.generate`.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from prosparse_jax.inference.generate import DEFAULT_NEW_TOKENS, Interrupted, generate_text
from prosparse_jax.inference.sparse_ffn import IMPLEMENTATIONS
from prosparse_jax.main import common

EXIT_INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C (SIGINT)


def _flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_string("checkpoint", None, "Workdir or HF model folder.", flag_values=fv)
    flags.DEFINE_integer("step", None, "Checkpoint step of a workdir; default: the latest.", flag_values=fv)
    flags.DEFINE_string("prompt", None, "Text to continue.", flag_values=fv)
    flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate at most; the prompt plus these must fit the "
                         f"model's context. Default: {DEFAULT_NEW_TOKENS}, or as many as fit.", flag_values=fv)
    flags.DEFINE_float("temperature", 0.0, "Sampling temperature, finite and >= 0; 0 = greedy.", flag_values=fv)
    flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens; 0 = all.", flag_values=fv)
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1].", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fv)
    flags.DEFINE_bool("sparse", False, "Decode in the sparse mode (model.neuron_thresholds).", flag_values=fv)
    flags.DEFINE_enum("implementation", "auto", ["auto", *IMPLEMENTATIONS], "Sparse FFN backend with --sparse: auto "
                      "= by platform (cpu_ffi on CPU, or cpu_gather without g++; pallas_triton on GPU, pallas_mosaic "
                      "on TPU); a Pallas backend on a CPU runs interpreted (slow: for checks).", flag_values=fv)
    flags.DEFINE_string("thresholds", None, "With --sparse: the sparse_mode.json written by analyze (or its --out "
                        "folder); its thresholds replace the model's model.neuron_thresholds.", flag_values=fv)
    flags.DEFINE_string("predictor", None, "An activation predictor of this model (the --out folder of `python -m "
                        "prosparse_jax.main.predictor train`): every layer's sparse FFN computes only the neurons it "
                        "predicts (gate rows included). Implies --sparse.", flag_values=fv)
    flags.mark_flags_as_required(["checkpoint", "prompt"], flag_values=fv)
    return fv


def main(argv: list[str] | None = None) -> int:
    """Prints :func:`prosparse_jax.inference.generate.generate_text`'s text and stats; returns the exit code (0, 1 on
    a user error, 130 on Ctrl-C)."""
    fv = _flags()

    def body() -> str:
        text, stats = generate_text(fv.checkpoint, fv.prompt, step=fv.step, max_new_tokens=fv.max_new_tokens,
                                    sparse=fv.sparse, implementation=fv.implementation, temperature=fv.temperature,
                                    top_k=fv.top_k, top_p=fv.top_p, seed=fv.seed, thresholds=fv.thresholds,
                                    predictor=fv.predictor)
        return f"{text}\n{json.dumps(stats)}"

    try:
        return common.run("generate", fv, argv, body, __doc__)
    except KeyboardInterrupt as e:
        when = f" after {e.tokens} of {e.max_new_tokens} new tokens (not printed)" if isinstance(e, Interrupted) \
            else ""
        print(f"generate: interrupted (Ctrl-C){when}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
