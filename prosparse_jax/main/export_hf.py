r"""Exports a prosparse_jax workdir (or any loadable checkpoint) as a HuggingFace model folder.

    python -m prosparse_jax.main.export_hf --workdir=runs/x --out=hf/x [--step=N] [--format=llama|minicpm] \
        [--dtype=float32|bfloat16] [--max_shard_size=2GB] [--max_position_embeddings=N] [--overwrite] \
        [--predictor=<dir>|none]

``llama`` folds MiniCPM scales and loads with plain ``AutoModelForCausalLM`` unless the activation (fatrelu, drelu)
or sparse-mode neuron thresholds need the shipped remote code (``trust_remote_code=True``); ``minicpm`` keeps the
scales (remote code). config.json records the run's context (``data.seq_len``) unless
``--max_position_embeddings`` says otherwise; every safetensors file carries the digests of its tensors, which
``import_hf`` / ``score`` / ``generate`` verify. The workdir's activation predictor (``<workdir>/predictor``, or
``--predictor``; ``none`` skips it) is verified and copied with its digests to ``<out>/predictor`` (docs/predictors.md).
Details: :mod:`prosparse_jax.training.model_io`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import flags

from prosparse_jax.hf.config import FORMATS, model_config_from_hf
from prosparse_jax.hf.io import EXPORT_DTYPES, read_config_json
from prosparse_jax.main import common
from prosparse_jax.predictor import io as predictor_io
from prosparse_jax.training.model_io import export_hf


def _flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "Workdir (or HF folder) to export.", flag_values=fv)
    flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.", flag_values=fv)
    flags.DEFINE_string("out", None, "Output HF folder (must be empty unless --overwrite).", flag_values=fv)
    flags.DEFINE_enum("format", "llama", list(FORMATS), "llama (folded scales) or minicpm.", flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", list(EXPORT_DTYPES), "Dtype of the stored weights.", flag_values=fv)
    flags.DEFINE_string("max_shard_size", "2GB", "Shard the safetensors above this size (2GB, 64KB, ...).",
                        flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace the export files in a non-empty --out.", flag_values=fv)
    flags.DEFINE_integer("max_position_embeddings", None, "Context written to config.json; default: the run's "
                         "data.seq_len (the source HF folder's own, else 4096).", flag_values=fv)
    flags.DEFINE_string("predictor", None, "Activation predictor folder copied to <out>/predictor; default: "
                        "<workdir>/predictor when it holds one; 'none': no predictor.", flag_values=fv)
    flags.mark_flags_as_required(["workdir", "out"], flag_values=fv)
    return fv


def _predictor_dir(workdir: str, flag: str | None) -> Path | None:
    """The predictor folder to export: ``--predictor`` (refused if it holds none), else the workdir's if any."""
    if flag is not None and flag.lower() == "none":
        return None
    if flag:
        predictor_io.read_record(flag)  # no predictor there: one line, before the export
        return Path(flag)
    auto = Path(workdir) / "predictor"
    return auto if predictor_io.has_predictor(auto) else None


def main(argv: list[str] | None = None) -> int:
    """Runs :func:`prosparse_jax.training.model_io.export_hf`; returns the exit code."""
    fv = _flags()

    def body() -> str:
        pred_dir = _predictor_dir(fv.workdir, fv.predictor)
        out = export_hf(fv.workdir, fv.out, step=fv.step, fmt=fv.format, dtype=fv.dtype,
                        max_shard_size=fv.max_shard_size, overwrite=fv.overwrite,
                        max_position_embeddings=fv.max_position_embeddings)
        context = json.loads((out / "config.json").read_text())["max_position_embeddings"]
        done = f"exported {fv.workdir} -> {out} (format={fv.format}, dtype={fv.dtype}, context={context} tokens)"
        if pred_dir is not None:
            cfg = model_config_from_hf(read_config_json(out) or {})
            dest = predictor_io.copy_predictor(pred_dir, out / "predictor", cfg, overwrite=fv.overwrite)
            done += f"; predictor {pred_dir} -> {dest}"
        return done

    return common.run("export_hf", fv, argv, body, __doc__)


if __name__ == "__main__":
    sys.exit(main())
