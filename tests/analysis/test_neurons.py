"""Dead-neuron tiers and the sparsity-gain split on synthetic activity with known answers; firing frequencies of a
tiny model against an independent count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_config

from prosparse_jax.analysis import neurons
from prosparse_jax.errors import UsageError
from prosparse_jax.model import transformer as model

N_TOKENS = 20_000  # 1 token = 5e-5 of them: both tier bounds (1e-4 = 2 tokens, 1e-3 = 20 tokens) are resolvable


def _activity(counts_LxF, n_tokens=N_TOKENS, seed=0):
    """A [L, N, F] bool activity matrix with the given active-token count per neuron, at random tokens."""
    rng = np.random.default_rng(seed)
    counts_LxF = np.asarray(counts_LxF)
    L, F = counts_LxF.shape
    act = np.zeros((L, n_tokens, F), bool)
    for l in range(L):
        for f in range(F):
            act[l, rng.choice(n_tokens, counts_LxF[l, f], replace=False), f] = True
    return act


def test_dead_tiers_count_a_synthetic_activity_matrix():
    # active tokens per neuron: 0 = never; 1 (5e-5) < 1e-4; 2 (= 1e-4) is not < 1e-4; 19 (9.5e-4) < 1e-3;
    # 20 (= 1e-3) is alive; more is alive
    counts = [[0, 1, 2, 19, 20, 500, 9000, 20_000],  # never 1, < 1e-4: 2, < 1e-3: 4 -> 50%: not flagged
              [0, 0, 0, 1, 3, 7, 25, 100],  # never 3, < 1e-4: 4, < 1e-3: 6 -> 75%: flagged
              [0, 0, 0, 0, 0, 0, 0, 0]]  # all never: flagged
    freq_LxF = _activity(counts).mean(axis=1)
    t = neurons.dead_neuron_tiers(freq_LxF, N_TOKENS)
    assert t["never"]["count_per_layer"] == [1, 3, 8]
    assert t["below_1e-4"]["count_per_layer"] == [2, 4, 8]
    assert t["below_1e-3"]["count_per_layer"] == [4, 6, 8]
    assert t["below_1e-3"]["fraction_per_layer"] == [0.5, 0.75, 1.0]
    assert t["never"]["count"] == 12 and t["never"]["fraction"] == 12 / 24
    assert t["below_1e-3"]["fraction"] == 18 / 24
    assert t["mostly_dead_layers"] == [1, 2]  # > 50% dead; exactly 50% (layer 0) is not flagged
    assert t["tokens"] == N_TOKENS and t["resolution"] == 1 / N_TOKENS and t["d_ff"] == 8
    assert neurons.tier_counts(t) == {"never": [1, 3, 8], "below_1e-4": [2, 4, 8], "below_1e-3": [4, 6, 8],
                                      "mostly_dead_layers": [1, 2]}


def test_gain_split_on_known_frequencies():
    a = np.array([[0.5, 0.2, 0.0005, 0.1],
                  [0.3, 0.3, 0.0, 0.0]])
    b = np.array([[0.0, 0.1, 0.0005, 0.1],  # neuron 0 dies; neuron 1 fires less; 2 dead in both
                  [0.0009, 0.2, 0.0, 0.05]])  # neuron 0 dies (< 1e-3); 1 fires less; 3 revives
    s = neurons.sparsity_gain_split(a, b)
    assert s["gain"] == pytest.approx(a.mean() - b.mean(), abs=1e-15)
    assert s["from_newly_dead"] == pytest.approx((0.5 + 0.2991) / 8, abs=1e-15)
    assert s["from_the_rest"] == pytest.approx((0.1 + 0.1 - 0.05) / 8, abs=1e-15)
    assert s["from_newly_dead"] + s["from_the_rest"] == pytest.approx(s["gain"], abs=1e-15)
    assert s["share_from_newly_dead"] == pytest.approx(0.7991 / 0.9491)
    assert s["newly_dead"] == 2 and s["newly_dead_fraction"] == 2 / 8 and s["revived"] == 1
    assert s["newly_dead_median_freq_a"] == pytest.approx(0.4)
    per = s["per_layer"]
    np.testing.assert_allclose(per["gain"], [0.6 / 4, 0.3491 / 4], atol=1e-15)
    np.testing.assert_allclose(per["from_newly_dead"], [0.5 / 4, 0.2991 / 4], atol=1e-15)
    np.testing.assert_allclose(per["from_the_rest"], [0.1 / 4, 0.05 / 4], atol=1e-15)
    assert per["newly_dead"] == [1, 1]
    assert "dead_in_b" not in s
    start = np.array([[0.0, 0.3, 0.0, 0.2],  # of b's dead neurons (0,0), (0,2), (1,0), (1,2), three were dead here
                      [0.3, 0.3, 0.0, 0.0]])
    s = neurons.sparsity_gain_split(a, b, start)
    assert s["dead_in_b"] == 4 and s["dead_in_b_dead_at_start"] == 3


def test_gain_split_without_change_or_deaths():
    a = np.full((2, 3), 0.2)
    s = neurons.sparsity_gain_split(a, a)
    assert s["gain"] == 0.0 and s["share_from_newly_dead"] is None and s["newly_dead_median_freq_a"] is None
    assert s["newly_dead"] == 0 and s["from_newly_dead"] == 0.0


@pytest.mark.parametrize("call,name", [
    (lambda: neurons.dead_neuron_tiers(np.zeros(8)), "freq_LxF"),
    (lambda: neurons.dead_neuron_tiers(np.full((2, 4), 3.0)), "freq_LxF"),  # counts, not fractions
    (lambda: neurons.dead_neuron_tiers(np.full((2, 4), np.nan)), "freq_LxF"),
    (lambda: neurons.sparsity_gain_split(np.zeros((2, 4)), np.zeros((2, 5))), "freq_b_LxF"),
    (lambda: neurons.sparsity_gain_split(-np.ones((2, 4)), np.zeros((2, 4))), "freq_a_LxF"),
    (lambda: neurons.sparsity_gain_split(np.zeros((2, 4)), np.zeros((2, 4)), np.zeros((3, 4))), "freq_start_LxF"),
])
def test_bad_frequencies_name_the_argument(call, name):
    with pytest.raises(UsageError, match=f"^{name}: "):
        call()


def _batches(cfg, n=2):
    """Batches with packed segments and padding (segment id 0) at the end of row 1."""
    out = []
    for k in range(n):
        ids = jax.random.randint(jax.random.key(k), (2, 12), 0, cfg.vocab_size)
        seg = jnp.array([[1] * 7 + [2] * 5, [1] * 9 + [0] * 3])
        pos = jnp.array([list(range(7)) + list(range(5)), list(range(9)) + [0] * 3])
        out.append({"inputs": ids, "targets": jnp.roll(ids, -1, axis=1), "weights": (seg != 0).astype(jnp.float32),
                    "segment_ids": seg, "positions": pos})
    return out


@pytest.mark.parametrize("sparse_mode", [False, True])
def test_firing_frequencies_count_valid_tokens_of_the_model_as_configured(sparse_mode):
    cfg = tiny_model_config(activation="relu")
    params = model.init_params(cfg, jax.random.key(0))
    if sparse_mode:  # drop about half of the active neurons by sparse mode's rule
        cfg = cfg.replace(neuron_thresholds=(2e-4, 2e-4))
    batches = _batches(cfg)
    freq_LxF, tokens = neurons.firing_frequencies(params, cfg, batches)
    count_LxF, n = np.zeros((cfg.n_layers, cfg.d_ff)), 0
    for b in batches:  # the reference: the model's captured x1 (after its own hook), valid tokens only
        _, st = model.forward(params, b["inputs"], cfg, segment_ids_BxT=b["segment_ids"],
                              positions_BxT=b["positions"], capture=True)
        valid = np.asarray(b["segment_ids"]) != 0
        count_LxF += (np.asarray(st.x1) != 0)[:, valid].sum(axis=1)
        n += int(valid.sum())
    assert tokens == n == 2 * (12 + 9)
    np.testing.assert_array_equal(freq_LxF, count_LxF / n)
    dense_freq, _ = neurons.firing_frequencies(params, cfg.replace(neuron_thresholds=()), batches)
    if sparse_mode:
        assert freq_LxF.mean() < 0.9 * dense_freq.mean()
    with pytest.raises(UsageError, match="^batches: "):
        neurons.firing_frequencies(params, cfg, [])
