"""ProSparse training: the run loop with orbax resume, metrics, evaluation and the FATReLU evaluation.

    python -m prosparse_jax.train --config=configs/prosparse.py:tiny --workdir=/tmp/run

One run = (optionally) start from ``init_from`` with the activation of ``model.activation`` substituted, train
through the sparsity stage table, then evaluate with FATReLU threshold shifting (``sparsity.final_threshold``,
ProSparse §3.3). Re-running the same command on the same workdir resumes from its latest checkpoint; SIGTERM saves
and exits 0.

:func:`train` runs four named steps: :func:`_setup` (config, workdir, tokenizer, mesh, batch semantics) ->
:func:`_init_state` (restore the latest checkpoint, or initialise / load ``init_from``) -> :class:`_Loop` (steps,
metrics fetched one step late, evaluations, checkpoints, stop requests) -> :func:`_final_eval`. The objective and the
jitted step are in :mod:`prosparse_jax.step`; the workdir's checks in :mod:`prosparse_jax.workdir`.

Several processes (hosts) run the same command on JAX's runtime: with ``--coordinator_address``, ``--num_processes``
and ``--process_id`` (or ``JAX_*`` variables), or under SLURM's ``srun`` with nothing added (see
:mod:`prosparse_jax.distributed`). Each reads its own data shard; process 0 alone writes metrics and prints; all save.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags, logging
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags

from prosparse_jax import checkpoint as ckpt
from prosparse_jax import cli, distributed, schedules
from prosparse_jax import data as data_lib
from prosparse_jax import optim as optim_lib
from prosparse_jax import sharding as shard_lib
from prosparse_jax.config import ConfigError, RunConfig
from prosparse_jax.metrics import IntervalMeans, MetricsFileError, MetricsWriter, measure_matmul_peak
from prosparse_jax.model import Params, abstract_params, init_params
from prosparse_jax.run_config import resolve
from prosparse_jax.step import evaluate, make_train_step, place_state, stack_layers_jit
from prosparse_jax.workdir import (
    TrainError,
    check_workdir_config,
    json_config,
    load_init_params,
    prepare_tokenizer,
    write_config,
)

# step metrics reported as means over the steps since the previous metrics entry
_MEAN_KEYS = ("loss", "lm_loss", "reg_loss", "grad_norm", "sparsity", "sparsity_per_layer", "mean_abs_x1_per_layer")


class NonFiniteLossError(TrainError):
    """Loss or gradients became NaN/Inf; the update was not applied and the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainResult:
    workdir: Path
    step: int
    final_eval: dict[str, Any]
    interrupted: bool
    stop_signal: str | None = None  # "SIGTERM" / "SIGINT" when a signal stopped the run


@functools.cache
def _matmul_peak(device_kind: str) -> float:  # the key: measured once per process and device kind
    """The MFU denominator: one device's measured matmul FLOP/s."""
    return measure_matmul_peak()


def metrics_lag(n_devices: int) -> bool:
    """Whether the loop fetches a step's metrics one step late (not on several simulated CPU devices: collectives
    queued there can deadlock, so every step is synced)."""
    return n_devices == 1 or jax.devices()[0].platform != "cpu"


# ---------------------------------------------------------------------------------------------------------------
# Set-up and state
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Run:
    """What the set-up resolved for one run."""

    rc: RunConfig
    config_json: dict[str, Any]  # the experiment config as written to config.json and into every checkpoint
    workdir: Path
    tokenizer: Any
    mesh: jax.sharding.Mesh
    is_main: bool  # process 0: the only one writing metrics, config.json, final_eval.json and printing
    train_iter: data_lib.TrainIterator  # this process's rows of every batch
    eval_batches: list[dict[str, jax.Array]]  # the same on every process, rows split over the mesh

    @property
    def tokens_per_step(self) -> int:
        return self.rc.train.batch_size * self.rc.data.seq_len


def _setup(config: ml_collections.ConfigDict, workdir: str | Path) -> _Run:
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
    return _Run(rc, config_json, workdir, tokenizer, mesh, is_main, train_iter,
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


def _init_state(run: _Run, tx: Any, mgr: Any, start: int | None) -> tuple[dict[str, Any], Any]:
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
# The loop
# ---------------------------------------------------------------------------------------------------------------
class _Loop:
    """Runs the steps from ``start`` to ``train.steps`` (or a stop request) on the host side.

    Metrics are fetched one step late: step s+1 is dispatched before the host waits on step s's metrics, so the
    host's bookkeeping overlaps device work. Steps that need the state (eval, checkpoint, end, stop) are synced at
    once. On several simulated CPU devices every step is synced (:func:`metrics_lag`).

    With several processes every one runs this loop in lockstep: each puts its rows of the batch, all save every
    checkpoint (orbax writes each process's shards), only process 0 writes metrics and prints. A stop request
    (a signal to any process) is OR-ed over the processes with each step, so all stop after the same step.
    """

    def __init__(self, run: _Run, state: dict[str, Any], step_fn: Any, mgr: Any, start: int,
                 data_state: Any, stop_after: int | None) -> None:
        rc = run.rc
        self.run, self.rc, self.state, self.step_fn, self.mgr = run, rc, state, step_fn, mgr
        self.step, self.stop_after = start, stop_after
        self.stop_requested = ""  # the name of the signal that asked this process to stop, "" while none did
        self.multi = jax.process_count() > 1
        self.stop_agreed = False  # several processes: some process asked to stop (the same on every process)
        self.it = run.train_iter
        if data_state is not None:
            self.it.set_state(data_state)
        self.last_data_state = self.it.get_state()
        self.eval_batches = run.eval_batches
        self.batch_sharding = shard_lib.accum_batch_sharding(run.mesh)
        self.writer = MetricsWriter(run.workdir, resume_step=start, enabled=run.is_main)
        self.means = IntervalMeans(_MEAN_KEYS)
        self.peak = _matmul_peak(jax.devices()[0].device_kind) * jax.device_count()
        self.t_last, self.steps_since = time.perf_counter(), 0
        self.pbar = None
        if run.is_main and rc.train.progress_bar:
            from tqdm import tqdm

            self.pbar = tqdm(total=rc.train.steps, initial=start, desc="train", file=sys.stderr, dynamic_ncols=True)

    def to_device(self, b: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's [B_host, T] -> global [A, micro, T]; the micro-batch dimension, made of every process's
        rows, is sharded over the devices."""
        A = self.rc.train.grad_accum
        b = {k: v.reshape(A, v.shape[0] // A, *v.shape[1:]) for k, v in b.items()}
        return shard_lib.host_batch_to_global(b, self.batch_sharding)

    @property
    def stopping(self) -> bool:
        """Whether a stop was requested (with several processes: of any process, as of the last processed step)."""
        return self.stop_agreed if self.multi else bool(self.stop_requested)

    def run_steps(self) -> bool:
        """The loop; returns whether it stopped early (a stop request or ``stop_after``)."""
        lag, pending = metrics_lag(jax.device_count()), None
        batches = data_lib.prefetch(self.it)
        while self.step < self.rc.train.steps:
            batch, next_data_state = next(batches)
            self.state, m_dev = self.step_fn(self.state, self.to_device(batch))
            stop_dev = distributed.any_process(bool(self.stop_requested), self.run.mesh) if self.multi else None
            dispatched = self.step + (2 if pending is not None else 1)  # the step number of the one just dispatched
            if pending is not None:
                self.process(*pending)  # the previous step's metrics, fetched while this step runs
                pending = None
            if lag and not self.needs_state(dispatched):
                pending = (m_dev, next_data_state, stop_dev)
                continue
            self.process(m_dev, next_data_state, stop_dev)
            if self.after_step():
                return True
        return False

    def needs_state(self, s: int) -> bool:
        """Whether the host must act on the state right after step s (eval, checkpoint, end, stop)."""
        t = self.rc.train
        return (s == t.steps or s % t.checkpoint_every == 0 or bool(t.eval_every and s % t.eval_every == 0)
                or self.stopping or (self.stop_after is not None and s >= self.stop_after))

    def process(self, m_dev: Any, data_state_after: Any, stop_dev: Any = None) -> None:
        """Host side of one finished step: NaN guard, interval means, progress bar, metrics entry (and, with several
        processes, whether any of them asked to stop by then)."""
        m = shard_lib.to_host(m_dev)
        if stop_dev is not None:
            self.stop_agreed = self.stop_agreed or bool(shard_lib.to_host(stop_dev))
        if not bool(m["finite"]):
            self.mgr.wait_until_finished()
            raise NonFiniteLossError(
                f"non-finite loss/gradient at step {self.step} (loss={float(m['loss'])}, grad_norm="
                f"{float(m['grad_norm'])}); the update was not applied. Last good checkpoint: "
                f"{ckpt.latest_step(self.run.workdir)} in {self.run.workdir}/checkpoints. Lower optim.lr or the "
                "sparsity lambdas.")
        self.last_data_state = data_state_after
        self.step += 1
        self.steps_since += 1
        self.means.add(m)
        if self.pbar is not None:
            self.pbar.update(1)
            self.pbar.set_postfix(loss=f"{float(m['loss']):.3f}", sp=f"{float(m['sparsity']):.3f}")
        if self.step % self.rc.train.log_every == 0 or self.step == self.rc.train.steps:
            self.log(m)

    def log(self, m: dict[str, Any]) -> None:
        """One train entry: interval means since the previous entry plus the last update's values."""
        tps = self.steps_since * self.run.tokens_per_step / max(time.perf_counter() - self.t_last, 1e-9)
        mean, n = self.means.pop()
        entry = {k: [float(x) for x in v] if k.endswith("_per_layer") else float(v) for k, v in mean.items()}
        self.writer.write(self.step, {
            **entry,
            # values of the update with index step - 1
            "reg_factor": float(m["reg_factor"]), "lr": float(m["lr"]),
            "last_loss": float(m["loss"]), "last_sparsity": float(m["sparsity"]),
            "tokens_per_sec": tps, "mfu": self.rc.model.flops_per_token(self.rc.data.seq_len) * tps / self.peak,
            "tokens_seen": self.step * self.run.tokens_per_step, "steps_averaged": n,
        })
        self.t_last, self.steps_since = time.perf_counter(), 0

    def after_step(self) -> bool:
        """Eval / checkpoint / stop after a synced step; returns True when the loop must stop."""
        t, s = self.rc.train, self.step
        if t.eval_every and s % t.eval_every == 0 and s != t.steps:
            self.writer.write(s, evaluate(self.state["params"], self.rc.model, self.eval_batches), kind="eval")
            self.t_last = time.perf_counter()
        if s % t.checkpoint_every == 0 or s == t.steps:
            self.save()
        if self.stopping or (self.stop_after is not None and s >= self.stop_after):
            if s % t.checkpoint_every and s != t.steps:
                self.save(force=True)
            if self.run.is_main:
                print(f"stopping at step {s}: checkpoint saved in {self.run.workdir}", flush=True)
            return True
        return False

    def save(self, force: bool = False) -> None:
        """Checkpoint of the current step (stacked layout, with the data-iterator state and the model config)."""
        params, opt_state = self.state["params"], self.state["opt_state"]
        if not self.rc.model.scan_layers:
            params, opt_state = stack_layers_jit(params, opt_state)
        extra = {"step": self.step, "model": dataclasses.asdict(self.rc.model), "run_config": self.run.config_json}
        if self.multi:  # orbax writes extra from process 0: it carries every process's position in its shard
            extra["data_states"] = distributed.allgather_json(self.last_data_state)
        else:
            extra["data_state"] = self.last_data_state
        ckpt.save(self.mgr, self.step, params, opt_state, extra, force=force)

    def close(self) -> None:
        if self.pbar is not None:
            self.pbar.close()


def _final_eval(loop: _Loop) -> dict[str, Any]:
    """Held-out evaluation at the end, then with FATReLU(t = sparsity.final_threshold) in place of ReLU
    (ProSparse §3.3: threshold shifting without retraining); written to metrics and ``final_eval.json``."""
    rc, params = loop.rc, loop.state["params"]
    final = evaluate(params, rc.model, loop.eval_batches)
    loop.writer.write(loop.step, final, kind="eval")
    t = rc.sparsity.final_threshold
    if t > 0 and rc.model.activation in ("relu", "fatrelu"):
        fat = evaluate(params, rc.model.replace(activation="fatrelu", activation_threshold=t), loop.eval_batches)
        fat = {f"fatrelu_{k}": v for k, v in fat.items()} | {"fatrelu_threshold": t}
        loop.writer.write(loop.step, fat, kind="final_fatrelu")
        final.update(fat)
    if loop.run.is_main:
        (loop.run.workdir / "final_eval.json").write_text(json.dumps(dict(final, step=loop.step), indent=2))
    return final


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
    loop = _Loop(run, state, step_fn, mgr, start or 0, data_state, stop_after)

    handlers = _install_stop_handlers(loop)
    try:
        with jax.set_mesh(run.mesh):  # Mosaic kernels (splash attention) are partitioned under the mesh
            interrupted = loop.run_steps()
        mgr.wait_until_finished()
        final = {} if interrupted else _final_eval(loop)
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


def _install_stop_handlers(loop: _Loop) -> dict[int, Any]:
    """SIGTERM and SIGINT (Ctrl-C) stop the loop after the current step with a checkpoint; a second Ctrl-C aborts
    at once (KeyboardInterrupt). Returns the previous handlers (none off the main thread, where Python has none)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def on_signal(signum: int, frame: Any) -> None:
        del frame
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and loop.stop_requested:
            raise KeyboardInterrupt
        loop.stop_requested = name
        again = " (Ctrl-C again aborts at once, without saving)" if signum == signal.SIGINT else ""
        if loop.run.is_main:
            print(f"{name}: stopping after this step and saving a checkpoint{again}", file=sys.stderr, flush=True)

    return {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}


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
    """The multi-process flags (:mod:`prosparse_jax.distributed`); unset, the environment or SLURM decides."""
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
