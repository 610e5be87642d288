"""A sweep's definition (``configs/sweeps/``): loaded, every run's overrides and config validated as train parses them.

``load_sweep`` is what every ``experiments/sweep.py`` subcommand calls first; see that file's docstring.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

import ml_collections  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs.sweeps import flatten  # noqa: E402
from prosparse_jax.config import ConfigError, RunConfig, did_you_mean  # noqa: E402
from prosparse_jax.main import common as cli  # noqa: E402
from prosparse_jax.run_config import resolve  # noqa: E402

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
RESERVED = ("logs", "results")  # <root>/logs holds the run logs, <root>/results the default aggregate
LOGS = "logs"


class SweepError(ValueError):
    """A sweep that cannot run as given; the message names the sweep, the run and the field."""

# ---------------------------------------------------------------------------------------------------------------
# The sweep: loaded, every run validated
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a sweep, validated: its overrides and the config train will see."""

    index: int
    name: str
    overrides: dict[str, Any]  # dotted field -> value
    axes: dict[str, str]  # axis -> value label (grid runs)
    config: ml_collections.ConfigDict  # the base config with the overrides, parsed as train parses its command
    rc: RunConfig

    @property
    def steps(self) -> int:
        return self.rc.train.steps

    @property
    def tokens_per_step(self) -> int:
        return self.rc.train.batch_size * self.rc.data.seq_len


@dataclasses.dataclass(frozen=True)
class Sweep:
    ref: str  # the sweep file (absolute) and its arg
    name: str
    base: str  # the base experiment config (absolute) and its arg
    runs: tuple[Run, ...]
    analysis: dict[str, Any]

    def workdir(self, root: Path, run: Run) -> Path:
        return Path(root).absolute() / run.name

    def command(self, root: Path, run: Run) -> list[str]:
        """The train command of ``run``: ``python -m prosparse_jax.training.train --config=<base> --workdir=... --config.*``."""
        return [sys.executable, "-m", "prosparse_jax.training.train", f"--config={self.base}",
                f"--workdir={self.workdir(root, run)}", *override_flags(run.overrides)]


def format_value(v: Any) -> str:
    """A config value as ``--config.<field>=`` takes it (bools lower-case, sequences as tuple literals)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return repr(_as_tuple(v))
    return str(v) if isinstance(v, str) else repr(v)


def override_flags(overrides: dict[str, Any]) -> list[str]:
    return [f"--config.{k}={format_value(v)}" for k, v in overrides.items()]


def _as_tuple(v: Any) -> Any:
    return tuple(_as_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v


def _split_ref(ref: str) -> tuple[str, str | None]:
    """``file.py:arg`` -> (file.py, arg); a ref without ``:arg`` -> (ref, None)."""
    path, sep, arg = ref.partition(".py:")
    return (path + ".py", arg) if sep else (ref, None)


def _find_file(path: str, what: str) -> Path:
    """A config file: absolute, or relative to the current directory, else to the repository root."""
    p = Path(path).expanduser()
    for cand in [p] if p.is_absolute() else [Path.cwd() / p, ROOT / p]:
        if cand.is_file():
            return cand.resolve()
    raise SweepError(f"{what}: {path} not found (a relative path is looked up in the current directory, then in "
                     f"{ROOT})")


def _load_sweep_config(path: Path, arg: str | None) -> Any:
    spec = importlib.util.spec_from_file_location(f"_prosparse_sweep_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise SweepError(f"--sweep: {path} line {e.lineno}: invalid Python ({e.msg})") from e
    if not hasattr(module, "get_config"):
        raise SweepError(f"--sweep: {path} has no get_config(arg); see configs/sweeps/__init__.py")
    try:
        return module.get_config() if arg is None else module.get_config(arg)
    except ValueError as e:  # ConfigError: an unknown arg; grid(): axes that clash
        raise SweepError(f"--sweep: {path}: {e}") from e


def parse_config(base: str, args: Sequence[str]) -> ml_collections.ConfigDict:
    """The ConfigDict that ``prosparse_jax.training.train --config=<base> <args>`` runs with (same flag parser)."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True, flag_values=fv)
    cli.parse_flags(fv, ["train", f"--config={base}", *args])
    return cli.load_config(fv)


def _get(c: ml_collections.ConfigDict, dotted: str) -> Any:
    for part in dotted.split("."):
        c = c[part]
    return c


def _validate_run(index: int, spec: Any, sweep_ref: str, base: str, fields: list[str]) -> Run:
    name = spec.get("name") if hasattr(spec, "get") else None
    where = f"sweep {sweep_ref}: run {index} ({name!r})"
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or name in RESERVED:
        raise SweepError(f"{where}: a run name must be a directory name of letters, digits and ._+- (not "
                         f"{' or '.join(RESERVED)})")
    overrides = dict(spec.get("overrides") or {})
    for k in overrides:
        if any(f.startswith(f"{k}.") for f in fields):
            raise SweepError(f"{where}: {k!r} is a config section of {base}, not a field; override its fields one by "
                             f"one ('{k}.<field>')")
        if k not in fields:
            raise SweepError(f"{where}: {k!r} is not a config field of {base}{did_you_mean(k, fields)}")
    try:
        cfg = parse_config(base, override_flags(overrides))
    except (flags.Error, cli.UsageError) as e:
        raise SweepError(f"{where}: {cli.error_line(e)}") from e
    for k, v in overrides.items():
        got = _get(cfg, k)
        if _as_tuple(got) != _as_tuple(v):
            raise SweepError(f"{where}: {k}={v!r} reads back from the command line as {got!r}; give the value in the "
                             "field's type")
    try:
        rc = resolve(cfg)
    except ConfigError as e:
        raise SweepError(f"{where}: {e}") from e
    return Run(index, name, overrides, {str(a): str(v) for a, v in dict(spec.get("axes") or {}).items()}, cfg, rc)


def load_sweep(ref: str) -> Sweep:
    """Loads a sweep config and validates every run (fields, values, names) before anything is done."""
    path_s, arg = _split_ref(ref)
    path = _find_file(path_s, "--sweep")
    full_ref = f"{path}:{arg}" if arg is not None else str(path)
    s = _load_sweep_config(path, arg)
    for key in ("base", "runs"):
        if key not in s:
            raise SweepError(f"sweep {full_ref}: no {key!r} field; see configs/sweeps/__init__.py")
    base_path, base_arg = _split_ref(str(s["base"]))
    base_file = _find_file(base_path, f"sweep {full_ref}: base")
    base = f"{base_file}:{base_arg}" if base_arg is not None else str(base_file)
    try:
        fields = sorted(flatten(parse_config(base, []).to_dict()))
    except (flags.Error, cli.UsageError) as e:
        raise SweepError(f"sweep {full_ref}: base {s['base']}: {cli.error_line(e)}") from e
    if not s["runs"]:
        raise SweepError(f"sweep {full_ref}: no runs")
    runs = tuple(_validate_run(i, r, full_ref, base, fields) for i, r in enumerate(s["runs"]))
    seen: dict[str, int] = {}
    for r in runs:
        if r.name in seen:
            raise SweepError(f"sweep {full_ref}: runs {seen[r.name]} and {r.index} are both named {r.name!r}")
        seen[r.name] = r.index
    analysis = s["analysis"].to_dict() if "analysis" in s and hasattr(s["analysis"], "to_dict") else \
        dict(s.get("analysis") or {})
    return Sweep(full_ref, str(s.get("name") or path.stem), base, runs, analysis)
