"""The shared shape of the library's absl command-line tools (export_hf, import_hf, score, analyze)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import flags


def run(prog: str, flag_values: flags.FlagValues, argv: list[str] | None, body: Callable[[], str],
        errors: tuple[type[BaseException], ...], doc: str | None = None) -> int:
    """Parses ``argv`` (default ``sys.argv``) into ``flag_values``, runs ``body`` and prints what it returns.

    ``--help`` / ``-h`` prints ``doc`` (the tool's module docstring) and its flags, and exits 0. A flag error or one of
    ``errors`` is printed as ``<prog>: error: <message>`` on stderr. Returns the exit code.
    """
    args = sys.argv if argv is None else argv
    if any(a in ("--help", "-h", "--helpfull") for a in args[1:]):
        print(f"{(doc or prog).strip()}\n\nflags:\n{flag_values.get_help(include_special_flags=False)}")
        return 0
    flag_values.unparse_flags()
    try:
        flag_values(args)
        out = body()
    except (flags.Error, *errors) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0
