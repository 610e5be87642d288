r"""Trains (or resumes) one ProSparse run.

    python -m prosparse_jax.main.train --config=configs/prosparse.py:tiny --workdir=/tmp/run \
        [--config.<section>.<field>=value ...]

Re-running the same command on the same workdir resumes from its latest checkpoint; SIGTERM saves and exits 0, Ctrl-C
saves and exits 130. Several processes (hosts) run the same command with ``--coordinator_address``,
``--num_processes`` and ``--process_id`` (or ``JAX_*`` variables), or under SLURM's ``srun`` with nothing added;
process 0 prints the final evaluation as one JSON line.
"""

from __future__ import annotations

import json
import sys

import jax
from absl import flags, logging
from ml_collections import config_flags

from prosparse_jax.errors import UsageError
from prosparse_jax.main import common
from prosparse_jax.training import distributed
from prosparse_jax.training.train import train

EXIT_INTERRUPTED = 130  # the shell's code for a run stopped by Ctrl-C (SIGINT)


def _flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Experiment config (file.py:arg).", lock_config=True,
                                    flag_values=fv)
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, config); resumed if it exists.",
                        flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for a multi-process run (default: "
                        "$JAX_COORDINATOR_ADDRESS; SLURM's srun: detected).", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "Number of processes (default: $JAX_NUM_PROCESSES; srun: "
                         "$SLURM_NTASKS); 1 forces a single process.", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes) (default: $JAX_PROCESS_ID; "
                         "srun: $SLURM_PROCID).", flag_values=fv)
    flags.DEFINE_string("local_device_ids", None, "Comma-separated local devices this process uses (default: "
                        "$JAX_LOCAL_DEVICE_IDS; all, or one per task under srun on GPUs).", flag_values=fv)
    flags.DEFINE_float("distributed_timeout", None, "Seconds a multi-process start waits for every process to join "
                       "before it fails in one line (default: $PROSPARSE_DISTRIBUTED_TIMEOUT, else 300).",
                       flag_values=fv)
    return fv


def main(argv: list[str] | None = None) -> int:
    """Runs :func:`prosparse_jax.training.train.train`; exits 0 (done, or saved on SIGTERM), 1 (user error), 130."""
    logging.set_verbosity(logging.WARNING)  # orbax / tfds INFO lines drown the progress bar
    fv = _flags()

    def body() -> tuple[str, int]:
        if not fv.workdir:
            raise UsageError("--workdir: required (a directory for checkpoints and metrics)")
        try:
            distributed.initialize(distributed.resolve(fv.coordinator_address, fv.num_processes, fv.process_id,
                                                       fv.local_device_ids, timeout_s=fv.distributed_timeout))
        except KeyboardInterrupt:
            return "aborted while waiting for the other processes; nothing was written", EXIT_INTERRUPTED
        try:
            res = train(common.load_config(fv), fv.workdir)
        except KeyboardInterrupt:
            return (f"aborted: the last checkpoint in {fv.workdir} is intact; rerun the command to resume from it",
                    EXIT_INTERRUPTED)
        exit_code = EXIT_INTERRUPTED if res.stop_signal == "SIGINT" else 0  # Ctrl-C: saved, but not finished
        if jax.process_index() != 0:
            return "", exit_code  # process 0 reports for the run
        if not res.final_eval:
            return f"stopped at step {res.step}; rerun the command to resume", exit_code
        final = {k: v for k, v in res.final_eval.items() if "per_layer" not in k}
        return json.dumps({"step": res.step, **final}), exit_code

    return common.run("train", fv, argv, body, __doc__)


if __name__ == "__main__":
    sys.exit(main())
