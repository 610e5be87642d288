"""Exports a prosparse_jax workdir (or any loadable checkpoint) as a HuggingFace model folder.

    python -m prosparse_jax.main.export_hf --workdir=runs/x --out=hf/x [--step=N] [--format=llama|minicpm] \
        [--dtype=float32|bfloat16] [--max_shard_size=2GB] [--overwrite]

``llama`` folds MiniCPM scales and loads with plain ``AutoModelForCausalLM`` unless the activation (fatrelu, drelu)
or sparse-mode neuron thresholds need the shipped remote code (``trust_remote_code=True``); ``minicpm`` keeps the
scales (remote code). See :mod:`prosparse_jax.hf.config` and :mod:`prosparse_jax.hf.weights`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import flags

from prosparse_jax.config import ConfigError
from prosparse_jax.hf import io as hf
from prosparse_jax.hf.config import FORMATS, HFConversionError
from prosparse_jax.main import common as cli
from prosparse_jax.training import checkpoint

FLAGS = flags.FlagValues()  # own flag set: the CLI modules can be imported together (tests)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir (or HF folder) to export.", flag_values=FLAGS)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "Output HF folder (must be empty unless --overwrite).", flag_values=FLAGS)
_FORMAT = flags.DEFINE_enum("format", "llama", list(FORMATS), "llama (folded scales) or minicpm.",
                            flag_values=FLAGS)
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(hf.EXPORT_DTYPES), "Dtype of the stored weights.",
                           flag_values=FLAGS)
_MAX_SHARD = flags.DEFINE_string("max_shard_size", "2GB", "Shard the safetensors above this size (2GB, 64KB, ...).",
                                 flag_values=FLAGS)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the export files in a non-empty --out.", flag_values=FLAGS)
_MAX_POS = flags.DEFINE_integer("max_position_embeddings", 4096, "max_position_embeddings written to config.json.",
                                flag_values=FLAGS)
flags.mark_flags_as_required(["workdir", "out"], flag_values=FLAGS)


def export(workdir: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None, fmt: str = "llama",
           dtype: str = "float32", max_shard_size: str | int = "2GB", overwrite: bool = False,
           max_position_embeddings: int = 4096) -> Path:
    """Exports ``workdir`` (at ``step``, default latest) to the HF folder ``out``; returns ``out``.

    ``out`` is checked before anything is loaded (a file, or a non-empty folder without ``overwrite``, is refused).
    The export is written into a staging folder next to ``out`` and moved in only once complete: a failure (disk
    full) leaves ``out`` -- a previous export included -- as it was.
    """
    out = cli.check_output_dir(out, "--out")
    if not overwrite:
        hf.check_output_dir(out, overwrite=False)  # fail before loading anything
    mcfg, params, tok = checkpoint.load_model(workdir, step)
    with cli.staged_output(out, replace=lambda d: hf.check_output_dir(d, overwrite=True)) as stage:
        hf.save_hf_folder(mcfg, params, stage, fmt=fmt, dtype=dtype, max_shard_size=max_shard_size,
                          tokenizer_json=tok, max_position_embeddings=max_position_embeddings)
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: parses ``argv`` (default ``sys.argv``) into this module's flags; returns the exit code."""
    def body() -> str:
        cli.check_output_dir(_OUT.value, "--out")
        cli.check_model_path(_WORKDIR.value, "--workdir")
        out = export(_WORKDIR.value, _OUT.value, step=_STEP.value, fmt=_FORMAT.value, dtype=_DTYPE.value,
                     max_shard_size=_MAX_SHARD.value, overwrite=_OVERWRITE.value,
                     max_position_embeddings=_MAX_POS.value)
        return f"exported {_WORKDIR.value} -> {out} (format={_FORMAT.value}, dtype={_DTYPE.value})"

    return cli.run("export_hf", FLAGS, argv, body, (HFConversionError, checkpoint.CheckpointError, ConfigError),
                   __doc__)


if __name__ == "__main__":
    sys.exit(main())
