r"""Imports a local HuggingFace LLaMA / Mistral / MiniCPM / ProSparse folder into a new prosparse_jax workdir.

    python -m prosparse_jax.main.import_hf --hf=path/to/hf_folder --workdir=runs/imported

Writes ``<workdir>/config.json`` (``model`` section) and a params-only checkpoint at step 0, and copies
``tokenizer.json`` when the folder has one. Unsupported features (rope_scaling, biases, other model types) and
weights that disagree with the config are errors naming the field or tensor; so is an export of this project whose
weights do not match the digests written with them. Details: :mod:`prosparse_jax.training.model_io`.
"""

from __future__ import annotations

import sys

from absl import flags

from prosparse_jax.main import common
from prosparse_jax.training.model_io import import_hf


def _flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_string("hf", None, "Local HuggingFace model folder (config.json + weights).", flag_values=fv)
    flags.DEFINE_string("workdir", None, "New (empty) workdir to write.", flag_values=fv)
    flags.mark_flags_as_required(["hf", "workdir"], flag_values=fv)
    return fv


def main(argv: list[str] | None = None) -> int:
    """Runs :func:`prosparse_jax.training.model_io.import_hf`; returns the exit code."""
    fv = _flags()

    def body() -> str:
        return f"imported {fv.hf} -> {import_hf(fv.hf, fv.workdir)}"

    return common.run("import_hf", fv, argv, body, __doc__)


if __name__ == "__main__":
    sys.exit(main())
