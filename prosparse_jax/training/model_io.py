"""Models in and out of training workdirs: load a workdir or a HuggingFace folder (converted on the fly) to run or
measure it, export a workdir to a HuggingFace folder and import one as a workdir (a failure leaves no half output);
a model's sparse mode file (``sparse_mode.json``, written by ``analyze``).

The formats are in docs/hf.md; the mappings in :mod:`prosparse_jax.hf.config` and :mod:`prosparse_jax.hf.weights`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from prosparse_jax import files
from prosparse_jax.config import ModelConfig
from prosparse_jax.errors import InputError, OutputError, UsageError
from prosparse_jax.hf import io as hf_io
from prosparse_jax.model.transformer import Params
from prosparse_jax.training import checkpoint
from prosparse_jax.training.lock import WorkdirLock, check_free

DEFAULT_MAX_POSITION_EMBEDDINGS = 4096  # what an export records when the source records no context
SPARSE_MODE_FILE = "sparse_mode.json"
SPARSE_MODE_KEY = "model.neuron_thresholds"  # the thresholds' key in sparse_mode.json: a config override


def sparse_mode_record(thresholds: list[float] | tuple[float, ...]) -> dict[str, list[float]]:
    """The contents of a ``sparse_mode.json``: the per-layer CETT thresholds as the config field they set."""
    return {SPARSE_MODE_KEY: [float(t) for t in thresholds]}


def read_thresholds(path: str | os.PathLike) -> tuple[float, ...]:
    """The per-layer thresholds of a ``sparse_mode.json`` written by ``analyze`` (or of the folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / SPARSE_MODE_FILE
    raw = files.read_json(path, SPARSE_MODE_FILE)
    taus = raw.get(SPARSE_MODE_KEY) if isinstance(raw, dict) else None
    if not (isinstance(taus, list) and taus and all(isinstance(t, int | float) and not isinstance(t, bool)
                                                    for t in taus)):
        raise InputError(f"thresholds: {path} has no {SPARSE_MODE_KEY!r} list of numbers; pass the sparse_mode.json "
                         "written by `python -m prosparse_jax.main.analyze --metric=pplp` (or cett)")
    return tuple(float(t) for t in taus)


def is_hf_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a HuggingFace model: its config.json names a ``model_type`` or ``architectures``.

    Raises:
      InputError: config.json is not valid JSON or not a JSON object.
    """
    raw = hf_io.read_config_json(path)
    return raw is not None and ("model_type" in raw or "architectures" in raw)


def model_context(path: str | os.PathLike) -> int | None:
    """Tokens of context the model at ``path`` was trained or configured for: a workdir's ``data.seq_len`` (for an
    imported one, its source's ``max_position_embeddings``), an HF folder's ``max_position_embeddings``; None when
    its config.json records none. A workdir's lost config.json is restored from its latest checkpoint."""
    raw = hf_io.read_config_json(path)
    if raw is None and checkpoint.latest_step(path) is not None:
        raw = checkpoint.read_run_config(path)
    raw = raw or {}
    data, imported = (raw.get(k) if isinstance(raw.get(k), dict) else {} for k in ("data", "imported_from"))
    for tokens in (data.get("seq_len"), imported.get("max_position_embeddings"), raw.get("max_position_embeddings")):
        if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0:
            return tokens
    return None


def load_model(path: str | os.PathLike, step: int | None = None) -> tuple[ModelConfig, Params, Path | None]:
    """(model config, params, tokenizer.json path or None) of a workdir's checkpoint ``step`` (None: the latest) or
    of a HuggingFace model folder (``step`` does not apply; an export's weights are verified against their digests)."""
    if is_hf_folder(path):
        mcfg, params = hf_io.load_hf_folder(path)
        tok = Path(path) / "tokenizer.json"
        return mcfg, params, tok if tok.is_file() else None
    return checkpoint.load_model(path, step)


def export_hf(workdir: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None, fmt: str = "llama",
              dtype: str = "float32", max_shard_size: str | int = "2GB", overwrite: bool = False,
              max_position_embeddings: int | None = None) -> Path:
    """Exports ``workdir`` (or a HF folder; at ``step``, default the latest) to the HF folder ``out``; returns it.

    ``max_position_embeddings`` (None: :func:`model_context` of ``workdir``, else 4096) goes into config.json, so
    score / generate on the export use the context the run was trained at. Every safetensors file carries the digests
    of its tensors. ``out`` is checked before anything is loaded: a file, or a non-empty folder without
    ``overwrite``, is refused (``overwrite`` replaces an earlier export's files, keeping the others). A failure
    leaves ``out`` as it was.
    """
    if max_position_embeddings is not None and max_position_embeddings < 1:
        raise UsageError(f"max_position_embeddings: must be a positive number of tokens, got {max_position_embeddings}")
    if overwrite:
        out = files.check_output_path(out, "out")
    else:
        out = files.check_empty_dir(out, "out", "set overwrite to replace the export files, or choose an empty folder")
    files.check_model_path(workdir, "workdir")
    context = max_position_embeddings or model_context(workdir) or DEFAULT_MAX_POSITION_EMBEDDINGS
    mcfg, params, tok = load_model(workdir, step)
    with WorkdirLock(out, "export_hf"), files.staged_output(out, replace=hf_io.remove_export_files) as stage:
        hf_io.save_hf_folder(mcfg, params, stage, fmt=fmt, dtype=dtype, max_shard_size=max_shard_size,
                             tokenizer_json=tok, max_position_embeddings=context)
    return out


def import_hf(hf_path: str | os.PathLike, workdir: str | os.PathLike) -> Path:
    """Converts the HF folder ``hf_path`` into a new workdir (its config.json, a params-only checkpoint at step 0 and
    tokenizer.json when the folder has one); returns the workdir.

    A file or a workdir holding a run is refused before any work; so is an export whose weights do not match their
    digests (a damaged export never becomes a workdir with fresh digests). A failure leaves no half-written run.
    """
    hf_path = files.check_model_path(hf_path, "hf")
    workdir = files.check_output_path(workdir, "workdir")
    check_free(workdir)  # a train in its set-up holds the lock before it writes a run
    if checkpoint.has_run(workdir):
        raise OutputError(f"workdir: {workdir} already holds a run; choose an empty workdir (nothing was overwritten)")
    mcfg, params = hf_io.load_hf_folder(hf_path)
    raw = hf_io.read_config_json(hf_path) or {}
    source = {"hf_folder": str(hf_path.absolute()), "model_type": raw.get("model_type"),
              "architectures": raw.get("architectures"), "max_position_embeddings": model_context(hf_path)}
    with WorkdirLock(workdir, "import_hf"), files.staged_output(workdir) as stage:
        checkpoint.write_params_workdir(stage, mcfg, params, run_config={"imported_from": source})
        tok = hf_path / "tokenizer.json"
        if tok.is_file():
            shutil.copyfile(tok, stage / "tokenizer.json")
    return workdir
