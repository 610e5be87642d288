"""ProSparse training: one run from a config into a workdir, resumed when the workdir holds it already.

:func:`train` runs :func:`_setup` (config, workdir, tokenizer, mesh, batch semantics) -> :func:`_init_state` (the
latest checkpoint, else ``init_from`` with ``model.activation`` substituted, else a random init) -> ``loop.Loop`` ->
``loop.final_eval`` (FATReLU threshold shifting, ProSparse §3.3). A multi-process run joins its processes first
(:func:`prosparse_jax.training.distributed.initialize`). The run is described in docs/training.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections

from prosparse_jax import files
from prosparse_jax.config import SECTIONS, RunConfig, build_section, resolve, to_dict
from prosparse_jax.data import corpus as corpus_lib
from prosparse_jax.data import pipeline as data_lib
from prosparse_jax.errors import CheckpointError, ConfigError, InputError, TrainError
from prosparse_jax.model.transformer import Params, abstract_params, init_params
from prosparse_jax.training import checkpoint as ckpt
from prosparse_jax.training import distributed, memory_plan
from prosparse_jax.training import lock as lock_lib
from prosparse_jax.training import optim as optim_lib
from prosparse_jax.training import sharding as shard_lib
from prosparse_jax.training.loop import Loop, RunSetup, final_eval, install_stop_handlers
from prosparse_jax.training.model_io import load_model
from prosparse_jax.training.step import abstract_state, jit_train_step, place_state

# Fields that may change between a run and its resumption: they do not change the numbers (model.scan_layers only
# changes the layout of the state in memory -- checkpoints are stacked either way -- and another attention
# implementation computes the same function, rounding aside).
RESUMABLE_CHANGES = {
    "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints", "train.keep_period",
    "train.async_checkpoint", "train.progress_bar", "data.data_dir", "model.scan_layers", "model.attention",
}


@dataclasses.dataclass
class TrainResult:
    workdir: Path
    step: int
    final_eval: dict[str, Any]
    interrupted: bool
    stop_signal: str | None = None  # "SIGTERM" / "SIGINT" when a signal stopped the run


# ---------------------------------------------------------------------------------------------------------------
# The workdir: its config (a resume under another config is refused), tokenizer and start weights
# ---------------------------------------------------------------------------------------------------------------
def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": leaf}: the dotted field names of a config dict."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def json_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The experiment config as written to config.json and into every checkpoint."""
    return json.loads(config.to_json_best_effort())


def saved_config(workdir: Path) -> tuple[dict[str, Any] | None, str]:
    """The config a workdir's run was written with, and where it was read: its config.json, else the latest
    checkpoint's (every checkpoint carries the run config). (None, "") if the workdir holds no run."""
    raw = ckpt.read_config_json(workdir)
    if raw is not None:
        return raw, str(workdir / "config.json")
    step = ckpt.latest_step(workdir)
    if step is None:
        return None, ""
    run_config = ckpt.checkpoint_run_config(workdir, step)
    if run_config is None:
        raise CheckpointError(f"{workdir / 'config.json'} is missing and checkpoint {step} carries no run config to "
                              "recover it from; restore config.json, or choose a new --workdir")
    return run_config, f"{workdir}/{ckpt.CKPT_DIR}/{step} (config.json is missing)"


def _resolved(config_json: dict[str, Any]) -> dict[str, Any]:
    """``config_json`` with each section as its validated dataclass writes it (defaults and auto values such as
    ``model.head_dim = 0`` filled in), so that two configs of the same run compare equal; a section that does not
    validate is compared as written."""
    out = dict(config_json)
    for name, cls in SECTIONS.items():
        if isinstance(out.get(name), dict):
            with contextlib.suppress(ConfigError, TypeError, ValueError):
                out[name] = to_dict(build_section(cls, name, out[name]))
    return out


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted field, saved value, new value) of the fields in which two run configs differ once resolved, except
    :data:`RESUMABLE_CHANGES`."""
    old, now = flatten(_resolved(saved)), flatten(_resolved(new))
    return [(k, old.get(k), now.get(k)) for k in sorted(set(old) | set(now))
            if old.get(k) != now.get(k) and k not in RESUMABLE_CHANGES]


def _shown(changes: list[tuple[str, Any, Any]]) -> str:
    shown = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, a, b in changes[:6])
    return shown + (" ..." if len(changes) > 6 else "")


def check_workdir_config(workdir: Path, config_json: dict[str, Any]) -> None:
    """Refuses to resume a workdir written with a different config, naming the differing fields (nothing is
    overwritten); a params-only workdir (import_hf, permute) is refused with the way to train from it. A lost
    config.json is recovered from the latest checkpoint. A workdir without a checkpoint holds nothing to resume:
    any config starts in it (:func:`write_config` replaces its config.json)."""
    if ckpt.latest_step(workdir) is None:
        return
    saved, where = saved_config(workdir)
    changes = config_changes(saved, config_json)
    if not changes:
        return
    if ckpt.params_only(workdir):
        origin = next((f" ({what} {src[key]})" for what, src, key in (
            ("permuted from", saved.get("permuted_from"), "checkpoint"),
            ("imported from", saved.get("imported_from"), "hf_folder")) if isinstance(src, dict) and src.get(key)), "")
        raise TrainError(
            f"workdir {workdir} holds a params-only model{origin}, not a run to resume (it has no optimizer state; "
            f"its config differs in {', '.join(k for k, _, _ in changes[:6])}{' ...' if len(changes) > 6 else ''}). "
            f"Train from it into a new workdir: --config.init_from={workdir} --workdir=<new dir>; nothing was changed.")
    raise TrainError(
        f"workdir {workdir} holds a run with a different config ({_shown(changes)}; saved in {where}). Resume it "
        "with its own config or choose a new --workdir; nothing was changed.")


def write_config(workdir: Path, config_json: dict[str, Any]) -> None:
    """Writes ``config.json`` (atomically) once the run's state is initialised: this run's config while the workdir
    holds no checkpoint (one left by a start that saved none is replaced, with one warning naming what changed), else
    the run config of the checkpoints when config.json was lost (restored with one warning)."""
    if ckpt.latest_step(workdir) is not None:
        ckpt.read_run_config(workdir)  # restores a lost config.json from the latest checkpoint
        return
    try:
        old = ckpt.read_config_json(workdir)
    except InputError:
        old = {}  # unreadable: replaced as well
    if old == config_json:
        return
    if old is not None:
        changed = config_changes(old, config_json)
        warnings.warn(f"{workdir} holds no checkpoint, so nothing to resume: its config.json, left by a start that "
                      f"saved none, is replaced by this run's config{f' ({_shown(changed)})' if changed else ''}",
                      stacklevel=2)
    files.write_text_atomic(workdir / "config.json", json.dumps(config_json, indent=2))


def _copy_atomically(src: Path, dst: Path) -> None:
    """Copies ``src`` to ``dst`` through a temporary file: a process reading ``dst`` meanwhile (another process of a
    multi-process run) sees the old or the new file, never a part."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)


def prepare_tokenizer(rc: RunConfig, workdir: Path, corpus: corpus_lib.Corpus) -> tuple[Any, Any]:
    """Tokenizer of the run, kept as ``<workdir>/tokenizer.json``: data.tokenizer, else the init_from checkpoint's,
    else a BPE trained on the corpus. The tokenizer of a workdir that holds a run is never replaced by a different
    one; that of a start that failed before its first checkpoint is."""
    dcfg, local, fresh = rc.data, workdir / "tokenizer.json", ckpt.latest_step(workdir) is None
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
    tok = corpus_lib.get_tokenizer(dcfg, corpus, workdir)
    if tok.get_vocab_size() > rc.model.vocab_size:
        raise TrainError(f"tokenizer has {tok.get_vocab_size()} tokens but model.vocab_size="
                         f"{rc.model.vocab_size}; raise model.vocab_size")
    return tok, dcfg


def load_init_params(rc: RunConfig) -> Params:
    """Params of ``rc.init_from`` (a workdir or HF folder) for this run's model (its activation substituted); the
    shapes must match."""
    src_cfg, params, _ = load_model(rc.init_from)
    want = jax.tree.map(lambda x: x.shape, abstract_params(rc.model))
    have = jax.tree.map(lambda x: tuple(x.shape), params)
    if want != have:
        raise TrainError(
            f"init_from={rc.init_from} has a different model shape than model.* of this config "
            f"(init_from: d_model={src_cfg.d_model}, n_layers={src_cfg.n_layers}, d_ff={src_cfg.d_ff}, "
            f"vocab={src_cfg.vocab_size}, tied={src_cfg.tie_embeddings}); make the model section match it"
        )
    logging.getLogger(__name__).info("initialised from %s (activation %s -> %s)", rc.init_from,
                                     src_cfg.activation, rc.model.activation)
    return params


# ---------------------------------------------------------------------------------------------------------------
# Set-up and state
# ---------------------------------------------------------------------------------------------------------------
def _setup(config: ml_collections.ConfigDict, workdir: str | Path) -> RunSetup:
    """Resolves the config, refuses a workdir of another config, checks that the mesh and batch fit the devices,
    then prepares the tokenizer and data (process 0 first: it builds the shared caches).

    Nothing that would block a corrected command is written here: config.json is written by :func:`train` once the
    state is initialised (a bad ``init_from`` fails before that)."""
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise TrainError(f"workdir {workdir} is a file, not a directory; choose a directory")
    rc = resolve(config)
    config_json = json_config(config)
    check_workdir_config(workdir, config_json)
    is_main = jax.process_index() == 0
    mesh = shard_lib.make_mesh(rc.train.mesh_data, rc.train.mesh_fsdp)
    if is_main:
        memory_plan.warn_fsdp_coverage(rc.model, mesh.shape["fsdp"])
    semantics = _batch_semantics(rc, mesh)  # a batch the devices cannot split fails here, before any work
    with distributed.main_process_first("prosparse: tokenizer and data caches"):
        corpus = corpus_lib.open_corpus(rc.data)
        tokenizer, dcfg = prepare_tokenizer(rc, workdir, corpus)
        rc = dataclasses.replace(rc, data=dcfg)
        workdir.mkdir(parents=True, exist_ok=True)
        n_proc = jax.process_count()
        train_iter = data_lib.make_train_iterator(corpus, tokenizer, seq_len=rc.data.seq_len, seed=rc.data.seed,
                                                  batch_size=rc.train.batch_size // n_proc,
                                                  process_index=jax.process_index(), process_count=n_proc)
        eval_batches = data_lib.make_eval_batches(corpus, tokenizer, seq_len=rc.data.seq_len,
                                                  batch_size=min(rc.train.batch_size, 8),
                                                  num_batches=rc.train.eval_batches)
    if is_main:
        print(json.dumps(semantics), flush=True)
    return RunSetup(rc, config_json, workdir, tokenizer, mesh, is_main, train_iter,
                    [shard_lib.replicated_batch_to_global(b, mesh) for b in eval_batches])


def _batch_semantics(rc: RunConfig, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """Global / micro / per-device batch of the run (printed at start-up); errors if the devices cannot split it."""
    n_dev, n_proc = jax.device_count(), jax.process_count()
    B, A = rc.train.batch_size, rc.train.grad_accum
    shard_lib.check_batch_split(B, A, mesh.shape)
    if B % n_proc:
        raise ConfigError(f"train.batch_size={B} must be divisible by the {n_proc} processes")
    return {"global_batch": B, "grad_accum_steps": A, "micro_batch": B // A, "per_device_batch": B // A // n_dev,
            "devices": n_dev, "processes": n_proc, "mesh": dict(mesh.shape), "seq_len": rc.data.seq_len,
            "tokens_per_step": B * rc.data.seq_len, "steps": rc.train.steps, "activation": rc.model.activation,
            "params": rc.model.params_total}


def _init_state(run: RunSetup, tx: Any, mgr: Any, start: int | None) -> tuple[dict[str, Any], Any]:
    """The train state (placed on the mesh) and the data-iterator state: restored from checkpoint ``start``, else
    initialised (from ``init_from`` when set, else randomly with ``train.seed``)."""
    rc, mesh = run.rc, run.mesh
    abs_params, abs_opt = abstract_state(rc.model, tx, mesh)
    if start is not None:
        params, opt_state, extra = ckpt.restore(mgr, start, abs_params, abs_opt)
        if run.is_main:
            print(f"resuming {run.workdir} from step {start}", flush=True)
        return place_state(params, opt_state, start, rc.model, mesh), _own_data_state(extra)
    p_shard = jax.tree.map(lambda a: a.sharding, abs_params)
    if rc.init_from:
        params: Params = jax.device_put(load_init_params(rc), p_shard)
    else:
        params = jax.jit(lambda r: init_params(rc.model, r), out_shardings=p_shard)(jax.random.key(rc.train.seed))
    opt_state = jax.jit(tx.init, out_shardings=jax.tree.map(lambda a: a.sharding, abs_opt))(params)
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
def train(config: ml_collections.ConfigDict, workdir: str | Path) -> TrainResult:
    """Runs (or resumes) one training run in ``workdir``, holding its lock (:mod:`prosparse_jax.training.lock`).

    Raises:
      UserError: the config, workdir, data or a checkpoint is wrong (the message says what to do), another command
        holds the workdir, the loss became non-finite (:class:`~prosparse_jax.errors.NonFiniteLossError`), or writing
        the workdir failed.
    """
    with _hold_workdir(workdir):
        return _train(config, workdir)


@contextlib.contextmanager
def _hold_workdir(workdir: str | Path) -> Iterator[None]:
    """The workdir's lock for the whole run, taken once, by process 0: the other processes start after it holds it,
    and all stop when it cannot. Until the loop installs its own stop handlers, SIGTERM aborts like Ctrl-C, so the
    lock is released then too."""
    on_main = threading.current_thread() is threading.main_thread()
    prev = signal.signal(signal.SIGTERM, _abort) if on_main else None
    lock, failure = None, None
    try:
        if jax.process_index() == 0:
            try:
                lock = lock_lib.WorkdirLock(workdir, "train").acquire()
            except Exception as e:  # told to the other processes first, so that none waits for process 0
                failure = e
        if jax.process_count() > 1:
            told = distributed.allgather_json(str(failure) if failure is not None else "")[0]
            if told and failure is None:
                raise TrainError(f"process 0 could not start the run: {told}")
        if failure is not None:
            raise failure
        yield
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if prev is None else prev)
        if lock is not None:
            lock.release()


def _abort(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM before the loop runs: abort, releasing the workdir's lock


def _train(config: ml_collections.ConfigDict, workdir: str | Path) -> TrainResult:
    run = _setup(config, workdir)
    rc, workdir = run.rc, run.workdir
    start = ckpt.latest_step(workdir)
    if start is not None and start >= rc.train.steps and (workdir / "final_eval.json").exists():
        if run.is_main:
            write_config(workdir, run.config_json)  # a lost config.json is restored from the checkpoint
            print(f"{workdir} already finished at step {start}; nothing to do", flush=True)
        final = json.loads((workdir / "final_eval.json").read_text())
        return TrainResult(workdir=workdir, step=start, final_eval=final, interrupted=False)
    tx, lr_fn = optim_lib.make_optimizer(rc.optim, rc.train.steps, rc.model.d_model)
    mgr = ckpt.manager(workdir, keep=rc.train.keep_checkpoints, async_save=rc.train.async_checkpoint,
                       keep_period=rc.train.keep_period)
    state, data_state = _init_state(run, tx, mgr, start)
    if run.is_main:
        write_config(workdir, run.config_json)
    loop = Loop(run, state, jit_train_step(rc, tx, lr_fn, state, run.mesh), mgr, start or 0, data_state)

    handlers = install_stop_handlers(loop)
    try:
        with jax.set_mesh(run.mesh):  # Mosaic kernels (splash attention) are partitioned under the mesh
            interrupted = loop.run_steps()
        with ckpt.save_errors(mgr):  # a failed save (disk full): one line; the newest committed step is untouched
            mgr.wait_until_finished()
        final = {} if interrupted else final_eval(loop)
    except OSError as e:  # metrics.jsonl, final_eval.json: disk full, permissions
        last = ckpt.latest_step(workdir)
        kept = (f"the newest complete checkpoint (step {last}) is intact: rerun the command to resume from it"
                if last is not None else "no checkpoint was completed: rerun the command")
        raise files.write_error(e.filename or workdir, e, kept) from e
    finally:
        with contextlib.suppress(OSError, CheckpointError), ckpt.save_errors(mgr):  # already reported above
            mgr.wait_until_finished()
        loop.close()
        for signum, prev in handlers.items():
            signal.signal(signum, prev)
    loop.writer.close()
    mgr.close()
    return TrainResult(workdir=workdir, step=loop.step, final_eval=final, interrupted=interrupted,
                       stop_signal=loop.stop_requested or None)
