"""Plots of :mod:`prosparse_jax.analysis.analyze`: the activation-ratio heatmap (layer x token position) and per-layer bars."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def write_plots(out: Path, heat_LxT: np.ndarray, res: dict[str, Any]) -> None:
    """Writes ``<out>/heatmap.png`` and ``<out>/per_layer.png`` for the sparsity.json dict ``res``."""
    import matplotlib

    matplotlib.use("Agg")
    title = f"{res['metric']} {res['value']:g}" + (f" ({res['topk_mode']})" if res["topk_mode"] else "")
    _heatmap(out / "heatmap.png", heat_LxT, title)
    _per_layer(out / "per_layer.png", res, title)


def _heatmap(path: Path, heat_LxT: np.ndarray, title: str) -> None:
    """Activation ratio per layer x token position (within the document); NaN where no token was measured."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.35 * heat_LxT.shape[0] + 2))
    im = ax.imshow(np.ma.masked_invalid(heat_LxT), aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel("token position (within document)")
    ax.set_ylabel("layer")
    ax.set_yticks(range(heat_LxT.shape[0]))
    ax.set_title(f"activation ratio per layer x position — {title}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _per_layer(path: Path, res: dict[str, Any], title: str) -> None:
    """Activation ratio and dead-neuron fraction per layer, with the mean ratio and PPL ratio in the title."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ratios = res["activation_ratio_per_layer"]
    fig, ax = plt.subplots(figsize=(max(5, 0.3 * len(ratios) + 2), 3.5))
    ax.bar(range(len(ratios)), ratios, label="activation ratio")
    ax.bar(range(len(ratios)), res["dead_neuron_fraction_per_layer"], alpha=0.6, label="dead-neuron fraction")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction")
    ax.set_title(f"{title}: mean activation ratio {res['activation_ratio']:.4f}, PPL ratio {res['ppl_ratio']:.4f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
