"""Prints a model's size and cost as one JSON object, without allocating it.

    python -m prosparse_jax.main.describe --config=configs/sparsing_law.py:0.4b-relu
    python -m prosparse_jax.main.describe --config=configs/sparsing_law.py:1.2b-relu --mesh=data:2,fsdp:4 \
        --device_memory=80GB

The object holds parameter counts, FLOPs, batch, warm-up, LR-decay start and tokens. With ``--mesh`` it also compiles
the train step for that mesh (abstract devices, nothing allocated) and adds its per-device memory and what fsdp
shards as ``memory_plan`` (a warning when fsdp shards under half of the parameter bytes); with ``--device_memory``,
whether it fits and the smallest ``train.grad_accum`` that does (:mod:`prosparse_jax.training.memory_plan`).
"""

from __future__ import annotations

import json
import sys

from absl import flags
from ml_collections import config_flags

from prosparse_jax import files
from prosparse_jax.config import resolve
from prosparse_jax.errors import UsageError
from prosparse_jax.main import common as cli
from prosparse_jax.training import memory_plan


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
            raise UsageError("--device_memory needs --mesh (e.g. --mesh=data:2,fsdp:4)")
        mesh = memory_plan.parse_mesh(fv.mesh, "--mesh") if fv.mesh is not None else None
        budget = files.parse_size(fv.device_memory, "--device_memory") if fv.device_memory is not None else None
        rc = resolve(cli.load_config(fv))
        out = memory_plan.describe(rc)
        if mesh is not None:
            out["memory_plan"] = memory_plan.plan(rc, mesh, budget)
        return json.dumps(out, indent=2)

    return cli.run("describe", flag_values, argv, body, __doc__)


if __name__ == "__main__":
    sys.exit(main())
