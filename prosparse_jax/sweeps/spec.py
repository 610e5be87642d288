"""A sweep: a base experiment config and its runs (a name and dotted-field overrides each), loaded and validated.

Sweep files (``configs/sweeps/*.py``) build their ConfigDict with :func:`grid` and :func:`sweep`; :func:`load_sweep`
checks every run as the train command will parse it, before anything is created or trained. Format: docs/sweeps.md.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from prosparse_jax.config import RunConfig, resolve
from prosparse_jax.errors import ConfigError, InputError, UserError, did_you_mean
from prosparse_jax.training.train import flatten

Overrides = dict[str, Any]
#: ``parse(base, args)``: the ConfigDict of ``python -m prosparse_jax.main.train --config=<base> <args>``, parsed by
#: that command's own flag parser; a bad config or override raises a :class:`UserError`.
ConfigParser = Callable[[str, Sequence[str]], ml_collections.ConfigDict]

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
LOGS = "logs"  # <root>/logs holds the run logs
RESERVED = (LOGS, "results")  # <root>/results: the default aggregate
TRAIN_MODULE = "prosparse_jax.main.train"


# ---------------------------------------------------------------------------------------------------------------
# Writing sweep files
# ---------------------------------------------------------------------------------------------------------------
def config_diff(base: ml_collections.ConfigDict, other: ml_collections.ConfigDict) -> Overrides:
    """The overrides (dotted field -> value) that turn ``base`` into ``other`` (both experiment configs)."""
    a, b = flatten(base.to_dict()), flatten(other.to_dict())
    if set(a) != set(b):
        raise ConfigError(f"config_diff: the configs have different fields: {sorted(set(a) ^ set(b))}")
    return {k: b[k] for k in b if a[k] != b[k]}


def grid(axes: Mapping[str, Mapping[str, Overrides]], fixed: Overrides | None = None,
         derive: Callable[[dict[str, str]], Overrides] | None = None) -> list[dict[str, Any]]:
    """The runs of the product of ``axes``, in order (the last axis varies fastest).

    Args:
      axes: axis name -> {value label -> overrides}, e.g. ``{"activation": {"relu": {"model.activation": "relu"}}}``.
      fixed: overrides of every run (applied first).
      derive: optional ``f({axis: label}) -> overrides`` for fields that depend on several axes at once.

    Returns:
      ``[{"name": "<label>-<label>...", "overrides": {...}, "axes": {axis: label}}, ...]``.

    Raises:
      ConfigError: two axes set the same field (an ambiguous product).
    """
    runs = []
    names = list(axes)
    for labels in itertools.product(*(list(axes[a]) for a in names)):
        chosen = dict(zip(names, labels, strict=True))
        over: Overrides = dict(fixed or {})
        owner: dict[str, str] = {}
        for a, label in chosen.items():
            for k, v in axes[a][label].items():
                if k in owner:
                    raise ConfigError(f"grid: axes {owner[k]!r} and {a!r} both set {k!r}")
                owner[k] = a
                over[k] = v
        if derive is not None:
            over.update(derive(chosen))
        runs.append({"name": "-".join(labels), "overrides": over, "axes": chosen})
    return runs


def analysis(law_input: str = "cett_ppl", *, p: float = 1.0, n_search: int = 5, num_batches: int = 4,
             batch_size: int = 8, search_steps: int = 12, min_step: int = -1, max_step: int | str | None = None,
             group_by: str = "scale") -> ml_collections.ConfigDict:
    """What ``python -m prosparse_jax.main.sweep aggregate`` computes; each field is commented in the body.

    Args:
      law_input: ``cett_ppl`` (the Sparsing Law's A, CETT-PPL-p% activation ratio, App. E), ``exact_zero``
        (1 - exact-zero training sparsity; cheap, not the paper's A) or ``""`` (no law fit: a ProSparse ablation).
      max_step: the fit's last step: None (every kept checkpoint), a step, or ``"decay_start"``
        (:data:`prosparse_jax.analysis.law_fit.DECAY_START`): each run's own wsd LR-decay start, the stable phase.
    """
    a = ml_collections.ConfigDict()
    a.law_input = law_input  # cett_ppl | exact_zero | '' (no law fit)
    a.p = p  # PPL budget in percent (PPL ratio <= 1 + p/100)
    a.n_search = n_search  # the CETT target is searched on this many last kept checkpoints
    a.num_batches = num_batches  # validation batches per checkpoint
    a.batch_size = batch_size  # sequences per validation batch
    a.search_steps = search_steps  # bisection steps on the CETT target
    a.min_step = min_step  # warm-up cut; -1 = the run's optim.warmup_steps
    a.max_step = max_step  # steps > this are left out; None = none, 'decay_start' = each run's wsd LR-decay start
    a.group_by = group_by  # axis holding the scale of each run
    return a


def sweep(name: str, base: str, runs: list[dict[str, Any]],
          law: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """A sweep file's ConfigDict."""
    s = ml_collections.ConfigDict()
    s.name = name  # sweep name (SLURM job name)
    s.base = base  # experiment config of every run: 'file.py:arg'
    s.runs = runs  # [{name, overrides, axes}], usually grid(...)
    s.analysis = law if law is not None else analysis("")  # what `sweep aggregate` measures
    return s


# ---------------------------------------------------------------------------------------------------------------
# The sweep: loaded, every run validated
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SweepRun:
    """One run of a sweep, validated: its overrides and the config train will see."""

    index: int
    name: str
    overrides: Overrides  # dotted field -> value
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
    runs: tuple[SweepRun, ...]
    analysis: dict[str, Any]

    def workdir(self, root: Path, run: SweepRun) -> Path:
        return Path(root).absolute() / run.name

    def command(self, root: Path, run: SweepRun) -> list[str]:
        """The train command of ``run``, with absolute paths (it runs from any directory)."""
        return [sys.executable, "-m", TRAIN_MODULE, f"--config={self.base}", f"--workdir={self.workdir(root, run)}",
                *override_flags(run.overrides)]


def format_value(v: Any) -> str:
    """A config value as ``--config.<field>=`` takes it (bools lower-case, sequences as tuple literals)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return repr(_as_tuple(v))
    return str(v) if isinstance(v, str) else repr(v)


def override_flags(overrides: Overrides) -> list[str]:
    return [f"--config.{k}={format_value(v)}" for k, v in overrides.items()]


def _as_tuple(v: Any) -> Any:
    return tuple(_as_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v


def _split_ref(ref: str) -> tuple[str, str | None]:
    """``file.py:arg`` -> (file.py, arg); a ref without ``:arg`` -> (ref, None)."""
    path, sep, arg = ref.partition(".py:")
    return (path + ".py", arg) if sep else (ref, None)


def _find_file(path: str, what: str) -> Path:
    """A config file: absolute, or relative to the current directory, else to the directory holding ``configs``."""
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p]
    configs = importlib.util.find_spec("configs")
    if not p.is_absolute() and configs is not None and configs.submodule_search_locations:
        candidates += [Path(loc).parent / p for loc in configs.submodule_search_locations]
    for cand in candidates:
        if cand.is_file():
            return cand.resolve()
    raise InputError(f"{what}: {path} not found (looked in {', '.join(str(c.parent) for c in candidates)})")


def _load_sweep_config(path: Path, arg: str | None) -> Any:
    spec = importlib.util.spec_from_file_location(f"_prosparse_sweep_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"--sweep: {path} line {e.lineno}: invalid Python ({e.msg})") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--sweep: {path} has no get_config(arg); see prosparse_jax/sweeps/spec.py")
    try:
        return module.get_config() if arg is None else module.get_config(arg)
    except (ConfigError, ValueError) as e:  # an unknown arg; grid(): axes that clash
        raise ConfigError(f"--sweep: {path}: {e}") from e


def _get(c: ml_collections.ConfigDict, dotted: str) -> Any:
    for part in dotted.split("."):
        c = c[part]
    return c


def _validate_run(index: int, spec: Any, sweep_ref: str, base: str, fields: list[str],
                  parse: ConfigParser) -> SweepRun:
    name = spec.get("name") if hasattr(spec, "get") else None
    where = f"sweep {sweep_ref}: run {index} ({name!r})"
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or name in RESERVED:
        raise ConfigError(f"{where}: a run name must be a directory name of letters, digits and ._+- (not "
                          f"{' or '.join(RESERVED)})")
    overrides = dict(spec.get("overrides") or {})
    for k in overrides:
        if any(f.startswith(f"{k}.") for f in fields):
            raise ConfigError(f"{where}: {k!r} is a config section of {base}, not a field; override its fields one "
                              f"by one ('{k}.<field>')")
        if k not in fields:
            raise ConfigError(f"{where}: {k!r} is not a config field of {base}{did_you_mean(k, fields)}")
    try:
        cfg = parse(base, override_flags(overrides))
        for k, v in overrides.items():
            got = _get(cfg, k)
            if _as_tuple(got) != _as_tuple(v):
                raise ConfigError(f"{k}={v!r} reads back from the command line as {got!r}; give the value in the "
                                  "field's type")
        rc = resolve(cfg)
    except UserError as e:
        raise ConfigError(f"{where}: {e}") from e
    return SweepRun(index, name, overrides, {str(a): str(v) for a, v in dict(spec.get("axes") or {}).items()}, cfg,
                    rc)


def load_sweep(ref: str, parse: ConfigParser) -> Sweep:
    """Loads the sweep file ``ref`` (``file.py:arg``) and validates every run (fields, values, names).

    Raises:
      InputError: the sweep or base config file does not exist.
      ConfigError: a run's name, overrides or config is not valid (the message names the run and the field).
    """
    path_s, arg = _split_ref(ref)
    path = _find_file(path_s, "--sweep")
    full_ref = f"{path}:{arg}" if arg is not None else str(path)
    s = _load_sweep_config(path, arg)
    for key in ("base", "runs"):
        if key not in s:
            raise ConfigError(f"sweep {full_ref}: no {key!r} field; see prosparse_jax/sweeps/spec.py")
    base_path, base_arg = _split_ref(str(s["base"]))
    base_file = _find_file(base_path, f"sweep {full_ref}: base")
    base = f"{base_file}:{base_arg}" if base_arg is not None else str(base_file)
    try:
        fields = sorted(flatten(parse(base, []).to_dict()))
    except UserError as e:
        raise ConfigError(f"sweep {full_ref}: base {s['base']}: {e}") from e
    if not s["runs"]:
        raise ConfigError(f"sweep {full_ref}: no runs")
    runs = tuple(_validate_run(i, r, full_ref, base, fields, parse) for i, r in enumerate(s["runs"]))
    seen: dict[str, int] = {}
    for r in runs:
        if r.name in seen:
            raise ConfigError(f"sweep {full_ref}: runs {seen[r.name]} and {r.index} are both named {r.name!r}")
        seen[r.name] = r.index
    law = s["analysis"].to_dict() if "analysis" in s and hasattr(s["analysis"], "to_dict") else \
        dict(s.get("analysis") or {})
    return Sweep(full_ref, str(s.get("name") or path.stem), base, runs, law)
