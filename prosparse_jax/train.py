"""ProSparse training: LM loss + lambda(t) * sum_layers ||x1||_1, orbax resume, metrics, FATReLU evaluation.

    python -m prosparse_jax.train --config=configs/prosparse.py:tiny --workdir=/tmp/run

One run = (optionally) start from ``init_from`` with the activation of ``model.activation`` substituted, train
through the sparsity stage table, then evaluate with FATReLU threshold shifting (``sparsity.final_threshold``).
Re-running the same command on the same workdir resumes from its latest checkpoint; SIGTERM saves and exits 0.

Objective (ProSparse Eq. 2): loss = CE(next token) + lambda(t) * sum_l L1_l with, per ``sparsity.l1_reduction``,
L1_l = mean over tokens of ||x1_l||_1 (sum over d_ff; ``"sum"``, the paper's literal form and the default) or the
mean of |x1_l| over tokens x d_ff (``"mean"`` = ``"sum"`` / d_ff); lambda(t) is evaluated from the step stored in
the train state inside the jitted step (so it resumes exactly).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import queue
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from prosparse_jax import checkpoint as ckpt
from prosparse_jax import data as data_lib
from prosparse_jax import optim as optim_lib
from prosparse_jax import schedules
from prosparse_jax import sharding as shard_lib
from prosparse_jax.config import L1_REDUCTIONS, ConfigError, ModelConfig, RunConfig
from prosparse_jax.metrics import MetricsWriter, measure_matmul_peak
from prosparse_jax.model import (
    Params,
    abstract_params,
    cross_entropy,
    forward,
    init_params,
    stack_layers,
    unstack_layers,
)
from prosparse_jax.run_config import resolve

# Fields that may change between a run and its resumption (they do not change the numbers; model.scan_layers only
# changes the layout of the state in memory -- checkpoints are stacked either way -- and float round-off).
RESUMABLE_CHANGES = {
    "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints", "train.keep_period",
    "train.async_checkpoint", "train.progress_bar", "data.data_dir", "model.scan_layers",
}


class TrainError(RuntimeError):
    """The run cannot start or continue; the message says why and what to do."""


class NonFiniteLossError(TrainError):
    """Loss or gradients became NaN/Inf; the update was not applied and the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainResult:
    workdir: Path
    step: int
    final_eval: dict[str, Any]
    interrupted: bool


# ---------------------------------------------------------------------------------------------------------------
# Loss and step
# ---------------------------------------------------------------------------------------------------------------
def loss_fn(params: Params, batch: dict[str, jax.Array], cfg: ModelConfig, reg_factor: jax.Array,
            l1_reduction: str = "sum") -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss = lm_loss + reg_factor * sum over layers of the layer's L1 term.

    The L1 term of a layer (``sparsity.l1_reduction``, see :data:`prosparse_jax.run_config.L1_REDUCTIONS`):
    ``"sum"`` = ||x1||_1 of a token's d_ff vector as in ProSparse Eq. 2 (a sum over d_ff), averaged over valid tokens;
    ``"mean"`` = the mean of |x1| over valid tokens x d_ff, i.e. exactly ``"sum"`` / d_ff.
    """
    logits, stats = forward(params, batch["inputs"], cfg, segment_ids_BxT=batch["segment_ids"],
                            positions_BxT=batch["positions"])
    lm_loss = cross_entropy(logits, batch["targets"], batch["weights"])
    if l1_reduction not in L1_REDUCTIONS:
        raise ConfigError(f"sparsity.l1_reduction: {l1_reduction!r}; choose one of: {', '.join(L1_REDUCTIONS)}")
    per_element = jnp.sum(stats.mean_abs_x1)  # stats.mean_abs_x1: mean |x1| over valid tokens x d_ff, per layer
    reg_loss = reg_factor * (per_element * cfg.d_ff if l1_reduction == "sum" else per_element)
    return lm_loss + reg_loss, {"lm_loss": lm_loss, "reg_loss": reg_loss, "sparsity_per_layer": stats.zero_frac,
                                "mean_abs_x1_per_layer": stats.mean_abs_x1}


def accumulate_grads(params: Params, batch: dict[str, jax.Array], cfg: ModelConfig, reg_factor: jax.Array,
                     l1_reduction: str = "sum") -> tuple[dict[str, jax.Array], Params]:
    """Metrics and gradients of the objective over all micro-batches of ``batch`` (leaves [A, micro_batch, T]).

    The objective is the one of a single batch holding every micro-batch's rows: the LM loss is the mean over all
    target tokens of the step and the L1 term the mean over all its valid tokens -- each micro-batch weighs by its
    share of the tokens, not 1/A (micro-batches of packed data hold different numbers of valid tokens).
    """
    n = batch["inputs"].shape[0]
    if n == 1:  # no accumulation buffers (zeros + g == g): saves a pass over the parameters
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, jax.tree.map(lambda x: x[0], batch), cfg, reg_factor, l1_reduction)
        return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), dict(aux, loss=loss)), grads
    w_A = jnp.sum(batch["weights"].astype(jnp.float32), axis=(1, 2))  # CE target tokens per micro-batch
    v_A = jnp.sum((batch["segment_ids"] != 0).astype(jnp.float32), axis=(1, 2))  # valid tokens (the L1 mean's)
    shares = (w_A / jnp.maximum(w_A.sum(), 1.0), v_A / jnp.maximum(v_A.sum(), 1.0))

    def weighted(p: Params, mb: dict[str, jax.Array], ce_share: jax.Array, reg_share: jax.Array
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        _, aux = loss_fn(p, mb, cfg, reg_factor, l1_reduction)
        out = {"lm_loss": aux["lm_loss"] * ce_share, "reg_loss": aux["reg_loss"] * reg_share,
               "sparsity_per_layer": aux["sparsity_per_layer"] * reg_share,
               "mean_abs_x1_per_layer": aux["mean_abs_x1_per_layer"] * reg_share}
        return out["lm_loss"] + out["reg_loss"], out

    grad_fn = jax.value_and_grad(weighted, has_aux=True)

    def micro(carry: Any, xs: Any) -> tuple[Any, None]:
        g_acc, aux_acc = carry
        mb, ce_share, reg_share = xs
        (loss, aux), g = grad_fn(params, mb, ce_share, reg_share)
        aux = dict(aux, loss=loss)
        return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, aux_acc, aux)), None

    zeros_aux = {"loss": 0.0, "lm_loss": 0.0, "reg_loss": 0.0,
                 "sparsity_per_layer": jnp.zeros(cfg.n_layers), "mean_abs_x1_per_layer": jnp.zeros(cfg.n_layers)}
    zeros_aux = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), zeros_aux)
    (grads, aux), _ = jax.lax.scan(micro, (jax.tree.map(jnp.zeros_like, params), zeros_aux), (batch, *shares))
    return aux, grads


def make_train_step(rc: RunConfig, tx: Any, lr_fn: Any, reg_factor_fn: Any):
    """Builds ``step(state, batch) -> (state, metrics)``; batch leaves are [grad_accum, micro_batch, T]."""
    cfg = rc.model

    def step(state: dict[str, Any], batch: dict[str, jax.Array]) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        t = state["step"]
        reg_factor = reg_factor_fn(t)
        aux, grads = accumulate_grads(state["params"], batch, cfg, reg_factor, rc.sparsity.l1_reduction)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(aux["loss"]) & jnp.isfinite(grad_norm)

        def apply(operands: tuple[Any, Any, Any]) -> tuple[Any, Any]:
            params, opt_state, grads = operands
            updates, new_opt = tx.update(grads, opt_state, params)
            return jax.tree.map(lambda p, u: p + u, params, updates), new_opt

        # A non-finite step is not applied: the state stays the last good one and the host stops the run.
        new_params, new_opt = jax.lax.cond(finite, apply, lambda ops: (ops[0], ops[1]),
                                           (state["params"], state["opt_state"], grads))
        new_state = {"params": new_params, "opt_state": new_opt, "step": jnp.where(finite, t + 1, t)}
        metrics = dict(aux, reg_factor=reg_factor, lr=lr_fn(t), grad_norm=grad_norm, finite=finite,
                       sparsity=jnp.mean(aux["sparsity_per_layer"]))
        return new_state, metrics

    return step


def metrics_lag(n_devices: int) -> bool:
    """Whether the loop fetches a step's metrics one step late (not on several simulated CPU devices: collectives
    queued there can deadlock, so every step is synced)."""
    return n_devices == 1 or jax.devices()[0].platform != "cpu"


def place_state(params: Params, opt_state: Any, step: int, cfg: ModelConfig, mesh: jax.sharding.Mesh
                ) -> dict[str, Any]:
    """The train state for the jitted step from stacked params and optimizer state.

    Parameters and optimizer state get their FSDP shardings (a no-op when already placed), the per-layer layout when
    ``cfg.scan_layers`` is False (checkpoints stay stacked, see ``train``'s ``save``), and the step counter is
    replicated on the mesh -- everything placed as the jitted step returns it, so its second call does not compile
    it again.
    """
    params = jax.device_put(params, shard_lib.shardings_like(params, mesh))
    opt_state = jax.device_put(opt_state, shard_lib.shardings_like(opt_state, mesh))
    if not cfg.scan_layers:
        params, opt_state = to_per_layer((params, opt_state), mesh)
    step_arr = jax.device_put(np.int32(step), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return {"params": params, "opt_state": opt_state, "step": step_arr}


@functools.cache
def _matmul_peak(device_kind: str) -> float:
    """The MFU denominator: one device's measured matmul FLOP/s, measured once per process and device kind."""
    del device_kind  # the cache key
    return measure_matmul_peak()


def to_per_layer(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """The per-layer training layout of stacked params / optimizer state (``model.scan_layers = False``).

    Each layer group keeps the FSDP sharding rule of its stacked leaf."""
    out_sh = shard_lib.shardings_like(jax.eval_shape(unstack_layers, tree), mesh)
    return jax.jit(unstack_layers, out_shardings=out_sh)(tree)


@jax.jit
def stack_layers_jit(params: Params, opt_state: Any) -> tuple[Params, Any]:
    """Stacked copies of per-layer params and optimizer state, for a checkpoint (the state itself is unchanged)."""
    return stack_layers(params), stack_layers(opt_state)


@functools.lru_cache(maxsize=8)
def make_eval_fn(cfg: ModelConfig):
    """Jitted held-out evaluation of one model config (cached: evaluate() runs every eval_every steps)."""

    def ev(params: Params, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        logits, stats = forward(params, batch["inputs"], cfg, segment_ids_BxT=batch["segment_ids"],
                                positions_BxT=batch["positions"])
        w = batch["weights"]
        return {"nll_sum": cross_entropy(logits, batch["targets"], w) * jnp.maximum(w.sum(), 1.0),
                "tokens": w.sum(), "zero_frac": stats.zero_frac}

    return jax.jit(ev)


def evaluate(params: Params, cfg: ModelConfig, batches: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Held-out loss / perplexity / activation sparsity (mean over layers and per layer)."""
    ev = make_eval_fn(cfg)
    nll, tok, zf = 0.0, 0.0, np.zeros(cfg.n_layers)
    for b in batches:
        out = jax.device_get(ev(params, b))
        nll += float(out["nll_sum"])
        tok += float(out["tokens"])
        zf += np.asarray(out["zero_frac"])
    zf /= max(len(batches), 1)
    loss = nll / max(tok, 1.0)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_sparsity": float(zf.mean()),
            "eval_sparsity_per_layer": [float(x) for x in zf], "eval_tokens": int(tok)}


# ---------------------------------------------------------------------------------------------------------------
# Workdir / config handling
# ---------------------------------------------------------------------------------------------------------------
def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _json_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
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


def _prepare_tokenizer(rc: RunConfig, workdir: Path) -> tuple[Any, Any]:
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


def _load_init_params(rc: RunConfig) -> Params:
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


# ---------------------------------------------------------------------------------------------------------------
# Data prefetch (batch paired with the iterator state *after* it, so checkpoints resume exactly)
# ---------------------------------------------------------------------------------------------------------------
def _prefetch(it: data_lib.TrainIterator, depth: int = 2) -> Iterator[tuple[dict[str, np.ndarray], dict]]:
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            while not stop.is_set():
                b = next(it)
                q.put((b, it.get_state()))
        except BaseException as e:  # noqa: BLE001 - surfaced in the consumer
            q.put(e)

    th = threading.Thread(target=produce, daemon=True)
    th.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------
def train(config: ml_collections.ConfigDict, workdir: str | Path, *, stop_after: int | None = None) -> TrainResult:
    """Runs (or resumes) one training run in ``workdir``. ``stop_after`` simulates a kill after that step."""
    workdir = Path(workdir)
    rc = resolve(config)
    config_json = _json_config(config)
    check_workdir_config(workdir, config_json)
    shard_lib.maybe_initialize_distributed()
    is_main = jax.process_index() == 0

    tokenizer, dcfg = _prepare_tokenizer(rc, workdir)
    rc = dataclasses.replace(rc, data=dcfg)
    workdir.mkdir(parents=True, exist_ok=True)
    if is_main and not (workdir / "config.json").exists():
        (workdir / "config.json").write_text(json.dumps(config_json, indent=2))

    # ---- mesh and batch semantics ----
    mesh = shard_lib.make_mesh(rc.train.mesh_data, rc.train.mesh_fsdp)
    n_dev, n_proc = jax.device_count(), jax.process_count()
    B, A, T = rc.train.batch_size, rc.train.grad_accum, rc.data.seq_len
    micro = B // A
    if micro % n_dev:
        raise ConfigError(f"train.batch_size / train.grad_accum = {micro} must be divisible by the {n_dev} devices")
    if B % n_proc:
        raise ConfigError(f"train.batch_size={B} must be divisible by the {n_proc} processes")
    if is_main:
        print(json.dumps({"global_batch": B, "grad_accum_steps": A, "micro_batch": micro,
                          "per_device_batch": micro // n_dev, "devices": n_dev, "processes": n_proc,
                          "mesh": dict(mesh.shape), "seq_len": T, "tokens_per_step": B * T,
                          "steps": rc.train.steps, "activation": rc.model.activation,
                          "params": rc.model.params_total}), flush=True)

    # ---- state ----
    tx, lr_fn = optim_lib.make_optimizer(rc.optim, rc.train.steps, rc.model.d_model)
    reg_factor_fn = schedules.reg_factor_schedule(rc.sparsity.stages)
    p_shard = shard_lib.shardings_like(abstract_params(rc.model), mesh)
    rng = jax.random.key(rc.train.seed)

    start = ckpt.latest_step(workdir)
    if start is not None and start >= rc.train.steps and (workdir / "final_eval.json").exists():
        if is_main:
            print(f"{workdir} already finished at step {start}; nothing to do", flush=True)
        final = json.loads((workdir / "final_eval.json").read_text())
        return TrainResult(workdir=workdir, step=start, final_eval=final, interrupted=False)
    mgr = ckpt.manager(workdir, keep=rc.train.keep_checkpoints, async_save=rc.train.async_checkpoint,
                       keep_period=rc.train.keep_period)
    abs_params = abstract_params(rc.model)
    abs_opt = jax.eval_shape(tx.init, abs_params)
    o_shard = shard_lib.shardings_like(abs_opt, mesh)
    data_state = None
    if start is not None:
        with_sh = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
        params, opt_state, extra = ckpt.restore(mgr, start, jax.tree.map(with_sh, abs_params, p_shard),
                                                jax.tree.map(with_sh, abs_opt, o_shard))
        data_state = extra.get("data_state")
        if is_main:
            print(f"resuming {workdir} from step {start}", flush=True)
    else:
        if rc.init_from:
            params = jax.device_put(_load_init_params(rc), p_shard)
        else:
            params = jax.jit(lambda r: init_params(rc.model, r), out_shardings=p_shard)(rng)
        opt_state = jax.jit(tx.init, out_shardings=o_shard)(params)
        start = 0
    state = place_state(params, opt_state, start, rc.model, mesh)

    # ---- data ----
    it = data_lib.make_train_iterator(rc.data, tokenizer, batch_size=B // n_proc, cache_dir=workdir,
                                      process_index=jax.process_index(), process_count=n_proc)
    if data_state is not None:
        it.set_state(data_state)
    eval_batches = data_lib.make_eval_batches(rc.data, tokenizer, batch_size=min(B, 8),
                                              num_batches=rc.train.eval_batches, cache_dir=workdir)
    def to_device(b: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        # [B_host, T] -> [A, micro_host, T]; the micro-batch dimension is sharded over the devices.
        out = {}
        sh = shard_lib.accum_batch_sharding(mesh)
        for k, v in b.items():
            v = v.reshape(A, v.shape[0] // A, *v.shape[1:])
            out[k] = jax.make_array_from_process_local_data(sh, v) if n_proc > 1 else jax.device_put(v, sh)
        return out

    step_fn = jax.jit(make_train_step(rc, tx, lr_fn, reg_factor_fn), donate_argnums=(0,))

    # ---- metrics ----
    writer = MetricsWriter(workdir, resume_step=start, enabled=is_main)
    peak = _matmul_peak(jax.devices()[0].device_kind) * n_dev
    flops_per_step = rc.model.flops_per_token(T) * B * T

    stop_requested = {"flag": False}

    def on_sigterm(signum: int, frame: Any) -> None:
        del signum, frame
        stop_requested["flag"] = True

    prev_handler = signal.signal(signal.SIGTERM, on_sigterm) if threading.current_thread() is threading.main_thread() \
        else None

    def save(step: int, force: bool = False) -> None:
        params, opt_state = state["params"], state["opt_state"]
        if not rc.model.scan_layers:
            params, opt_state = stack_layers_jit(params, opt_state)
        ckpt.save(mgr, step, params, opt_state,
                  {"step": step, "data_state": last_data_state, "model": dataclasses.asdict(rc.model)},
                  force=force)

    pbar = None
    if is_main and rc.train.progress_bar:
        from tqdm import tqdm

        pbar = tqdm(total=rc.train.steps, initial=start, desc="train", file=sys.stderr, dynamic_ncols=True)

    last_data_state = data_state if data_state is not None else it.get_state()
    batches = _prefetch(it)
    step = start
    interrupted = False
    t_last, tokens_since = time.perf_counter(), 0
    mean_keys = ("loss", "lm_loss", "reg_loss", "grad_norm", "sparsity", "sparsity_per_layer", "mean_abs_x1_per_layer")
    acc: dict[str, Any] = {}  # sums since the last metrics entry (entries report interval means)
    n_acc = 0
    # Metrics are fetched one step late: step s+1 is dispatched before the host waits on step s's metrics, so the
    # host's bookkeeping overlaps device work. Steps that need the state (eval, checkpoint, end, stop) are synced at
    # once. On several simulated CPU devices every step is synced: queued collectives can deadlock there.
    lag = metrics_lag(n_dev)
    pending: tuple[Any, Any] | None = None  # (metrics on device, data-iterator state after that step's batch)

    def process(m_dev: Any, data_state_after: Any) -> None:
        """Host side of one finished step: NaN guard, interval means, progress bar, metrics entry."""
        nonlocal step, last_data_state, tokens_since, acc, n_acc, t_last
        m = jax.device_get(m_dev)
        if not bool(m["finite"]):
            mgr.wait_until_finished()
            raise NonFiniteLossError(
                f"non-finite loss/gradient at step {step} (loss={float(m['loss'])}, grad_norm="
                f"{float(m['grad_norm'])}); the update was not applied. Last good checkpoint: "
                f"{ckpt.latest_step(workdir)} in {workdir}/checkpoints. Lower optim.lr or the sparsity lambdas."
            )
        last_data_state = data_state_after
        step += 1
        tokens_since += B * T
        for k in mean_keys:
            acc[k] = acc.get(k, 0.0) + np.asarray(m[k], np.float64)
        n_acc += 1
        if pbar is not None:
            pbar.update(1)
            pbar.set_postfix(loss=f"{float(m['loss']):.3f}", sp=f"{float(m['sparsity']):.3f}")
        if step % rc.train.log_every == 0 or step == rc.train.steps:
            dt = time.perf_counter() - t_last
            tps = tokens_since / max(dt, 1e-9)
            mean = {k: v / n_acc for k, v in acc.items()}
            writer.write(step, {
                # interval means over the steps since the previous entry
                "loss": float(mean["loss"]), "lm_loss": float(mean["lm_loss"]),
                "reg_loss": float(mean["reg_loss"]), "grad_norm": float(mean["grad_norm"]),
                "sparsity": float(mean["sparsity"]),
                "sparsity_per_layer": [float(x) for x in mean["sparsity_per_layer"]],
                "mean_abs_x1_per_layer": [float(x) for x in mean["mean_abs_x1_per_layer"]],
                # values of the update with index step - 1
                "reg_factor": float(m["reg_factor"]), "lr": float(m["lr"]),
                "last_loss": float(m["loss"]), "last_sparsity": float(m["sparsity"]),
                "tokens_per_sec": tps, "mfu": flops_per_step / (B * T) * tps / peak,
                "tokens_seen": step * B * T, "steps_averaged": n_acc,
            })
            t_last, tokens_since = time.perf_counter(), 0
            acc, n_acc = {}, 0

    def needs_state(s: int) -> bool:
        """Whether the host must act on the state right after step s (eval, checkpoint, end, stop)."""
        return (s == rc.train.steps or s % rc.train.checkpoint_every == 0
                or bool(rc.train.eval_every and s % rc.train.eval_every == 0)
                or stop_requested["flag"] or (stop_after is not None and s >= stop_after))

    try:
        while step < rc.train.steps:
            batch, next_data_state = next(batches)
            state, m_dev = step_fn(state, to_device(batch))
            dispatched = step + (2 if pending is not None else 1)  # the step number of the one just dispatched
            if pending is not None:
                process(*pending)  # the previous step's metrics, fetched while this step runs
                pending = None
            if lag and not needs_state(dispatched):
                pending = (m_dev, next_data_state)
                continue
            process(m_dev, next_data_state)
            if rc.train.eval_every and step % rc.train.eval_every == 0 and step != rc.train.steps:
                writer.write(step, evaluate(state["params"], rc.model, eval_batches), kind="eval")
                t_last = time.perf_counter()
            if step % rc.train.checkpoint_every == 0 or step == rc.train.steps:
                save(step)
            if stop_requested["flag"] or (stop_after is not None and step >= stop_after):
                if step % rc.train.checkpoint_every and step != rc.train.steps:
                    save(step, force=True)
                interrupted = True
                if is_main:
                    print(f"stopping at step {step}: checkpoint saved in {workdir}", flush=True)
                break
    finally:
        mgr.wait_until_finished()
        if pbar is not None:
            pbar.close()
        if prev_handler is not None:
            signal.signal(signal.SIGTERM, prev_handler)

    final: dict[str, Any] = {}
    if not interrupted:
        final = evaluate(state["params"], rc.model, eval_batches)
        writer.write(step, final, kind="eval")
        t = rc.sparsity.final_threshold
        if t > 0 and rc.model.activation in ("relu", "fatrelu"):
            fat_cfg = rc.model.replace(activation="fatrelu", activation_threshold=t)
            fat = evaluate(state["params"], fat_cfg, eval_batches)
            fat = {f"fatrelu_{k}": v for k, v in fat.items()}
            fat["fatrelu_threshold"] = t
            writer.write(step, fat, kind="final_fatrelu")
            final.update(fat)
        if is_main:
            (workdir / "final_eval.json").write_text(json.dumps(dict(final, step=step), indent=2))
    writer.close()
    mgr.close()
    return TrainResult(workdir=workdir, step=step, final_eval=final, interrupted=interrupted)


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax / tfds INFO lines drown the progress bar
    FLAGS = flags.FLAGS
    if not FLAGS.workdir:
        print("error: --workdir is required (a directory for checkpoints and metrics)", file=sys.stderr)
        sys.exit(2)
    try:
        res = train(FLAGS.config, FLAGS.workdir)
    except (ConfigError, TrainError, ckpt.CheckpointError, data_lib.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if res.final_eval:
        print(json.dumps({"step": res.step, **{k: v for k, v in res.final_eval.items() if "per_layer" not in k}}))


if __name__ == "__main__":
    # flags are defined only when run as a program, so the module can be imported next to other CLIs
    config_flags.DEFINE_config_file("config", None, "Experiment config (file.py:arg).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, config); resumed if it exists.")
    app.run(main)
