"""Sweep configs: a base experiment config plus a list of runs, each a name and dotted-field overrides.

A sweep file is like an experiment config file: ``get_config(arg)`` returns an ``ml_collections.ConfigDict`` with

- ``name``: the sweep's name (SLURM job name);
- ``base``: the experiment config every run starts from, ``file.py:arg`` (relative to the repository root);
- ``runs``: a list of ``{"name": str, "overrides": {dotted field: value}, "axes": {axis: value label}}``, usually
  :func:`grid` of some axes; ``overrides`` are exactly what ``--config.<field>=<value>`` would set;
- ``analysis``: what ``experiments/sweep.py aggregate`` measures (:func:`analysis`).

``experiments/sweep.py`` checks every override field and value against the resolved base config before anything
trains (``python experiments/sweep.py plan --sweep=<file.py:arg>`` shows the runs and their commands).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

Overrides = dict[str, Any]


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> {"a.b.c": leaf}: the dotted field names of a config dict."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(base: ml_collections.ConfigDict, other: ml_collections.ConfigDict) -> Overrides:
    """The overrides (dotted field -> value) that turn ``base`` into ``other`` (both from ``base_config()``)."""
    a, b = flatten(base.to_dict()), flatten(other.to_dict())
    if set(a) != set(b):
        raise ValueError(f"config_diff: the configs have different fields: {sorted(set(a) ^ set(b))}")
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
      ValueError: two axes set the same field (an ambiguous product).
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
                    raise ValueError(f"grid: axes {owner[k]!r} and {a!r} both set {k!r}")
                owner[k] = a
                over[k] = v
        if derive is not None:
            over.update(derive(chosen))
        runs.append({"name": "-".join(labels), "overrides": over, "axes": chosen})
    return runs


def analysis(law_input: str = "cett_ppl", *, p: float = 1.0, n_search: int = 5, num_batches: int = 4,
             batch_size: int = 8, search_steps: int = 12, min_step: int = -1,
             group_by: str = "scale") -> ml_collections.ConfigDict:
    """What ``sweep.py aggregate`` computes.

    Args:
      law_input: ``cett_ppl`` (the Sparsing Law's A: CETT-PPL-p% activation ratio of every kept checkpoint,
        ``prosparse_jax.analysis.law_inputs``), ``exact_zero`` (1 - exact-zero training sparsity from metrics.jsonl; cheap,
        not the paper's A) or ``""`` (no law fit: a ProSparse ablation).
      p, n_search, num_batches, batch_size, search_steps: the CETT-PPL protocol's settings (``fit_laws.py``).
      min_step: warm-up cut (checkpoints with step <= min_step are dropped); -1 = the run's optim.warmup_steps.
      group_by: the axis whose values are the scales of the law plots.
    """
    a = ml_collections.ConfigDict()
    a.law_input = law_input  # cett_ppl | exact_zero | '' (no law fit)
    a.p = p  # PPL budget in percent (PPL ratio <= 1 + p/100)
    a.n_search = n_search  # the CETT target is searched on this many last kept checkpoints
    a.num_batches = num_batches  # validation batches per checkpoint
    a.batch_size = batch_size  # sequences per validation batch
    a.search_steps = search_steps  # bisection steps on the CETT target
    a.min_step = min_step  # warm-up cut; -1 = the run's optim.warmup_steps
    a.group_by = group_by  # axis holding the scale of each run
    return a


def sweep(name: str, base: str, runs: list[dict[str, Any]],
          law: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """A sweep ConfigDict (module docstring)."""
    s = ml_collections.ConfigDict()
    s.name = name  # sweep name (SLURM job name)
    s.base = base  # experiment config of every run: 'file.py:arg', relative to the repository root
    s.runs = runs  # [{name, overrides, axes}], usually grid(...)
    s.analysis = law if law is not None else analysis("")  # what `sweep.py aggregate` measures
    return s
