"""The AdamW chain: weight decay and µP on matrices only, clipping, the schedule read from the state, config checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prosparse_jax.config import ModelConfig, OptimConfig, build_section, to_dict
from prosparse_jax.errors import ConfigError
from prosparse_jax.model.transformer import abstract_params
from prosparse_jax.training.optim import make_optimizer

MODEL = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=24)
TOTAL = 100
# The leaves of MODEL's parameters that are matrices: decayed and µP-scaled (norms and the embedding are not).
MATRICES = {"lm_head_DxV", "layers/wq_LxDxNxH", "layers/wk_LxDxKxH", "layers/wv_LxDxKxH", "layers/wo_LxNxHxD",
            "layers/w_gate_LxDxF", "layers/w_up_LxDxF", "layers/w_down_LxFxD"}
NOT_MATRICES = {"embed_VxD", "final_norm_D", "layers/attn_norm_LxD", "layers/ffn_norm_LxD"}


@pytest.fixture(scope="module")
def params():
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), abstract_params(MODEL))


def _by_name(tree) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(k.key) for k in path): np.asarray(v) for path, v in flat}


def _update(cfg: OptimConfig, params, grads, d_model: int = MODEL.d_model):
    tx, _ = make_optimizer(cfg, TOTAL, d_model)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    return _by_name(updates)


def test_weight_decay_only_on_matrices(params) -> None:
    cfg = OptimConfig(lr=1e-2, schedule="constant", warmup_steps=0, weight_decay=0.5)
    updates = _update(cfg, params, jax.tree.map(jnp.zeros_like, params))
    p = _by_name(params)
    assert set(updates) == MATRICES | NOT_MATRICES
    for name in MATRICES:  # decoupled decay: p <- p - lr * wd * p
        np.testing.assert_allclose(updates[name], -1e-2 * 0.5 * p[name], rtol=1e-6)
    for name in NOT_MATRICES:
        np.testing.assert_array_equal(updates[name], 0.0)


def test_mup_scales_matrix_updates_exactly(params) -> None:
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    base = OptimConfig(lr=1e-2, schedule="constant", warmup_steps=0, clip_norm=0.0, weight_decay=0.1)
    u0 = _update(base, params, grads, d_model=1024)
    u1 = _update(base.replace(mup=True, mup_base_dim=256), params, grads, d_model=1024)
    for name in MATRICES:
        np.testing.assert_allclose(u1[name], u0[name] * 0.25, rtol=1e-6)
    for name in NOT_MATRICES:
        np.testing.assert_array_equal(u1[name], u0[name])


def test_clipping_bounds_the_gradient_norm_before_adam() -> None:
    """A gradient of norm 1000 moves the weights as the same gradient scaled to norm clip_norm; clip_norm=0 does not
    clip. eps=1 keeps Adam from normalising the scale away."""
    w = {"w_DxF": jnp.ones((4, 3))}
    g = {"w_DxF": jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)}
    big = jax.tree.map(lambda x: 1e3 * x / optax.tree.norm(g), g)
    cfg = OptimConfig(lr=1e-2, schedule="constant", warmup_steps=0, weight_decay=0.0, eps=1.0, clip_norm=2.0)
    clipped = _update(cfg, w, big)["w_DxF"]
    np.testing.assert_allclose(clipped, _update(cfg, w, jax.tree.map(lambda x: x * 2e-3, big))["w_DxF"], rtol=1e-6)
    assert not np.allclose(_update(cfg.replace(clip_norm=0.0), w, big)["w_DxF"], clipped)


def test_schedule_follows_the_state_count_across_a_restore() -> None:
    """Update t moves by lr(t); a state copied to host and back (a restore) continues the schedule."""
    cfg = OptimConfig(lr=1e-2, schedule="cosine", warmup_steps=10, weight_decay=0.0, clip_norm=0.0)
    tx, lr_fn = make_optimizer(cfg, TOTAL, MODEL.d_model)
    p = {"final_norm_D": jnp.ones(4)}
    g = jax.tree.map(jnp.ones_like, p)
    update = jax.jit(tx.update)
    state = tx.init(p)
    for t in range(12):
        if t == 6:
            state = jax.tree.map(np.asarray, state)
        updates, state = update(g, state, p)
        # Adam's update of a constant gradient is exactly 1 per element (eps negligible): the step is -lr(t).
        np.testing.assert_allclose(updates["final_norm_D"], -lr_fn(t), rtol=1e-4, atol=1e-12)
    assert float(lr_fn(0)) == 0.0 and float(lr_fn(10)) == pytest.approx(1e-2)


def test_state_structure_independent_of_config() -> None:
    """clip_norm, mup, weight_decay and the schedule can change across a resume: the state keeps its structure."""
    abstract = abstract_params(MODEL)
    structs = set()
    other = OptimConfig(mup=True, clip_norm=0.0, weight_decay=0.0, schedule="wsd", warmup_steps=10)
    for cfg in (OptimConfig(warmup_steps=10), other):
        tx, _ = make_optimizer(cfg, TOTAL, MODEL.d_model)
        state = jax.eval_shape(tx.init, abstract)
        structs.add(jax.tree_util.tree_structure(state))
        assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))
    assert len(structs) == 1


def test_config_round_trip_and_errors() -> None:
    cfg = _from({"lr": 0.01, "schedule": "wsd", "mup": True})
    assert _from(to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match=r"^optim\.lr: must be > 0, got -1$"):
        _from({"lr": -1})
    with pytest.raises(ConfigError, match=r"optim\.schedule: unknown schedule 'cos' \(did you mean 'cosine'\?\); "
                                          r"choose one of: cosine"):
        _from({"schedule": "cos"})
    with pytest.raises(ConfigError, match=r"optim: unknown field\(s\) \['learning_rate'\]"):
        _from({"learning_rate": 1e-3})
    for field, value in [("b2", 1.0), ("eps", 0.0), ("weight_decay", -0.1), ("clip_norm", -1.0),
                         ("warmup_steps", -1), ("warmup_steps", 1.5), ("decay_fraction", 1.5),
                         ("min_lr_ratio", 2.0), ("mup_base_dim", 0), ("lr", float("nan"))]:
        with pytest.raises(ConfigError, match=rf"^optim\.{field}: "):
            _from({field: value})
    with pytest.raises(ConfigError, match=r"optim\.min_lr_ratio: .*wsd"):
        OptimConfig(schedule="wsd", min_lr_ratio=0.0)


def _from(d):
    return build_section(OptimConfig, "optim", d)
