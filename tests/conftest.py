"""Shared fixtures: tiny model configs that compile in a second on CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

from prosparse_jax.config import ModelConfig  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def tiny_model_config(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, activation="relu")
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_model_config()
