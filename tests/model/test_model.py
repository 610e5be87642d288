"""Behavioural tests of the decoder: causality, GQA, MiniCPM folding, packing, dtype, remat, statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_grads_close, tiny_model_config

from prosparse_jax.model import transformer as model_lib
from prosparse_jax.model.transformer import (
    apply_rope,
    cross_entropy,
    fold_minicpm_scales,
    forward,
    init_params,
    layer_param,
    neuron_norm_mask,
    rope_tables,
    stack_layers,
    unstack_layers,
)

MINICPM = dict(scale_emb=12.0, scale_depth=1.4, dim_model_base=8, tie_embeddings=True, init_std=0.05)


def _ids(cfg, B=2, T=12, seed=1):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, cfg.vocab_size)


def _loss(params, ids, cfg, attn_block=64):
    logits, stats = forward(params, ids[:, :-1], cfg, attn_block=attn_block)
    return cross_entropy(logits, ids[:, 1:]) + 0.1 * stats.mean_abs_x1.sum()


# (loss, grads) of _loss, jitted: cfg and attn_block static
_loss_and_grads = jax.jit(jax.value_and_grad(_loss), static_argnums=(2, 3))


@pytest.mark.parametrize("act", ["silu", "relu", "drelu"])
def test_causality_token_change(act):
    cfg = tiny_model_config(activation=act)
    params = init_params(cfg, jax.random.key(0))
    ids = _ids(cfg, B=1, T=16)
    t = 9
    ids2 = ids.at[0, t].set((ids[0, t] + 1) % cfg.vocab_size)
    l1, _ = forward(params, ids, cfg)
    l2, _ = forward(params, ids2, cfg)
    np.testing.assert_array_equal(np.asarray(l1[:, :t]), np.asarray(l2[:, :t]))
    assert not np.allclose(np.asarray(l1[:, t:]), np.asarray(l2[:, t:]))


def test_causality_gradients():
    cfg = tiny_model_config(activation="silu")
    params = init_params(cfg, jax.random.key(0))
    T, t = 10, 6
    x_BxTxD = jax.random.normal(jax.random.key(2), (1, T, cfg.d_model))

    def out_at_t(x):  # logit at position t as a function of the input embeddings
        p = dict(params, embed_VxD=x[0])  # each position gets its own embedding row
        logits, _ = forward(p, jnp.arange(T)[None], cfg)
        return logits[0, t].sum()

    g = jax.grad(out_at_t)(x_BxTxD)
    norms = np.asarray(jnp.abs(g[0]).sum(-1))
    assert np.all(norms[t + 1 :] == 0) and np.all(norms[: t + 1] > 0)


def _naive_mha_logits(params, ids, cfg):
    """Independent per-head numpy implementation of a LLaMA forward pass (fp64)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    L, N, K, H = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    T = ids.shape[1]
    h = p["embed_VxD"][np.asarray(ids[0])]

    def norm(x, w):
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + cfg.norm_eps) * w

    pos = np.arange(T)
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, H, 2) / H)
    ang = pos[:, None] * inv
    cos, sin = np.cos(ang), np.sin(ang)

    def rot(x):
        a, b = x[:, : H // 2], x[:, H // 2 :]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)

    for layer in range(L):
        lp = {k: v[layer] for k, v in p["layers"].items()}
        x = norm(h, lp["attn_norm_LxD"])
        out = np.zeros_like(h)
        for n in range(N):
            kv = n // (N // K)
            q = rot(x @ lp["wq_LxDxNxH"][:, n])
            k = rot(x @ lp["wk_LxDxKxH"][:, kv])
            v = x @ lp["wv_LxDxKxH"][:, kv]
            s = q @ k.T / np.sqrt(H)
            s = np.where(np.tril(np.ones((T, T))) > 0, s, -np.inf)
            a = np.exp(s - s.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            out += (a @ v) @ lp["wo_LxNxHxD"][n]
        h = h + out
        x = norm(h, lp["ffn_norm_LxD"])
        g = x @ lp["w_gate_LxDxF"]
        act = np.maximum(g, 0) if cfg.activation == "relu" else g / (1 + np.exp(-g))
        h = h + (act * (x @ lp["w_up_LxDxF"])) @ lp["w_down_LxFxD"]
    h = norm(h, p["final_norm_D"])
    head = p["embed_VxD"].T if cfg.tie_embeddings else p["lm_head_DxV"]
    return h @ head


@pytest.mark.parametrize("block", [64, 4])  # 4: three query blocks (4, 4, 1 rows), causal key blocks skipped
@pytest.mark.parametrize("kv", [4, 2, 1])
def test_attention_matches_naive_reference(kv, block):
    cfg = tiny_model_config(n_heads=4, n_kv_heads=kv, activation="silu", init_std=0.1)
    params = init_params(cfg, jax.random.key(3))
    ids = _ids(cfg, B=1, T=9)
    logits, _ = forward(params, ids, cfg, attn_block=block)
    np.testing.assert_allclose(np.asarray(logits[0]), _naive_mha_logits(params, ids, cfg), atol=1e-5, rtol=1e-5)


def test_gqa_equals_mha_with_repeated_kv():
    gqa = tiny_model_config(n_heads=4, n_kv_heads=2)
    mha = gqa.replace(n_kv_heads=4)
    p = init_params(gqa, jax.random.key(0))
    lp = dict(p["layers"])
    lp["wk_LxDxKxH"] = jnp.repeat(lp["wk_LxDxKxH"], 2, axis=2)
    lp["wv_LxDxKxH"] = jnp.repeat(lp["wv_LxDxKxH"], 2, axis=2)
    p_mha = dict(p, layers=lp)
    ids = _ids(gqa)
    np.testing.assert_allclose(forward(p, ids, gqa)[0], forward(p_mha, ids, mha)[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_minicpm_equals_folded_llama(tied):
    cfg = tiny_model_config(**dict(MINICPM, tie_embeddings=tied))
    params = init_params(cfg, jax.random.key(4))
    folded, llama_cfg = fold_minicpm_scales(params, cfg)
    assert not llama_cfg.is_minicpm and not llama_cfg.tie_embeddings
    ids = _ids(cfg)
    a, sa = forward(params, ids, cfg)
    b, sb = forward(folded, ids, llama_cfg)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(sa.zero_frac, sb.zero_frac, atol=1e-6)
    # the scales really do something: the unfolded params under the LLaMA config differ
    c, _ = forward(params, ids, cfg.replace(scale_emb=1.0, scale_depth=0.0, dim_model_base=0))
    assert not np.allclose(np.asarray(a), np.asarray(c), atol=1e-3)
    # in sparse mode too: the neuron thresholds follow W_down's scale (r = 4 / sqrt(2), far from 1)
    cfg = cfg.replace(scale_depth=4.0)
    _, dense = forward(params, ids, cfg, capture=True)
    n_LxBxTxF = jnp.abs(dense.x1) * model_lib.w_down_norms(params)[:, None, None, :]
    taus = tuple(float(jnp.median(n)) for n in n_LxBxTxF)
    sparse_cfg = cfg.replace(neuron_thresholds=taus)
    folded, llama_sparse = fold_minicpm_scales(params, sparse_cfg)
    d, sd = forward(params, ids, sparse_cfg)
    e, se = forward(folded, ids, llama_sparse)
    np.testing.assert_allclose(np.asarray(d), np.asarray(e), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(sd.zero_frac, se.zero_frac, atol=0.01)  # a few n_i sit at tau within round-off
    assert 0.3 < float(sd.zero_frac.mean()) < 0.7


def test_bf16_close_to_fp32():
    cfg = tiny_model_config(activation="silu", d_model=64, d_ff=128, init_std=0.05)
    params = init_params(cfg, jax.random.key(5))
    ids = _ids(cfg, T=32)
    l32, _ = forward(params, ids, cfg)
    l16, _ = forward(params, ids, cfg.replace(dtype="bfloat16"))
    assert l16.dtype == jnp.float32  # logits always float32
    # bf16 has 8 mantissa bits (rel. eps 7.8e-3); tolerance: 3% of the logit scale
    scale = float(jnp.abs(l32).max())
    assert float(jnp.abs(l16 - l32).max()) < 0.03 * scale
    ce32 = cross_entropy(l32[:, :-1], ids[:, 1:])
    ce16 = cross_entropy(l16[:, :-1], ids[:, 1:])
    assert abs(float(ce32 - ce16)) < 1e-2 * float(ce32)


def test_remat_same_loss_and_grads():
    cfg = tiny_model_config(activation="relu")
    params = init_params(cfg, jax.random.key(6))
    ids = _ids(cfg, T=16)
    l0, g0 = _loss_and_grads(params, ids, cfg)
    l1, g1 = _loss_and_grads(params, ids, cfg.replace(remat=True))
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    assert_grads_close(g0, g1)


@pytest.mark.parametrize("block", [64, 3])
def test_packed_segments_equal_separate_sequences(block):
    cfg = tiny_model_config(activation="silu")
    params = init_params(cfg, jax.random.key(7))
    a, b = _ids(cfg, B=1, T=5, seed=10), _ids(cfg, B=1, T=7, seed=11)
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.array([[1] * 5 + [2] * 7])
    pos = jnp.array([list(range(5)) + list(range(7))])
    lp, _ = forward(params, packed, cfg, segment_ids_BxT=seg, positions_BxT=pos, attn_block=block)
    la, _ = forward(params, a, cfg)
    lb, _ = forward(params, b, cfg)
    np.testing.assert_allclose(lp[:, :5], la, atol=1e-5)
    np.testing.assert_allclose(lp[:, 5:], lb, atol=1e-5)


def test_stats_match_captured_x1_and_ignore_padding():
    cfg = tiny_model_config(activation="relu")
    params = init_params(cfg, jax.random.key(8))
    ids = _ids(cfg, T=10)
    seg = jnp.array([[1] * 10, [1] * 6 + [0] * 4])
    _, st = forward(params, ids, cfg, segment_ids_BxT=seg, capture=True)
    assert st.x1.shape == (cfg.n_layers, 2, 10, cfg.d_ff)
    valid = np.asarray(seg != 0)
    x1 = np.asarray(st.x1)[:, valid]  # [L, tokens, F]
    np.testing.assert_allclose(st.zero_frac, (x1 == 0).mean(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(st.mean_abs_x1, np.abs(x1).mean(axis=(1, 2)), rtol=1e-5)
    assert 0.2 < float(st.zero_frac.mean()) < 0.8  # random init ReLU: about half
    _, st_silu = forward(params, ids, cfg.replace(activation="silu"))
    assert float(st_silu.zero_frac.max()) == 0.0


def test_logits_at_some_positions_equal_those_of_the_full_head():
    """logits_at_BxK runs the LM head on the given positions of each row only: the logits there, the same stats."""
    cfg = tiny_model_config(activation="relu")
    params = init_params(cfg, jax.random.key(3))
    ids = _ids(cfg, T=10)
    at = jnp.array([[9, 4, 4], [0, 7, 8]], jnp.int32)
    full, st_full = forward(params, ids, cfg)
    some, st_some = forward(params, ids, cfg, logits_at_BxK=at)
    assert some.shape == (2, 3, cfg.vocab_size)
    want = np.take_along_axis(np.asarray(full), np.asarray(at)[..., None], axis=1)
    np.testing.assert_allclose(np.asarray(some), want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    np.testing.assert_array_equal(np.asarray(st_some.zero_frac), np.asarray(st_full.zero_frac))


def test_x1_mask_hook_and_sparse_mode():
    cfg = tiny_model_config(activation="silu")
    params = init_params(cfg, jax.random.key(9))
    ids = _ids(cfg)
    dense, sd = forward(params, ids, cfg)
    calls = []

    def identity(layer, x1, act, valid):
        calls.append(layer.shape)
        return x1

    same, _ = forward(params, ids, cfg, x1_mask=identity)
    np.testing.assert_allclose(same, dense, rtol=1e-6, atol=1e-6 * float(jnp.abs(dense).max()))
    assert calls == [()]  # traced once inside lax.scan with a scalar layer index
    drop_layer1 = lambda layer, x1, act, valid: jnp.where(layer == 1, 0.0, x1)  # noqa: E731
    _, s1 = forward(params, ids, cfg, x1_mask=drop_layer1)
    np.testing.assert_array_equal(s1.zero_frac, [0.0, 1.0])
    _, s1u = forward(unstack_layers(params), ids, cfg, x1_mask=drop_layer1)  # per-layer layout: same layer index
    np.testing.assert_array_equal(s1u.zero_frac, [0.0, 1.0])
    # a hook with a fifth parameter gets the FFN input after its norm: x1 recomputed from it is the model's x1
    assert not model_lib.takes_ffn_input(identity) and model_lib.takes_ffn_input(lambda a, b, c, d, x: b)
    w_gate_LxDxF, w_up_LxDxF = layer_param(params, "w_gate_LxDxF"), layer_param(params, "w_up_LxDxF")

    def from_input(layer, x1, act, valid, x_BxTxD):
        return jax.nn.silu(x_BxTxD @ w_gate_LxDxF[layer]) * (x_BxTxD @ w_up_LxDxF[layer])

    again, s_again = forward(params, ids, cfg, x1_mask=from_input)
    np.testing.assert_allclose(again, dense, rtol=1e-5, atol=1e-5 * float(jnp.abs(dense).max()))
    np.testing.assert_allclose(s_again.mean_abs_x1, sd.mean_abs_x1, rtol=1e-5)
    wrong_input = lambda layer, x1, act, valid, x: jax.nn.silu(x @ w_gate_LxDxF[0]) * (x @ w_up_LxDxF[0])  # noqa: E731
    other, _ = forward(params, ids, cfg, x1_mask=wrong_input)  # layer 0's weights in layer 1: another model
    assert not np.allclose(np.asarray(other), np.asarray(dense), rtol=1e-3, atol=1e-3)
    # sparse mode from the config is the neuron-norm hook
    taus = (1e-3, 2e-3)
    a, sa = forward(params, ids, cfg.replace(neuron_thresholds=taus))
    b, _ = forward(params, ids, cfg, x1_mask=neuron_norm_mask(params, jnp.array(taus)))
    np.testing.assert_array_equal(a, b)
    assert float(sa.zero_frac.min()) > 0.0 and not np.array_equal(np.asarray(a), np.asarray(dense))
    _, s_big = forward(params, ids, cfg.replace(neuron_thresholds=(1e9, 1e9)))
    np.testing.assert_array_equal(s_big.zero_frac, np.ones(cfg.n_layers))


def test_rope_is_relative():
    x = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
    y = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))

    def rope(v, position):
        return apply_rope(v, *rope_tables(jnp.array([[position]]), v.shape[-1], 1e4))

    def dot(p, q):
        return float((rope(x, p) * rope(y, q)).sum())

    # an 8-term float32 sum: round-off scales with sum |x_i y_i| (2.4 here); the wrong offset (12, 11) is 0.2 off
    scale = float(jnp.sum(jnp.abs(x * y)))
    assert abs(dot(3, 1) - dot(12, 10)) < 4e-6 * scale
    assert abs(dot(3, 1) - dot(12, 11)) > 1e-2 * scale


def test_attention_blocks_give_the_same_loss_and_grads():
    cfg = tiny_model_config(activation="relu", n_kv_heads=2)
    params = init_params(cfg, jax.random.key(12))
    ids = _ids(cfg, T=21)
    l0, g0 = _loss_and_grads(params, ids, cfg, 64)
    l1, g1 = _loss_and_grads(params, ids, cfg, 8)  # three query blocks of 8, 8 and 4 rows
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    assert_grads_close(g0, g1)


def test_layouts_convert_both_ways():
    cfg = tiny_model_config(n_layers=3)
    rng = np.random.default_rng(0)  # numpy leaves: no compile per shape
    params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), model_lib.abstract_params(cfg))
    per = unstack_layers(params)
    assert model_lib.is_per_layer(per) and len(per["layers"]) == 3 and not model_lib.is_per_layer(params)
    assert per["layers"][1]["w_up_LxDxF"].shape == (1, cfg.d_model, cfg.d_ff)
    np.testing.assert_array_equal(per["layers"][2]["wq_LxDxNxH"][0], params["layers"]["wq_LxDxNxH"][2])
    jax.tree.map(np.testing.assert_array_equal, stack_layers(per), params)
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(per), per)  # already per-layer: unchanged
    jax.tree.map(np.testing.assert_array_equal, stack_layers(params), params)  # already stacked: unchanged
    np.testing.assert_array_equal(layer_param(per, "w_down_LxFxD"), params["layers"]["w_down_LxFxD"])
    # a tree holding several params-shaped dicts (an optimizer state: moments beside a count) converts each of them
    state = {"mu": params, "nu": jax.tree.map(np.square, params), "count": np.int32(3)}
    jax.tree.map(np.testing.assert_array_equal, stack_layers(unstack_layers(state)), state)
    assert model_lib.is_per_layer(unstack_layers(state)["nu"])


def test_per_layer_layout_gives_the_same_logits_stats_and_grads():
    """In the sparse mode, so that the per-neuron thresholds are read from either layout too."""
    cfg = tiny_model_config(activation="relu", n_layers=3)
    params = init_params(cfg, jax.random.key(13))
    ids = _ids(cfg, T=16)

    @jax.jit
    def run(p, taus_L):  # (loss, (logits, stats)), grads with the neuron-norm mask at taus_L
        def loss(p):
            logits, stats = forward(p, ids[:, :-1], cfg, x1_mask=neuron_norm_mask(p, taus_L))
            return cross_entropy(logits, ids[:, 1:]) + 0.1 * stats.mean_abs_x1.sum(), (logits, stats)
        return jax.value_and_grad(loss, has_aux=True)(p)

    dense = jax.jit(lambda p: forward(p, ids[:, :-1], cfg, capture=True)[1])(params)
    n_LxBxTxF = jnp.abs(dense.x1) * model_lib.w_down_norms(params)[:, None, None, :]
    taus_L = jnp.asarray([jnp.quantile(n, 0.75) for n in n_LxBxTxF])
    (la, (logits_a, sa)), ga = run(params, taus_L)
    (lb, (logits_b, sb)), gb = run(unstack_layers(params), taus_L)
    np.testing.assert_allclose(logits_a, logits_b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sa.zero_frac, sb.zero_frac)
    assert float(sa.zero_frac.min()) > float(dense.zero_frac.max()) + 0.1  # the thresholds drop active neurons
    np.testing.assert_allclose(la, lb, rtol=1e-6)
    assert_grads_close(ga, stack_layers(gb))
