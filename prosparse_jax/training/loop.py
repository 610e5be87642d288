"""The host side of a training run: the step loop, its metrics, checkpoints and stop requests, the final evaluation.

:class:`Loop` runs the jitted step from a start step to ``train.steps``; :func:`final_eval` evaluates at the end, also
with FATReLU threshold shifting. :mod:`prosparse_jax.training.train` builds a :class:`RunSetup` and drives these.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from prosparse_jax.config import RunConfig
from prosparse_jax.data import pipeline as data_lib
from prosparse_jax.errors import NonFiniteLossError
from prosparse_jax.training import checkpoint as ckpt
from prosparse_jax.training import distributed
from prosparse_jax.training import sharding as shard_lib
from prosparse_jax.training.metrics import IntervalMeans, MetricsWriter, measure_matmul_peak
from prosparse_jax.training.step import make_evaluate, stack_layers_jit

# step metrics reported as means over the steps since the previous metrics entry
MEAN_KEYS = ("loss", "lm_loss", "reg_loss", "grad_norm", "sparsity", "sparsity_per_layer", "mean_abs_x1_per_layer")


@functools.cache
def _matmul_peak(device_kind: str) -> float:
    """The MFU denominator: one device's matmul FLOP/s, measured once per process and kind of device."""
    return measure_matmul_peak()


def metrics_lag(n_devices: int) -> bool:
    """Whether the loop fetches a step's metrics one step late (not on several simulated CPU devices: collectives
    queued there can deadlock, so every step is synced)."""
    return n_devices == 1 or jax.devices()[0].platform != "cpu"


@dataclasses.dataclass
class RunSetup:
    """What the set-up of one run resolved: config, workdir, tokenizer, mesh and data."""

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


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------
class Dispatched(NamedTuple):
    """A step sent to the devices whose results the host has not read yet."""

    metrics: dict[str, jax.Array]
    data_state: Any  # the data iterator's state after this step's batch
    any_stop: jax.Array | None  # several processes: whether any of them asked to stop (None with one process)


class Loop:
    """Runs the steps from ``start`` to ``train.steps`` (or a stop request) on the host side.

    Metrics are fetched one step late (:func:`metrics_lag`) so host bookkeeping overlaps device work; steps that need
    the state (eval, checkpoint, end, stop) are synced. Several processes run it in lockstep: all save every
    checkpoint, only process 0 writes metrics, and a stop request is OR-ed over them so all stop after the same step.
    """

    def __init__(self, run: RunSetup, state: dict[str, Any], step_fn: Any, mgr: Any, start: int,
                 data_state: Any) -> None:
        rc = run.rc
        self.run, self.rc, self.state, self.step_fn, self.mgr = run, rc, state, step_fn, mgr
        self.step = start
        self.stop_requested = ""  # the name of the signal that asked this process to stop, "" while none did
        self.multi = jax.process_count() > 1
        self.any_process = distributed.any_process_fn(run.mesh) if self.multi else None
        self.stop_agreed = False  # several processes: some process asked to stop (the same on every process)
        self.it = run.train_iter
        if data_state is not None:
            self.it.set_state(data_state)
        self.last_data_state = self.it.get_state()
        self.eval_batches = run.eval_batches
        self.evaluate = make_evaluate(rc.model)
        self.batch_sharding = shard_lib.accum_batch_sharding(run.mesh)
        self.writer = MetricsWriter(run.workdir, resume_step=start, enabled=run.is_main)
        self.means = IntervalMeans(MEAN_KEYS)
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
        """The loop; returns whether a stop request ended it early."""
        lag, pending = metrics_lag(jax.device_count()), None
        batches = data_lib.prefetch(self.it)
        while self.step < self.rc.train.steps:
            batch, next_data_state = next(batches)
            self.state, metrics = self.step_fn(self.state, self.to_device(batch))
            any_stop = self.any_process(bool(self.stop_requested)) if self.any_process is not None else None
            sent = Dispatched(metrics, next_data_state, any_stop)
            sent_step = self.step + (2 if pending is not None else 1)  # the step number of the one just dispatched
            if pending is not None:
                self.finish(pending)  # the previous step's metrics, fetched while this step runs
                pending = None
            if lag and not self.needs_state(sent_step):
                pending = sent
                continue
            self.finish(sent)
            if self.after_step():
                return True
        return False

    def needs_state(self, s: int) -> bool:
        """Whether the host must act on the state right after step s (eval, checkpoint, end, stop)."""
        t = self.rc.train
        return (s == t.steps or s % t.checkpoint_every == 0 or bool(t.eval_every and s % t.eval_every == 0)
                or self.stopping)

    def finish(self, sent: Dispatched) -> None:
        """Host side of one finished step: NaN guard, interval means, progress bar, metrics entry (and, with several
        processes, whether any of them asked to stop by then)."""
        m = shard_lib.to_host(sent.metrics)
        if sent.any_stop is not None:
            self.stop_agreed = self.stop_agreed or bool(shard_lib.to_host(sent.any_stop))
        if not bool(m["finite"]):
            with ckpt.save_errors(self.mgr):
                self.mgr.wait_until_finished()
            wd, last = self.run.workdir, ckpt.latest_step(self.run.workdir)
            fix = ("No checkpoint was saved, so nothing is lost: rerun with a lower optim.lr (or sparsity lambdas) in "
                   "the same --workdir, where it starts afresh." if last is None else
                   f"Last good checkpoint: step {last} in {wd}/checkpoints. A workdir resumes only its own config: "
                   "lower optim.lr (or the sparsity lambdas) in a new --workdir, with --config.init_from="
                   f"{wd} to start from that checkpoint's weights.")
            raise NonFiniteLossError(
                f"non-finite loss/gradient at step {self.step} (loss={float(m['loss'])}, grad_norm="
                f"{float(m['grad_norm'])}); the update was not applied. {fix}")
        self.last_data_state = sent.data_state
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
            self.writer.write(s, self.evaluate(self.state["params"], self.eval_batches), kind="eval")
            self.t_last = time.perf_counter()
        if s % t.checkpoint_every == 0 or s == t.steps:
            self.save()
        if self.stopping:
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
        with ckpt.save_errors(self.mgr):  # a full disk: one line; an async save's failure shows at the next save
            ckpt.save(self.mgr, self.step, params, opt_state, extra, force=force)

    def close(self) -> None:
        if self.pbar is not None:
            self.pbar.close()


def final_eval(loop: Loop) -> dict[str, Any]:
    """Held-out evaluation at the end, then with FATReLU(t = sparsity.final_threshold) in place of ReLU
    (ProSparse §3.3: threshold shifting without retraining); written to metrics and ``final_eval.json``."""
    rc, params = loop.rc, loop.state["params"]
    final = loop.evaluate(params, loop.eval_batches)
    loop.writer.write(loop.step, final, kind="eval")
    t = rc.sparsity.final_threshold
    if t > 0 and rc.model.activation in ("relu", "fatrelu"):
        fat_model = rc.model.replace(activation="fatrelu", activation_threshold=t)
        fat = make_evaluate(fat_model)(params, loop.eval_batches)
        fat = {f"fatrelu_{k}": v for k, v in fat.items()} | {"fatrelu_threshold": t}
        loop.writer.write(loop.step, fat, kind="final_fatrelu")
        final.update(fat)
    if loop.run.is_main:
        (loop.run.workdir / "final_eval.json").write_text(json.dumps(dict(final, step=loop.step), indent=2))
    return final


def install_stop_handlers(loop: Loop) -> dict[int, Any]:
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
