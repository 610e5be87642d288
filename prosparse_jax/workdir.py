"""A training workdir: its saved config (a resume under another config is refused), tokenizer and start weights.

Layout: ``config.json`` (the experiment ConfigDict as JSON, written once), ``tokenizer.json``, ``checkpoints/``
(orbax), ``metrics.jsonl``, ``tb/``, ``final_eval.json``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import logging

from prosparse_jax import checkpoint as ckpt
from prosparse_jax import data as data_lib
from prosparse_jax.config import RunConfig
from prosparse_jax.model import Params, abstract_params

# Fields that may change between a run and its resumption (they do not change the numbers; model.scan_layers only
# changes the layout of the state in memory -- checkpoints are stacked either way -- and float round-off).
RESUMABLE_CHANGES = {
    "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints", "train.keep_period",
    "train.async_checkpoint", "train.progress_bar", "data.data_dir", "model.scan_layers",
}


class TrainError(RuntimeError):
    """The run cannot start or continue; the message says why and what to do."""


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


def check_workdir_config(workdir: Path, config_json: dict[str, Any]) -> None:
    """Refuses to resume a workdir written with a different config (nothing is overwritten)."""
    path = workdir / "config.json"
    if not path.exists():
        return
    saved = _flatten(json.loads(path.read_text()))
    new = _flatten(config_json)
    diffs = sorted(k for k in set(saved) | set(new) if saved.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
    if diffs:
        shown = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {new.get(k)!r}" for k in diffs[:6])
        raise TrainError(
            f"workdir {workdir} holds a run with a different config ({shown}{' ...' if len(diffs) > 6 else ''}). "
            "Resume it with its own config (see its config.json) or choose a new --workdir; nothing was changed."
        )


def prepare_tokenizer(rc: RunConfig, workdir: Path) -> tuple[Any, Any]:
    """Tokenizer of the run, kept as ``<workdir>/tokenizer.json``: data.tokenizer, else the init_from checkpoint's,
    else a BPE trained on the corpus. An existing workdir tokenizer is never replaced by a different one."""
    dcfg = rc.data
    local = workdir / "tokenizer.json"
    if not dcfg.tokenizer and rc.init_from:
        src = Path(rc.init_from) / "tokenizer.json"
        if not local.exists() and src.is_file():
            workdir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, local)
        if local.exists():
            dcfg = dataclasses.replace(dcfg, tokenizer=str(local))
    tok = data_lib.get_tokenizer(dcfg, workdir)
    if dcfg.tokenizer and Path(dcfg.tokenizer).resolve() != local.resolve():
        if not local.exists():
            shutil.copyfile(dcfg.tokenizer, local)
        elif local.read_bytes() != Path(dcfg.tokenizer).read_bytes():
            raise TrainError(f"{local} differs from data.tokenizer={dcfg.tokenizer}; this workdir was trained with "
                             "its own tokenizer: use it, or choose a new --workdir (nothing was changed)")
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


