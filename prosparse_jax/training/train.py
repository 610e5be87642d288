"""ProSparse training: the run loop with orbax resume, metrics, evaluation and the FATReLU evaluation.

    python -m prosparse_jax.training.train --config=configs/prosparse.py:tiny --workdir=/tmp/run

One run = (optionally) start from ``init_from`` with the activation of ``model.activation`` substituted, train
through the sparsity stage table, then evaluate with FATReLU threshold shifting (``sparsity.final_threshold``,
ProSparse §3.3). Re-running the same command on the same workdir resumes from its latest checkpoint; SIGTERM saves
and exits 0.

:func:`train` runs four named steps: :func:`_setup` (config, workdir, tokenizer, mesh, batch semantics) ->
:func:`_init_state` (restore the latest checkpoint, or initialise / load ``init_from``) -> ``loop.Loop`` (steps,
metrics fetched one step late, evaluations, checkpoints, stop requests) -> ``loop.final_eval``. The objective and the
jitted step are in :mod:`prosparse_jax.training.step`, the host loop in :mod:`prosparse_jax.training.loop`, the workdir's checks in
:mod:`prosparse_jax.training.workdir`. ``NonFiniteLossError`` (a :class:`TrainError`) is raised when the loss or gradients
become NaN/Inf.

Several processes (hosts) run the same command on JAX's runtime: with ``--coordinator_address``, ``--num_processes``
and ``--process_id`` (or ``JAX_*`` variables), or under SLURM's ``srun`` with nothing added (see
:mod:`prosparse_jax.training.distributed`). Each reads its own data shard; process 0 alone writes metrics and prints; all save.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import flags, logging
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags

from prosparse_jax.config import ConfigError, RunConfig
from prosparse_jax.data import pipeline as data_lib
from prosparse_jax.main import common as cli
from prosparse_jax.model.transformer import Params, abstract_params, init_params
from prosparse_jax.run_config import resolve
from prosparse_jax.training import checkpoint as ckpt
from prosparse_jax.training import distributed, schedules
from prosparse_jax.training import optim as optim_lib
from prosparse_jax.training import sharding as shard_lib
from prosparse_jax.training.loop import Loop, Run, final_eval, install_stop_handlers
from prosparse_jax.training.metrics import MetricsFileError
from prosparse_jax.training.step import make_train_step, place_state
from prosparse_jax.training.workdir import (
    NonFiniteLossError,  # noqa: F401  (train's API: raised by the loop)
    TrainError,
    check_workdir_config,
    json_config,
    load_init_params,
    prepare_tokenizer,
    write_config,
)


@dataclasses.dataclass
class TrainResult:
    workdir: Path
    step: int
    final_eval: dict[str, Any]
    interrupted: bool
    stop_signal: str | None = None  # "SIGTERM" / "SIGINT" when a signal stopped the run


# ---------------------------------------------------------------------------------------------------------------
# Set-up and state
# ---------------------------------------------------------------------------------------------------------------
def _setup(config: ml_collections.ConfigDict, workdir: str | Path) -> Run:
    """Joins a multi-process run, resolves the config, refuses a workdir of another config, checks that the mesh
    and batch fit the devices, then prepares the tokenizer and data (process 0 first: it builds the shared caches).

    Nothing that would block a corrected command is written here: config.json is written by :func:`train` once the
    state is initialised (a bad ``init_from`` fails before that)."""
    distributed.initialize()  # from the environment (main() applied the flags); before any use of a backend
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise TrainError(f"--workdir {workdir} is a file, not a directory; choose a directory")
    rc = resolve(config)
    config_json = json_config(config)
    check_workdir_config(workdir, config_json, rc.model)
    is_main = jax.process_index() == 0
    mesh = shard_lib.make_mesh(rc.train.mesh_data, rc.train.mesh_fsdp)
    semantics = _batch_semantics(rc, mesh)  # a batch the devices cannot split fails here, before any work
    with distributed.main_process_first("prosparse: tokenizer and data caches"):
        tokenizer, dcfg = prepare_tokenizer(rc, workdir)
        rc = dataclasses.replace(rc, data=dcfg)
        workdir.mkdir(parents=True, exist_ok=True)
        n_proc = jax.process_count()
        train_iter = data_lib.make_train_iterator(rc.data, tokenizer, batch_size=rc.train.batch_size // n_proc,
                                                  process_index=jax.process_index(), process_count=n_proc)
        eval_batches = data_lib.make_eval_batches(rc.data, tokenizer, batch_size=min(rc.train.batch_size, 8),
                                                  num_batches=rc.train.eval_batches)
    if is_main:
        print(json.dumps(semantics), flush=True)
    return Run(rc, config_json, workdir, tokenizer, mesh, is_main, train_iter,
                [shard_lib.replicated_batch_to_global(b, mesh) for b in eval_batches])


def _batch_semantics(rc: RunConfig, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """Global / micro / per-device batch of the run (printed at start-up); errors if the devices cannot split it.

    The global batch (``train.batch_size``) is split over the processes (each reads ``batch_size / processes`` rows
    of its own data shard) and over the mesh's data x fsdp devices; ``train.grad_accum`` micro-batches per step."""
    n_dev, n_proc = jax.device_count(), jax.process_count()
    B, A = rc.train.batch_size, rc.train.grad_accum
    micro = B // A
    if micro % n_dev:
        raise ConfigError(f"train.batch_size / train.grad_accum = {B}/{A} = {micro} must be divisible by the {n_dev} "
                          f"devices of the mesh (data x fsdp = {mesh.shape['data']}x{mesh.shape['fsdp']}); set "
                          f"train.batch_size to a multiple of {n_dev * A}")
    if B % n_proc:
        raise ConfigError(f"train.batch_size={B} must be divisible by the {n_proc} processes")
    return {"global_batch": B, "grad_accum_steps": A, "micro_batch": micro, "per_device_batch": micro // n_dev,
            "devices": n_dev, "processes": n_proc, "mesh": dict(mesh.shape), "seq_len": rc.data.seq_len,
            "tokens_per_step": B * rc.data.seq_len, "steps": rc.train.steps, "activation": rc.model.activation,
            "params": rc.model.params_total}


def _init_state(run: Run, tx: Any, mgr: Any, start: int | None) -> tuple[dict[str, Any], Any]:
    """The train state (placed on the mesh) and the data-iterator state: restored from checkpoint ``start``, else
    initialised (from ``init_from`` when set, else randomly with ``train.seed``)."""
    rc, mesh = run.rc, run.mesh
    abs_params = abstract_params(rc.model)
    abs_opt = jax.eval_shape(tx.init, abs_params)
    p_shard = shard_lib.shardings_like(abs_params, mesh)
    o_shard = shard_lib.shardings_like(abs_opt, mesh)
    if start is not None:
        with_sh = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
        params, opt_state, extra = ckpt.restore(mgr, start, jax.tree.map(with_sh, abs_params, p_shard),
                                                jax.tree.map(with_sh, abs_opt, o_shard))
        if run.is_main:
            print(f"resuming {run.workdir} from step {start}", flush=True)
        return place_state(params, opt_state, start, rc.model, mesh), _own_data_state(extra)
    if rc.init_from:
        params: Params = jax.device_put(load_init_params(rc), p_shard)
    else:
        params = jax.jit(lambda r: init_params(rc.model, r), out_shardings=p_shard)(jax.random.key(rc.train.seed))
    opt_state = jax.jit(tx.init, out_shardings=o_shard)(params)
    return place_state(params, opt_state, 0, rc.model, mesh), None


def _own_data_state(extra: dict[str, Any]) -> Any:
    """This process's data-iterator state in a checkpoint's ``extra``: ``data_state`` (one process) or entry
    ``process_index`` of ``data_states`` (several; each reads its own shard)."""
    n_proc = jax.process_count()
    states = extra.get("data_states", [extra.get("data_state")])
    if len(states) != n_proc:
        raise TrainError(f"the checkpoint was written by a run of {len(states)} process(es), this one has {n_proc}: "
                         f"resume with {len(states)} processes (each owns a shard of the data), or start a new "
                         "--workdir")
    return states[jax.process_index()]


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------
def train(config: ml_collections.ConfigDict, workdir: str | Path, *, stop_after: int | None = None) -> TrainResult:
    """Runs (or resumes) one training run in ``workdir``. ``stop_after`` simulates a kill after that step."""
    run = _setup(config, workdir)
    rc, workdir = run.rc, run.workdir
    start = ckpt.latest_step(workdir)
    if start is not None and start >= rc.train.steps and (workdir / "final_eval.json").exists():
        if run.is_main:
            print(f"{workdir} already finished at step {start}; nothing to do", flush=True)
        final = json.loads((workdir / "final_eval.json").read_text())
        return TrainResult(workdir=workdir, step=start, final_eval=final, interrupted=False)
    tx, lr_fn = optim_lib.make_optimizer(rc.optim, rc.train.steps, rc.model.d_model)
    mgr = ckpt.manager(workdir, keep=rc.train.keep_checkpoints, async_save=rc.train.async_checkpoint,
                       keep_period=rc.train.keep_period)
    state, data_state = _init_state(run, tx, mgr, start)
    if run.is_main:
        write_config(workdir, run.config_json)
    # the state keeps its shardings (else XLA picks others for the outputs and the second step compiles again);
    # metrics come back replicated, readable on every process
    out_sh = (jax.tree.map(lambda x: x.sharding, state), NamedSharding(run.mesh, PartitionSpec()))
    step_fn = jax.jit(make_train_step(rc, tx, lr_fn, schedules.reg_factor_schedule(rc.sparsity.stages)),
                      donate_argnums=(0,), out_shardings=out_sh)
    loop = Loop(run, state, step_fn, mgr, start or 0, data_state, stop_after)

    handlers = install_stop_handlers(loop)
    try:
        with jax.set_mesh(run.mesh):  # Mosaic kernels (splash attention) are partitioned under the mesh
            interrupted = loop.run_steps()
        mgr.wait_until_finished()
        final = {} if interrupted else final_eval(loop)
    except OSError as e:  # disk full, permissions: the newest committed checkpoint is untouched
        latest = ckpt.latest_step(workdir)
        raise TrainError(f"writing to {workdir} failed ({e}); the newest complete checkpoint (step {latest}) is "
                         "intact: free space and rerun the command to resume from it") from e
    finally:
        with contextlib.suppress(OSError):  # already reported above
            mgr.wait_until_finished()
        loop.close()
        for signum, prev in handlers.items():
            signal.signal(signum, prev)
    loop.writer.close()
    mgr.close()
    return TrainResult(workdir=workdir, step=loop.step, final_eval=final, interrupted=interrupted,
                       stop_signal=loop.stop_requested or None)


def main(argv: list[str] | None = None) -> int:
    """CLI: runs :func:`train`; exit code 0 (done, or saved on SIGTERM), 1 (a user error, one line), 130 (Ctrl-C)."""
    logging.set_verbosity(logging.WARNING)  # orbax / tfds INFO lines drown the progress bar
    flag_values = flags.FlagValues()  # fresh per call: config_flags registers the overrides of each parse
    config_flags.DEFINE_config_file("config", None, "Experiment config (file.py:arg).", lock_config=True,
                                    flag_values=flag_values)
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, config); resumed if it exists.",
                        flag_values=flag_values)
    _define_distributed_flags(flag_values)
    code = {"exit": 0}

    def body() -> str:
        if not flag_values.workdir:
            raise cli.UsageError("--workdir: required (a directory for checkpoints and metrics)")
        distributed.initialize(flag_values.coordinator_address, flag_values.num_processes, flag_values.process_id,
                               flag_values.local_device_ids)
        try:
            res = train(cli.load_config(flag_values), flag_values.workdir)
        except KeyboardInterrupt:
            code["exit"] = 130
            return (f"aborted: the last checkpoint in {flag_values.workdir} is intact; rerun the command to resume "
                    "from it")
        code["exit"] = 130 if res.stop_signal == "SIGINT" else 0  # Ctrl-C: saved, but the run did not finish
        if jax.process_index() != 0:
            return ""  # process 0 reports for the run
        if not res.final_eval:
            return f"stopped at step {res.step}; rerun the command to resume"
        return json.dumps({"step": res.step, **{k: v for k, v in res.final_eval.items() if "per_layer" not in k}})

    rc = cli.run("train", flag_values, argv, body, (ConfigError, TrainError, ckpt.CheckpointError,
                                                   data_lib.DataError, MetricsFileError,
                                                   distributed.DistributedError), __doc__)
    return rc or code["exit"]


def _define_distributed_flags(flag_values: flags.FlagValues) -> None:
    """The multi-process flags (:mod:`prosparse_jax.training.distributed`); unset, the environment or SLURM decides."""
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for a multi-process run (default: "
                        "$JAX_COORDINATOR_ADDRESS; SLURM's srun: detected).", flag_values=flag_values)
    flags.DEFINE_integer("num_processes", None, "Number of processes (default: $JAX_NUM_PROCESSES; srun: "
                         "$SLURM_NTASKS); 1 forces a single process.", flag_values=flag_values)
    flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes) (default: $JAX_PROCESS_ID; "
                         "srun: $SLURM_PROCID).", flag_values=flag_values)
    flags.DEFINE_string("local_device_ids", None, "Comma-separated local devices this process uses (default: "
                        "$JAX_LOCAL_DEVICE_IDS; all, or one per task under srun on GPUs).", flag_values=flag_values)


if __name__ == "__main__":
    sys.exit(main())
