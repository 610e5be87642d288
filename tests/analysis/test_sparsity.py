"""Sparsity metrics: top-k fractions and ties, FAT on SiLU, CETT properties and bisection, gate-masked forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_config

from prosparse_jax.analysis import sparsity
from prosparse_jax.model import transformer as model
from prosparse_jax.model.transformer import forward, init_params


def _act(shape, seed=0):
    return jax.nn.silu(3.0 * jax.random.normal(jax.random.key(seed), shape))


@pytest.mark.parametrize("k", [0.25, 0.5, 1.0, 1 / 64])
def test_topk_global_keeps_exact_fraction_and_the_largest(k):
    act = _act((2, 8, 64))
    keep = sparsity.topk_mask(act, k, "global")
    assert int(keep.sum()) == round(k * act.size)
    a = np.abs(np.asarray(act))
    kept, dropped = a[np.asarray(keep)], a[~np.asarray(keep)]
    assert dropped.size == 0 or kept.min() >= dropped.max()


@pytest.mark.parametrize("k", [0.25, 0.5, 1.0])
def test_topk_token_keeps_exact_fraction_per_token(k):
    act = _act((2, 8, 64), seed=1)
    keep = np.asarray(sparsity.topk_mask(act, k, "token"))
    assert (keep.sum(-1) == round(k * 64)).all()
    a = np.abs(np.asarray(act))
    for b in range(2):
        for t in range(8):
            row_k, row_d = a[b, t][keep[b, t]], a[b, t][~keep[b, t]]
            assert row_d.size == 0 or row_k.min() >= row_d.max()


def test_topk_ties_are_deterministic_lower_index_first():
    act = jnp.ones((1, 2, 8))  # all tied
    g = np.asarray(sparsity.topk_mask(act, 0.25, "global")).reshape(-1)
    assert g.tolist() == [True] * 4 + [False] * 12
    t = np.asarray(sparsity.topk_mask(act, 0.25, "token"))[0]
    assert t.tolist() == [[True, True] + [False] * 6] * 2
    # ties with the sign: |-1| == |1|, lower index first
    g2 = np.asarray(sparsity.topk_mask(jnp.array([[[1.0, -1.0, 1.0, 0.5]]]), 0.5, "global")).reshape(-1)
    assert g2.tolist() == [True, True, False, False]
    np.testing.assert_array_equal(g, np.asarray(sparsity.topk_mask(act, 0.25, "global")).reshape(-1))


def test_topk_excludes_padding_and_counts_valid_units_only():
    act = _act((2, 4, 8), seed=2)
    valid = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
    keep = np.asarray(sparsity.topk_mask(act, 0.5, "global", valid))
    assert keep.sum() == 0.5 * 5 * 8 and not keep[~np.asarray(valid)].any()
    keep_t = np.asarray(sparsity.topk_mask(act, 0.5, "token", valid))
    assert (keep_t.sum(-1) == np.asarray(valid) * 4).all()


def test_topk_count_rounds_half_up_and_keeps_at_least_one():
    assert int(sparsity.topk_count(0.5, 5)) == 3 and int(sparsity.topk_count(0.3, 10)) == 3
    assert int(sparsity.topk_count(1e-6, 10)) == 1 and int(sparsity.topk_count(0.5, 0)) == 0


def test_fat_uses_absolute_value_so_negative_silu_outputs_are_kept():
    z = jnp.array([-1.28, -0.2, 0.0, 0.05, 0.3, 2.0])
    act = jax.nn.silu(z)  # silu(-1.28) ~ -0.278, silu(-0.2) ~ -0.09
    keep = np.asarray(sparsity.fat_mask(act, 0.1))
    assert keep.tolist() == [True, False, False, False, True, True]
    assert bool(sparsity.fat_mask(jnp.float32(0.1), 0.1))  # |act| == eps kept (zero where |act| < eps)
    assert np.asarray(sparsity.fat_mask(act, 0.0)).all()


def _cett_naive(x1, w, tau):
    n = np.abs(x1) * np.linalg.norm(w, axis=-1)
    tail = (x1 * (n <= tau)) @ w
    full = x1 @ w
    return np.mean(np.linalg.norm(tail, axis=-1) / np.linalg.norm(full, axis=-1))


def test_cett_matches_definition_is_zero_at_zero_and_one_at_max():
    rng = np.random.default_rng(0)
    x1 = rng.normal(size=(2, 16, 24)).astype(np.float32)
    x1[x1 < -0.5] = 0.0  # exact zeros are truncated at tau = 0 and change nothing
    w = rng.normal(size=(24, 12)).astype(np.float32)
    for tau in (0.3, 1.0, 2.5):
        np.testing.assert_allclose(float(sparsity.cett(x1, w, tau)), _cett_naive(x1.reshape(-1, 24), w, tau),
                                   rtol=1e-5)
    assert float(sparsity.cett(x1, w, 0.0)) == 0.0
    n_max = float(np.max(np.abs(x1) * np.linalg.norm(w, axis=-1)))
    assert float(sparsity.cett(x1, w, n_max)) == pytest.approx(1.0, abs=1e-6)


def test_cett_is_monotone_in_tau():
    rng = np.random.default_rng(1)
    x1 = rng.normal(size=(1, 64, 32)).astype(np.float32)
    # Orthogonal W_down rows: ||tail||^2 = sum of n_i^2 over the tail, so CETT is monotone exactly.
    q, _ = np.linalg.qr(rng.normal(size=(32, 32)))
    w_orth = (q * rng.uniform(0.5, 2.0, size=(32, 1))).astype(np.float32)
    taus = np.linspace(0, 6, 61)
    c = np.array([float(sparsity.cett(x1, w_orth, t)) for t in taus])
    assert c[0] == 0.0 and (np.diff(c) >= -1e-6).all() and c[-1] > 0.99
    # Random (non-orthogonal) W_down: not guaranteed in general (tail cancellation), but monotone on averages.
    w = rng.normal(size=(32, 16)).astype(np.float32)
    c = np.array([float(sparsity.cett(x1, w, t)) for t in taus])
    assert (np.diff(c) >= -1e-3).all()


@pytest.mark.parametrize("target", [0.05, 0.2, 0.5])
def test_cett_bisection_hits_target_per_layer(target):
    rng = np.random.default_rng(2)
    L, F, D = 3, 64, 16
    x1 = jnp.asarray(rng.normal(size=(L, 4, 32, F)) * rng.uniform(0.1, 3, size=(L, 1, 1, F)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(L, F, D)), jnp.float32)
    valid = jnp.ones((4, 32), bool)
    cache = sparsity.CETTCache(w, [(x1[:, :2], valid[:2]), (x1[:, 2:], valid[2:])])  # two batches, pooled
    taus, achieved = cache.bisect(target)
    assert (achieved <= target + 1e-6).all() and (np.abs(achieved - target) < 5e-3).all()
    for l in range(L):
        direct = float(sparsity.cett(x1[l], w[l], taus[l], valid))
        assert direct == pytest.approx(achieved[l], abs=1e-5)


def test_mask_stats_firing_frequencies_and_heatmap():
    L, B, T, F = 2, 2, 4, 8
    active = np.zeros((L, B, T, F), bool)
    active[:, :, :, :2] = True  # neurons 0, 1 always active; the rest never
    active[1, 0, 0, 5] = True  # neuron 5 of layer 1 active on 1/8 tokens
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    s = sparsity.summarize_stats(sparsity.add_stats(None, sparsity.mask_stats(
        jnp.asarray(active), jnp.ones((B, T), bool), pos)), F)
    expected = np.zeros((L, F))
    expected[:, :2], expected[1, 5] = 1.0, 1 / 8
    np.testing.assert_array_equal(s["freq_LxF"], expected)
    assert s["activation_ratio_per_layer"][0] == 0.25 and s["tokens_measured"] == 8
    assert s["heatmap_LxT"].shape == (L, T) and s["heatmap_LxT"][1, 0] == pytest.approx(2.5 / 8)


def _batch(cfg, seed=0):
    ids = jax.random.randint(jax.random.key(seed), (2, 12), 0, cfg.vocab_size)
    seg = jnp.array([[1] * 7 + [2] * 5, [1] * 10 + [0] * 2])
    pos = jnp.array([list(range(7)) + list(range(5)), list(range(10)) + [0, 0]])
    return ids, seg, pos


@pytest.mark.parametrize("activation,minicpm", [("silu", False), ("relu", True)])
def test_fat_hook_at_zero_keeps_everything(activation, minicpm):
    kw = dict(scale_emb=12.0, scale_depth=1.4, dim_model_base=8, tie_embeddings=True) if minicpm else {}
    cfg = tiny_model_config(activation=activation, **kw)
    params = init_params(cfg, jax.random.key(0))
    ids, seg, pos = _batch(cfg)
    ref, st = forward(params, ids, cfg, segment_ids_BxT=seg, positions_BxT=pos)
    got, st_got = forward(params, ids, cfg, segment_ids_BxT=seg, positions_BxT=pos,
                          x1_mask=sparsity.fat_x1_mask(jnp.zeros(cfg.n_layers)))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
    np.testing.assert_allclose(st_got.zero_frac, st.zero_frac, atol=1e-6)


def test_fat_hook_on_relu_equals_fatrelu_model():
    cfg = tiny_model_config(activation="relu")
    params = init_params(cfg, jax.random.key(1))
    ids, seg, pos = _batch(cfg, 1)
    eps = 0.02
    got, _ = forward(params, ids, cfg, segment_ids_BxT=seg, positions_BxT=pos,
                     x1_mask=sparsity.fat_x1_mask(jnp.full(cfg.n_layers, eps)))
    ref, _ = forward(params, ids, cfg.replace(activation="fatrelu", activation_threshold=eps), segment_ids_BxT=seg,
                     positions_BxT=pos)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))


def test_topk_hook_keeps_fraction_in_the_sparse_run():
    cfg = tiny_model_config(activation="silu")
    params = init_params(cfg, jax.random.key(2))
    ids, seg, pos = _batch(cfg, 2)
    _, st = forward(params, ids, cfg, segment_ids_BxT=seg, positions_BxT=pos,
                    x1_mask=sparsity.topk_x1_mask(jnp.full(cfg.n_layers, 0.25), "token"))
    np.testing.assert_allclose(1.0 - st.zero_frac, 0.25, atol=1e-6)  # SiLU x1 has no exact zeros


def test_sparse_mode_drops_exactly_what_cett_truncates():
    """Layer 0 sees the same input dense and sparse: its sparse x1 is the dense x1 where n_i > tau (CETT's rule)."""
    cfg = tiny_model_config(activation="silu")
    params = init_params(cfg, jax.random.key(3))
    ids, seg, pos = _batch(cfg, 3)
    _, dense = forward(params, ids, cfg, segment_ids_BxT=seg, positions_BxT=pos, capture=True)
    norms_LxF = model.w_down_norms(params)
    n0 = np.asarray(model.neuron_output_norms(dense.x1[0], norms_LxF[0]))
    taus = (float(np.sort(n0.ravel())[n0.size // 2]), 0.0)  # a value one n_i equals exactly: the boundary counts
    _, sp = forward(params, ids, cfg.replace(neuron_thresholds=tuple(taus)), segment_ids_BxT=seg,
                    positions_BxT=pos, capture=True)
    want = np.where(n0 > taus[0], np.asarray(dense.x1[0]), 0.0)
    np.testing.assert_array_equal(np.asarray(sp.x1[0]), want)
    assert (n0 == taus[0]).any()
