"""The shared shape of the library's absl command-line tools (export_hf, import_hf, score, analyze)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import flags


def run(prog: str, flag_values: flags.FlagValues, argv: list[str] | None, body: Callable[[], str],
        errors: tuple[type[BaseException], ...]) -> int:
    """Parses ``argv`` (default ``sys.argv``) into ``flag_values``, runs ``body`` and prints what it returns.

    A flag error or one of ``errors`` is printed as ``<prog>: error: <message>`` on stderr. Returns the exit code.
    """
    flag_values.unparse_flags()
    try:
        flag_values(sys.argv if argv is None else argv)
        out = body()
    except (flags.Error, *errors) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0
