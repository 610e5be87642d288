"""The two layer layouts of a parameter pytree: stacked ``{"layers": {name: [L, ...]}}`` (canonical: checkpoints, HF
conversion, analysis; layers under ``lax.scan``) and per-layer ``{"layers": [{name: [1, ...]}] * L}`` (layers
unrolled: training with ``model.scan_layers = False``, decoding). See :mod:`prosparse_jax.model.transformer`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
Params = dict[str, Any]


def _is_layers_holder(x: Any) -> bool:
    return isinstance(x, dict) and "layers" in x


def unstack_layers(tree: Any) -> Any:
    """Per-layer form of any pytree holding params-shaped dicts (params, optimizer moments, shardings).

    Every ``{"layers": {name: [L, ...]}}`` becomes ``{"layers": [{name: [1, ...]}, ... L groups]}``; the rest of the
    tree is unchanged. Already per-layer trees are returned as they are.
    """

    def split(node: Any) -> Any:
        if not _is_layers_holder(node) or not isinstance(node["layers"], dict):
            return node
        stacked = node["layers"]
        n = {jnp.shape(v)[0] for v in stacked.values()}
        if len(n) != 1:
            raise ValueError(f"stacked layer leaves disagree on the number of layers: {sorted(n)}")
        groups = [{k: v[i:i + 1] for k, v in stacked.items()} for i in range(n.pop())]
        return dict(node, layers=groups)

    return jax.tree.map(split, tree, is_leaf=_is_layers_holder)


def stack_layers(tree: Any) -> Any:
    """Inverse of :func:`unstack_layers`: the canonical stacked form (a no-op on stacked trees)."""

    def join(node: Any) -> Any:
        if not _is_layers_holder(node) or not isinstance(node["layers"], (list, tuple)):
            return node
        groups = node["layers"]
        return dict(node, layers={k: jnp.concatenate([g[k] for g in groups], axis=0) for k in groups[0]})

    return jax.tree.map(join, tree, is_leaf=_is_layers_holder)


def layer_param(params: Params, name: str) -> Array:
    """One stacked [L, ...] layer parameter from params in either layout."""
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return jnp.concatenate([g[name] for g in layers], axis=0)
    return layers[name]
