"""Orbax checkpoints of a run's workdir, and loading a model from any workdir (ours or imported from HF).

Workdir layout (shared by train, import_hf, analyze, score, export_hf)::

    <workdir>/config.json        resolved run config (the ``model`` section is the ModelConfig)
    <workdir>/tokenizer.json     HF tokenizers file used by the run (if any)
    <workdir>/metrics.jsonl      one JSON object per logged step
    <workdir>/checkpoints/<step>/{params, opt_state, extra}

``params`` and ``opt_state`` are orbax StandardSave pytrees; ``extra`` is JSON (step, data iterator state, model
config). An imported model has ``params`` and ``extra`` only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from prosparse_jax.config import ModelConfig, model_config_from_dict, to_dict
from prosparse_jax.model import Params, abstract_params

CKPT_DIR = "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match the config."""


def manager(workdir: str | os.PathLike, *, keep: int = 3, async_save: bool = True,
            save_interval_steps: int = 1, keep_period: int = 0) -> ocp.CheckpointManager:
    """A CheckpointManager over ``<workdir>/checkpoints`` with items params / opt_state / extra.

    Args:
      workdir: the run's workdir.
      keep: the latest ``keep`` checkpoints are kept on disk (older ones are deleted) ...
      async_save: write checkpoints in the background.
      save_interval_steps: orbax's save interval (1: every ``save`` call writes).
      keep_period: ... except that a checkpoint whose step is a multiple of ``keep_period`` is never deleted
        (0 = off). The Sparsing Law protocol (``prosparse_jax.law_ratios``) measures every checkpoint of a run.
    """
    if keep_period < 0:
        raise ValueError(f"keep_period must be >= 0 (0 = off), got {keep_period}")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, save_interval_steps=save_interval_steps,
        keep_period=keep_period or None, create=True,
    )
    return ocp.CheckpointManager(Path(workdir).absolute() / CKPT_DIR, options=options)


def save(mgr: ocp.CheckpointManager, step: int, params: Params, opt_state: Any | None,
         extra: dict[str, Any], *, force: bool = False) -> bool:
    """Saves one step (async if the manager is); ``extra`` must be JSON-serialisable."""
    items: dict[str, Any] = {"params": ocp.args.StandardSave(params), "extra": ocp.args.JsonSave(extra)}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    return mgr.save(step, args=ocp.args.Composite(**items), force=force)


def restore(mgr: ocp.CheckpointManager, step: int, abstract_params_: Params,
            abstract_opt_state: Any | None = None) -> tuple[Params, Any | None, dict[str, Any]]:
    """Restores (params, opt_state or None, extra) of ``step`` into the given abstract pytrees."""
    items: dict[str, Any] = {"params": ocp.args.StandardRestore(abstract_params_), "extra": ocp.args.JsonRestore()}
    if abstract_opt_state is not None:
        items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
    try:
        out = mgr.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"checkpoint {mgr.directory}/{step} does not match the configured model/optimizer: {e}. "
            "Use the config the checkpoint was written with, or a fresh --workdir."
        ) from e
    return out["params"], out.get("opt_state") if abstract_opt_state is not None else None, out["extra"]


def latest_step(workdir: str | os.PathLike) -> int | None:
    d = Path(workdir) / CKPT_DIR
    if not d.is_dir():
        return None
    steps = [int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "params").exists()]
    return max(steps) if steps else None


def read_extra(workdir: str | os.PathLike, step: int) -> dict[str, Any]:
    """The JSON ``extra`` item of checkpoint ``step`` (step, data state, model and run config), read without orbax.

    Raises:
        CheckpointError: naming the file when it is missing or not JSON.
    """
    path = Path(workdir) / CKPT_DIR / str(step) / "extra" / "metadata"
    try:
        extra = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({e}); the checkpoint of step {step} is "
                              "damaged") from e
    if not isinstance(extra, dict):
        raise CheckpointError(f"{path}: checkpoint metadata is not a JSON object; the checkpoint of step {step} is "
                              "damaged")
    return extra


def read_run_config(workdir: str | os.PathLike) -> dict[str, Any]:
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: {workdir} is not a prosparse_jax workdir (train or import_hf one)")
    return json.loads(path.read_text())


def load_model(path: str | os.PathLike, step: int | None = None) -> tuple[ModelConfig, Params, Path | None]:
    """Loads (model config, float32 params, tokenizer.json path or None) from a workdir or a HF model folder.

    A folder with a HuggingFace ``config.json`` (it has ``architectures`` or ``model_type``) is converted on the fly
    with :mod:`prosparse_jax.hf`.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    cfg_file = path / "config.json"
    if cfg_file.is_file():
        raw = json.loads(cfg_file.read_text())
        if "model_type" in raw or "architectures" in raw:
            from prosparse_jax import hf  # local import: HF conversion pulls in safetensors

            mcfg, params = hf.load_hf_folder(path)
            tok = path / "tokenizer.json"
            return mcfg, params, tok if tok.is_file() else None
    run_cfg = read_run_config(path)
    mcfg = model_config_from_dict(run_cfg["model"])
    if step is None:
        step = latest_step(path)
        if step is None:
            raise CheckpointError(f"no checkpoint under {path / CKPT_DIR}; train first or pass a finished workdir")
    mgr = ocp.CheckpointManager(path.absolute() / CKPT_DIR)
    if step not in mgr.all_steps():
        raise CheckpointError(f"step {step} not in {path / CKPT_DIR} (have {sorted(mgr.all_steps())})")
    # restore onto this process's first device whatever topology the checkpoint was written with
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), abstract_params(mcfg))
    try:
        params = mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / CKPT_DIR}/{step} does not match the model in {cfg_file}: {e}") from e
    mgr.close()
    tok = path / "tokenizer.json"
    return mcfg, params["params"], tok if tok.is_file() else None


def write_params_workdir(workdir: str | os.PathLike, mcfg: ModelConfig, params: Params,
                         run_config: dict[str, Any] | None = None, step: int = 0) -> Path:
    """Writes a params-only workdir (used by import_hf); refuses a workdir that already has checkpoints."""
    workdir = Path(workdir)
    if latest_step(workdir) is not None or (workdir / "config.json").exists():
        raise CheckpointError(f"{workdir} already holds a run; choose an empty --workdir (nothing was overwritten)")
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = dict(run_config or {})
    cfg["model"] = to_dict(mcfg)
    (workdir / "config.json").write_text(json.dumps(cfg, indent=2))
    mgr = manager(workdir, async_save=False)
    params = jax.tree.map(lambda x: jax.numpy.asarray(x, jax.numpy.float32), params)
    save(mgr, step, params, None, {"step": step, "model": to_dict(mcfg)}, force=True)
    mgr.wait_until_finished()
    mgr.close()
    return workdir
