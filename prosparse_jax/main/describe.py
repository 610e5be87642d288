"""Prints a model's size and cost as one JSON object, without allocating it.

    python -m prosparse_jax.main.describe --config=configs/sparsing_law.py:0.4b-relu
    python -m prosparse_jax.main.describe --config=configs/sparsing_law.py:1.2b-relu --mesh=data:2,fsdp:4 \
        --device_memory=80GB

Parameter counts come from ``jax.eval_shape`` of the real initialiser (checked against the closed form), so a 13B
model is described in seconds on a laptop. With ``--mesh`` it also compiles the train step for that mesh (abstract
devices, nothing allocated) and adds its per-device memory as ``memory_plan`` (:mod:`prosparse_jax.training.memory_plan`):
with ``--device_memory``, whether it fits and the smallest ``train.grad_accum`` that does.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import jax
from absl import flags
from ml_collections import config_flags

from prosparse_jax.config import ConfigError, RunConfig
from prosparse_jax.main import common as cli
from prosparse_jax.model.transformer import abstract_params
from prosparse_jax.run_config import resolve
from prosparse_jax.training import memory_plan


def describe(rc: RunConfig) -> dict[str, Any]:
    """Size / cost summary of a resolved run config (no allocation)."""
    m = rc.model
    shapes = abstract_params(m)
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    embedding = math.prod(shapes["embed_VxD"].shape) + (
        math.prod(shapes["lm_head_DxV"].shape) if "lm_head_DxV" in shapes else 0
    )
    if total != m.params_total:  # the closed form (used by flops) must agree with the real initialiser
        raise AssertionError(f"parameter count mismatch: eval_shape {total} vs formula {m.params_total}")
    seq_len = rc.data.seq_len
    tokens_per_step = rc.train.batch_size * seq_len
    fpt = m.flops_per_token(seq_len)
    return {
        "params_total": total,
        "params_non_embedding": total - embedding,
        "params_embedding": embedding,
        "flops_per_token": fpt,
        "flops_per_token_note": "training: 6*N_matmul (non-embedding matrices + output head) + "
        "causal attention 6*L*n_heads*head_dim*(seq_len+1)",
        "d_model": m.d_model,
        "n_layers": m.n_layers,
        "n_heads": m.n_heads,
        "n_kv_heads": m.n_kv_heads,
        "head_dim": m.head_dim,
        "d_ff": m.d_ff,
        "vocab_size": m.vocab_size,
        "tie_embeddings": m.tie_embeddings,
        "activation": m.activation,
        "activation_threshold": m.activation_threshold,
        "minicpm_scales": {"scale_emb": m.scale_emb, "scale_depth": m.scale_depth,
                           "dim_model_base": m.dim_model_base},
        "dtype": m.dtype,
        "seq_len": seq_len,
        "global_batch": rc.train.batch_size,
        "tokens_per_step": tokens_per_step,
        "train_steps": rc.train.steps,
        "train_tokens": tokens_per_step * rc.train.steps,
        "train_flops": fpt * tokens_per_step * rc.train.steps,
        "param_bytes_fp32": 4 * total,
        "sparsity_stages": [list(s) for s in rc.sparsity.stages],
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: parses ``argv`` (default ``sys.argv``), prints the JSON; returns the exit code."""
    flag_values = flags.FlagValues()  # fresh per call: config_flags registers the overrides of each parse
    config_flags.DEFINE_config_file("config", None, "Experiment config file (file.py:arg).", lock_config=True,
                                    flag_values=flag_values)
    flags.DEFINE_string("mesh", None, "Plan the train step's memory on this mesh, e.g. data:2,fsdp:4 (axes: "
                        f"{', '.join(memory_plan.MESH_AXES)}; one left out has size 1).", flag_values=flag_values)
    flags.DEFINE_string("device_memory", None, "With --mesh: memory per device to fit, e.g. 80GB (10^9 bytes), "
                        "80GiB (2^30) or 512MB.", flag_values=flag_values)

    def body() -> str:
        fv = flag_values
        if fv.device_memory is not None and fv.mesh is None:
            raise cli.UsageError("--device_memory needs --mesh (e.g. --mesh=data:2,fsdp:4)")
        mesh = memory_plan.parse_mesh(fv.mesh) if fv.mesh is not None else None
        budget = memory_plan.parse_bytes(fv.device_memory) if fv.device_memory is not None else None
        rc = resolve(cli.load_config(fv))
        out = describe(rc)
        if mesh is not None:
            out["memory_plan"] = memory_plan.plan(rc, mesh, budget)
        return json.dumps(out, indent=2)

    return cli.run("describe", flag_values, argv, body, (ConfigError, memory_plan.PlanError), __doc__)


if __name__ == "__main__":
    sys.exit(main())
