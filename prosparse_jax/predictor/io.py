"""Predictors on disk: an orbax pytree and a JSON file of metadata carrying the digests of its arrays, like every
checkpoint (:mod:`prosparse_jax.training.checkpoint`).

A predictor folder (default ``<checkpoint>/predictor``) holds::

    params/          orbax StandardCheckpoint of {w1_LxDxR, w2_LxRxF, b2_LxF, threshold_L} (float32)
    predictor.json   {"format", "meta": {...}, "shapes": {...}, "digests": {"algorithm", "predictor": {...}}}
    train/           the resumable training state (checkpoints/<step>: params, opt_state, extra), while training
    eval.json        what ``eval`` measured

A predictor is never overwritten silently (:func:`save_predictor` refuses a folder holding one); a damaged one is a
:class:`CorruptCheckpointError`, one for another model an :class:`InputError` naming the mismatch
(:func:`prosparse_jax.predictor.core.check_predictor`).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from prosparse_jax import files
from prosparse_jax.config import ModelConfig
from prosparse_jax.digest import DIGEST_ALGORITHM, digests
from prosparse_jax.errors import CheckpointError, CorruptCheckpointError, InputError, OutputError
from prosparse_jax.predictor.core import PARAM_NAMES, Predictor, check_predictor

FORMAT = "prosparse_jax.predictor/v1"
PARAMS_DIR = "params"
META_FILE = "predictor.json"


def has_predictor(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a saved predictor (its ``predictor.json`` or ``params``)."""
    path = Path(path)
    return (path / META_FILE).exists() or (path / PARAMS_DIR).exists()


def model_digest(params: Any) -> str:
    """16 hex digits identifying a model's weights: a hash of the :mod:`~prosparse_jax.digest` of every leaf."""
    leaves = digests({"params": params})["params"]
    return hashlib.sha256(json.dumps(leaves, sort_keys=True).encode()).hexdigest()[:16]


def _jsonable(x: Any) -> Any:
    """``x`` with numpy / jax scalars and arrays turned into plain JSON values."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        return np.asarray(x).tolist()
    return x


def save_predictor(path: Path, pred: Predictor, meta: dict[str, Any]) -> None:
    """Writes the predictor ``pred`` and its metadata ``meta`` (JSON-serialisable) into the folder ``path``.

    The arrays are stored as float32 with their digests; the folder may hold other files (the training state,
    eval.json), but a predictor already there is refused, never overwritten: remove it first (``remove_predictor``)
    to replace it. A failure (disk full) leaves ``path`` as it was.

    Raises:
      OutputError: ``path`` already holds a predictor, or cannot be written.
      InputError: ``pred`` lacks one of the parameters.
    """
    path = files.check_output_path(path, "out")
    if has_predictor(path):
        raise OutputError(f"out: {path} already holds a predictor ({META_FILE}); choose another --out or pass "
                          "--overwrite to replace it (nothing was written)")
    missing = [n for n in PARAM_NAMES if n not in pred]
    if missing:
        raise InputError(f"predictor: missing {', '.join(missing)}; nothing was written")
    arrays = {n: jnp.asarray(pred[n], jnp.float32) for n in PARAM_NAMES}
    record = {
        "format": FORMAT,
        "meta": _jsonable(meta),
        "shapes": {n: list(a.shape) for n, a in arrays.items()},
        "digests": {"algorithm": DIGEST_ALGORITHM, **digests({"predictor": arrays})},
    }
    with files.staged_output(path) as stage:
        ckptr = ocp.StandardCheckpointer()
        try:
            ckptr.save((stage / PARAMS_DIR).absolute(), arrays)
            ckptr.wait_until_finished()
        finally:
            ckptr.close()
        (stage / META_FILE).write_text(json.dumps(record, indent=2))


def remove_predictor(path: str | os.PathLike) -> None:
    """Removes the predictor of the folder ``path`` (its params and predictor.json; other files stay)."""
    path = Path(path)
    shutil.rmtree(path / PARAMS_DIR, ignore_errors=True)
    (path / META_FILE).unlink(missing_ok=True)


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``predictor.json`` of the folder ``path``.

    Raises:
      InputError: ``path`` holds no predictor.
      CorruptCheckpointError: predictor.json is unreadable or not a predictor record.
    """
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        if not path.exists():
            raise InputError(f"predictor: {path} does not exist; train one with `python -m "
                             "prosparse_jax.main.predictor train --checkpoint=<workdir>`")
        raise InputError(f"predictor: {path} holds no predictor ({META_FILE} not found); train one with `python -m "
                         "prosparse_jax.main.predictor train --checkpoint=<workdir>`")
    try:
        record = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"predictor {path} is corrupt: {meta_file} is unreadable ({e}); train it "
                                     "again or restore it from a copy") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("shapes"), dict):
        raise CorruptCheckpointError(f"predictor {path} is corrupt: {meta_file} is not a {FORMAT} record; train it "
                                     "again or restore it from a copy")
    return record


def load_predictor(path: Path, cfg: ModelConfig) -> tuple[Predictor, dict[str, Any]]:
    """(predictor, meta) of the folder ``path``, verified against its digests, for a model of config ``cfg``.

    Raises:
      InputError: ``path`` holds no predictor, or one for another model (the message names the mismatch).
      CorruptCheckpointError: its files cannot be read back or do not match the digests written with them.
      CheckpointError: it carries no digests of this version's algorithm.
    """
    path = Path(path)
    record = read_record(path)
    try:
        shapes = {n: tuple(int(d) for d in record["shapes"][n]) for n in PARAM_NAMES}
    except (KeyError, TypeError, ValueError):
        raise CorruptCheckpointError(f"predictor {path} is corrupt: {path / META_FILE} lacks the shapes of "
                                     f"{', '.join(PARAM_NAMES)}; train it again or restore it from a copy") from None
    abstract = {n: jax.ShapeDtypeStruct(s, jnp.float32) for n, s in shapes.items()}
    check_predictor(abstract, cfg, where=f"predictor {path}")  # another model: refused before any read
    saved = record.get("digests")
    if not isinstance(saved, dict) or saved.get("algorithm") != DIGEST_ALGORITHM:
        raise CheckpointError(f"predictor {path} carries no {DIGEST_ALGORITHM} digests of its arrays (another "
                              "version of prosparse_jax wrote it), so it cannot be verified; train it again")
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {n: jax.ShapeDtypeStruct(s, jnp.float32, sharding=dev) for n, s in shapes.items()}
    failure = None
    ckptr = ocp.StandardCheckpointer()
    try:
        pred = ckptr.restore((path / PARAMS_DIR).absolute(), target)
    except Exception as e:  # noqa: BLE001 -- orbax raises bare Exception around tensorstore read errors
        failure = " ".join(str(e).split())[:240] or type(e).__name__
    finally:
        ckptr.close()
    if failure is not None:
        gc.collect()  # finalise orbax's abandoned reads now (see checkpoint.quiet_orbax_noise)
        raise CorruptCheckpointError(f"predictor {path} is corrupt: reading {path / PARAMS_DIR} failed ({failure}); "
                                     "train it again or restore it from a copy")
    want = saved.get("predictor") if isinstance(saved.get("predictor"), dict) else {}
    for name, digest in digests({"predictor": pred})["predictor"].items():
        if want.get(name) != digest:
            raise CorruptCheckpointError(f"predictor {path} is corrupt: {name} does not match the digest written "
                                         "with it; train it again or restore it from a copy")
    pred = {n: pred[n] for n in PARAM_NAMES}
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    return pred, meta


def copy_predictor(src: str | os.PathLike, dest: str | os.PathLike, cfg: ModelConfig, *, overwrite: bool = False
                   ) -> Path:
    """Copies the predictor of the folder ``src`` into the folder ``dest`` (an HF export's ``predictor``), after
    verifying it against its digests and the model config ``cfg``; the copy keeps its digests. Returns ``dest``.

    Raises:
      InputError / CorruptCheckpointError: as :func:`load_predictor` for ``src``.
      OutputError: ``dest`` holds a predictor and ``overwrite`` is not set.
    """
    src, dest = Path(src), files.check_output_path(dest, "predictor")
    load_predictor(src, cfg)
    if has_predictor(dest) and not overwrite:
        raise OutputError(f"predictor: {dest} already holds a predictor; pass --overwrite to replace it (nothing was "
                          "written)")

    def clear(d: Path) -> None:
        remove_predictor(d)

    with files.staged_output(dest, replace=clear) as stage:
        shutil.copytree(src / PARAMS_DIR, stage / PARAMS_DIR)
        shutil.copyfile(src / META_FILE, stage / META_FILE)
    return dest
