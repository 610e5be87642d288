"""Models in and out of training workdirs: load a workdir or a HuggingFace folder (converted on the fly) to run or
measure it, export a workdir to a HuggingFace folder and import one as a workdir; a failure leaves no half output.

The formats are in docs/hf.md; the mappings in :mod:`prosparse_jax.hf.config` and :mod:`prosparse_jax.hf.weights`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from prosparse_jax import files
from prosparse_jax.config import ModelConfig
from prosparse_jax.errors import OutputError
from prosparse_jax.hf import io as hf_io
from prosparse_jax.model.transformer import Params
from prosparse_jax.training import checkpoint


def is_hf_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a HuggingFace model: its config.json names a ``model_type`` or ``architectures``."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return False
    raw = files.read_json(cfg_file, "config.json")
    return isinstance(raw, dict) and ("model_type" in raw or "architectures" in raw)


def load_model(path: str | os.PathLike, step: int | None = None) -> tuple[ModelConfig, Params, Path | None]:
    """(model config, params, tokenizer.json path or None) of a workdir's checkpoint ``step`` (None: the latest) or
    of a HuggingFace model folder (``step`` does not apply)."""
    if is_hf_folder(path):
        mcfg, params = hf_io.load_hf_folder(path)
        tok = Path(path) / "tokenizer.json"
        return mcfg, params, tok if tok.is_file() else None
    return checkpoint.load_model(path, step)


def export_hf(workdir: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None, fmt: str = "llama",
              dtype: str = "float32", max_shard_size: str | int = "2GB", overwrite: bool = False,
              max_position_embeddings: int = 4096) -> Path:
    """Exports ``workdir`` (or a HF folder; at ``step``, default the latest) to the HF folder ``out``; returns it.

    ``out`` is checked before anything is loaded: a file, or a non-empty folder without ``overwrite``, is refused
    (``overwrite`` replaces an earlier export's files, keeping the others). A failure leaves ``out`` as it was.
    """
    if overwrite:
        out = files.check_output_path(out, "out")
    else:
        out = files.check_empty_dir(out, "out", "set overwrite to replace the export files, or choose an empty folder")
    files.check_model_path(workdir, "workdir")
    mcfg, params, tok = load_model(workdir, step)
    with files.staged_output(out, replace=hf_io.remove_export_files) as stage:
        hf_io.save_hf_folder(mcfg, params, stage, fmt=fmt, dtype=dtype, max_shard_size=max_shard_size,
                             tokenizer_json=tok, max_position_embeddings=max_position_embeddings)
    return out


def import_hf(hf_path: str | os.PathLike, workdir: str | os.PathLike) -> Path:
    """Converts the HF folder ``hf_path`` into a new workdir (its config.json, a params-only checkpoint at step 0 and
    tokenizer.json when the folder has one); returns the workdir.

    A file or a workdir holding a run is refused before any work; a failure leaves no half-written run behind.
    """
    hf_path = files.check_model_path(hf_path, "hf")
    workdir = files.check_output_path(workdir, "workdir")
    if checkpoint.has_run(workdir):
        raise OutputError(f"workdir: {workdir} already holds a run; choose an empty workdir (nothing was overwritten)")
    mcfg, params = hf_io.load_hf_folder(hf_path)
    raw = files.read_json(hf_path / "config.json", "config.json")
    source = {"hf_folder": str(hf_path.absolute()), "model_type": raw.get("model_type"),
              "architectures": raw.get("architectures")}
    with files.staged_output(workdir) as stage:
        checkpoint.write_params_workdir(stage, mcfg, params, run_config={"imported_from": source})
        tok = hf_path / "tokenizer.json"
        if tok.is_file():
            shutil.copyfile(tok, stage / "tokenizer.json")
    return workdir
