"""Gated-FFN activations by name (one entry of ``ACTIVATIONS`` each) and :func:`ffn_product`, the one place where
x1 = act(gate) * up is formed.

FATReLU keeps a gate exactly at its threshold, ``fatrelu_t(z) = z if z >= t else 0`` (ProSparse Eq. 3; public
implementations disagree).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def _silu(z: Array, threshold: float) -> Array:
    del threshold
    return jax.nn.silu(z)


def _relu(z: Array, threshold: float) -> Array:
    del threshold
    return jax.nn.relu(z)


def _fatrelu(z: Array, threshold: float) -> Array:
    return jnp.where(z >= threshold, z, jnp.zeros_like(z))


def _relu2(z: Array, threshold: float) -> Array:
    del threshold
    return jnp.square(jax.nn.relu(z))


def _gelu(z: Array, threshold: float) -> Array:
    del threshold
    return jax.nn.gelu(z, approximate=False)


# name -> (act applied to the gate pre-activation, also applied to the up projection?)
ACTIVATIONS: dict[str, tuple[Callable[[Array, float], Array], bool]] = {
    "silu": (_silu, False),  # SwiGLU, the dense baseline
    "relu": (_relu, False),  # ReGLU, ProSparse step 1
    "fatrelu": (_fatrelu, False),  # ProSparse step 3 (threshold shifting), z >= t kept
    "drelu": (_relu, True),  # dReLU (Bamboo / TurboSparse): relu(gate) * relu(up)
    "relu2": (_relu2, False),  # squared ReLU on the gate
    "gelu": (_gelu, False),  # GeGLU (exact erf GELU)
}

#: Activations whose gate output is exactly zero for a whole half-line (ProSparse's sparsity measure makes sense).
RELU_FAMILY = frozenset({"relu", "fatrelu", "drelu", "relu2"})


def check_activation(name: str) -> None:
    """Raises ValueError naming the choices if ``name`` is not a registered activation (``ffn_product`` assumes one)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of: {', '.join(ACTIVATIONS)}")


def ffn_product(name: str, gate: Array, up: Array, threshold: float = 0.0) -> tuple[Array, Array]:
    """(x1, act(gate)) with x1 = act(gate) * up (dReLU: relu(gate) * relu(up)); ``threshold`` is FATReLU's t."""
    fn, on_up = ACTIVATIONS[name]
    act_gate = fn(gate, threshold)
    if on_up:
        up = jax.nn.relu(up)
    return act_gate * up, act_gate
