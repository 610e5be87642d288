"""The project's exceptions: one base, one branch for errors the user can fix.

A :class:`UserError` means the input was wrong (a flag, a config field, a file that is missing, corrupt or in the way,
a full disk); its message names the problem and the fix, and the command-line tools print it as one line. Anything
else raised inside the package is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ProsparseError(Exception):
    """Base of every exception raised on purpose by prosparse_jax."""


class UserError(ProsparseError):
    """Bad input the user can fix; the message names it and the fix."""


class ConfigError(UserError):
    """A config field is unknown or has a bad value."""


class UsageError(UserError):
    """A bad argument or flag of a tool, or arguments that do not fit together."""


class DataError(UserError):
    """The corpus, tokenizer or data directory cannot give what the run needs."""


class InputError(UserError):
    """An input file is missing, unreadable or corrupt; the message names the file."""


class OutputError(UserError):
    """An output cannot be written (in the way, disk full, permissions); the message names the path."""


class CheckpointError(UserError):
    """A checkpoint is missing, incompatible with the run, or cannot be saved."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files do not match the digests written with them."""


class TrainError(UserError):
    """A training run cannot start or go on (a workdir holding another run, a diverged loss)."""


class NonFiniteLossError(TrainError):
    """The loss or the gradients became NaN or Inf."""


class HFConversionError(UserError):
    """A model cannot be converted to or from the HuggingFace format."""


class KernelUnavailableError(UserError):
    """A compiled kernel cannot be built or loaded on this machine."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
