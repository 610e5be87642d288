"""The lm-eval backend ``prosparse`` against lm-eval's own ``hf`` backend (transformers) on an exported tiny model: the
same log-likelihoods, rolling log-likelihoods and greedy generations, with and without BOS; bad input in one line."""

from __future__ import annotations

import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="hf_modules_"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import TOKENIZER_TEXTS, random_params, tiny_model_config, write_bpe_tokenizer  # noqa: E402

pytest.importorskip("torch")
pytest.importorskip("accelerate")
lm_instance = pytest.importorskip("lm_eval.api.instance")

from prosparse_jax.errors import InputError, UsageError  # noqa: E402
from prosparse_jax.evaluation.backend import ProsparseLM, bucket  # noqa: E402
from prosparse_jax.training import checkpoint, model_io  # noqa: E402

VOCAB = 300
CONTEXT = 32  # the workdir's data.seq_len: the context of both backends (the export's max_position_embeddings)
LONG = "the quick brown fox jumps over the lazy dog, hello world, hello jax. " * 3  # longer than the context

LL_REQUESTS = [
    ("the quick brown", " fox jumps"),
    ("hello", " world, hello jax"),
    ("", "the lazy dog"),  # empty context: conditioned on the prefix (BOS) token
    ("sparse activations ", "make inference fast"),  # the context's trailing space moves to the continuation
    (LONG, " over the lazy dog"),  # left-truncated to the context
]
ROLLING = ["hello world, hello jax", LONG, "sparse activations make inference fast " * 2]
GEN = [("the quick brown", {"until": ["\n", "jax"], "max_gen_toks": 8, "do_sample": False}),
       ("hello world,", {"until": ["\n"], "max_gen_toks": 12, "do_sample": False}),
       (LONG[:90], {"until": ["dog"], "max_gen_toks": 8})]


def instances(kind: str, args: list) -> list:
    return [lm_instance.Instance(kind, {}, a if isinstance(a, tuple) else (a,), i, ("t", i, 1))
            for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    """(workdir, its HF export) of a random tiny ReLU model with a BPE tokenizer whose <|endoftext|> is BOS / EOS."""
    root = tmp_path_factory.mktemp("backend")
    tok = write_bpe_tokenizer(root / "tokenizer.json", VOCAB, [*TOKENIZER_TEXTS, "sparse activations make inference"])
    cfg = tiny_model_config(vocab_size=VOCAB)
    wd = checkpoint.write_params_workdir(root / "wd", cfg, random_params(cfg, seed=3),
                                         run_config={"data": {"seq_len": CONTEXT}})
    shutil.copyfile(tok, wd / "tokenizer.json")
    return wd, model_io.export_hf(wd, root / "hf")


@pytest.fixture(scope="module", params=[True, False], ids=["bos", "no_bos"])
def pair(request: pytest.FixtureRequest, model):
    """(ours on the workdir, lm-eval's hf backend on the export), both with or both without BOS."""
    from lm_eval.models.huggingface import HFLM

    wd, hf = model
    ours = ProsparseLM(pretrained=str(wd), add_bos=request.param, batch_size=4)
    theirs = HFLM(pretrained=str(hf), device="cpu", dtype="float32", batch_size=1, add_bos_token=request.param)
    assert ours.max_length == theirs.max_length == CONTEXT
    return ours, theirs


def test_loglikelihoods_equal_the_hf_backend(pair) -> None:
    ours, theirs = pair
    reqs = instances("loglikelihood", LL_REQUESTS)
    got, want = ours.loglikelihood(reqs), theirs.loglikelihood(reqs)
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5, atol=1e-5)
    assert [g[1] for g in got] == [w[1] for w in want]
    assert all(g[0] < 0 for g in got)


def test_rolling_loglikelihoods_equal_the_hf_backend_without_bos(pair, model) -> None:
    """Our rolling log-likelihood conditions the first token on BOS and never scores BOS itself, with or without
    add_bos: lm-eval's hf backend without BOS does the same (with BOS it also scores a BOS token)."""
    from lm_eval.models.huggingface import HFLM

    ours, theirs = pair
    if theirs.add_bos_token:
        theirs = HFLM(pretrained=str(model[1]), device="cpu", dtype="float32", batch_size=1, add_bos_token=False)
    reqs = instances("loglikelihood_rolling", ROLLING)
    got, want = ours.loglikelihood_rolling(reqs), theirs.loglikelihood_rolling(reqs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert len(ours.tok_encode(LONG, add_special_tokens=False)) > 2 * CONTEXT  # several windows were scored


def test_greedy_generations_equal_the_hf_backend(pair) -> None:
    ours, theirs = pair
    reqs = instances("generate_until", GEN)
    got, want = ours.generate_until(reqs), theirs.generate_until(reqs)
    assert got == want
    assert any(got)  # not all empty


def test_sparsity_is_counted_per_task_over_the_real_tokens(model) -> None:
    wd, _ = model
    lm = ProsparseLM(pretrained=str(wd), batch_size=3)
    reqs = instances("loglikelihood", LL_REQUESTS)
    for i, r in enumerate(reqs):
        r.task_name = "a" if i < 2 else "b"
    lm.loglikelihood(reqs)
    res = lm.sparsity.results()
    assert set(res) == {"a", "b"}
    lens_a = [len(lm.tok_encode(c + x)) - 1 for c, x in LL_REQUESTS[:2]]  # the model reads all but the last token
    assert res["a"]["tokens"] == sum(lens_a)  # padding is not counted
    assert len(res["a"]["sparsity_per_layer"]) == 2 and 0 < res["a"]["sparsity"] < 1  # ReLU: exact zeros


def test_a_continuation_longer_than_the_context_is_scored_in_windows(model) -> None:
    """lm-eval's hf backend refuses a continuation longer than the context; ours scores it in consecutive windows of
    the context, each exactly as the one-window requests (checked against hf above) that predict its tokens."""
    lm = ProsparseLM(pretrained=str(model[0]))
    ids = lm.tok_encode(LONG, add_special_tokens=False)
    ctx, cont = ids[:5], ids[5:5 + 2 * CONTEXT + 7]
    (whole, g), = lm.score_tokens([(ctx, cont)])
    parts = lm.score_tokens([(ctx, cont[:CONTEXT]), (ctx + cont[:CONTEXT], cont[CONTEXT:2 * CONTEXT]),
                             (ctx + cont[:2 * CONTEXT], cont[2 * CONTEXT:])])
    assert whole == pytest.approx(sum(p[0] for p in parts), rel=1e-6)
    assert g == all(p[1] for p in parts)


def test_length_buckets_are_few() -> None:
    assert [bucket(n, 512) for n in (1, 16, 17, 100, 300, 512)] == [16, 16, 32, 112, 304, 512]
    assert len({bucket(n, 4096) for n in range(1, 4097)}) == 22
    assert bucket(20, 33) == 32 and bucket(33, 33) == 33 and bucket(17, 24) == 24  # capped at the context


def test_an_empty_request_list_is_one_clear_error(model) -> None:
    lm = ProsparseLM(pretrained=str(model[0]))
    for method in (lm.loglikelihood, lm.loglikelihood_rolling, lm.generate_until):
        with pytest.raises(InputError, match="no requests to run; the task produced no documents"):
            method([])


def test_bad_model_arguments_are_one_clear_error(model) -> None:
    with pytest.raises(UsageError, match="unknown argument 'add_bso'.*did you mean 'add_bos'"):
        ProsparseLM(pretrained=str(model[0]), add_bso=True)
    with pytest.raises(UsageError, match="mode 'topk:0'"):
        ProsparseLM(pretrained=str(model[0]), mode="topk:0")
    lm = ProsparseLM.create_from_arg_string(f"pretrained={model[0]},mode=topk:0.5,add_bos=False,batch_size=2")
    assert (lm.mode.name, lm.add_bos, lm.batch_size) == ("topk:0.5", False, 2)


def test_generation_in_a_hooked_mode_is_greedy_decoding_by_full_forwards(model) -> None:
    """A mode the config cannot express (Top-k: an x1 hook) generates as it scores: each token is the argmax of a full
    forward (no KV cache) with the mode's hook over the prompt and the tokens before it, cut at the first stop
    sequence; the sparsity counted is the mode's (Top-k 25%: at least 75% zeros)."""
    import jax.numpy as jnp
    from lm_eval.models.utils import handle_stop_sequences, postprocess_generated_text

    from prosparse_jax.model import transformer

    lm = ProsparseLM(pretrained=str(model[0]), mode="topk:0.25", batch_size=2)
    reqs = instances("generate_until", GEN)
    for r in reqs:
        r.task_name = "gen"
    got = lm.generate_until(reqs)
    hook = lm.mode.hook(lm.params, lm.mode.aux)
    for (context, kw), text in zip(GEN, got, strict=True):
        max_gen = kw["max_gen_toks"]
        ids, new = lm.tok_encode(context)[-(CONTEXT - max_gen):], []
        while len(new) < max_gen and (not new or new[-1] != lm.eot_token_id):
            logits, _ = transformer.forward(lm.params, jnp.asarray([ids + new]), lm.mode.cfg, x1_mask=hook)
            new.append(int(jnp.argmax(logits[0, -1])))
        until = handle_stop_sequences(kw["until"], eos=lm.eos_token)
        assert text == postprocess_generated_text(lm.tok_decode(new), until, None)
    assert any(got)
    assert lm.sparsity.result("gen")["sparsity"] >= 0.75


def test_registered_as_prosparse() -> None:
    from lm_eval.api.registry import get_model

    assert get_model("prosparse") is ProsparseLM
    assert get_model("hf").__name__ == "HFLM"  # registering ours hides none of lm-eval's own
