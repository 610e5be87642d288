"""Shared fixtures: tiny model configs that compile in a second on CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from prosparse_jax.config import ModelConfig  # noqa: E402
from prosparse_jax.run_config import base_config  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def tiny_model_config(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, activation="relu")
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_model_config()


WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
         "tau").split()


def write_corpus(d, n_docs: int = 40):
    """A tiny file corpus of n_docs Python-like text files in directory ``d`` (created); returns ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n_docs):
        text = " ".join(rng.choice(WORDS, size=rng.integers(50, 200)))
        (d / f"doc{i:03d}.txt").write_text(f"def f{i}():\n    return '{text}'\n")
    return d


def small_run_config(corpus, steps, *, activation="relu", batch_size=4, checkpoint_every=2, stages=None):
    """A 2-layer model training in seconds on a ``write_corpus`` corpus (tfds data next to the corpus)."""
    c = base_config()
    c.model.update(dict(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                        activation=activation))
    c.data.source = f"files:{corpus}/*.txt"
    c.data.data_dir = str(corpus.parent / "tfds")
    c.data.vocab_size = 320
    c.data.seq_len = 32
    c.data.eval_fraction = 0.1
    c.train.update(dict(steps=steps, batch_size=batch_size, log_every=1, eval_every=0, eval_batches=2,
                        checkpoint_every=checkpoint_every, progress_bar=False, async_checkpoint=False))
    c.optim.update(dict(lr=3e-3, warmup_steps=2, schedule="cosine"))
    c.sparsity.stages = stages if stages is not None else [[0.0, steps]]
    return c


TOKENIZER_TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world, hello jax"]


def write_bpe_tokenizer(path, vocab_size: int, texts=TOKENIZER_TEXTS):
    """A byte-level BPE with ``<|endoftext|>`` trained on ``texts`` (x10), saved as ``path``; returns ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts) * 10, trainer)
    assert tok.get_vocab_size() <= vocab_size
    tok.save(str(path))
    return path


def gated_ffn_weights(sparsity: float, B: int, D: int, F: int, fat_t: float, seed: int = 0):
    """(x_BxD, w_gate_DxF, w_up_DxF, w_down_FxD) float32 for the sparse FFN tests: round((1 - s) F) positive gates on
    every row (rows b > 0 are (1 + b / 4) x0, the same sign set), every gate at least 2 * fat_t away from 0 (so a
    FATReLU threshold fat_t decides nothing differently), and x . W_up > 0 on two thirds of the neurons (dReLU's
    relu(up) zeros the rest: most active neurons still count, so a lost one shows)."""
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    wg = rng.normal(size=(D, F)).astype(np.float32) / np.sqrt(D)
    wu = rng.normal(size=(D, F)).astype(np.float32) / np.sqrt(D)
    wd = rng.normal(size=(F, D)).astype(np.float32) / np.sqrt(F)
    x0 = rng.normal(size=D).astype(np.float32)
    on_F = np.zeros(F, bool)
    on_F[rng.permutation(F)[:round((1.0 - sparsity) * F)]] = True
    wg = wg * np.where(on_F == (x0 @ wg > 0), 1.0, -1.0).astype(np.float32)
    wg = wg * np.maximum(1.0, 2 * fat_t / np.maximum(np.abs(x0 @ wg), 1e-6)).astype(np.float32)
    wu = wu * np.where((x0 @ wu > 0) == (rng.random(F) < 2 / 3), 1.0, -1.0).astype(np.float32)
    x = np.stack([(1.0 + b / 4) * x0 for b in range(B)])
    return tuple(jnp.asarray(a) for a in (x, wg, wu, wd))
