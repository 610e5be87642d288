"""Files in and out: inputs read with their name in the error, outputs checked before any work and written so that a
failure (a full disk) never leaves a half-written file in place of a valid one.

``what`` in the checks is the argument the path came from (``out``, ``--out``): every message starts with it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prosparse_jax.errors import InputError, OutputError, UsageError


def cache_dir() -> Path:
    """The project's cache (compiled kernels, XLA executables): ``$PROSPARSE_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/prosparse_jax``, else ``~/.cache/prosparse_jax``."""
    if os.environ.get("PROSPARSE_CACHE_DIR"):
        return Path(os.environ["PROSPARSE_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "prosparse_jax"


_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, what: str = "size") -> int:
    """Bytes of ``"2GB"`` (10^9), ``"80GiB"`` (2^30), ``"512 MB"``, ``"1.5TB"``; a number without a unit is refused
    (bytes or GB? the reader cannot tell)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]i?B|B)\s*", text, flags=re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"{what}={text}: expected a positive size with a unit, e.g. 80GB, 80GiB or 512MB "
                         "(GB = 10^9 bytes, GiB = 2^30)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------
RESTORE = "restore or regenerate it"
_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true/false",
               type(None): "null"}


def read_json(path: str | os.PathLike, what: str = "file", fix: str = RESTORE) -> Any:
    """``json.loads`` of a file; a missing or corrupt file is an :class:`InputError` naming it (and ``fix``)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: {what} not found") from None
    except (ValueError, OSError) as e:
        detail = f"line {e.lineno} column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise InputError(f"{path}: not valid JSON ({detail}); {fix}") from None


def read_json_object(path: str | os.PathLike, what: str = "file", fix: str = RESTORE) -> dict[str, Any]:
    """:func:`read_json` of a file that must hold a JSON object (a config.json, a manifest); anything else is an
    :class:`InputError` naming what it holds and ``fix``."""
    raw = read_json(path, what, fix)
    if not isinstance(raw, dict):
        kind = _JSON_KINDS.get(type(raw), type(raw).__name__)
        raise InputError(f"{path}: not a JSON object but {kind} {json.dumps(raw)[:40]}; {fix}")
    return raw


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """The UTF-8 text of a file; one that cannot be read (missing, not UTF-8) is an :class:`InputError` naming it."""
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        why = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else (e.strerror or str(e))
        raise InputError(f"{what}: cannot read {path}: {why}") from e


def check_model_path(path: str | os.PathLike | None, what: str) -> Path:
    """A workdir or HF model folder to read: it must exist, and its config.json (if any) must be a JSON object."""
    if not path:
        raise UsageError(f"{what}: required (a workdir or HF model folder)")
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{what}: {path} does not exist")
    if path.is_file():
        raise UsageError(f"{what}: {path} is a file; give the workdir or HF model folder it is in")
    if (path / "config.json").is_file():
        read_json_object(path / "config.json", "config.json", "delete it (a workdir's is restored from its latest "
                         "checkpoint) or regenerate it (an HF folder's: export it again)")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Outputs: checked before any work
# ---------------------------------------------------------------------------------------------------------------
def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_path(path: str | os.PathLike, what: str) -> Path:
    """An output directory with nothing in the way: refused (:class:`UsageError`, nothing done) if it or a parent
    is a file, or if it cannot be created / written. What it already holds is the caller's business."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what}: {path} is a file, not a directory (nothing was done)")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise UsageError(f"{what}: {base} is a file, so {path} cannot be a directory (nothing was done)")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"{what}: {base} is not writable (nothing was done)")
    return path


def check_empty_dir(path: str | os.PathLike, what: str, hint: str = "choose a new directory") -> Path:
    """:func:`check_output_path`, and the directory must be absent or empty; ``hint`` says what to do instead."""
    path = check_output_path(path, what)
    if path.is_dir() and any(path.iterdir()):
        raise UsageError(f"{what}: {path} exists and is not empty; {hint} (nothing was written)")
    return path


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """An output file: refused (:class:`UsageError`, nothing done) if it is a directory or its folder cannot be one."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what}: {path} is a directory; give a file name (nothing was done)")
    check_output_path(path.parent if str(path.parent) else Path("."), what)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Outputs: written so that a failure keeps the previous ones
# ---------------------------------------------------------------------------------------------------------------
def write_error(path: Path | str, e: OSError, kept: str) -> OutputError:
    """The one-line error of a failed write: the path, the reason (disk full named as such) and what was kept."""
    why = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    at = f" (at {e.filename})" if e.filename and str(e.filename) != str(path) else ""
    return OutputError(f"cannot write {path}: {why}{at}; {kept}")


def _pid_ns() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino  # containers may share a host name, not a pid namespace
    except OSError:
        return 0


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's process
        return False
    return False


def remove_stale_stages(dest: str | os.PathLike) -> list[Path]:
    """Removes the staging folders of :func:`staged_output` for ``dest`` whose writer was killed (a process of this
    host and pid namespace that no longer runs); a live writer's, another host's or an unnamed one are kept. Logs one
    line per removal; returns the removed folders."""
    dest = Path(dest)
    me = re.compile(rf"\.{re.escape(dest.name)}\.(\d+)\.(\d+)@(.+)\.[a-z0-9_]+\.partial")
    removed = []
    with contextlib.suppress(OSError):
        for p in dest.parent.iterdir():
            m = me.fullmatch(p.name)
            if (m and p.is_dir() and m.group(3) == socket.gethostname() and int(m.group(2)) == _pid_ns()
                    and _pid_gone(int(m.group(1)))):
                shutil.rmtree(p, ignore_errors=True)
                if not p.exists():
                    removed.append(p)
                    logging.getLogger(__name__).warning(
                        "removed %s, left by an interrupted write to %s (its writer, pid %s, no longer runs)", p, dest,
                        m.group(1))
    return removed


@contextlib.contextmanager
def staged_output(dest: str | os.PathLike, *, replace: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """A staging folder next to ``dest`` for a set of output files: write them all there; when the block succeeds
    they replace their namesakes in ``dest`` (``os.replace`` per file, after ``replace(dest)`` cleans up), when it
    fails the stage is removed and ``dest`` is untouched. An OSError (disk full) becomes an :class:`OutputError`.

    The stage ``.<dest name>.<pid>.<pid namespace>@<host>.<random>.partial`` names its writer, so that the stage
    of a killed writer is removed by the next one (:func:`remove_stale_stages`)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_stages(dest)
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}.{_pid_ns()}@{socket.gethostname()}.",
                                  suffix=".partial", dir=dest.parent))
    keep_stage = False
    try:
        try:
            yield stage
        except OSError as e:
            raise write_error(dest, e, f"the previous outputs in {dest} were not touched") from e
        try:
            dest.mkdir(parents=True, exist_ok=True)
            if replace is not None:
                replace(dest)
            for f in sorted(stage.iterdir()):
                os.replace(f, dest / f.name)
        except OSError as e:  # the new outputs are complete: keep them for the user, under a name no writer removes
            keep_stage = True
            with contextlib.suppress(OSError):
                stage = stage.rename(stage.with_name(f".{dest.name}.kept.{stage.name.rsplit('.', 2)[1]}.partial"))
            raise write_error(dest, e, f"the complete new outputs are in {stage}") from e
    finally:
        if not keep_stage:
            shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path next to ``path`` (same suffix) to write; it replaces ``path`` when the block succeeds. On a
    failure (disk full) the temp file is removed, ``path`` is left as it was and an :class:`OutputError` names it."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(path, e, f"the previous {path.name} (if any) was not touched") from e
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
