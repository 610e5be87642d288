"""Per-neuron firing frequencies, dead-neuron tiers and where a sparsity gain comes from.

A neuron's firing frequency is the fraction of the measured (valid) tokens on which its x1_i is non-zero (ProSparse
§2's activation). Dead tiers and the gain split are plain numpy on [layers, d_ff] frequencies, so they work on any
source of counts; :func:`firing_frequencies` measures them with the counting forward that ``analyze`` uses
(:func:`prosparse_jax.analysis.sparsity.mask_stats`). Definitions: docs/analysis.md.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import numpy as np

from prosparse_jax.analysis import measure, sparsity
from prosparse_jax.analysis.measure import Batch
from prosparse_jax.config import ModelConfig
from prosparse_jax.errors import UsageError
from prosparse_jax.model.transformer import Params

# Nested tiers (name, a neuron is in the tier when its frequency is below the bound; 0.0: never active). The last is
# the dead rule: DEAD_FREQ.
DEAD_TIERS: tuple[tuple[str, float], ...] = (("never", 0.0), ("below_1e-4", 1e-4), ("below_1e-3", 1e-3))
DEAD_FREQ = DEAD_TIERS[-1][1]  # dead: active on fewer than 0.1% of the measured tokens
MOSTLY_DEAD = 0.5  # a layer with more than this fraction of dead neurons is flagged
_model_forward = functools.lru_cache(maxsize=8)(measure.make_model_forward)  # compiled once per model config


def firing_frequencies(params: Params, cfg: ModelConfig, batches: Iterable[Batch]) -> tuple[np.ndarray, int]:
    """Per-neuron firing frequencies of the model as configured over the valid tokens of ``batches``.

    Active = x1_i != 0 in the model's own forward (its activation, FATReLU threshold and sparse mode included), one
    jitted forward per batch.

    Args:
      batches: dicts with inputs, targets, weights, segment_ids (0 = padding, not counted) and positions, e.g. from
        :func:`prosparse_jax.data.pipeline.make_eval_batches` or :func:`measure.load_eval`.

    Returns:
      (freq_LxF float64, valid tokens counted).
    """
    forward = _model_forward(cfg)
    acc = None
    for b in batches:
        acc = sparsity.add_stats(acc, forward(params, b)[2])
    if acc is None:
        raise UsageError("batches: no batches given; pass at least one held-out batch")
    tokens = int(round(float(acc["tokens"])))
    return acc["neuron_active_LxF"] / max(tokens, 1), tokens


def _check_freq(name: str, freq_LxF: Any) -> np.ndarray:
    f = np.asarray(freq_LxF, np.float64)
    if f.ndim != 2 or f.size == 0:
        raise UsageError(f"{name}: per-neuron frequencies must be a non-empty [layers, d_ff] array, got shape "
                         f"{f.shape}")
    if not np.all(np.isfinite(f)) or f.min() < 0.0 or f.max() > 1.0:
        raise UsageError(f"{name}: frequencies must be fractions of tokens in [0, 1] (divide the counts by the "
                         "token count)")
    return f


def _tier_masks(freq_LxF: np.ndarray) -> dict[str, np.ndarray]:
    """{tier: [L, F] bool}: never = 0, else frequency < the tier's bound."""
    return {name: (freq_LxF == 0.0) if bound == 0.0 else (freq_LxF < bound) for name, bound in DEAD_TIERS}


def dead_neuron_tiers(freq_LxF: Any, tokens: int | None = None) -> dict[str, Any]:
    """Dead neurons per layer in nested tiers, and the layers flagged as mostly dead.

    Tiers (each contains the previous one): ``never`` (never active), ``below_1e-4`` (active on < 1e-4 of the
    tokens), ``below_1e-3`` (< 1e-3: the dead rule, :data:`DEAD_FREQ`). A layer is flagged when more than
    :data:`MOSTLY_DEAD` of its neurons are dead.

    Args:
      freq_LxF: per-neuron firing frequencies, [layers, d_ff], in [0, 1] (:func:`firing_frequencies`).
      tokens: the tokens behind the frequencies, recorded with its resolution 1 / tokens (a bound below it cannot
        separate its tier from ``never``).

    Returns:
      JSON-ready: {"rule", "tokens", "resolution", "d_ff", one entry per tier {"count_per_layer",
      "fraction_per_layer", "count", "fraction"}, "mostly_dead_layers": [layer indices]}.

    Raises:
      UsageError: ``freq_LxF`` is not a [layers, d_ff] array of fractions.
    """
    f = _check_freq("freq_LxF", freq_LxF)
    L, F = f.shape
    res: dict[str, Any] = {
        "rule": "nested tiers: " + "; ".join("never active" if bound == 0.0 else f"active on < {bound:g} of the tokens"
                                             for _, bound in DEAD_TIERS)
                + f" (dead); a layer with > {MOSTLY_DEAD:.0%} dead is flagged",
        "tokens": tokens, "resolution": None if not tokens else 1.0 / tokens, "d_ff": F}
    for name, mask_LxF in _tier_masks(f).items():
        count_L = mask_LxF.sum(axis=1)
        res[name] = {"count_per_layer": [int(c) for c in count_L],
                     "fraction_per_layer": [float(c / F) for c in count_L],
                     "count": int(count_L.sum()), "fraction": float(count_L.sum() / (L * F))}
    dead_frac_L = np.asarray(res[DEAD_TIERS[-1][0]]["fraction_per_layer"])
    res["mostly_dead_layers"] = [int(i) for i in np.flatnonzero(dead_frac_L > MOSTLY_DEAD)]
    return res


def tier_counts(tiers: dict[str, Any]) -> dict[str, list[int]]:
    """The per-layer counts of a :func:`dead_neuron_tiers` result, and its flagged layers (a compact summary)."""
    return {**{name: tiers[name]["count_per_layer"] for name, _ in DEAD_TIERS},
            "mostly_dead_layers": tiers["mostly_dead_layers"]}


def sparsity_gain_split(freq_a_LxF: Any, freq_b_LxF: Any, freq_start_LxF: Any = None) -> dict[str, Any]:
    """Splits the sparsity gain from model a (before) to model b (after), same neurons, into the part from neurons
    that died and the rest.

    gain = mean(r_a) - mean(r_b) over all layers x d_ff neurons (the drop of the activation ratio) =
    ``from_newly_dead`` (neurons dead in b, frequency < :data:`DEAD_FREQ`, but not in a: their r_a - r_b) +
    ``from_the_rest`` (every other neuron: survivors firing less, and the small changes of neurons dead in both or
    revived in b).

    Args:
      freq_a_LxF, freq_b_LxF: per-neuron firing frequencies of a and b, [layers, d_ff] (:func:`firing_frequencies`).
      freq_start_LxF: optional, the same neurons at an earlier start (e.g. a SiLU start measured with
        ``activation="relu"``: its gates' positive rate): adds which of b's dead neurons were dead there already.

    Returns:
      JSON-ready: {"gain", "from_newly_dead", "from_the_rest", "share_from_newly_dead" (None when gain == 0),
      "newly_dead", "newly_dead_fraction", "newly_dead_median_freq_a" (None when none died), "revived", and
      "per_layer": the same sums per layer (each layer's mean over its d_ff neurons)}; with ``freq_start_LxF`` also
      "dead_in_b" and "dead_in_b_dead_at_start" (counts).

    Raises:
      UsageError: the arrays are not [layers, d_ff] fractions of the same shape.
    """
    a, b = _check_freq("freq_a_LxF", freq_a_LxF), _check_freq("freq_b_LxF", freq_b_LxF)
    start = None if freq_start_LxF is None else _check_freq("freq_start_LxF", freq_start_LxF)
    for name, x in (("freq_b_LxF", b), ("freq_start_LxF", start)):
        if x is not None and x.shape != a.shape:
            raise UsageError(f"{name}: shape {x.shape} differs from freq_a_LxF's {a.shape}; the split needs the same "
                             "neurons in every model")
    dead_a, dead_b = a < DEAD_FREQ, b < DEAD_FREQ
    died, revived = dead_b & ~dead_a, dead_a & ~dead_b
    drop = a - b
    died_L = np.where(died, drop, 0.0).mean(axis=1)
    rest_L = np.where(died, 0.0, drop).mean(axis=1)
    gain, from_died, from_rest = float(drop.mean()), float(died_L.mean()), float(rest_L.mean())
    res = {
        "gain": gain, "from_newly_dead": from_died, "from_the_rest": from_rest,
        "share_from_newly_dead": None if gain == 0.0 else from_died / gain,
        "newly_dead": int(died.sum()), "newly_dead_fraction": float(died.mean()),
        "newly_dead_median_freq_a": float(np.median(a[died])) if died.any() else None,
        "revived": int(revived.sum()),
        "per_layer": {"gain": [float(x) for x in drop.mean(axis=1)], "from_newly_dead": [float(x) for x in died_L],
                      "from_the_rest": [float(x) for x in rest_L], "newly_dead": [int(x) for x in died.sum(axis=1)]},
    }
    if start is not None:
        res.update(dead_in_b=int(dead_b.sum()), dead_in_b_dead_at_start=int((dead_b & (start < DEAD_FREQ)).sum()))
    return res
