"""What every command-line tool shares: one line per user error, a traceback only for bugs.

A :class:`prosparse_jax.errors.UserError` or a bad flag prints ``<prog>: error: <message>`` on stderr and exits 1;
anything else is a bug and keeps its traceback (``--verbose`` shows the user errors' too). Each tool builds its absl
flags per call: config_flags registers each parse's overrides there, and tools imported together keep separate sets.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections
from absl import flags

from prosparse_jax.config import SECTIONS
from prosparse_jax.errors import UsageError, UserError, did_you_mean
from prosparse_jax.training.checkpoint import quiet_orbax_noise

_VERBOSE_HELP = "On an error, show the Python traceback too."


def compilation_cache_default() -> str:
    """Where a tool keeps XLA's compiled programs between runs by default: ``<files.cache_dir()>/xla``."""
    from prosparse_jax import files

    return str(files.cache_dir() / "xla")


def use_compilation_cache(path: str) -> None:
    """Keeps XLA's compiled programs in ``path`` (JAX's persistent compilation cache), so the same command run again
    loads them instead of compiling; "" turns it off. Every program is kept, whatever its compile time."""
    if not path:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# ---------------------------------------------------------------------------------------------------------------
# absl tools: run() parses, calls, prints one error line
# ---------------------------------------------------------------------------------------------------------------
def run(prog: str, flag_values: flags.FlagValues, argv: list[str] | None, body: Callable[[], str | tuple[str, int]],
        doc: str | None = None) -> int:
    """Parses ``argv`` (default ``sys.argv``), runs ``body`` and prints its output; returns the exit code.

    ``body`` returns the output, or (output, exit code) for a tool whose success has several codes. ``--help`` prints
    ``doc`` (the tool's module docstring) and the flags.
    """
    if "verbose" not in flag_values:
        flags.DEFINE_bool("verbose", False, _VERBOSE_HELP, flag_values=flag_values)
    args = list(sys.argv if argv is None else argv)
    if any(a in ("--help", "-h", "--helpfull") for a in args[1:]):
        print(f"{(doc or prog).strip()}\n\nflags:\n{flag_values.get_help(include_special_flags=False)}")
        return 0
    verbose = _verbose(args)
    quiet_orbax_noise()  # a failed restore leaves orbax's reads behind; their tracebacks would bury the error line
    flag_values.unparse_flags()
    try:
        with one_line_warnings(prog):
            parse_flags(flag_values, args)
            out = body()
    except (flags.Error, UserError) as e:
        if verbose:
            raise
        print(f"{prog}: error: {error_line(e)}", file=sys.stderr)
        return 1
    text, exit_code = out if isinstance(out, tuple) else (out, 0)
    print(text)
    return exit_code


@contextlib.contextmanager
def one_line_warnings(prog: str) -> Iterator[None]:
    """While a tool runs, a :class:`UserWarning` (what the library tells the user) prints as one line
    ``<prog>: warning: <message>`` on stderr; other categories (deprecations) keep Python's format."""
    with warnings.catch_warnings():
        original = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if not issubclass(category, UserWarning):
                return original(message, category, filename, lineno, file, line)
            print(f"{prog}: warning: {' '.join(str(message).split())}", file=sys.stderr)

        warnings.showwarning = show
        yield


def _verbose(args: list[str]) -> bool:
    """The value of ``--verbose`` in ``args``, read by absl alone (the tool's own parse may fail before it)."""
    fv = flags.FlagValues()
    flags.DEFINE_bool("verbose", False, _VERBOSE_HELP, flag_values=fv)
    try:
        fv(args, known_only=True)
    except flags.Error:  # --verbose=maybe: the tool's own parse reports it
        return False
    return fv.verbose


def parse_flags(flag_values: flags.FlagValues, args: list[str]) -> None:
    """``flag_values(args)``; an unknown ``--config.<path>`` override is a :class:`UsageError` naming the nearest field.

    ml_collections' config flags read the overrides from ``sys.argv``, so it is ``args`` meanwhile.
    """
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


def _section_fields(section: str) -> list[str]:
    return [f.name for f in dataclasses.fields(SECTIONS[section])]


def config_override_message(args: list[str], e: BaseException) -> str:
    """One line naming the first ``--config.`` override of ``args`` that is not a config field, with did-you-mean.

    Falls back to ml_collections' own message when no override is found at fault.
    """
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
        if field and field.split(".")[0] not in _section_fields(section):
            name = field.split(".")[0]
            return (f"--config.{m.group(1)}: {section!r} has no field {name!r}"
                    f"{did_you_mean(name, _section_fields(section))}")
    text = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
    return "unknown config override: " + " ".join(text.replace('\\n', " ").split()).strip("'\"")


def error_line(e: BaseException) -> str:
    """The message of ``e`` as one line of at most 1200 characters.

    An embedded traceback (config_flags wraps a config file's exception in one) is reduced to its last line.
    """
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    if "Traceback (most recent call last)" in text:
        head = text.split(": ", 1)[0] if text.startswith("flag --") else ""
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        last = re.sub(r"^[\w.]+(Error|Exception): ", "", last.strip())
        text = f"{head}: {last}" if head else last
    line = " ".join(text.split())
    return line if len(line) <= 1200 else line[:1197] + "..."


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


# ---------------------------------------------------------------------------------------------------------------
# argparse tools (experiments/, sweep, fit_laws)
# ---------------------------------------------------------------------------------------------------------------
class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are a :class:`UsageError` (one line through :func:`call`), with ``--verbose``."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.add_argument("--verbose", action="store_true", help="on an error, show the Python traceback too")

    def error(self, message: str) -> Any:  # argparse's is usage + message, exit 2
        raise UsageError(f"{message} (--help for usage)")


def call(prog: str, argv: list[str] | None, body: Callable[[], int | None]) -> int:
    """Runs ``body`` (which parses ``argv`` itself) with :func:`run`'s error handling; returns the exit code."""
    args = sys.argv[1:] if argv is None else argv
    try:
        with one_line_warnings(prog):
            return body() or 0
    except UserError as e:
        if _argparse_verbose(args):
            raise
        print(f"{prog}: error: {error_line(e)}", file=sys.stderr)
        return 1


def _argparse_verbose(args: list[str]) -> bool:
    """Whether ``args`` hold ``--verbose``, read as the tool's own argparse parser reads it."""
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    parser.add_argument("--verbose", action="store_true")
    try:
        return parser.parse_known_args(args)[0].verbose
    except argparse.ArgumentError:  # --verbose=1: the tool's own parse reports it
        return False
