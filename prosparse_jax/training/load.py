"""A model to run or measure: from a training workdir or from a HuggingFace model folder, converted on the fly."""

from __future__ import annotations

import os
from pathlib import Path

from prosparse_jax import files
from prosparse_jax.config import ModelConfig
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
