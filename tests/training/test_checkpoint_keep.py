"""train.keep_period: checkpoints at multiples of it survive train.keep_checkpoints (orbax keep_period)."""

import jax.numpy as jnp
import pytest
from conftest import load_config

from prosparse_jax.config import base_config, resolve
from prosparse_jax.errors import ConfigError
from prosparse_jax.training import checkpoint as ckpt


def _save_steps(workdir, steps, **kw):
    mgr = ckpt.manager(workdir, async_save=False, **kw)
    params = {"w": jnp.ones((2, 3), jnp.float32)}
    for s in steps:
        ckpt.save(mgr, s, params, None, {"step": s})
    mgr.wait_until_finished()
    mgr.close()
    return sorted(int(p.name) for p in (workdir / ckpt.CKPT_DIR).iterdir() if p.name.isdigit())


def test_multiples_of_keep_period_survive_keep(tmp_path):
    assert _save_steps(tmp_path / "a", range(1, 11), keep=2, keep_period=3) == [3, 6, 9, 10]
    assert _save_steps(tmp_path / "b", range(1, 11), keep=2) == [9, 10]  # 0 = off: only the last `keep`
    assert _save_steps(tmp_path / "c", range(5, 41, 5), keep=1, keep_period=5) == [5, 10, 15, 20, 25, 30, 35, 40]


def test_negative_keep_period_is_refused():
    c = base_config()
    c.train.keep_period = -1
    with pytest.raises(ConfigError, match="train.keep_period"):
        resolve(c)


def test_sparsing_law_configs_keep_every_checkpoint():
    c = load_config("configs/sparsing_law.py:0.1b-silu")
    assert c.train.keep_period == c.train.checkpoint_every > 0
