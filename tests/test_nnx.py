"""The NNX GatedFFN computes the functional FFN, records its L1 statistic, trains sparser with λ, decodes sparse."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_model_config
from flax import nnx

import prosparse_jax.nnx as psnnx
from prosparse_jax.model import transformer as model
from prosparse_jax.training import step

D, F = 16, 40


def _x(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _params(cfg, std=0.3, seed=0):
    """Random functional params (numpy-filled: eager jax.random costs a compile per shape)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(std * rng.normal(size=a.shape), jnp.float32),
                        model.abstract_params(cfg))


def _ffn(activation, threshold=0.0, seed=0):
    return psnnx.GatedFFN(D, F, activation=activation, activation_threshold=threshold,
                          kernel_init=nnx.initializers.normal(D ** -0.5), rngs=nnx.Rngs(seed))


def _functional(ffn, x_BxTxD, activation, threshold=0.0, tau=None):
    """The functional model's FFN on the module's weights (with the sparse mode's mask when tau is given)."""
    lp = {"w_gate_DxF": ffn.w_gate_DxF[...], "w_up_DxF": ffn.w_up_DxF[...], "w_down_FxD": ffn.w_down_FxD[...]}
    x1, act = model.ffn_hidden(x_BxTxD, lp, activation, threshold)
    if tau is not None:
        mask = model.neuron_norm_mask({"layers": {"w_down_LxFxD": lp["w_down_FxD"][None]}}, [tau])
        x1 = mask(jnp.int32(0), x1, act, jnp.ones(x1.shape[:2], bool))
    return model.ffn_down(x1, lp)


def _numpy_ffn(ffn, x_BxTxD, activation, threshold):
    """act(x W_gate) * (x W_up) @ W_down in float64 numpy, the activations written out (dReLU: relu(g) * relu(u))."""
    x, wg, wu, wd = (np.asarray(a, np.float64) for a in (x_BxTxD, ffn.w_gate_DxF[...], ffn.w_up_DxF[...],
                                                          ffn.w_down_FxD[...]))
    g, u = x @ wg, x @ wu
    x1 = {"relu": np.maximum(g, 0) * u, "fatrelu": np.where(g >= threshold, g, 0) * u,
          "silu": g / (1 + np.exp(-g)) * u, "drelu": np.maximum(g, 0) * np.maximum(u, 0)}[activation]
    return x1 @ wd


def _close(out, ref, rtol):
    out, ref = np.asarray(out), np.asarray(ref)
    assert out.shape == ref.shape
    assert np.max(np.abs(out - ref)) <= rtol * max(1.0, float(np.max(np.abs(ref))))


@pytest.mark.parametrize("activation,threshold", [("relu", 0.0), ("fatrelu", 0.3), ("silu", 0.0), ("drelu", 0.0)])
def test_dense_equals_the_gated_ffn_formula(activation, threshold):
    ffn, x = _ffn(activation, threshold), _x((2, 5, D))
    ref = _numpy_ffn(ffn, x, activation, threshold)
    _close(ffn(x), ref, 1e-5)
    _close(nnx.jit(lambda m, x: m(x))(ffn, x), ref, 1e-5)


class _FFNStack(nnx.Module):
    """The FFN half of the functional decoder (its attention zeroed): h += ffn(rms_norm(h)) per layer."""

    def __init__(self, params, cfg):
        self.norms = nnx.List([nnx.Param(params["layers"]["ffn_norm_LxD"][i]) for i in range(cfg.n_layers)])
        self.ffns = nnx.List([psnnx.GatedFFN.from_params(params, layer=i, activation=cfg.activation)
                              for i in range(cfg.n_layers)])
        self.eps = cfg.norm_eps

    def __call__(self, h_BxTxD, valid_BxT):
        for norm, ffn in zip(self.norms, self.ffns, strict=True):
            h_BxTxD = h_BxTxD + ffn(model.rms_norm(h_BxTxD, norm[...], self.eps), valid_BxT=valid_BxT)
        return h_BxTxD


def test_statistic_and_penalty_equal_the_functional_objective():
    cfg = tiny_model_config(n_layers=2)
    params = _params(cfg)
    params["layers"]["wo_LxNxHxD"] = jnp.zeros_like(params["layers"]["wo_LxNxHxD"])  # attention adds 0 exactly
    ids = jnp.asarray(np.random.default_rng(1).integers(1, cfg.vocab_size, (2, 12)), jnp.int32)
    seg = jnp.ones((2, 12), jnp.int32).at[0, 9:].set(0).at[1, :4].set(0)  # padding, excluded from the statistic
    batch = {"inputs": ids, "targets": ids, "weights": (seg != 0).astype(jnp.float32), "segment_ids": seg,
             "positions": jnp.broadcast_to(jnp.arange(12), (2, 12))}

    # the functional objective (reg_factor = 1): its L1 term and the forward's per-layer statistics
    _, aux = jax.jit(lambda p, b: step.loss_fn(p, b, cfg, jnp.float32(1.0), "sum"))(params, batch)
    stack = _FFNStack(params, cfg)
    stack(params["embed_VxD"][ids], seg != 0)
    mine = psnnx.ffn_stats(stack)
    _close(mine.mean_abs_x1, aux["mean_abs_x1_per_layer"], 1e-6)
    _close(mine.zero_frac, aux["sparsity_per_layer"], 1e-6)
    all_valid = psnnx.GatedFFN.from_params(params, layer=0, activation="relu")
    all_valid(model.rms_norm(params["embed_VxD"][ids], params["layers"]["ffn_norm_LxD"][0], cfg.norm_eps))
    assert abs(float(all_valid.mean_abs_x1[...]) - float(aux["mean_abs_x1_per_layer"][0])) > 1e-4  # mask matters
    _close(psnnx.l1_penalty(stack), aux["reg_loss"], 1e-6)  # "sum": ProSparse Eq. 2, step.loss_fn's default
    _close(psnnx.l1_penalty(stack, l1_reduction="mean"), jnp.sum(aux["mean_abs_x1_per_layer"]), 1e-6)
    _, aux_b = jax.jit(lambda p, b: step.loss_fn(p, b, cfg, jnp.float32(1.0), "blockffn"))(params, batch)
    _close(psnnx.l1_penalty(stack, l1_reduction="blockffn", valid_tokens=jnp.sum(seg != 0)), aux_b["reg_loss"], 1e-6)
    with pytest.raises(ValueError, match="pass valid_tokens"):
        psnnx.l1_penalty(stack, l1_reduction="blockffn")
    _close(psnnx.activation_sparsity(stack), jnp.mean(aux["sparsity_per_layer"]), 1e-6)


@nnx.jit
def _train_step(ffn, optimizer, x_BxTxD, y_BxTxD, reg_factor):
    def loss_fn(ffn):  # the ProSparse objective: task loss + λ · L1
        return jnp.mean((ffn(x_BxTxD) - y_BxTxD) ** 2) + reg_factor * psnnx.l1_penalty(ffn)

    loss, grads = nnx.value_and_grad(loss_fn)(ffn)
    optimizer.update(ffn, grads)
    return loss


def _train(reg_factor, steps=60):
    """Final (mean |x1|, zero fraction) of a ReLU FFN regressing a random linear map with Adam."""
    ffn = _ffn("relu", seed=0)
    x = _x((4, 8, D), seed=2)
    y = x @ _x((D, D), seed=3) * 0.3
    optimizer = nnx.Optimizer(ffn, optax.adam(1e-2), wrt=nnx.Param)
    for _ in range(steps):
        _train_step(ffn, optimizer, x, y, jnp.float32(reg_factor))
    ffn(x)
    return float(ffn.mean_abs_x1[...]), float(ffn.zero_frac[...])


def test_l1_penalty_lowers_the_statistic_and_raises_sparsity():
    l1_0, zeros_0 = _train(0.0)
    l1_reg, zeros_reg = _train(0.1)
    assert l1_reg < 0.5 * l1_0, (l1_reg, l1_0)
    assert zeros_reg > zeros_0 + 0.05, (zeros_reg, zeros_0)


@pytest.mark.parametrize("implementation", ["cpu_gather", "dense"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 3)])
def test_sparse_relu_equals_dense(implementation, shape):
    ffn, x = _ffn("relu"), _x((*shape, D))
    ref = ffn(x)
    _close(ffn(x, sparse=True, implementation=implementation), ref, 1e-5)
    assert 0.0 < float(ffn.zero_frac[...]) < 1.0 and np.isnan(ffn.mean_abs_x1[...])
    ffn.prepare_sparse()
    _close(nnx.jit(lambda m, x: m(x, sparse=True, implementation=implementation))(ffn, x), ref, 1e-5)


@pytest.mark.parametrize("implementation", ["cpu_gather", "dense"])
def test_sparse_silu_with_tau_equals_neuron_norm_mask(implementation):
    ffn, x = _ffn("silu"), _x((3, 1, D))
    x1 = model.ffn_hidden(x, ffn.to_params(), "silu")[0]
    tau = float(jnp.quantile(model.neuron_output_norms(x1, jnp.linalg.norm(ffn.w_down_FxD[...], axis=-1)), 0.8))
    ref = _functional(ffn, x, "silu", tau=tau)
    assert np.max(np.abs(np.asarray(ref - _functional(ffn, x, "silu")))) > 1e-3  # tau drops neurons that matter
    _close(ffn(x, tau=tau), ref, 1e-6)
    _close(ffn(x, sparse=True, implementation=implementation, tau=tau), ref, 1e-5)
    _close(ffn.prepare_sparse()(x, sparse=True, implementation=implementation, tau=tau), ref, 1e-5)


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="analyze --metric=pplp"):
        _ffn("silu")(_x((1, 1, D)), sparse=True)
    with pytest.raises(ValueError, match=re.escape("unknown activation 'rleu'; choose one of: silu, relu")):
        psnnx.GatedFFN(D, F, activation="rleu", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="sparse=False for prefill"):
        _ffn("relu")(_x((3, 3, D)), sparse=True)
    with pytest.raises(ValueError, match="holds no prosparse_jax.nnx.GatedFFN"):
        psnnx.l1_penalty(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="pass layer="):
        psnnx.GatedFFN.from_params(_params(tiny_model_config()), activation="relu")


def test_params_round_trip_both_layouts():
    cfg = tiny_model_config(n_layers=3, activation="fatrelu", activation_threshold=0.01)
    params = _params(cfg, std=0.02)
    x = _x((2, 4, cfg.d_model))
    lp = {k.replace("_Lx", "_"): v[1] for k, v in params["layers"].items()}  # layer 1, in-layer names
    ref = model.ffn_down(model.ffn_hidden(x, lp, cfg.activation, cfg.activation_threshold)[0], lp)
    for source in (params, model.unstack_layers(params), params["layers"]):
        ffn = psnnx.GatedFFN.from_params(source, layer=1, activation=cfg.activation,
                                         activation_threshold=cfg.activation_threshold)
        for key, value in ffn.to_params().items():
            np.testing.assert_array_equal(value, lp[key])
        np.testing.assert_array_equal(ffn(x), ref)
    again = psnnx.GatedFFN.from_params(ffn.to_params(layer_axis=True), activation=cfg.activation,
                                       activation_threshold=cfg.activation_threshold)
    np.testing.assert_array_equal(again(x), ref)


def test_module_docstring_example_runs():
    lines = [line[4:] for line in psnnx.__doc__.splitlines() if line.startswith("    ") or not line.strip()]
    code = "\n".join(lines).strip()  # the docstring's one indented block: the usage example
    namespace = {}
    exec(compile(code, "prosparse_jax.nnx example", "exec"), namespace)  # noqa: S102
    assert np.isfinite(float(namespace["loss"])) and 0.0 <= float(namespace["sparsity"]) <= 1.0
