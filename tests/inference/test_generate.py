"""KV-cache generation: cached logits = full forwards, greedy / sampling / EOS, sparse mode, transformers, CLI."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_config, write_bpe_tokenizer

from prosparse_jax.inference import decode, generate, sparse_ffn
from prosparse_jax.main import generate as generate_main
from prosparse_jax.model import transformer as model
from prosparse_jax.training import checkpoint
from prosparse_jax.training.model_io import load_model

VOCAB = 300
SEQ_LEN = 16
PROMPTS = [[5, 9, 2, 7, 1, 3], [4, 8], [6, 6, 1, 0, 2, 9, 11, 12, 3]]


def rel_close(a: np.ndarray, b: np.ndarray, rtol: float = 1e-5) -> None:
    """|a - b| <= rtol * max|b|: float32 differences measured against the logits' scale."""
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_array_less(np.abs(a - b).max(), rtol * np.abs(b).max() + 1e-30)


_forward = jax.jit(model.forward, static_argnums=2)


def full_logits_batch(params: dict, cfg, seqs: list[list[int]]) -> list[np.ndarray]:
    """Full-forward logits [T_b, V] of every sequence, from ONE forward over them right-padded (causal attention:
    the padding after a sequence does not change its logits)."""
    T = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), T), np.int32)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = s
    logits = np.asarray(_forward(params, jnp.asarray(ids), cfg)[0])
    return [logits[b, :len(s)] for b, s in enumerate(seqs)]


def full_logits(params: dict, cfg, seq: list[int]) -> np.ndarray:
    return full_logits_batch(params, cfg, [seq])[0]


CFGS = {
    "mha": tiny_model_config(n_kv_heads=4),
    "gqa": tiny_model_config(n_kv_heads=2, activation="silu"),
    "minicpm": tiny_model_config(n_kv_heads=1, scale_emb=12.0, scale_depth=1.4, dim_model_base=16,
                                 tie_embeddings=True),
}


@pytest.mark.parametrize("name", list(CFGS))
def test_cached_decode_logits_equal_full_forward(name: str) -> None:
    cfg = CFGS[name]
    params = model.init_params(cfg, jax.random.key(1))
    steps = 4
    cont_BxS = np.random.default_rng(0).integers(0, cfg.vocab_size, (len(PROMPTS), steps)).astype(np.int32)
    ids_BxP, pad_B = generate.left_pad(PROMPTS)
    cache = decode.init_cache(cfg, len(PROMPTS), ids_BxP.shape[1] + steps, pad_B)
    logits_BxV, cache = decode.prefill(params, jnp.asarray(ids_BxP), cache, cfg=cfg)
    got = [np.asarray(logits_BxV)]
    for i in range(steps):
        logits_BxV, cache, _ = decode.decode_step(params, jnp.asarray(cont_BxS[:, i]), cache,
                                                  jnp.ones(len(PROMPTS), bool), cfg=cfg)
        got.append(np.asarray(logits_BxV))
    wants = full_logits_batch(params, cfg, [p + list(c) for p, c in zip(PROMPTS, cont_BxS, strict=True)])
    for b, (p, want_TxV) in enumerate(zip(PROMPTS, wants, strict=True)):
        for i in range(steps + 1):
            rel_close(got[i][b], want_TxV[len(p) - 1 + i])


def test_greedy_equals_argmax_of_full_forwards() -> None:
    cfg = CFGS["gqa"]
    params = model.unstack_layers(model.init_params(cfg, jax.random.key(2)))  # either layout decodes
    news, stats = generate.generate(params, cfg, PROMPTS, max_new_tokens=5)
    wants = full_logits_batch(params, cfg, [p + n for p, n in zip(PROMPTS, news, strict=True)])
    for p, new, want_TxV in zip(PROMPTS, news, wants, strict=True):
        assert len(new) == 5 and new == np.argmax(want_TxV[len(p) - 1:-1], axis=-1).tolist()
    assert stats.decoded_tokens == 4 * len(PROMPTS) and stats.decode_tokens_per_s > 0
    assert len(stats.sparsity_per_layer) == cfg.n_layers


def test_sampling_is_reproducible_and_top_k_1_is_greedy() -> None:
    cfg = CFGS["mha"]
    params = model.init_params(cfg, jax.random.key(3))
    kw = dict(max_new_tokens=6, temperature=1.5, top_p=0.9)
    a, _ = generate.generate(params, cfg, PROMPTS, seed=7, **kw)
    b, _ = generate.generate(params, cfg, PROMPTS, seed=7, **kw)
    c, _ = generate.generate(params, cfg, PROMPTS, seed=8, **kw)
    assert a == b and a != c
    greedy, _ = generate.generate(params, cfg, PROMPTS, max_new_tokens=6)
    top1, _ = generate.generate(params, cfg, PROMPTS, max_new_tokens=6, temperature=2.0, top_k=1, seed=3)
    assert top1 == greedy


def test_top_p_keeps_the_nucleus() -> None:
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(generate.sample(logits, jax.random.key(i), temperature=1.0, top_p=0.7)[0]) for i in range(64)}
    assert draws == {0, 1}


def test_eos_stops_a_row() -> None:
    cfg = CFGS["gqa"]
    params = model.init_params(cfg, jax.random.key(2))
    free, _ = generate.generate(params, cfg, PROMPTS, max_new_tokens=5)
    eos = free[0][2]
    news, _ = generate.generate(params, cfg, PROMPTS, max_new_tokens=5, eos_id=eos)
    for row, new in zip(free, news, strict=True):
        cut = row.index(eos) + 1 if eos in row else len(row)
        assert new == row[:cut]
    assert news[0] == free[0][:3]


def test_sparse_mode_thresholds_apply_as_in_forward() -> None:
    cfg = CFGS["gqa"]
    params = model.init_params(cfg, jax.random.key(4))
    norms_LxF = np.asarray(model.w_down_norms(params))
    sparse = cfg.replace(neuron_thresholds=tuple(float(0.02 * n.mean()) for n in norms_LxF))
    news, stats = generate.generate(params, sparse, PROMPTS, max_new_tokens=4)
    dense_news, dense_stats = generate.generate(params, cfg, PROMPTS, max_new_tokens=4)
    wants = full_logits_batch(params, sparse, [p + n for p, n in zip(PROMPTS, news, strict=True)])
    for p, new, want_TxV in zip(PROMPTS, news, wants, strict=True):
        assert new == np.argmax(want_TxV[len(p) - 1:-1], axis=-1).tolist()
    assert min(stats.sparsity_per_layer) > 0.05 and max(dense_stats.sparsity_per_layer) == 0.0
    # the cached logits of the sparse mode equal its forward's
    ids_BxP, pad_B = generate.left_pad(PROMPTS[:1])
    cache = decode.init_cache(sparse, 1, ids_BxP.shape[1] + 1, pad_B)
    logits_BxV, _ = decode.prefill(params, jnp.asarray(ids_BxP), cache, cfg=sparse)
    rel_close(logits_BxV[0], full_logits(params, sparse, PROMPTS[0])[-1])


def test_greedy_matches_transformers_generate(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hcfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, hidden_act="silu", rms_norm_eps=1e-5, initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, eos_token_id=None, bos_token_id=None,
        pad_token_id=None)
    hf_model = transformers.LlamaForCausalLM(hcfg).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    cfg, params, _ = load_model(tmp_path / "hf")
    prompt = [3, 17, 99, 5, 42]
    news, _ = generate.generate(params, cfg, [prompt], max_new_tokens=8)
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8, min_new_tokens=8)
    assert news[0] == out[0, len(prompt):].tolist()


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gen")
    write_bpe_tokenizer(root / "tokenizer.json", VOCAB)
    cfg = tiny_model_config(vocab_size=VOCAB, activation="silu")
    wd = checkpoint.write_params_workdir(root / "wd", cfg, model.init_params(cfg, jax.random.key(0)),
                                         run_config={"data": {"seq_len": SEQ_LEN}})
    shutil.copyfile(root / "tokenizer.json", wd / "tokenizer.json")
    return wd


def test_cli_prints_text_and_stats(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", f"--checkpoint={workdir}", "--prompt=hello world", "--max_new_tokens=3"]
    assert generate_main.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    stats = json.loads(lines[-1])
    assert stats["new_tokens"] <= 3 and len(stats["sparsity_per_layer"]) == 2 and stats["decode_tokens_per_s"] >= 0


@pytest.mark.parametrize(("args", "needle"), [
    (["--prompt="], "prompt: empty"),
    (["--prompt=" + "the quick brown fox " * 10], "longer than the model's context of 16"),
    (["--prompt=hi", "--max_new_tokens=0"], "max_new_tokens: must be at least 1"),
    (["--prompt=hi", "--sparse"], "--metric=pplp --value=1"),
    (["--prompt=hi", "--checkpoint=/nonexistent/run"], "does not exist"),
])
def test_cli_errors_are_one_line(workdir: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                 needle: str) -> None:
    assert generate_main.main(["generate", f"--checkpoint={workdir}", *args]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("generate: error: ") and needle in err[0], err


def test_decode_ffn_hook_is_used() -> None:
    cfg = CFGS["gqa"]
    params = model.init_params(cfg, jax.random.key(2))

    def all_zero_count(params: dict, cfg) -> decode.FFN:
        dense = decode.dense_ffn(params, cfg)

        def ffn(layer, x_BxTxD, lp, valid_BxT):
            out, zeros_BxT = dense(layer, x_BxTxD, lp, valid_BxT)
            return out, jnp.full_like(zeros_BxT, cfg.d_ff)

        return ffn

    want, _ = generate.generate(params, cfg, PROMPTS, max_new_tokens=3)
    got, stats = generate.generate(params, cfg, PROMPTS, max_new_tokens=3, ffn=all_zero_count)
    assert got == want and stats.sparsity_per_layer == [1.0] * cfg.n_layers


@pytest.mark.parametrize("kind", ["fatrelu", "silu_sparse_mode"])
def test_sparse_ffn_decode_gives_the_dense_tokens(kind: str) -> None:
    """The sparse FFN kernel as the decode hook: greedy tokens and per-step logits equal the dense FFN's, at a
    sparsity (> 70%) where the kernel runs (not its dense fallback)."""
    cfg = tiny_model_config(activation="relu", d_ff=256)
    params = model.init_params(cfg, jax.random.key(7))
    if kind == "fatrelu":
        cfg = cfg.replace(activation="fatrelu", activation_threshold=0.15)
    else:
        cfg = cfg.replace(activation="silu")
        _, st = model.forward(params, jnp.asarray([PROMPTS[0]]), cfg, capture=True)
        n_LxBxTxF = np.abs(np.asarray(st.x1)) * np.asarray(model.w_down_norms(params))[:, None, None, :]
        cfg = cfg.replace(neuron_thresholds=tuple(float(np.quantile(n, 0.85)) for n in n_LxBxTxF))
    for prompts in (PROMPTS[:1], PROMPTS):  # batch 1: the kernel path; batch 3: the union (may fall back to dense)
        dense, dense_stats = generate.generate(params, cfg, prompts, max_new_tokens=6)
        sparse, stats = generate.generate(generate.prepare_sparse_params(params), cfg, prompts, max_new_tokens=6,
                                          ffn=generate.sparse_decode_ffn)
        assert sparse == dense
    one, stats = generate.generate(generate.prepare_sparse_params(params), cfg, PROMPTS[:1], max_new_tokens=6,
                                   ffn=generate.sparse_decode_ffn)
    assert min(stats.sparsity_per_layer) > 1 - sparse_ffn.DENSE_CROSSOVER  # below the crossover: the gather runs


@pytest.mark.parametrize("implementation", ["pallas_triton", "pallas_mosaic"])
def test_generate_sparse_with_a_pallas_backend_gives_the_dense_tokens(implementation: str) -> None:
    """``generate`` with the GPU / TPU kernels as the decode FFN (interpreted on this CPU) emits the dense tokens, for
    one prompt and for a batch (the union active set)."""
    cfg = tiny_model_config(activation="relu", d_ff=256).replace(activation="fatrelu", activation_threshold=0.15)
    params = model.init_params(cfg, jax.random.key(7))
    ffn = functools.partial(generate.sparse_decode_ffn, implementation=implementation)
    for prompts in (PROMPTS[:1], PROMPTS):
        dense, _ = generate.generate(params, cfg, prompts, max_new_tokens=4)
        sparse, stats = generate.generate(generate.prepare_sparse_params(params), cfg, prompts, max_new_tokens=4,
                                          ffn=ffn)
        assert sparse == dense
    assert min(stats.sparsity_per_layer) > 0.5


def _decode_logits(params, cfg, ffn_impl) -> np.ndarray:
    """Logits of one cached decode step after the first prompt, with the given FFN hook."""
    ids_BxP, pad_B = generate.left_pad(PROMPTS[:1])
    cache = decode.init_cache(cfg, 1, ids_BxP.shape[1] + 1, pad_B)
    logits_BxV, cache = decode.prefill(params, jnp.asarray(ids_BxP), cache, cfg)
    tok_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV, _, _ = decode.decode_step(params, tok_B, cache, jnp.ones(1, bool), cfg, ffn_impl=ffn_impl)
    return np.asarray(logits_BxV[0], np.float64)


def test_sparse_decode_check_catches_a_kernel_that_skips_one_active_neuron(monkeypatch) -> None:
    """The decode equality check can fail: a backend that drops one active neuron per call (a kernel whose last
    chunk loses a row) moves the step's logits far beyond the tolerance the correct kernel meets."""
    cfg = tiny_model_config(activation="relu", d_ff=256).replace(activation="fatrelu", activation_threshold=0.15)
    params = generate.prepare_sparse_params(model.init_params(cfg, jax.random.key(7)))
    good = sparse_ffn.IMPLEMENTATIONS["cpu_gather"]

    def broken(x_BxD, w, mode):  # the first active neuron's W_down row is lost
        act = (x_BxD @ w.w_gate_DxF) >= mode.threshold
        first = jnp.argmax(jnp.any(act, axis=0))
        return good(x_BxD, w._replace(w_down_FxD=w.w_down_FxD.at[first].set(0.0)), mode)

    monkeypatch.setitem(sparse_ffn.IMPLEMENTATIONS, "broken", broken)
    dense = _decode_logits(params, cfg, decode.dense_ffn)
    scale = np.max(np.abs(dense))
    right = _decode_logits(params, cfg, functools.partial(generate.sparse_decode_ffn, implementation="cpu_gather"))
    wrong = _decode_logits(params, cfg, functools.partial(generate.sparse_decode_ffn, implementation="broken"))
    assert np.max(np.abs(right - dense)) <= 1e-5 * scale
    assert np.max(np.abs(wrong - dense)) > 1e-3 * scale
