"""Sparse modes of an evaluation, each one string: the model config and the x1 hook a mode runs the model with.

=================== ========================================================================================
``dense``           the model as saved, without sparse-mode thresholds (a ReLU model keeps its exact zeros)
``fatrelu:<t>``     FATReLU at threshold t on a ReLU model's gate (ProSparse §3.3): gate z kept iff z >= t
``fatrelu:<x>rel``  the same at t = x * the model's mean positive gate activation (its activation scale,
                    :func:`prosparse_jax.analysis.frontier.positive_gate_mean`, on held-out batches)
``thresholds``      the CETT / PPL-p% sparse mode saved in the model's config (``model.neuron_thresholds``)
``thresholds:<f>``  the sparse mode of a ``sparse_mode.json`` written by ``analyze --metric=pplp`` (or cett)
``topk:<k>``        Top-k per token on |act(gate)| (Sparsing Law §4.1): k a fraction in (0, 1], or an integer
                    number of neurons >= 2
``predictor:<dir>`` an activation predictor in the loop (``python -m prosparse_jax.main.predictor train``), with
                    the sparse mode it was trained for
=================== ========================================================================================

``dense``, ``fatrelu`` and ``thresholds`` are one program: the model's FFN (a FATReLU model's gate through ReLU) with
:func:`threshold_hook`, whose thresholds are arrays passed to the jitted forward. Every such mode of a model runs the
same compiled forward (compiled once per shape, not per mode), so a sparse mode costs exactly what the dense run does.

A new mode is one more branch of :func:`resolve_mode` returning a :class:`SparseMode` (the config it runs with, its
x1 hook factory and the hook's arrays).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp

from prosparse_jax.analysis import sparsity
from prosparse_jax.config import ModelConfig
from prosparse_jax.errors import ConfigError, UsageError, did_you_mean
from prosparse_jax.model import transformer as model
from prosparse_jax.model.transformer import Params, X1Mask
from prosparse_jax.training.model_io import read_thresholds

KINDS = ("dense", "fatrelu", "thresholds", "topk", "predictor")
FATRELU_GATES = ("relu", "fatrelu")  # activations whose gate FATReLU's threshold shifts
_REL = re.compile(r"^(?P<x>[^a-z]+)rel$")

# (params, aux) -> the x1 hook of model.forward; traced inside jit (aux: the mode's arrays, a jit argument)
HookFactory = Callable[[Params, Any], X1Mask]


class Thresholds(NamedTuple):
    """The arrays of :func:`threshold_hook`: a gate threshold (FATReLU's t; -inf: none) and per-layer neuron-norm
    thresholds (the CETT sparse mode's tau; -inf: none)."""

    gate_t: Any
    taus_L: Any  # noqa: N815


def threshold_hook(params: Params, aux: Thresholds) -> X1Mask:
    """The x1 hook of the ``dense``, ``fatrelu`` and ``thresholds`` modes: neuron i is kept iff act(gate_i) >= t
    (on a ReLU gate: FATReLU(t), ProSparse Eq. 3; t = 0 keeps ReLU's own output) and |x1_i| * ||W_down[i]|| > tau_l
    (:func:`model.neuron_norm_mask`'s rule, Sparsing Law §4.1)."""
    norms_LxF = model.w_down_norms(params)
    gate_t = jnp.asarray(aux.gate_t, jnp.float32)
    taus_L = jnp.asarray(aux.taus_L, jnp.float32)

    def mask(layer: Any, x1_BxTxF: Any, act_BxTxF: Any, valid_BxT: Any) -> Any:
        del valid_BxT
        keep = (act_BxTxF.astype(jnp.float32) >= gate_t) & (
            model.neuron_output_norms(x1_BxTxF, norms_LxF[layer]) > taus_L[layer])
        return jnp.where(keep, x1_BxTxF, jnp.zeros_like(x1_BxTxF))

    return mask


def _threshold_mode(text: str, cfg: ModelConfig, gate_t: float | None, taus: Sequence[float] | None,
                    settings: dict[str, Any]) -> SparseMode:
    """A mode of :func:`threshold_hook` on a model of config ``cfg`` (as loaded): ``gate_t`` None keeps the model's
    own activation (a FATReLU model: its threshold), ``taus`` None no neuron-norm thresholds."""
    run = cfg.replace(neuron_thresholds=())
    if cfg.activation in FATRELU_GATES:  # ReLU's gate, the threshold as an array: one program for every t
        t = cfg.activation_threshold if cfg.activation == "fatrelu" and gate_t is None else (gate_t or 0.0)
        run = run.replace(activation="relu", activation_threshold=0.0)
    else:
        t = -math.inf
    taus_L = [-math.inf] * cfg.n_layers if taus is None else [float(v) for v in taus]
    aux = Thresholds(jnp.float32(t), jnp.asarray(taus_L, jnp.float32))
    return SparseMode(text, run, hook=threshold_hook, aux=aux, settings=settings)


@dataclasses.dataclass(frozen=True)
class ModeSpec:
    """A parsed mode string: its kind and its argument (a number or a path), not yet checked against a model."""

    text: str
    kind: str
    value: float | None = None
    relative: bool = False
    path: str | None = None


@dataclasses.dataclass(frozen=True)
class SparseMode:
    """A mode resolved for one model.

    Attributes:
      name: the mode string as given.
      cfg: the model config the mode runs with (a FATReLU model's gate as ReLU: the threshold is in ``aux``).
      hook: the x1 hook factory (a module-level function per program: modes with the same hook and config share
        one compiled forward).
      aux: the arrays the hook reads (passed to the jitted forward as an argument, not baked in).
      settings: what the mode resolved to (absolute threshold, scale, k, file), recorded with the results.
    """

    name: str
    cfg: ModelConfig
    hook: HookFactory
    aux: Any
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)


def _number(text: str, what: str, raw: str) -> float:
    try:
        v = float(raw)
    except ValueError:
        raise UsageError(f"mode {text!r}: {what} must be a number, got {raw!r}") from None
    if not math.isfinite(v):
        raise UsageError(f"mode {text!r}: {what} must be finite, got {raw!r}")
    return v


def parse_mode(text: str) -> ModeSpec:
    """The :class:`ModeSpec` of a mode string (syntax only); a :class:`UsageError` names a bad one."""
    text = str(text).strip()
    kind, sep, arg = text.partition(":")
    if kind not in KINDS:
        raise UsageError(f"mode {text!r}: unknown kind {kind!r}{did_you_mean(kind, KINDS)}; choose one of: "
                         "dense, fatrelu:<t>, fatrelu:<x>rel, thresholds[:<sparse_mode.json>], topk:<k>, "
                         "predictor:<dir>")
    if kind == "dense":
        if sep:
            raise UsageError(f"mode {text!r}: dense takes no argument")
        return ModeSpec(text, kind)
    if kind == "thresholds":
        return ModeSpec(text, kind, path=arg or None)
    if not arg:
        example = {"fatrelu": "fatrelu:0.01", "topk": "topk:0.1", "predictor": "predictor:<dir>"}[kind]
        raise UsageError(f"mode {text!r}: {kind} needs an argument, e.g. {example}")
    if kind == "predictor":
        return ModeSpec(text, kind, path=arg)
    if kind == "fatrelu":
        m = _REL.match(arg)
        v = _number(text, "the threshold", m.group("x") if m else arg)
        if v < 0:
            raise UsageError(f"mode {text!r}: the FATReLU threshold must be >= 0, got {v}")
        return ModeSpec(text, kind, value=v, relative=bool(m))
    v = _number(text, "k", arg)
    if not (0 < v <= 1 or (v >= 2 and v == int(v))):
        raise UsageError(f"mode {text!r}: k must be a fraction in (0, 1] or a whole number of neurons >= 2, got "
                         f"{arg}")
    return ModeSpec(text, kind, value=v)


def parse_modes(text: str) -> list[ModeSpec]:
    """The modes of a comma-separated list (each checked by :func:`parse_mode`; no duplicates)."""
    specs = [parse_mode(m) for m in str(text).split(",") if m.strip()]
    if not specs:
        raise UsageError("modes: give at least one mode, e.g. dense,fatrelu:0.01")
    names = [s.text for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"modes: {', '.join(dup)} given twice")
    return specs


def analyze_command(checkpoint: str | Path | None) -> str:
    """The ``analyze`` command that writes a model's CETT / PPL-1% sparse mode."""
    ck = checkpoint if checkpoint is not None else "<checkpoint>"
    return (f"`python -m prosparse_jax.main.analyze --checkpoint={ck} --data=stdlib --metric=pplp --value=1 "
            "--out=<dir>`")


def _fatrelu(spec: ModeSpec, cfg: ModelConfig, checkpoint: Any, scale: Callable[[ModelConfig], float]
             ) -> SparseMode:
    if cfg.activation not in FATRELU_GATES:
        raise UsageError(
            f"mode {spec.text!r}: FATReLU shifts the threshold of a ReLU gate and this is a {cfg.activation} model; "
            f"its sparse mode comes from {analyze_command(checkpoint)}: evaluate it with "
            "mode thresholds:<dir>/sparse_mode.json")
    settings: dict[str, Any] = {"kind": "fatrelu"}
    t = float(spec.value)
    if spec.relative:
        gate_mean = float(scale(cfg.replace(neuron_thresholds=())))
        settings.update(relative=t, positive_gate_mean=gate_mean)
        t = t * gate_mean
    settings["threshold"] = t
    return _threshold_mode(spec.text, cfg, t, None, settings)


def _thresholds(spec: ModeSpec, cfg: ModelConfig, checkpoint: Any) -> SparseMode:
    if spec.path is None:
        taus, source = cfg.neuron_thresholds, "the model's config"
        if not taus:
            raise UsageError(
                f"mode {spec.text!r}: this {cfg.activation} model has no sparse-mode thresholds in its config; "
                f"{analyze_command(checkpoint)} finds them: evaluate with mode thresholds:<dir>/sparse_mode.json")
    else:
        taus, source = read_thresholds(spec.path), str(spec.path)
    try:
        cfg.replace(neuron_thresholds=tuple(taus))  # the config's own checks (the layer count)
    except ConfigError as e:
        raise UsageError(f"mode {spec.text!r}: {e} (is it the analysis of another model?)") from None
    return _threshold_mode(spec.text, cfg, None, taus, {"kind": "thresholds", "source": source,
                                                        "thresholds_per_layer": [float(t) for t in taus]})


def _topk(spec: ModeSpec, cfg: ModelConfig) -> SparseMode:
    k = float(spec.value)
    frac = k if k <= 1 else k / cfg.d_ff
    if frac > 1:
        raise UsageError(f"mode {spec.text!r}: k = {int(k)} neurons exceeds d_ff = {cfg.d_ff}")
    return SparseMode(spec.text, cfg.replace(neuron_thresholds=()), hook=topk_hook,
                      aux=jnp.full((cfg.n_layers,), frac, jnp.float32),
                      settings={"kind": "topk", "k_fraction": frac, "topk_mode": "token"})


def topk_hook(params: Params, k_L: Any) -> X1Mask:
    """The x1 hook of the ``topk`` modes (one program for every k: ``k_L`` is an array)."""
    del params
    return sparsity.topk_x1_mask(k_L, "token")


def _predictor(spec: ModeSpec, cfg: ModelConfig) -> SparseMode:
    from prosparse_jax.predictor import io as predictor_io
    from prosparse_jax.predictor import measure as predictor_measure

    pred, meta = predictor_io.load_predictor(Path(spec.path), cfg)
    taus = tuple(float(t) for t in (meta.get("neuron_thresholds") or ()))
    try:
        pcfg = cfg.replace(neuron_thresholds=taus)
    except ConfigError as e:
        raise UsageError(f"mode {spec.text!r}: {e}") from None
    return SparseMode(spec.text, pcfg, hook=lambda params, p: predictor_measure.predictor_hook(p, params, pcfg),
                      aux=pred, settings={"kind": "predictor", "path": str(spec.path),
                                          "model_sparse_mode": bool(taus)})


def resolve_mode(spec: ModeSpec | str, cfg: ModelConfig, *, checkpoint: Any = None,
                 scale: Callable[[ModelConfig], float] | None = None) -> SparseMode:
    """The :class:`SparseMode` of ``spec`` for a model of config ``cfg`` (its config as loaded).

    ``scale(dense_cfg)`` gives the mean positive gate activation for relative FATReLU thresholds (called only then).
    A mode the model cannot run is a :class:`UsageError` naming the command that gives it one.
    """
    spec = parse_mode(spec) if isinstance(spec, str) else spec
    if spec.kind == "dense":
        return _threshold_mode(spec.text, cfg, None, None, {"kind": "dense"})
    if spec.kind == "fatrelu":
        if scale is None and spec.relative:
            raise UsageError(f"mode {spec.text!r}: a relative threshold needs held-out data for the activation scale")
        return _fatrelu(spec, cfg, checkpoint, scale or (lambda c: 0.0))
    if spec.kind == "thresholds":
        return _thresholds(spec, cfg, checkpoint)
    if spec.kind == "topk":
        return _topk(spec, cfg)
    return _predictor(spec, cfg)

