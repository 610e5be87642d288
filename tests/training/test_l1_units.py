"""The λ unit of the L1 term: the exact factors between the readings of ``sparsity.l1_reduction`` and BlockFFN's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_grads_close, tiny_model_config

from prosparse_jax.config import base_config, resolve
from prosparse_jax.errors import ConfigError
from prosparse_jax.model.transformer import forward, init_params
from prosparse_jax.training import step as step_mod

LAM = 0.3


def _rows(cfg, n_rows, T, valid_per_row, seed=1):
    """``n_rows`` random rows of ``T`` tokens, row r valid on its first ``valid_per_row[r]`` positions."""
    ids = jax.random.randint(jax.random.key(seed), (n_rows, T + 1), 0, cfg.vocab_size)
    seg = (np.arange(T)[None, :] < np.asarray(valid_per_row)[:, None]).astype(np.int32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": jnp.asarray(seg),
            "positions": jnp.broadcast_to(jnp.arange(T), (n_rows, T)), "weights": jnp.asarray(seg, jnp.float32)}


def _regs(params, batch, cfg, reductions=("sum", "mean", "blockffn")):
    """{reading: the L1 term λ x l1_term of ``batch``}, one compile for all readings."""
    f = jax.jit(lambda p, b: {r: step_mod.loss_fn(p, b, cfg, jnp.float32(LAM), r)[1]["reg_loss"] for r in reductions})
    return {r: float(v) for r, v in f(params, batch).items()}


def _token_sum_of_abs_x1(params, batch, cfg):
    """sum over valid tokens, d_ff and layers of |x1|, in float64 from the captured x1 (the independent reference)."""
    _, st = forward(params, batch["inputs"], cfg, segment_ids_BxT=batch["segment_ids"], capture=True)
    valid = np.asarray(batch["segment_ids"]) > 0
    return sum(float(np.abs(np.asarray(st.x1[i], np.float64))[valid].sum()) for i in range(cfg.n_layers))


def test_factors_between_readings_are_exact():
    """blockffn / sum == 1e-8 x valid tokens of the micro-batch, sum / mean == d_ff (float32 precision)."""
    cfg = tiny_model_config(activation="relu")
    params = init_params(cfg, jax.random.key(0))
    batch = _rows(cfg, 3, 16, [16, 9, 16])  # 41 valid tokens: padding is not a token
    reg = _regs(params, batch, cfg)
    assert reg["blockffn"] / reg["sum"] == pytest.approx(1e-8 * 41, rel=1e-6)
    assert reg["sum"] / reg["mean"] == pytest.approx(cfg.d_ff, rel=1e-6)


def test_blockffn_is_1e8_times_the_token_sum():
    """'blockffn' = λ x 1e-8 x sum over the valid tokens, d_ff and layers of |x1| (BlockFFN's l1_regularization)."""
    cfg = tiny_model_config(activation="relu")
    params = init_params(cfg, jax.random.key(0))
    batch = _rows(cfg, 2, 12, [12, 5])
    assert _regs(params, batch, cfg, ("blockffn",))["blockffn"] == pytest.approx(
        LAM * 1e-8 * _token_sum_of_abs_x1(params, batch, cfg), rel=1e-5)


def test_blockffn_averages_micro_batches_like_blockffn():
    """With grad_accum the 'blockffn' term is the mean over micro-batches of each one's token sum (BlockFFN divides
    each micro-batch's term by its accumulation count), while the LM loss stays the token mean of the step: loss and
    gradients equal that written objective."""
    cfg = tiny_model_config(activation="relu")
    params = init_params(cfg, jax.random.key(0))
    rows = _rows(cfg, 4, 8, [8, 8, 3, 2])  # micro-batches of 16 and 5 valid tokens
    two = jax.tree.map(lambda x: x.reshape(2, 2, *x.shape[1:]), rows)
    micro = [jax.tree.map(lambda x, i=i: x[i], two) for i in range(2)]
    lam = jnp.float32(LAM)
    aux, grads = jax.jit(lambda b: step_mod.accumulate_grads(params, b, cfg, lam, "blockffn"))(two)

    def written(p):
        lm = step_mod.loss_fn(p, rows, cfg, jnp.float32(0.0))[1]["lm_loss"]
        terms = []
        for mb in micro:
            _, st = forward(p, mb["inputs"], cfg, segment_ids_BxT=mb["segment_ids"], capture=True)
            valid = (mb["segment_ids"] > 0)[..., None]
            terms.append(sum(jnp.sum(jnp.abs(st.x1[i]) * valid) for i in range(cfg.n_layers)))
        return lm + lam * 1e-8 * (terms[0] + terms[1]) / 2

    s0, s1 = (_token_sum_of_abs_x1(params, mb, cfg) for mb in micro)
    assert float(aux["reg_loss"]) == pytest.approx(LAM * 1e-8 * (s0 + s1) / 2, rel=1e-5)
    loss_w, grads_w = jax.jit(jax.value_and_grad(written))(params)
    assert float(aux["loss"]) == pytest.approx(float(loss_w), rel=1e-6)
    assert_grads_close(grads, grads_w)
    # = 'sum' of the step x 1e-8 x its mean valid tokens per micro-batch; weighing the micro-batches' token sums by
    # their token shares (as 'sum' weighs its means) would be another objective
    assert float(aux["reg_loss"]) == pytest.approx(_regs(params, rows, cfg, ("sum",))["sum"] * 1e-8 * 21 / 2, rel=1e-5)
    token_weighted = LAM * 1e-8 * (16 * s0 + 5 * s1) / 21
    assert abs(float(aux["reg_loss"]) - token_weighted) > 0.1 * token_weighted


def test_unknown_reading_is_refused_naming_the_choices():
    c = base_config()
    c.sparsity.l1_reduction = "blockfn"
    with pytest.raises(ConfigError, match=r"sparsity\.l1_reduction: unknown L1 reduction 'blockfn'.*'blockffn'.*"
                                          r"choose one of: sum, mean, blockffn"):
        resolve(c)
