"""score: per-token log-probabilities; a text longer than the context is scored in half-overlapping windows."""

import shutil

import jax
import numpy as np
import pytest
from conftest import random_params, tiny_model_config, write_bpe_tokenizer

from prosparse_jax.errors import UsageError
from prosparse_jax.inference import score
from prosparse_jax.model import transformer as model
from prosparse_jax.training import checkpoint

VOCAB = 300
SEQ_LEN = 16  # the workdir's data.seq_len: its context window
LONG_TEXT = "the quick brown fox jumps over the lazy dog, hello world " * 4


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    write_bpe_tokenizer(root / "tokenizer.json", VOCAB)
    cfg = tiny_model_config(vocab_size=VOCAB)
    wd = checkpoint.write_params_workdir(root / "wd", cfg, random_params(cfg),
                                         run_config={"data": {"seq_len": SEQ_LEN}})
    shutil.copyfile(root / "tokenizer.json", wd / "tokenizer.json")
    return wd


def test_long_text_is_scored_in_windows_of_the_context(workdir):
    res = score.score(workdir, LONG_TEXT)
    n, ctx, ids = res["num_tokens"], res["context"], res["token_ids"]
    assert n > 2 * SEQ_LEN and ctx["window"] == SEQ_LEN and ctx["window_source"] == "the run's data.seq_len"
    assert ctx["windows"] > 1 and "overlapping by 8" in ctx["policy"]
    assert res["logprobs"][0] is None and all(lp is not None for lp in res["logprobs"][1:])
    assert res["total_logprob"] == pytest.approx(sum(res["logprobs"][1:]), rel=1e-6)
    # Each log-prob is that of one forward over SEQ_LEN tokens: the first window, then windows that end where the
    # previous one did + 8 (the last one at the end of the text).
    mcfg, params, _ = checkpoint.load_model(workdir)
    forward = jax.jit(model.forward, static_argnums=2)

    def ref(start, i):
        logits_TxV = forward(params, np.asarray([ids[start:start + SEQ_LEN]]), mcfg)[0][0]
        return float(jax.nn.log_softmax(logits_TxV[i - start - 1])[ids[i]])

    np.testing.assert_allclose(res["logprobs"][SEQ_LEN - 1], ref(0, SEQ_LEN - 1), atol=1e-5)
    np.testing.assert_allclose(res["logprobs"][SEQ_LEN], ref(8, SEQ_LEN), atol=1e-5)  # 2nd window: 8..23
    np.testing.assert_allclose(res["logprobs"][n - 1], ref(n - SEQ_LEN, n - 1), atol=1e-5)


def test_a_text_within_the_window_is_one_forward(workdir):
    wide = len(LONG_TEXT)  # characters: at least as many as tokens
    ctx = score.score(workdir, LONG_TEXT, window=wide)["context"]
    assert ctx["windows"] == 1 and ctx["window"] == wide and ctx["window_source"] == "the window argument"


def test_bad_window_is_a_usage_error(workdir):
    with pytest.raises(UsageError, match="window: must be at least 2"):
        score.score(workdir, "hello", window=1)
