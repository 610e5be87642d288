"""Orbax checkpoints of a run's workdir: save, verified restore, and loading a workdir's model.

A step is ``<workdir>/checkpoints/<step>/{params, opt_state, extra}``: orbax pytrees, and JSON holding the step, data
iterator state, model and run config and the :mod:`~prosparse_jax.digest` of every array (an imported model
has no ``opt_state``). A damaged step raises :class:`CorruptCheckpointError` naming the newest older step that verifies
(nothing is deleted); stored shapes that differ from the config's are a plain :class:`CheckpointError`, and so is a
save that fails for a reason the user can fix (disk full, quota, read-only or unwritable directory:
:func:`save_errors`). A workdir's ``config.json`` lost after its first checkpoint is restored from the latest one
(:func:`read_run_config`).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import gc
import json
import logging as stdlib_logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from prosparse_jax import files
from prosparse_jax.config import ModelConfig, model_config_from_dict, to_dict
from prosparse_jax.digest import DIGEST_ALGORITHM, digests
from prosparse_jax.errors import CheckpointError, CorruptCheckpointError, OutputError
from prosparse_jax.model.transformer import Params, abstract_params

CKPT_DIR = "checkpoints"


class _DamageError(Exception):
    """Internal: a step's files cannot be read back or do not match their digests (``str``: what is wrong)."""


def _brief(e: BaseException) -> str:
    """One line about an exception: the class and first line of its root cause (orbax wraps tensorstore's)."""
    while e.__cause__ is not None:
        e = e.__cause__
    first = (str(e).strip().splitlines() or [""])[0]
    first = first if len(first) <= 240 else first[:237] + "..."
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _verify(step_dir: Path, extra: Any, restored: dict[str, Any]) -> None:
    """Compares the digests of the ``restored`` items with those saved in ``extra``.

    Raises:
      _DamageError: ``extra`` is not a JSON object, or a leaf does not match (or lacks) its digest.
      CheckpointError: the step carries no digests of this version's algorithm (it cannot be verified).
    """
    if not isinstance(extra, dict):
        raise _DamageError("its extra/metadata is not a JSON object")
    saved = extra.get("digests")
    if not isinstance(saved, dict) or saved.get("algorithm") != DIGEST_ALGORITHM:
        raise CheckpointError(f"checkpoint {step_dir} carries no {DIGEST_ALGORITHM} digests of its arrays (another "
                              "version of prosparse_jax wrote it), so it cannot be verified and is not loaded")
    for item, leaves in digests(restored).items():
        want = saved.get(item)
        if not isinstance(want, dict):
            raise _DamageError(f"extra/metadata has no digests of its {item}")
        for name, digest in leaves.items():
            if want.get(name) != digest:
                raise _DamageError(f"{item} leaf {name} does not match the digest written with it")


def _stored_shapes(step_dir: Path, item: str) -> dict[str, tuple[int, ...]] | None:
    """``{orbax leaf name: shape}`` of the arrays stored for ``item`` (None when its metadata cannot be read)."""
    try:
        md = ocp.StandardCheckpointHandler().metadata(step_dir / item)
    except Exception:  # noqa: BLE001 -- unreadable metadata is damage; the restore reports it
        return None
    leaves = [m for m in jax.tree.leaves(getattr(md, "tree", md)) if hasattr(m, "shape")]
    return {str(getattr(m, "name", i)): tuple(m.shape) for i, m in enumerate(leaves)}


def _mismatch(step_dir: Path, targets: dict[str, Any], *, by_name: bool) -> str | None:
    """How the arrays stored in ``step_dir`` differ from ``targets`` (a config problem, not damage), else None.

    The shapes are compared as a multiset (independent of how orbax names leaves); ``by_name`` also compares the
    leaf names (only after a failed restore: a different tree is then a mismatch, not damage).
    """
    for item, target in targets.items():
        stored = _stored_shapes(step_dir, item)
        if stored is None:
            continue
        wanted = {jax.tree_util.keystr(p, simple=True, separator="."): tuple(a.shape)
                  for p, a in jax.tree_util.tree_flatten_with_path(target)[0]}
        if sorted(stored.values()) == sorted(wanted.values()) and (not by_name or stored.keys() == wanted.keys()):
            continue
        diff = [f"{item} leaf {k} has shape {stored[k]} in the checkpoint, {wanted[k]} in the config"
                for k in wanted if k in stored and stored[k] != wanted[k]]
        if diff:
            return diff[0] + (f" (and {len(diff) - 1} more leaves differ)" if len(diff) > 1 else "")
        only_ckpt, only_cfg = sorted(stored.keys() - wanted.keys()), sorted(wanted.keys() - stored.keys())
        return (f"its {item} has {len(stored)} arrays, the config {len(wanted)} (only in the checkpoint: "
                f"{only_ckpt[:3] or 'none'}; only in the config: {only_cfg[:3] or 'none'})")
    return None


def _is_abandoned_read(u: Any) -> bool:
    """Whether an unraisable exception comes from orbax's reads left running by a failed restore."""
    if isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value):
        return True
    code = getattr(getattr(u, "object", None), "cr_code", None)
    if code is not None and "orbax" in code.co_filename:
        return True
    tb = getattr(u, "exc_traceback", None)
    while tb is not None:
        if "/orbax/checkpoint/" in tb.tb_frame.f_code.co_filename.replace("\\", "/"):
            return True
        tb = tb.tb_next
    return False


class _AbandonedOrbaxTasks(stdlib_logging.Filter):
    """Drops asyncio's "exception was never retrieved" records about the reads a failed orbax restore left behind."""

    def filter(self, record: stdlib_logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("exception was never retrieved" in msg and any(k in msg for k in ("orbax", "OCDBT", "TensorStore")))


class _FailedSaveThreads(stdlib_logging.Filter):
    """Drops the records orbax's background save threads log, with their tracebacks, about a write that failed for a
    reason the user can fix (:func:`write_failure`): the main thread raises the same failure, which
    :func:`save_errors` turns into one line."""

    def filter(self, record: stdlib_logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        from_orbax = "/orbax/" in record.pathname.replace("\\", "/")
        return not (from_orbax and write_failure(exc if exc is not None else Exception(record.getMessage())))


def quiet_orbax_noise() -> None:
    """Drops the noise of a failed orbax restore or save; for a process's entry point. Idempotent.

    When one array cannot be read, orbax raises while its other reads are in flight; they later report tracebacks
    through ``sys.unraisablehook`` and the ``asyncio`` logger that bury the one-line error. A save that fails (disk
    full) is logged with its traceback by each of orbax's save threads before the main thread raises it. Only those
    are dropped.
    """
    asyncio_log, absl_log = stdlib_logging.getLogger("asyncio"), stdlib_logging.getLogger("absl")
    if not any(isinstance(f, _AbandonedOrbaxTasks) for f in asyncio_log.filters):
        asyncio_log.addFilter(_AbandonedOrbaxTasks())
    if not any(isinstance(f, _FailedSaveThreads) for f in absl_log.filters):
        absl_log.addFilter(_FailedSaveThreads())
    prev = sys.unraisablehook
    if getattr(prev, "_prosparse_ckpt_quiet", False):
        return

    def hook(u: Any, _abandoned: Callable[[Any], bool] = _is_abandoned_read) -> None:  # bound now: usable at exit
        if not _abandoned(u):
            prev(u)

    hook._prosparse_ckpt_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    atexit.register(gc.collect)  # reads still in flight at the failure are collected before the hook goes away


def _read(mgr: ocp.CheckpointManager, step: int, targets: dict[str, Any],
          mismatch: Callable[[str], CheckpointError]) -> dict[str, Any]:
    """Restores ``targets`` (item -> abstract pytree) and ``extra`` of ``step`` and verifies their digests.

    Raises:
      CheckpointError: ``mismatch(what differs)`` when the stored arrays do not fit the targets.
      _DamageError: when the step cannot be read back or does not match its digests.
    """
    step_dir = Path(mgr.directory) / str(step)
    if (what := _mismatch(step_dir, targets, by_name=False)) is not None:
        raise mismatch(what)  # checked first: a restore that fails leaves orbax's reads running
    items: dict[str, Any] = {k: ocp.args.StandardRestore(v) for k, v in targets.items()}
    items["extra"] = ocp.args.JsonRestore()
    failure = None
    try:
        out = mgr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 -- orbax raises bare Exception around tensorstore read errors
        failure = _brief(e)  # (not chained: its traceback would keep orbax's abandoned reads alive)
    if failure is not None:
        gc.collect()  # finalise the abandoned reads now, while a quiet_orbax_noise hook is there (not at exit)
        if (what := _mismatch(step_dir, targets, by_name=True)) is not None:
            raise mismatch(what)
        raise _DamageError(f"reading it failed ({failure})")
    _verify(step_dir, out["extra"], {k: out[k] for k in targets})
    return out


def _corrupt(mgr: ocp.CheckpointManager, step: int, targets: dict[str, Any], damage: _DamageError,
             use_intact: str) -> CorruptCheckpointError:
    """The error for a damaged ``step``: what is wrong, and the newest older step that reads back and verifies.

    ``use_intact`` says how to go on from that step; ``{intact}`` and ``{aside}`` (a command moving the damaged step
    out of the way) are filled in.
    """
    ckpt_dir = Path(mgr.directory)
    step_dir = ckpt_dir / str(step)
    intact, bad = None, []
    for s in sorted((s for s in mgr.all_steps() if s < step), reverse=True):
        try:
            _read(mgr, s, targets, CheckpointError)
        except (_DamageError, CheckpointError) as e:
            logging.info("checkpoint %s/%d is not intact either: %s", ckpt_dir, s, e)
            bad.append(s)
            continue
        intact = s
        break
    also = f" (older step {bad[0]} fails too)" if len(bad) == 1 else ""
    also = f" (older steps {', '.join(map(str, bad))} fail too)" if len(bad) > 1 else also
    if intact is None:
        hint = (f"there is no intact older step{also}; nothing was deleted: restore {step_dir} from a copy, or "
                "start again in a fresh --workdir")
    else:
        aside = f"move it aside (`mv {step_dir} {ckpt_dir.parent / f'corrupt-step-{step}'}`)"
        hint = (f"the newest intact older step is step {intact}{also}: "
                f"{use_intact.format(intact=intact, aside=aside)} (nothing was deleted)")
    return CorruptCheckpointError(f"checkpoint {step_dir} is corrupt: {damage}; {hint}")


def manager(workdir: str | os.PathLike, *, keep: int = 3, async_save: bool = True,
            save_interval_steps: int = 1, keep_period: int = 0) -> ocp.CheckpointManager:
    """A CheckpointManager over ``<workdir>/checkpoints`` with items params / opt_state / extra.

    It keeps the newest ``keep`` steps and every multiple of ``keep_period`` (0 = off; the Sparsing Law fit measures
    every kept step). ``save_interval_steps`` is orbax's (1: every ``save`` call writes). A step left half-written (a
    kill or a full disk during its save: ``<step>.orbax-checkpoint-tmp``) is removed when the manager opens; only the
    holder of the workdir's lock opens one.
    """
    if keep_period < 0:
        raise ValueError(f"keep_period must be >= 0 (0 = off), got {keep_period}")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, save_interval_steps=save_interval_steps,
        keep_period=keep_period or None, create=True, cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(Path(workdir).absolute() / CKPT_DIR, options=options)


def save(mgr: ocp.CheckpointManager, step: int, params: Params, opt_state: Any | None,
         extra: dict[str, Any], *, force: bool = False) -> bool:
    """Saves one step (async if the manager is), adding to the JSON-serialisable ``extra`` the digests of its arrays."""
    trees = {"params": params} if opt_state is None else {"params": params, "opt_state": opt_state}
    extra = dict(extra, digests={"algorithm": DIGEST_ALGORITHM, **digests(trees)})
    items: dict[str, Any] = {"params": ocp.args.StandardSave(params), "extra": ocp.args.JsonSave(extra)}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    return mgr.save(step, args=ocp.args.Composite(**items), force=force)


def restore(mgr: ocp.CheckpointManager, step: int, abstract_params_: Params,
            abstract_opt_state: Any | None = None) -> tuple[Params, Any | None, dict[str, Any]]:
    """Restores (params, opt_state or None, extra) of ``step`` into the given abstract pytrees, verified.

    Raises:
      CorruptCheckpointError: the step cannot be read back or does not match its digests; the message names the
        newest older step that restores and verifies.
      CheckpointError: the stored arrays do not match the configured model/optimizer.
    """
    targets: dict[str, Any] = {"params": abstract_params_}
    if abstract_opt_state is not None:
        targets["opt_state"] = abstract_opt_state

    def mismatch(what: str) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {mgr.directory}/{step} does not match the configured model/optimizer: {what}. "
            "Use the config the checkpoint was written with, or a fresh --workdir."
        )

    try:
        out = _read(mgr, step, targets, mismatch)
    except _DamageError as d:
        raise _corrupt(mgr, step, targets, d, "{aside} and rerun to resume from step {intact}") from None
    return out["params"], out.get("opt_state") if abstract_opt_state is not None else None, out["extra"]


def has_run(workdir: str | os.PathLike) -> bool:
    """Whether ``workdir`` holds a run (a checkpoint or a config.json); a failed start leaves neither."""
    return (Path(workdir) / "config.json").exists() or latest_step(workdir) is not None


def latest_step(workdir: str | os.PathLike) -> int | None:
    """The newest step with saved params under ``<workdir>/checkpoints``, or None."""
    d = Path(workdir) / CKPT_DIR
    if not d.is_dir():
        return None
    steps = [int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "params").exists()]
    return max(steps) if steps else None


def read_extra(workdir: str | os.PathLike, step: int) -> dict[str, Any]:
    """The JSON ``extra`` item of checkpoint ``step`` (step, data state, model and run config), read without orbax.

    Raises:
        CorruptCheckpointError: naming the file when it is missing or not a JSON object.
    """
    path = Path(workdir) / CKPT_DIR / str(step) / "extra" / "metadata"
    try:
        extra = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{path}: unreadable checkpoint metadata ({e}); the checkpoint of step {step} "
                                     "is damaged") from e
    if not isinstance(extra, dict):
        raise CorruptCheckpointError(f"{path}: checkpoint metadata is not a JSON object; the checkpoint of step "
                                     f"{step} is damaged")
    return extra


def params_only(workdir: str | os.PathLike) -> bool:
    """Whether the latest checkpoint of ``workdir`` holds params but no optimizer state (import_hf, permute): a model
    to start a run from (``init_from``), not a run to resume."""
    step = latest_step(workdir)
    return step is not None and not (Path(workdir) / CKPT_DIR / str(step) / "opt_state").exists()


def read_config_json(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """``<workdir>/config.json`` as a dict, or None when there is none.

    Raises:
      InputError: it is not valid JSON or not a JSON object (the message says how to get it back).
    """
    workdir = Path(workdir)
    path = workdir / "config.json"
    if not path.is_file():
        return None
    step = latest_step(workdir)
    fix = (f"delete it and rerun: it is restored from checkpoint {step}, which carries the run config"
           if step is not None else "restore it, or start again in a new workdir")
    return files.read_json_object(path, "config.json", fix)


def checkpoint_run_config(workdir: str | os.PathLike, step: int) -> dict[str, Any] | None:
    """The run config that checkpoint ``step`` carries (every checkpoint does), or None (an older version's)."""
    run_config = read_extra(workdir, step).get("run_config")
    return run_config if isinstance(run_config, dict) else None


def read_run_config(workdir: str | os.PathLike) -> dict[str, Any]:
    """The run config of a workdir: its ``config.json``; one lost after the first checkpoint is restored from the
    latest checkpoint (atomically, with one warning), as every checkpoint carries it.

    Raises:
      InputError: config.json is not valid JSON or not a JSON object.
      CheckpointError: the workdir has neither config.json nor a checkpoint carrying the run config.
    """
    workdir = Path(workdir)
    path = workdir / "config.json"
    raw = read_config_json(workdir)
    if raw is not None:
        return raw
    step = latest_step(workdir)
    if step is None:
        raise CheckpointError(f"{path} not found: {workdir} is not a prosparse_jax workdir (train or import_hf one)")
    run_config = checkpoint_run_config(workdir, step)
    if run_config is None:
        raise CheckpointError(f"{path} is missing and checkpoint {step} carries no run config to restore it from; "
                              "restore config.json from a copy")
    try:
        files.write_text_atomic(path, json.dumps(run_config, indent=2))
    except OutputError as e:
        warnings.warn(f"{path} is missing; using the run config that checkpoint {step} carries ({e})", stacklevel=2)
    else:
        warnings.warn(f"{path} was missing: restored from checkpoint {step}, which carries the run config",
                      stacklevel=2)
    return run_config


def load_model(path: str | os.PathLike, step: int | None = None) -> tuple[ModelConfig, Params, Path | None]:
    """(model config, params, tokenizer.json path or None) of a workdir's checkpoint ``step`` (None: the latest)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    cfg_file = path / "config.json"
    run_cfg = read_run_config(path)
    if not isinstance(run_cfg.get("model"), dict):
        raise CheckpointError(f"{cfg_file} has no model section: {path} is not a prosparse_jax workdir (train or "
                              "import_hf one)")
    mcfg = model_config_from_dict(run_cfg["model"])
    if step is None:
        step = latest_step(path)
        if step is None:
            raise CheckpointError(f"no checkpoint under {path / CKPT_DIR}; train first or pass a finished workdir")
    mgr = ocp.CheckpointManager(path.absolute() / CKPT_DIR)
    try:
        if step not in mgr.all_steps():
            raise CheckpointError(f"step {step} not in {path / CKPT_DIR} (have {sorted(mgr.all_steps())})")
        # restore onto this process's first device whatever topology the checkpoint was written with
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), abstract_params(mcfg))
        targets = {"params": target}

        def mismatch(what: str) -> CheckpointError:
            return CheckpointError(f"{path / CKPT_DIR}/{step} does not match the model in {cfg_file}: {what}")

        try:
            params = _read(mgr, step, targets, mismatch)["params"]
        except _DamageError as d:
            raise _corrupt(mgr, step, targets, d, "pass --step={intact}, or {aside} and rerun") from None
    finally:
        mgr.close()
    tok = path / "tokenizer.json"
    return mcfg, params, tok if tok.is_file() else None


def write_params_workdir(workdir: str | os.PathLike, mcfg: ModelConfig, params: Params,
                         run_config: dict[str, Any] | None = None, step: int = 0) -> Path:
    """Writes a params-only workdir (import_hf, permute) into a new or empty folder ``workdir``."""
    workdir = files.check_empty_dir(workdir, "workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = dict(run_config or {})
    cfg["model"] = to_dict(mcfg)
    (workdir / "config.json").write_text(json.dumps(cfg, indent=2))
    mgr = manager(workdir, async_save=False)
    params = jax.tree.map(lambda x: jax.numpy.asarray(x, jax.numpy.float32), params)
    try:
        save(mgr, step, params, None, {"step": step, "model": to_dict(mcfg), "run_config": cfg}, force=True)
        mgr.wait_until_finished()
    except Exception as e:
        if (cause := write_failure(e)) is None or cause is e:
            raise
        # an OSError, which the caller's staged output reports naming the folder (the previous one is kept)
        raise OSError(cause.errno, cause.strerror, cause.filename) from e
    finally:
        mgr.close()
    return workdir


# ---------------------------------------------------------------------------------------------------------------
# A save that fails for a reason the user can fix
# ---------------------------------------------------------------------------------------------------------------
# errno -> what to do about it
_WRITE_FIXES = {
    errno.ENOSPC: "free space", errno.EDQUOT: "free space (or raise the quota)",
    errno.EFBIG: "raise the file-size limit (ulimit -f) or use another file system",
    errno.EROFS: "make the directory writable", errno.EACCES: "make the directory writable",
    errno.EPERM: "make the directory writable",
}
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")  # tensorstore's status text, which orbax raises as a ValueError
_FAILED_PATH = re.compile(r'(?:local file|Failed writing:?) "([^"]+)"')


def write_failure(e: BaseException | None) -> OSError | None:
    """The OSError behind a failed write the user can fix (disk full, quota, file-size limit, read-only or
    unwritable directory) anywhere in the chain of ``e``, else None. Orbax raises tensorstore's failures as a
    ValueError whose text carries the errno (``[os_error_code='28']``); they are turned back into an OSError."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _WRITE_FIXES:
            return e
        if not isinstance(e, OSError) and (m := _OS_ERROR_CODE.search(str(e))) and int(m.group(1)) in _WRITE_FIXES:
            code, at = int(m.group(1)), _FAILED_PATH.search(str(e))
            return OSError(code, os.strerror(code), at.group(1) if at else None)
        e = e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def save_errors(mgr: ocp.CheckpointManager) -> Iterator[None]:
    """Turns a checkpoint save that failed for a reason the user can fix (:func:`write_failure`), raised by a save or
    later by the wait for an async one, into one :class:`CheckpointError` naming the checkpoint directory and the
    last completed step, which is intact (orbax writes a step to a temporary directory and commits it by rename)."""
    try:
        yield
    except Exception as e:
        if (cause := write_failure(e)) is None:
            raise
        ckpt_dir = Path(mgr.directory)
        why = os.strerror(cause.errno)
        why = why[:1].lower() + why[1:]
        at = f" (at {cause.filename})" if cause.filename else ""
        fix = _WRITE_FIXES[cause.errno]
        last = latest_step(ckpt_dir.parent)
        kept = (f"the last completed checkpoint (step {last}) is intact: {fix} and rerun the command to resume from it"
                if last is not None else f"no checkpoint was completed before it: {fix} and rerun the command")
        raise CheckpointError(f"cannot save a checkpoint in {ckpt_dir}: {why}{at}; {kept}") from e
