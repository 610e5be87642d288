"""KV-cache generation: cached logits = full forwards, greedy / sampling / EOS, sparse mode, transformers, chunked
decode, CLI (errors, context cap, --thresholds, Ctrl-C)."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_config, write_bpe_tokenizer

from prosparse_jax.data.corpus import EOS_TOKEN
from prosparse_jax.errors import UsageError
from prosparse_jax.inference import decode, generate, sparse_ffn
from prosparse_jax.main import generate as generate_main
from prosparse_jax.model import transformer as model
from prosparse_jax.training import checkpoint
from prosparse_jax.training.model_io import load_model

ROOT = Path(__file__).resolve().parents[2]
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


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.3, "top_p": 0.9, "seed": 5},
                                      {"temperature": 1.0, "top_k": 5, "seed": 1, "eos": True}],
                         ids=["greedy", "top_p", "top_k_eos"])
def test_chunked_decode_equals_one_loop(sampling: dict) -> None:
    """The decode loop split into on-device calls of any length samples the same tokens, sparsity counts and decoded
    tokens as one call over all ``max_new_tokens``."""
    cfg = CFGS["gqa"]
    params = model.init_params(cfg, jax.random.key(2))
    kw = {k: v for k, v in sampling.items() if k != "eos"}
    n = 24
    one, one_stats = generate.generate(params, cfg, PROMPTS, max_new_tokens=n, chunk_tokens=n, **kw)
    if sampling.get("eos"):  # a token that ends one row early and leaves the others running
        kw["eos_id"] = one[1][4]
        one, one_stats = generate.generate(params, cfg, PROMPTS, max_new_tokens=n, chunk_tokens=n, **kw)
        assert len(one[1]) == 5 and max(len(r) for r in one) > 5
    for chunk_tokens in (1, 5, None):
        got, stats = generate.generate(params, cfg, PROMPTS, max_new_tokens=n, chunk_tokens=chunk_tokens, **kw)
        assert got == one, chunk_tokens
        assert stats.decoded_tokens == one_stats.decoded_tokens
        assert stats.sparsity_per_layer == one_stats.sparsity_per_layer


def test_stop_ends_the_generation_early_with_the_same_tokens() -> None:
    """``stop`` (checked between decode calls) ends the generation once it says so: every row's tokens are a prefix of
    the generation without it, at least as long as where it first held, and fewer steps are decoded."""
    cfg = CFGS["gqa"]
    params = model.init_params(cfg, jax.random.key(2))
    n = 24
    full, full_stats = generate.generate(params, cfg, PROMPTS, max_new_tokens=n, chunk_tokens=n)
    seen: list[int] = []

    def stop(rows: list[list[int]]) -> bool:
        seen.append(len(rows[0]))
        return len(rows[0]) >= 6

    got, stats = generate.generate(params, cfg, PROMPTS, max_new_tokens=n, chunk_tokens=4, stop=stop)
    assert seen == [5, 9]  # the first call samples 1 + 4 tokens per row, then 4 per call
    assert all(len(g) == 9 and g == f[:9] for g, f in zip(got, full, strict=True))
    assert stats.decoded_tokens < full_stats.decoded_tokens


def test_padding_the_prompts_further_gives_the_same_tokens() -> None:
    """``pad_to`` (shared shapes across calls) left-pads past the longest prompt: masked, so the same tokens."""
    cfg = CFGS["gqa"]
    params = model.init_params(cfg, jax.random.key(2))
    want, _ = generate.generate(params, cfg, PROMPTS, max_new_tokens=5)
    got, stats = generate.generate(params, cfg, PROMPTS, max_new_tokens=5, pad_to=14)
    assert got == want and stats.prefill_tokens == len(PROMPTS) * 14


def test_bf16_decode_casts_the_weights_once_not_in_every_step() -> None:
    """A float32 checkpoint decoded in bfloat16: the decode step's program reads bf16 weights (no float32 weight, so
    no per-step convert of one), and the tokens are those of the model casting at every use."""
    cfg = CFGS["gqa"].replace(dtype="bfloat16")
    params = model.init_params(cfg, jax.random.key(6))
    cast = generate.cast_weights(model.unstack_layers(params), cfg)
    lp = cast["layers"][0]
    assert lp["w_gate_LxDxF"].dtype == jnp.bfloat16 and lp["ffn_norm_LxD"].dtype == jnp.float32
    assert cast["embed_VxD"].dtype == jnp.float32
    logits_BxV, cache = decode.prefill(cast, jnp.asarray([PROMPTS[0]]), decode.init_cache(cfg, 1, 16, np.zeros(1)),
                                       cfg=cfg)
    step = decode.decode_step.lower(cast, jnp.zeros((1,), jnp.int32), cache, jnp.ones((1,), bool), cfg=cfg)
    hlo = step.as_text()
    D, F = cfg.d_model, cfg.d_ff
    assert f"tensor<1x{D}x{F}xbf16>" in hlo and f"tensor<1x{D}x{F}xf32>" not in hlo
    got, _ = generate.generate(params, cfg, PROMPTS[:1], max_new_tokens=4)
    seq = list(PROMPTS[0])
    for _ in range(4):
        logits, _ = model.forward(params, jnp.asarray([seq]), cfg)
        seq.append(int(jnp.argmax(logits[0, -1])))
    assert got[0] == seq[len(PROMPTS[0]):]


def test_an_x1_hook_generates_as_a_forward_with_it_and_takes_no_ffn() -> None:
    """``x1_hook`` (a mode the config cannot express) runs in the prefill and every step: greedy tokens are the argmax
    of full forwards with the same hook; its arrays travel as ``x1_hook_aux``."""
    cfg = CFGS["gqa"]
    params = model.init_params(cfg, jax.random.key(4))

    def hook_of(params: dict, keep_LxF: jax.Array):
        return lambda layer, x1, act, valid: jnp.where(keep_LxF[layer], x1, 0.0)

    keep = jax.random.bernoulli(jax.random.key(5), 0.5, (cfg.n_layers, cfg.d_ff)).at[1:].set(False)  # the last FFNs off
    got, stats = generate.generate(params, cfg, PROMPTS[:1], max_new_tokens=6, x1_hook=hook_of, x1_hook_aux=keep)
    seq = list(PROMPTS[0])
    for _ in range(6):
        logits, _ = model.forward(params, jnp.asarray([seq]), cfg, x1_mask=hook_of(params, keep))
        seq.append(int(jnp.argmax(logits[0, -1])))
    assert got[0] == seq[len(PROMPTS[0]):]
    # the hook ran in the decode steps: x1 is zero where it drops neurons (SiLU has no zeros of its own)
    assert stats.sparsity_per_layer[1] == 1.0
    assert stats.sparsity_per_layer[0] == pytest.approx(1.0 - float(keep[0].mean()), abs=1e-6)
    with pytest.raises(UsageError, match="not both"):
        generate.generate(params, cfg, PROMPTS, max_new_tokens=2, x1_hook=hook_of, x1_hook_aux=keep,
                          ffn=decode.dense_ffn)


@pytest.mark.parametrize("bad", [{"temperature": float("nan")}, {"temperature": float("inf")}, {"temperature": -1.0},
                                 {"top_p": 0.0}, {"top_p": float("nan")}, {"top_k": -1}, {"chunk_tokens": 0}])
def test_bad_sampling_arguments_are_refused(bad: dict) -> None:
    cfg = CFGS["mha"]
    params = model.init_params(cfg, jax.random.key(3))
    with pytest.raises(UsageError):
        generate.generate(params, cfg, PROMPTS, max_new_tokens=2, **bad)


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


def test_cli_default_max_new_tokens_fits_the_context(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --max_new_tokens: 64 tokens, or as many as the context leaves (here 16 - the prompt's)."""
    prompt = "the quick brown fox jumps"
    assert generate_main.main(["generate", f"--checkpoint={workdir}", f"--prompt={prompt}"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < stats["new_tokens"] <= SEQ_LEN - stats["prompt_tokens"] < generate.DEFAULT_NEW_TOKENS


@pytest.mark.parametrize(("args", "needle"), [
    (["--prompt="], "prompt: empty"),
    (["--prompt=" + "the quick brown fox " * 10], "longer than the model's context of 16"),
    (["--prompt=hi", "--max_new_tokens=0"], "max_new_tokens: must be at least 1"),
    (["--prompt=hi", "--max_new_tokens=15"], "max_new_tokens: 15 new tokens after a prompt of 2 exceed the model's "
                                              "context of 16 tokens (the run's data.seq_len); ask for at most 14"),
    (["--prompt=hi", "--sparse"], "--thresholds=<dir>/sparse_mode.json"),
    (["--prompt=hi", "--checkpoint=/nonexistent/run"], "does not exist"),
    (["--prompt=abc\udcff\udcfedef"], "prompt: not valid UTF-8 text (byte 0xff at character 3)"),
    (["--prompt=hi", "--temperature=nan"], "finite temperature >= 0"),
    (["--prompt=hi", "--temperature=inf"], "finite temperature >= 0"),
    (["--prompt=hi", "--temperature=1", "--top_p=0"], "0 < top_p <= 1"),
    (["--prompt=hi", "--thresholds=x.json"], "add --sparse"),
    (["--prompt=hi", "--sparse", "--thresholds=/nonexistent/sparse_mode.json"], "sparse_mode.json not found"),
])
def test_cli_errors_are_one_line(workdir: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                 needle: str) -> None:
    assert generate_main.main(["generate", f"--checkpoint={workdir}", *args]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("generate: error: ") and needle in err[0], err


def test_past_the_context_is_refused_before_the_model_is_loaded(workdir: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """max_new_tokens=1e9 never reaches an allocation: it is refused before the checkpoint is read (this folder has
    none: a request within the context fails on that)."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "tokenizer.json"):
        shutil.copyfile(workdir / f, bare / f)
    args = ["generate", f"--checkpoint={bare}", "--prompt=hello world"]
    assert generate_main.main([*args, "--max_new_tokens=1000000000"]) == 1
    err = capsys.readouterr().err.strip()
    assert "1000000000 new tokens after a prompt of 2 exceed the model's context of 16" in err and "\n" not in err, err
    assert generate_main.main([*args, "--max_new_tokens=2"]) == 1
    assert "no checkpoint under" in capsys.readouterr().err


def test_cli_thresholds_file_sets_the_sparse_mode(workdir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The SiLU model that --sparse refuses decodes with the remedy its message names, --thresholds=<the
    sparse_mode.json analyze writes, or its folder>, as the library does with those thresholds in the config."""
    from tokenizers import Tokenizer

    cfg, params, tok_path = load_model(workdir)
    taus = [float(0.05 * n) for n in np.asarray(model.w_down_norms(params)).mean(axis=-1)]
    (tmp_path / "sparse_mode.json").write_text(json.dumps({"model.neuron_thresholds": taus}))
    tok = Tokenizer.from_file(str(tok_path))
    _, want = generate.generate(generate.prepare_sparse_params(params), cfg.replace(neuron_thresholds=tuple(taus)),
                                [tok.encode("hello world").ids], max_new_tokens=4, eos_id=tok.token_to_id(EOS_TOKEN),
                                ffn=generate.sparse_decode_ffn)
    assert min(want.sparsity_per_layer) > 0  # SiLU has no exact zeros without the sparse mode
    args = ["generate", f"--checkpoint={workdir}", "--prompt=hello world", "--max_new_tokens=4", "--sparse"]
    for where in (tmp_path / "sparse_mode.json", tmp_path):
        assert generate_main.main([*args, f"--thresholds={where}"]) == 0
        stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert stats["sparsity_per_layer"] == pytest.approx(want.sparsity_per_layer)
    (tmp_path / "three.json").write_text(json.dumps({"model.neuron_thresholds": [*taus, 0.1]}))
    assert generate_main.main([*args, f"--thresholds={tmp_path / 'three.json'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert "needs one value per layer (2), got 3" in err and "\n" not in err, err


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C: a decode of minutes stops within two seconds
# ---------------------------------------------------------------------------------------------------------------
LONG_CONTEXT = 65536  # KV cache slots of the long-decode model (16 MB): minutes of decoding on a CPU


@pytest.fixture(scope="module")
def long_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model with a context of LONG_CONTEXT tokens and a word-level tokenizer without an EOS token, so a
    decode runs to max_new_tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = tiny_model_config(vocab_size=VOCAB)
    wd = checkpoint.write_params_workdir(tmp_path_factory.mktemp("long") / "wd", cfg,
                                         model.init_params(cfg, jax.random.key(0)),
                                         run_config={"data": {"seq_len": LONG_CONTEXT}})
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(wd / "tokenizer.json"))
    return wd


def test_ctrl_c_stops_a_long_generate_within_two_seconds(long_workdir: Path) -> None:
    """SIGINT during a decode of ~60000 tokens: the process exits 130 within 2 s with one line on stderr saying how
    far it got. (An on-device loop over all the tokens cannot be interrupted: the process ran on for minutes.)"""
    cmd = [sys.executable, "-m", "prosparse_jax.main.generate", f"--checkpoint={long_workdir}", "--prompt=w1 w2 w3"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    t0 = time.monotonic()  # a short run's time: the long run is decoding by then (imports, load, compile)
    short = subprocess.run([*cmd, "--max_new_tokens=2"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    startup_s = time.monotonic() - t0
    assert short.returncode == 0, short.stderr
    proc = subprocess.Popen([*cmd, f"--max_new_tokens={LONG_CONTEXT - 3}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(startup_s + 2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        t_signal = time.monotonic()
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pytest.fail("generate still running 2 s after Ctrl-C")
        exit_s = time.monotonic() - t_signal
    finally:
        if proc.poll() is None:
            proc.kill()
        out, err = proc.communicate()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 130 and exit_s < 2 and out == "", (proc.returncode, exit_s, err)
    assert len(lines) == 1 and lines[0].startswith("generate: interrupted (Ctrl-C) after "), err
    assert int(lines[0].split(" after ")[1].split()[0]) > 0  # it was decoding


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


# ---------------------------------------------------------------------------------------------------------------
# Decoding with an activation predictor
# ---------------------------------------------------------------------------------------------------------------
def _with_thresholds(pred: dict, t: float) -> dict:
    return dict(pred, threshold_L=jnp.full_like(pred["threshold_L"], t))


@pytest.mark.parametrize("implementation", ["cpu_ffi", "cpu_gather"])
def test_a_predictor_of_recall_one_decodes_the_sparse_models_tokens(implementation: str) -> None:
    """Threshold -inf predicts every neuron: the predictor path emits the dense tokens; a threshold above every logit
    predicts none, so the FFN is empty (sparsity 1 in every layer) and the tokens change: the predictor is in the
    loop of every layer."""
    from prosparse_jax.predictor import core as predictor_core

    cfg = tiny_model_config(activation="relu", d_ff=256).replace(activation="fatrelu", activation_threshold=0.15)
    params = model.init_params(cfg, jax.random.key(7))
    pred = predictor_core.init_predictor(cfg, 8, jax.random.key(3))
    ffn = functools.partial(generate.sparse_decode_ffn, implementation=implementation)
    dense, _ = generate.generate(params, cfg, PROMPTS[:1], max_new_tokens=6)
    got, stats = generate.generate(generate.prepare_sparse_params(params, _with_thresholds(pred, -np.inf)), cfg,
                                   PROMPTS[:1], max_new_tokens=6, ffn=ffn)
    assert got == dense and min(stats.sparsity_per_layer) > 0.5
    _, none = generate.generate(generate.prepare_sparse_params(params, _with_thresholds(pred, 1e9)), cfg,
                                PROMPTS[:1], max_new_tokens=6, ffn=ffn)
    assert none.sparsity_per_layer == [1.0] * cfg.n_layers


@pytest.fixture(scope="module")
def saved_predictor(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A predictor of the CLI's (SiLU) model, saved as ``predictor train`` saves one, threshold -inf (recall 1)."""
    from prosparse_jax.predictor import core as predictor_core
    from prosparse_jax.predictor import io as predictor_io

    cfg, _, _ = load_model(workdir)
    path = tmp_path_factory.mktemp("pred") / "predictor"
    pred = _with_thresholds(predictor_core.init_predictor(cfg, 8, jax.random.key(0)), -np.inf)
    predictor_io.save_predictor(path, pred, {"rank": 8})
    return path


def test_cli_predictor_decodes_a_silu_model_with_its_set(workdir: Path, saved_predictor: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """--predictor implies the sparse decode; a SiLU model needs no thresholds with it, and a predictor of recall 1
    gives the dense decode's text."""
    args = ["generate", f"--checkpoint={workdir}", "--prompt=hello world", "--max_new_tokens=4"]
    assert generate_main.main(args) == 0
    dense = capsys.readouterr().out.strip().splitlines()
    assert generate_main.main([*args, f"--predictor={saved_predictor}"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    stats = json.loads(out[-1])
    assert out[:-1] == dense[:-1] and stats["sparse"] and stats["predictor"] == str(saved_predictor)


def test_cli_refuses_a_missing_predictor_or_one_of_another_model(workdir: Path, saved_predictor: Path,
                                                                 tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from prosparse_jax.predictor import core as predictor_core
    from prosparse_jax.predictor import io as predictor_io

    other = tmp_path / "other"
    cfg = tiny_model_config(vocab_size=VOCAB, activation="silu", d_ff=64)
    predictor_io.save_predictor(other, predictor_core.init_predictor(cfg, 8, jax.random.key(0)), {})
    args = ["generate", f"--checkpoint={workdir}", "--prompt=hi", "--max_new_tokens=2"]
    for path, needle in ((tmp_path / "none", "does not exist"), (other, "trained for another model")):
        assert generate_main.main([*args, f"--predictor={path}"]) == 1
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith("generate: error: ") and needle in err[0], err
