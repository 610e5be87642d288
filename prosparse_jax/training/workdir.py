"""A training workdir: its saved config (a resume under another config is refused), tokenizer and start weights.

Layout: ``config.json`` (the experiment ConfigDict as JSON, written once), ``tokenizer.json``, ``checkpoints/``
(orbax), ``metrics.jsonl``, ``tb/``, ``final_eval.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import logging

from prosparse_jax.config import ModelConfig, RunConfig, to_dict
from prosparse_jax.data import pipeline as data_lib
from prosparse_jax.model.transformer import Params, abstract_params
from prosparse_jax.training import checkpoint as ckpt

# Fields that may change between a run and its resumption (they do not change the numbers; model.scan_layers only
# changes the layout of the state in memory -- checkpoints are stacked either way -- and float round-off).
RESUMABLE_CHANGES = {
    "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints", "train.keep_period",
    "train.async_checkpoint", "train.progress_bar", "data.data_dir", "model.scan_layers",
    "model.attention",  # another attention implementation computes the same function (rounding aside)
}


class TrainError(RuntimeError):
    """The run cannot start or continue; the message says why and what to do."""


class NonFiniteLossError(TrainError):
    """Loss or gradients became NaN/Inf; the update was not applied and the last good checkpoint is kept."""


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def json_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort())


def has_run(workdir: Path) -> bool:
    """Whether ``workdir`` holds a run (a checkpoint or a config.json); a failed start leaves neither."""
    return (workdir / "config.json").exists() or ckpt.latest_step(workdir) is not None


def saved_config(workdir: Path) -> tuple[dict[str, Any] | None, str]:
    """The config a workdir's run was written with, and where it was read: its config.json, else the latest
    checkpoint's (every checkpoint carries the run config; older ones only the model section). (None, "") if the
    workdir holds no run."""
    path = workdir / "config.json"
    if path.exists():
        try:
            return json.loads(path.read_text()), str(path)
        except ValueError as e:
            raise TrainError(f"{path} is not valid JSON ({e}); restore it, or choose a new --workdir") from None
    step = ckpt.latest_step(workdir)
    if step is None:
        return None, ""
    extra = ckpt.read_extra(workdir, step)
    where = f"{workdir}/{ckpt.CKPT_DIR}/{step} (config.json is missing)"
    if isinstance(extra.get("run_config"), dict):
        return extra["run_config"], where
    return {"model": extra.get("model", {})}, where + ", model section only"


def check_workdir_config(workdir: Path, config_json: dict[str, Any], model: ModelConfig) -> None:
    """Refuses to resume a workdir written with a different config, naming the differing fields (nothing is
    overwritten). A lost config.json is recovered from the latest checkpoint, which carries the run config."""
    saved, where = saved_config(workdir)
    if saved is None:
        return
    if where.endswith("model section only"):  # a checkpoint of an older version: compare the resolved models
        old, new = _flatten({"model": saved["model"]}), _flatten({"model": to_dict(model)})
    else:
        old, new = _flatten(saved), _flatten(config_json)
    diffs = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
    if diffs:
        shown = ", ".join(f"{k}: saved {old.get(k)!r} vs now {new.get(k)!r}" for k in diffs[:6])
        raise TrainError(
            f"workdir {workdir} holds a run with a different config ({shown}{' ...' if len(diffs) > 6 else ''}; "
            f"saved in {where}). Resume it with its own config or choose a new --workdir; nothing was changed.")


def write_config(workdir: Path, config_json: dict[str, Any]) -> None:
    """Writes ``config.json`` once (atomically): the config of the run's first checkpoint, or the one recovered
    from the latest checkpoint when config.json was lost."""
    path = workdir / "config.json"
    if path.exists():
        return
    saved, where = saved_config(workdir)
    if saved is not None and not where.endswith("model section only"):
        config_json = saved
    tmp = path.with_name("config.json.tmp")
    tmp.write_text(json.dumps(config_json, indent=2))
    tmp.replace(path)


def _copy_atomically(src: Path, dst: Path) -> None:
    """Copies ``src`` to ``dst`` through a temporary file: a process reading ``dst`` meanwhile (another process of a
    multi-process run) sees the old or the new file, never a part."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)


def prepare_tokenizer(rc: RunConfig, workdir: Path) -> tuple[Any, Any]:
    """Tokenizer of the run, kept as ``<workdir>/tokenizer.json``: data.tokenizer, else the init_from checkpoint's,
    else a BPE trained on the corpus. The tokenizer of a workdir that holds a run is never replaced by a different
    one; that of a start that failed before its first checkpoint is."""
    dcfg, local, fresh = rc.data, workdir / "tokenizer.json", not has_run(workdir)
    if dcfg.tokenizer and not Path(dcfg.tokenizer).is_file():
        raise TrainError(f"data.tokenizer={dcfg.tokenizer}: no such file (give a tokenizer.json, or '' to train a "
                         "BPE on the corpus)")
    if not dcfg.tokenizer and rc.init_from:
        src = Path(rc.init_from) / "tokenizer.json"
        if src.is_file() and (fresh or not local.exists()):
            workdir.mkdir(parents=True, exist_ok=True)
            _copy_atomically(src, local)
        if local.exists():
            dcfg = dataclasses.replace(dcfg, tokenizer=str(local))
    if dcfg.tokenizer and Path(dcfg.tokenizer).resolve() != local.resolve():
        if fresh or not local.exists():
            workdir.mkdir(parents=True, exist_ok=True)
            _copy_atomically(Path(dcfg.tokenizer), local)
        elif local.read_bytes() != Path(dcfg.tokenizer).read_bytes():
            raise TrainError(f"{local} differs from data.tokenizer={dcfg.tokenizer}; this workdir was trained with "
                             "its own tokenizer: use it, or choose a new --workdir (nothing was changed)")
    tok = data_lib.get_tokenizer(dcfg, workdir)
    if tok.get_vocab_size() > rc.model.vocab_size:
        raise TrainError(f"tokenizer has {tok.get_vocab_size()} tokens but model.vocab_size="
                         f"{rc.model.vocab_size}; raise model.vocab_size")
    return tok, dcfg


def load_init_params(rc: RunConfig) -> Params:
    """Params of ``rc.init_from`` for this run's model (its activation substituted); shapes must match."""
    src_cfg, params, _ = ckpt.load_model(rc.init_from)
    want = jax.tree.map(lambda x: x.shape, abstract_params(rc.model))
    have = jax.tree.map(lambda x: tuple(x.shape), params)
    if want != have:
        raise TrainError(
            f"init_from={rc.init_from} has a different model shape than model.* of this config "
            f"(init_from: d_model={src_cfg.d_model}, n_layers={src_cfg.n_layers}, d_ff={src_cfg.d_ff}, "
            f"vocab={src_cfg.vocab_size}, tied={src_cfg.tie_embeddings}); make the model section match it"
        )
    logging.info("initialised from %s (activation %s -> %s)", rc.init_from, src_cfg.activation,
                 rc.model.activation)
    return params


