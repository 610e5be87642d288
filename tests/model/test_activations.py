"""Each activation against its formula; the FATReLU boundary convention (z >= t kept)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prosparse_jax.model.activations import ACTIVATIONS, check_activation, ffn_product


def _ref(name, g, u, t):
    silu = g / (1 + np.exp(-g))
    relu = np.maximum(g, 0)
    gelu = 0.5 * g * (1 + np.vectorize(math.erf)(g / np.sqrt(2)))
    return {
        "silu": silu * u,
        "relu": relu * u,
        "fatrelu": np.where(g >= t, g, 0) * u,
        "drelu": relu * np.maximum(u, 0),
        "relu2": relu**2 * u,
        "gelu": gelu * u,
    }[name]


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_matches_formula(name):
    rng = np.random.default_rng(0)
    g = rng.normal(size=(4, 64)).astype(np.float32)
    u = rng.normal(size=(4, 64)).astype(np.float32)
    x1, _ = ffn_product(name, jnp.asarray(g), jnp.asarray(u), 0.3)
    np.testing.assert_allclose(np.asarray(x1), _ref(name, g.astype(np.float64), u, 0.3), rtol=1e-5, atol=1e-6)


def test_fatrelu_boundary_keeps_equal_to_threshold():
    t = 0.25
    g = jnp.array([t - 1e-3, t, t + 1e-3, -1.0, 0.0], jnp.float32)
    x1, act = ffn_product("fatrelu", g, jnp.ones_like(g), t)
    gn = np.asarray(g)
    np.testing.assert_array_equal(np.asarray(act), [0.0, gn[1], gn[2], 0.0, 0.0])  # z == t is kept
    np.testing.assert_array_equal(np.asarray(x1), np.asarray(act))


def test_fatrelu_zero_threshold_is_relu():
    g = jax.random.normal(jax.random.key(0), (128,))
    u = jax.random.normal(jax.random.key(1), (128,))
    np.testing.assert_array_equal(ffn_product("fatrelu", g, u, 0.0)[0], ffn_product("relu", g, u)[0])


def test_relu_family_makes_exact_zeros_silu_does_not():
    g = jax.random.normal(jax.random.key(0), (1000,))
    u = jnp.ones_like(g)
    assert float(jnp.mean(ffn_product("relu", g, u)[0] == 0)) > 0.4
    assert float(jnp.mean(ffn_product("silu", g, u)[0] == 0)) == 0.0


def test_unknown_activation_lists_choices():
    with pytest.raises(ValueError, match="unknown activation 'rleu'; choose one of: silu, relu"):
        check_activation("rleu")
