"""Imports a local HuggingFace LLaMA / Mistral / MiniCPM / ProSparse folder into a prosparse_jax workdir.

    python -m prosparse_jax.main.import_hf --hf=path/to/hf_folder --workdir=runs/imported

Writes ``<workdir>/config.json`` (``model`` section) and a params-only checkpoint at step 0, and copies
``tokenizer.json`` when the folder has one. Unsupported features (rope_scaling, biases, other model types) and
weights that disagree with the config are errors naming the field or tensor. See :mod:`prosparse_jax.hf.config` and
:mod:`prosparse_jax.hf.weights`.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from absl import flags

from prosparse_jax.config import ConfigError
from prosparse_jax.hf import io as hf
from prosparse_jax.hf.config import HFConversionError
from prosparse_jax.main import common as cli
from prosparse_jax.training import checkpoint

FLAGS = flags.FlagValues()  # own flag set: the CLI modules can be imported together (tests)
_HF = flags.DEFINE_string("hf", None, "Local HuggingFace model folder (config.json + weights).", flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string("workdir", None, "New (empty) workdir to write.", flag_values=FLAGS)
flags.mark_flags_as_required(["hf", "workdir"], flag_values=FLAGS)


def import_hf(hf_path: str | os.PathLike, workdir: str | os.PathLike) -> Path:
    """Converts the HF folder ``hf_path`` into a new workdir; returns the workdir.

    The workdir is checked first (a file or a workdir holding a run is refused), then written into a staging folder
    next to it and moved in only once complete: a failure (disk full) leaves no half-written run behind.
    """
    hf_path, workdir = Path(hf_path), cli.check_output_dir(workdir, "--workdir")
    if checkpoint.latest_step(workdir) is not None or (workdir / "config.json").exists():
        raise checkpoint.CheckpointError(
            f"{workdir} already holds a run; choose an empty --workdir (nothing was overwritten)")
    mcfg, params = hf.load_hf_folder(hf_path)
    raw = cli.read_json(hf_path / "config.json", "config.json")
    source = {"hf_folder": str(hf_path.absolute()), "model_type": raw.get("model_type"),
              "architectures": raw.get("architectures")}
    with cli.staged_output(workdir) as stage:
        checkpoint.write_params_workdir(stage, mcfg, params, run_config={"imported_from": source})
        tok = hf_path / "tokenizer.json"
        if tok.is_file():
            shutil.copyfile(tok, stage / "tokenizer.json")
    return workdir


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: parses ``argv`` (default ``sys.argv``) into this module's flags; returns the exit code."""
    def body() -> str:
        cli.check_output_dir(_WORKDIR.value, "--workdir")
        cli.check_model_path(_HF.value, "--hf")
        return f"imported {_HF.value} -> {import_hf(_HF.value, _WORKDIR.value)}"

    return cli.run("import_hf", FLAGS, argv, body, (HFConversionError, checkpoint.CheckpointError, ConfigError),
                   __doc__)


if __name__ == "__main__":
    sys.exit(main())
