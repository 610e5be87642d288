"""Shared fixtures: tiny model configs that compile in a second on CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from prosparse_jax.config import ModelConfig, base_config  # noqa: E402

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


def load_config(path_and_arg: str, *overrides: str):
    """The ConfigDict of ``--config=<path_and_arg> <overrides...>`` as the CLIs parse it (a relative path is taken
    from the repository root), e.g. ``load_config("configs/prosparse.py:tiny", "--config.train.steps=20")``."""
    from pathlib import Path

    from absl import flags
    from ml_collections import config_flags

    path, sep, arg = path_and_arg.partition(":")
    path = Path(path) if Path(path).is_absolute() else Path(__file__).resolve().parents[1] / path
    argv = ["load_config", f"--config={path}{sep}{arg}", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True, flag_values=fv,
                                    sys_argv=argv)
    fv(argv)
    return fv.config


def assert_grads_close(a, b, rtol: float = 1e-5) -> None:
    """Two gradient pytrees agree leaf by leaf: ``rtol`` per element plus an ``atol`` of ``rtol`` x the leaf's largest
    magnitude.

    A gradient element is a sum over tokens: where it nearly cancels, its round-off is that of the leaf's terms, not
    of its own value. A fixed atol is too tight for the large leaves (lm_head ~0.1) and no check at all for the small
    ones (wq ~3e-4); a wrong or missing gradient path is off by O(1) of the leaf's scale.
    """
    def check(x, y):
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * float(np.abs(y).max()))

    jax.tree.map(check, a, b)


def random_params(cfg: ModelConfig, seed: int = 0):
    """Random params of ``cfg`` drawn with numpy in milliseconds (``init_params`` compiles for seconds): for tests
    of files and command lines, which need some weights, not trained or well-initialised ones."""
    from prosparse_jax.model.transformer import abstract_params

    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(a.dtype), abstract_params(cfg))


def one_error_line(capsys, prog: str) -> str:
    """The single stderr line of a failed CLI call ``prog`` (asserting there is exactly one, and no traceback)."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: ") and "Traceback" not in err, err
    return lines[0]


def killed_after(workdir, step: int):
    """``workdir`` (a finished run's, changed in place) as a run killed right after saving its checkpoint of ``step``
    leaves it: the later checkpoints, their metrics entries and final_eval.json removed. Returns ``workdir``."""
    import json
    import shutil
    from pathlib import Path

    workdir = Path(workdir)
    for d in (workdir / "checkpoints").iterdir():
        if d.name.isdigit() and int(d.name) > step:
            shutil.rmtree(d)
    (workdir / "final_eval.json").unlink(missing_ok=True)
    metrics = workdir / "metrics.jsonl"
    metrics.write_text("".join(ln + "\n" for ln in metrics.read_text().splitlines() if json.loads(ln)["step"] <= step))
    assert (workdir / "checkpoints" / str(step) / "params").is_dir(), f"{workdir} has no checkpoint of step {step}"
    return workdir
