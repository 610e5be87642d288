"""The shared shape of the library's command-line tools (analyze, score, export_hf, import_hf, describe, and the
``experiments/`` scripts): one line per user error, a traceback only for bugs.

A failure caused by the user's input -- a flag, a config field, a file that is missing, corrupt or in the way, a full
disk -- is printed as ONE line, ``<prog>: error: <message>``, on stderr, and the exit code is 1. Any other exception is
a bug and propagates with its traceback; ``--verbose`` re-raises the user errors too, with theirs.

Helpers every tool shares: :func:`run` (flag parsing, ``--help``, ``--verbose``, the error line), the did-you-mean of
an unknown ``--config.<section>.<field>`` override, output checks made before any work (:func:`check_output_dir`,
:func:`check_output_file`), writes that never leave a half-written output in place of a valid one
(:func:`staged_output`, :func:`write_text_atomic`, errors naming the path: :class:`OutputError`) and JSON files read
with their name in the error (:func:`read_json`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags

from prosparse_jax.config import SECTIONS, did_you_mean


class UsageError(ValueError):
    """Bad user input found by a CLI: a flag, a config override, a path in the way; the message names it."""


class OutputError(OSError):
    """An output could not be written (disk full, permissions); the message names the path and what was kept."""


class InputError(ValueError):
    """An input file is unreadable or corrupt; the message names the file."""


def section_fields(section: str) -> list[str]:
    """The field names of config section ``section``."""
    return [f.name for f in dataclasses.fields(SECTIONS[section])]


# ---------------------------------------------------------------------------------------------------------------
# run(): parse, call, one error line
# ---------------------------------------------------------------------------------------------------------------
def run(prog: str, flag_values: flags.FlagValues, argv: list[str] | None, body: Callable[[], str],
        errors: tuple[type[BaseException], ...], doc: str | None = None) -> int:
    """Parses ``argv`` (default ``sys.argv``) into ``flag_values``, runs ``body`` and prints what it returns.

    ``--help`` / ``-h`` prints ``doc`` (the tool's module docstring) and its flags, and exits 0. A flag error, an
    unknown config override, :class:`UsageError` / :class:`OutputError` / :class:`InputError` or one of ``errors`` is
    printed as ONE line ``<prog>: error: <message>`` on stderr (exit code 1); with ``--verbose`` it is re-raised
    (traceback). Returns the exit code.
    """
    if "verbose" not in flag_values:
        flags.DEFINE_bool("verbose", False, "On an error, show the Python traceback too.", flag_values=flag_values)
    args = list(sys.argv if argv is None else argv)
    if any(a in ("--help", "-h", "--helpfull") for a in args[1:]):
        print(f"{(doc or prog).strip()}\n\nflags:\n{flag_values.get_help(include_special_flags=False)}")
        return 0
    verbose = any(a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1") for a in args[1:])
    flag_values.unparse_flags()
    try:
        parse_flags(flag_values, args)
        out = body()
    except (flags.Error, UsageError, OutputError, InputError, *errors) as e:
        if verbose:
            raise
        print(f"{prog}: error: {error_line(e)}", file=sys.stderr)
        return 1
    print(out)
    return 0


def parse_flags(flag_values: flags.FlagValues, args: list[str]) -> None:
    """``flag_values(args)``; an unknown ``--config.<path>`` override becomes a :class:`UsageError` with the nearest
    valid field. ml_collections' config flags read the overrides from ``sys.argv``: it is ``args`` meanwhile."""
    saved = sys.argv
    sys.argv = args
    try:
        flag_values(args)
    except (AttributeError, KeyError) as e:  # ml_collections: an override naming no field of the config
        raise UsageError(config_override_message(args, e)) from e
    except SyntaxError as e:  # a config file that is not valid Python
        raise UsageError(f"--config: {e.filename} line {e.lineno}: invalid Python ({e.msg})") from e
    except flags.UnrecognizedFlagError as e:
        name = getattr(e, "flagname", "") or ""
        if name.startswith("config.") and any(a.startswith("--config=") for a in args):
            raise UsageError(config_override_message(args, e)) from e
        raise
    finally:
        sys.argv = saved


def config_override_message(args: list[str], e: BaseException) -> str:
    """One line naming the first ``--config.<section>.<field>=`` override of ``args`` that is not a config field,
    with the nearest valid name (did-you-mean); ml_collections' own message when no override is found at fault."""
    for a in args[1:]:
        m = re.match(r"--config\.([\w.]+)", a)
        if not m:
            continue
        section, _, field = m.group(1).partition(".")
        if section not in SECTIONS:
            if section == "init_from" and not field:
                continue
            hint = did_you_mean(section, [*SECTIONS, "init_from"])
            return f"--config.{m.group(1)}: the config has no section or field {section!r}{hint}"
        if field and field.split(".")[0] not in section_fields(section):
            name = field.split(".")[0]
            return (f"--config.{m.group(1)}: {section!r} has no field {name!r}"
                    f"{did_you_mean(name, section_fields(section))}")
    text = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
    return "unknown config override: " + " ".join(text.replace('\\n', " ").split()).strip("'\"")


def error_line(e: BaseException) -> str:
    """The message of ``e`` as one line: an embedded traceback (config_flags wraps a config file's exception in
    one) is reduced to its last line, the rest is joined and capped at 1200 characters."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    if "Traceback (most recent call last)" in text:
        head = text.split(": ", 1)[0] if text.startswith("flag --") else ""
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        last = re.sub(r"^[\w.]+(Error|Exception): ", "", last.strip())
        text = f"{head}: {last}" if head else last
    line = " ".join(text.split())
    return line if len(line) <= 1200 else line[:1197] + "..."


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------
def load_config(flag_values: flags.FlagValues, name: str = "config") -> Any:
    """The ConfigDict of a ``config_flags`` flag; a config file that cannot be loaded is a :class:`UsageError`."""
    if not flag_values[name].present:
        raise UsageError(f"--{name}: required (e.g. --{name}=configs/prosparse.py:tiny)")
    cfg = getattr(flag_values, name)
    if isinstance(cfg, ml_collections.ConfigDict):
        return cfg
    try:  # config_flags defers a load failure to the first access of the config
        cfg.to_dict()
    except OSError as e:
        detail = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in reversed(detail) if ln.startswith("[Errno")), detail[-1] if detail else str(e))
        raise UsageError(f"--{name}: cannot load the config file: {why}") from e
    return cfg


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """``json.loads`` of a file; a missing or corrupt file is an :class:`InputError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: {what} not found") from None
    except (ValueError, OSError) as e:
        detail = f"line {e.lineno} column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise InputError(f"{path}: not valid JSON ({detail}); restore or regenerate it") from None


def check_model_path(path: str | os.PathLike | None, flag: str) -> Path:
    """A --checkpoint / --workdir / --hf to read: it must exist, and its config.json (if any) must be valid JSON."""
    if not path:
        raise UsageError(f"{flag}: required (a workdir or HF model folder)")
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{flag}: {path} does not exist")
    if path.is_file():
        raise UsageError(f"{flag}: {path} is a file; give the workdir or HF model folder it is in")
    if (path / "config.json").is_file():
        read_json(path / "config.json", "config.json")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Outputs: checked before any work; written so that a failure keeps the previous outputs
# ---------------------------------------------------------------------------------------------------------------
def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """An output directory: refused (:class:`UsageError`, nothing done) if it or a parent is a file, or if it cannot
    be created / written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag}: {path} is a file, not a directory (nothing was done)")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise UsageError(f"{flag}: {base} is a file, so {path} cannot be a directory (nothing was done)")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: {base} is not writable (nothing was done)")
    return path


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """An output file: refused (:class:`UsageError`, nothing done) if it is a directory or its folder cannot be one."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag}: {path} is a directory; give a file name (nothing was done)")
    check_output_dir(path.parent if str(path.parent) else Path("."), flag)
    return path


def write_error(path: Path | str, e: OSError, kept: str) -> OutputError:
    """The one-line error of a failed write: the path, the reason (disk full named as such) and what was kept."""
    why = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    at = f" (at {e.filename})" if e.filename and str(e.filename) != str(path) else ""
    return OutputError(f"cannot write {path}: {why}{at}; {kept}")


@contextlib.contextmanager
def staged_output(dest: str | os.PathLike, *, replace: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """A staging folder next to ``dest`` for a set of output files: write them all there; when the block succeeds
    they replace their namesakes in ``dest`` (``os.replace`` per file, after ``replace(dest)`` cleans up), when it
    fails the stage is removed and ``dest`` is untouched. An OSError (disk full) becomes an :class:`OutputError`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    keep_stage = False
    try:
        try:
            yield stage
        except OutputError:
            raise
        except OSError as e:
            raise write_error(dest, e, f"the previous outputs in {dest} were not touched") from e
        try:
            dest.mkdir(parents=True, exist_ok=True)
            if replace is not None:
                replace(dest)
            for f in sorted(stage.iterdir()):
                os.replace(f, dest / f.name)
        except OSError as e:  # the new outputs are complete: keep them for the user
            keep_stage = True
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
    except OutputError:
        raise
    except OSError as e:
        raise write_error(path, e, f"the previous {path.name} (if any) was not touched") from e
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


# ---------------------------------------------------------------------------------------------------------------
# argparse tools (experiments/)
# ---------------------------------------------------------------------------------------------------------------
class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are a :class:`UsageError` (one line through :func:`call`), with ``--verbose``."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.add_argument("--verbose", action="store_true", help="on an error, show the Python traceback too")

    def error(self, message: str) -> Any:  # argparse's is usage + message, exit 2
        raise UsageError(f"{message} (--help for usage)")


def call(prog: str, argv: list[str] | None, body: Callable[[], int | None],
         errors: tuple[type[BaseException], ...] = ()) -> int:
    """Runs ``body`` (which parses ``argv`` itself); a user error (:class:`UsageError`, :class:`OutputError`,
    :class:`InputError` or one of ``errors``) is ONE line ``<prog>: error: <message>`` on stderr and exit code 1,
    re-raised with its traceback under ``--verbose``. Returns the exit code."""
    args = sys.argv[1:] if argv is None else argv
    try:
        return body() or 0
    except (UsageError, OutputError, InputError, *errors) as e:
        if "--verbose" in args:
            raise
        print(f"{prog}: error: {error_line(e)}", file=sys.stderr)
        return 1
