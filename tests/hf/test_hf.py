"""HF export / import / score: logits equivalence with transformers, exact round trips, clear errors."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # never download: every model here is built locally
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="hf_modules_"))  # remote code copies go here

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import TOKENIZER_TEXTS, write_bpe_tokenizer  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from prosparse_jax.config import ModelConfig  # noqa: E402
from prosparse_jax.digest import DIGEST_ALGORITHM, digests  # noqa: E402
from prosparse_jax.errors import HFConversionError, InputError, OutputError, UsageError  # noqa: E402
from prosparse_jax.hf import io as hf  # noqa: E402
from prosparse_jax.inference import score  # noqa: E402
from prosparse_jax.main import export_hf, import_hf  # noqa: E402
from prosparse_jax.main import score as score_main  # noqa: E402
from prosparse_jax.model import transformer as model  # noqa: E402
from prosparse_jax.training import checkpoint, model_io  # noqa: E402

TOL = 1e-4
VOCAB = 300  # byte-level BPE needs >= 256 (+ merges, + <|endoftext|>)


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bpe_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", VOCAB,
                               [*TOKENIZER_TEXTS, "sparse activations make inference fast"])


def tiny_cfg(**kw: object) -> ModelConfig:
    base = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, init_std=0.1,
                rope_theta=5000.0, norm_eps=1e-5)
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


def minicpm_cfg(**kw: object) -> ModelConfig:
    return tiny_cfg(scale_emb=12.0, scale_depth=1.4, dim_model_base=16, tie_embeddings=True, init_std=0.05, **kw)


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random params with non-trivial norm weights (so a wrong norm mapping shows)."""
    params = model.init_params(cfg, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    for k in ("attn_norm_LxD", "ffn_norm_LxD"):
        params["layers"][k] = jnp.asarray(1 + 0.2 * rng.standard_normal(params["layers"][k].shape), jnp.float32)
    params["final_norm_D"] = jnp.asarray(1 + 0.2 * rng.standard_normal(cfg.d_model), jnp.float32)
    return params


def ids_for(cfg: ModelConfig) -> np.ndarray:
    return np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 12))


def our_logits(cfg: ModelConfig, params: dict, ids: np.ndarray) -> np.ndarray:
    return np.asarray(model.forward(params, jnp.asarray(ids), cfg)[0])


def torch_logits(folder: Path, ids: np.ndarray, *, trust: bool = False) -> np.ndarray:
    m = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust, dtype=torch.float32)
    m.eval()
    with torch.no_grad():
        return m(torch.tensor(ids)).logits.float().numpy()


def make_workdir(path: Path, cfg: ModelConfig, params: dict, tokenizer_file: Path | None = None) -> Path:
    checkpoint.write_params_workdir(path, cfg, params)
    if tokenizer_file is not None:
        (path / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    return path


def assert_params_equal(a: dict, b: dict) -> None:
    fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (p, x), (_, y) in zip(fa, fb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))


def save_random_llama(folder: Path, *, act: str, tied: bool, kv_heads: int = 2, **overrides: object) -> None:
    """A random 2-layer LlamaForCausalLM (non-trivial norm weights) saved with ``save_pretrained``; ``overrides``
    replace or add LlamaConfig fields."""
    torch.manual_seed(0)
    fields: dict[str, object] = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, hidden_act=act, tie_word_embeddings=tied, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, initializer_range=0.1,
    )
    hcfg = transformers.LlamaConfig(**{**fields, **overrides})
    m = transformers.LlamaForCausalLM(hcfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    m.save_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------------
# HF -> ours
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("act", "tied", "kv_heads"), [("relu", False, 2), ("silu", True, 2), ("silu", False, 4)])
def test_import_random_llama_matches_transformers(tmp_path: Path, act: str, tied: bool, kv_heads: int) -> None:
    save_random_llama(tmp_path / "hf", act=act, tied=tied, kv_heads=kv_heads)
    cfg, params = hf.load_hf_folder(tmp_path / "hf")
    assert (cfg.activation, cfg.tie_embeddings, cfg.n_kv_heads, cfg.rope_theta) == (act, tied, kv_heads, 5000.0)
    ids = ids_for(cfg)
    ref = torch_logits(tmp_path / "hf", ids)
    np.testing.assert_allclose(our_logits(cfg, params, ids), ref, atol=TOL, rtol=0)
    # The CLI function writes a workdir that load_model reads back identically.
    wd = model_io.import_hf(tmp_path / "hf", tmp_path / "wd")
    cfg2, params2, _ = checkpoint.load_model(wd)
    assert cfg2 == cfg
    assert_params_equal(params2, jax.tree.map(np.asarray, params))


def test_import_bf16_weights_load_as_float32(tmp_path: Path) -> None:
    save_random_llama(tmp_path / "hf", act="relu", tied=False)
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    m.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    cfg, params = hf.load_hf_folder(tmp_path / "bf16")
    assert all(np.asarray(x).dtype == np.float32 for x in jax.tree.leaves(params))
    _, p32 = hf.load_hf_folder(tmp_path / "hf")
    bf = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16).astype(np.float32), p32)
    assert_params_equal(params, bf)


def test_import_pytorch_model_bin(tmp_path: Path) -> None:
    save_random_llama(tmp_path / "hf", act="silu", tied=False)
    from safetensors.torch import load_file

    (tmp_path / "bin").mkdir()
    torch.save(load_file(tmp_path / "hf" / "model.safetensors"), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_bytes((tmp_path / "hf" / "config.json").read_bytes())
    cfg, params = hf.load_hf_folder(tmp_path / "bin")
    cfg_st, params_st = hf.load_hf_folder(tmp_path / "hf")
    assert cfg == cfg_st
    assert_params_equal(params, params_st)


# ---------------------------------------------------------------------------------------------------------------
# ours -> HF
# ---------------------------------------------------------------------------------------------------------------
def test_minicpm_export_llama_format_loads_natively(tmp_path: Path, tokenizer_file: Path) -> None:
    cfg = minicpm_cfg(activation="relu", vocab_size=VOCAB)
    params = random_params(cfg)
    wd = make_workdir(tmp_path / "wd", cfg, params, tokenizer_file)
    out = model_io.export_hf(wd, tmp_path / "hf", fmt="llama")
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "llama" and "auto_map" not in raw and not raw["tie_word_embeddings"]
    assert not list(out.glob("*.py"))
    ids = ids_for(cfg)
    m = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False, dtype=torch.float32)
    assert type(m) is transformers.LlamaForCausalLM
    np.testing.assert_allclose(torch_logits(out, ids), our_logits(cfg, params, ids), atol=TOL, rtol=0)
    # Tokenizer: PreTrainedTokenizerFast with <|endoftext|> as bos / eos, same ids as the tokenizers file.
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    assert tok.eos_token == tok.bos_token == "<|endoftext|>"
    assert raw["eos_token_id"] == tok.eos_token_id
    from tokenizers import Tokenizer

    assert tok("hello world")["input_ids"] == Tokenizer.from_file(str(tokenizer_file)).encode("hello world").ids
    # Re-import of the folded model: a plain LLaMA config with the same logits.
    cfg2, params2 = hf.load_hf_folder(out)
    assert not cfg2.is_minicpm and not cfg2.tie_embeddings
    np.testing.assert_allclose(our_logits(cfg2, params2, ids), our_logits(cfg, params, ids), atol=TOL, rtol=0)


@pytest.mark.parametrize("fmt", ["llama", "minicpm"])
def test_export_import_round_trip_is_exact(tmp_path: Path, fmt: str) -> None:
    cfg = minicpm_cfg(activation="silu") if fmt == "minicpm" else tiny_cfg(activation="relu2", tie_embeddings=True)
    params = random_params(cfg)
    wd = make_workdir(tmp_path / "wd", cfg, params)
    out = model_io.export_hf(wd, tmp_path / "hf", fmt=fmt)
    model_io.import_hf(out, tmp_path / "wd2")
    cfg2, params2, _ = checkpoint.load_model(tmp_path / "wd2")
    assert cfg2 == cfg
    assert_params_equal(params2, jax.tree.map(np.asarray, params))
    ids = ids_for(cfg)
    np.testing.assert_allclose(torch_logits(out, ids, trust=fmt == "minicpm"), our_logits(cfg, params, ids),
                               atol=TOL, rtol=0)


@pytest.mark.parametrize(
    ("act", "kw"),
    [("fatrelu", {"activation_threshold": 0.25}), ("drelu", {}), ("relu", {"neuron_thresholds": (0.02, 0.03)})],
)
def test_remote_code_activations(tmp_path: Path, act: str, kw: dict) -> None:
    cfg = minicpm_cfg(activation=act, **kw)
    params = random_params(cfg)
    ids = ids_for(cfg)
    ours = our_logits(cfg, params, ids)
    dense_relu = our_logits(cfg.replace(activation="relu", activation_threshold=0.0, neuron_thresholds=()), params, ids)
    assert np.abs(ours - dense_relu).max() > 50 * TOL  # the activation really differs from plain relu here
    out = hf.save_hf_folder(cfg, params, tmp_path / "hf", fmt="llama")
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "prosparse_llama" and raw["prosparse_activation"] == act and "auto_map" in raw
    if act == "fatrelu":
        assert (raw["hidden_act"], raw["hidden_act_param"]) == ("fatrelu", 0.25)
    np.testing.assert_allclose(torch_logits(out, ids, trust=True), ours, atol=TOL, rtol=0)
    # Without remote code it must not load as something else: both Auto and the plain Llama class refuse.
    with pytest.raises(ValueError, match="prosparse_llama|trust_remote_code"):
        transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    with pytest.raises(KeyError):
        transformers.LlamaForCausalLM.from_pretrained(out)
    cfg2, params2 = hf.load_hf_folder(out)
    np.testing.assert_allclose(our_logits(cfg2, params2, ids), ours, atol=TOL, rtol=0)


def test_public_prosparse_style_config_imports_as_fatrelu(tmp_path: Path) -> None:
    save_random_llama(tmp_path / "hf", act="relu", tied=False)
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    raw.update(hidden_act="fatrelu", hidden_act_param=0.01, architectures=["SparseLlamaForCausalLM"])
    (tmp_path / "hf" / "config.json").write_text(json.dumps(raw))
    cfg, _ = hf.load_hf_folder(tmp_path / "hf")
    assert (cfg.activation, cfg.activation_threshold) == ("fatrelu", 0.01)


def test_sharded_bf16_export_loads_and_reimports(tmp_path: Path) -> None:
    cfg = minicpm_cfg(activation="relu")
    params = random_params(cfg)
    wd = make_workdir(tmp_path / "wd", cfg, params)
    out = model_io.export_hf(wd, tmp_path / "hf", max_shard_size="40KB")
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 2
    ids = ids_for(cfg)
    ours = our_logits(cfg, params, ids)
    np.testing.assert_allclose(torch_logits(out, ids), ours, atol=TOL, rtol=0)
    cfg2, params2 = hf.load_hf_folder(out)
    np.testing.assert_allclose(our_logits(cfg2, params2, ids), ours, atol=TOL, rtol=0)
    out16 = model_io.export_hf(wd, tmp_path / "hf16", dtype="bfloat16", max_shard_size="40KB")
    _, params16 = hf.load_hf_folder(out16)
    assert_params_equal(params16, jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(np.float32), params2))


# ---------------------------------------------------------------------------------------------------------------
# score
# ---------------------------------------------------------------------------------------------------------------
def test_score_matches_log_softmax(tmp_path: Path, tokenizer_file: Path) -> None:
    cfg = tiny_cfg(vocab_size=VOCAB, activation="relu")
    params = random_params(cfg)
    wd = make_workdir(tmp_path / "wd", cfg, params, tokenizer_file)
    text = "the quick brown fox jumps"
    res = score.score(wd, text)
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_file)).encode(text).ids
    assert res["token_ids"] == ids and res["num_tokens"] == len(ids) and len(res["tokens"]) == len(ids)
    logp = np.asarray(jax.nn.log_softmax(our_logits(cfg, params, np.asarray([ids]))[0], axis=-1))
    expected = [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert res["logprobs"][0] is None
    # Per token: score's jitted forward vs the eager one here; |logprob| <= ~8 (float32 ulp 4.8e-7), so 1e-5 is
    # ~20 ulp of float32 round-off, while a shifted token / wrong sign / unnormalised logit is off by O(1).
    lp_tol = 1e-5
    np.testing.assert_allclose(res["logprobs"][1:], expected, atol=lp_tol, rtol=0)
    # The total is the float64 sum of exactly the reported per-token values (no term missing, none extra) ...
    assert res["total_logprob"] == pytest.approx(math.fsum(res["logprobs"][1:]), rel=1e-12)
    # ... and agrees with the reference within the per-token tolerance times the number of terms (the total is ~-77:
    # a fixed absolute tolerance would sit at the float32 ulp of the sum). Dropping any one token would not fit:
    sum_tol = lp_tol * len(expected)
    assert min(abs(e) for e in expected) > 10 * sum_tol
    np.testing.assert_allclose(res["total_logprob"], math.fsum(expected), atol=sum_tol, rtol=0)
    # The same model as an HF folder scores the same.
    out = model_io.export_hf(wd, tmp_path / "hf")
    res_hf = score.score(out, text)
    np.testing.assert_allclose(res_hf["logprobs"][1:], res["logprobs"][1:], atol=lp_tol, rtol=0)


def test_score_without_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tiny_cfg()
    wd = make_workdir(tmp_path / "wd", cfg, random_params(cfg))
    with pytest.raises(checkpoint.CheckpointError, match="tokenizer.json"):
        score.score(wd, "hello")


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"model_type": "gpt2"}, "model_type"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "rope_type"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu_new"}, "hidden_act"),
    ],
)
def test_unsupported_architecture_names_the_field(tmp_path: Path, patch: dict, field: str) -> None:
    save_random_llama(tmp_path / "hf", act="relu", tied=False)
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    raw.update(patch)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(HFConversionError, match=field):
        model_io.import_hf(tmp_path / "hf", tmp_path / "wd")
    assert not (tmp_path / "wd").exists()


def test_shape_mismatch_and_missing_weights(tmp_path: Path) -> None:
    save_random_llama(tmp_path / "hf", act="relu", tied=False)
    cfg_file = tmp_path / "hf" / "config.json"
    raw = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**raw, "intermediate_size": 80}))
    with pytest.raises(HFConversionError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\(96, 64\)"):
        hf.load_hf_folder(tmp_path / "hf")
    cfg_file.write_text(json.dumps({**raw, "num_hidden_layers": 3}))
    with pytest.raises(HFConversionError, match=r"model\.layers\.2\..*missing"):
        hf.load_hf_folder(tmp_path / "hf")
    cfg_file.write_text(json.dumps(raw))
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(HFConversionError, match="no weight file"):
        hf.load_hf_folder(tmp_path / "hf")


def test_missing_shard_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tiny_cfg()
    out = hf.save_hf_folder(cfg, random_params(cfg), tmp_path / "hf", max_shard_size="40KB")
    shard = sorted(out.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(HFConversionError, match=shard.name):
        hf.load_hf_folder(out)


def test_non_empty_output_folder_is_refused_and_untouched(tmp_path: Path) -> None:
    cfg = tiny_cfg()
    wd = make_workdir(tmp_path / "wd", cfg, random_params(cfg))
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("precious")
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not empty.*overwrite"):
        model_io.export_hf(wd, out)
    assert (out / "config.json").read_text() == "precious" and sorted(p.name for p in out.iterdir()) == [
        "config.json", "notes.txt"]
    model_io.export_hf(wd, out, overwrite=True)  # replaces export files, keeps the others
    assert (out / "notes.txt").read_text() == "keep me"
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    # import_hf refuses an existing workdir.
    with pytest.raises(OutputError, match="already holds a run"):
        model_io.import_hf(out, wd)


def test_cli_mains(tmp_path: Path, tokenizer_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = minicpm_cfg(vocab_size=VOCAB)
    params = random_params(cfg)
    wd = make_workdir(tmp_path / "wd", cfg, params, tokenizer_file)
    out = tmp_path / "hf"
    # export: exit 0, the message names the folder it wrote, --format reaches the writer.
    assert export_hf.main(["export_hf", f"--workdir={wd}", f"--out={out}", "--format=minicpm"]) == 0
    printed = capsys.readouterr()
    assert str(out) in printed.out and "format=minicpm" in printed.out and not printed.err
    assert json.loads((out / "config.json").read_text())["model_type"] == "minicpm"
    # A second export into the same folder without --overwrite: exit 1, an error naming the folder and the flag,
    # and every file of the first export still byte for byte there.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert export_hf.main(["export_hf", f"--workdir={wd}", f"--out={out}", "--format=llama"]) == 1
    printed = capsys.readouterr()
    assert not printed.out and str(out) in printed.err and "not empty" in printed.err and "overwrite" in printed.err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # import: exit 0, names the new workdir, which holds exactly the exported model (minicpm keeps it unfolded).
    wd2 = tmp_path / "wd2"
    assert import_hf.main(["import_hf", f"--hf={out}", f"--workdir={wd2}"]) == 0
    assert str(wd2) in capsys.readouterr().out
    cfg2, params2, tok2 = checkpoint.load_model(wd2)
    assert cfg2 == cfg and tok2 is not None and tok2.read_bytes() == tokenizer_file.read_bytes()
    assert_params_equal(params2, jax.tree.map(np.asarray, params))
    assert import_hf.main(["import_hf", f"--hf={out}", f"--workdir={wd2}"]) == 1  # never over an existing run
    assert "already holds a run" in capsys.readouterr().err
    # score prints, as JSON, what score.score returns (here for the imported copy of the same model).
    assert score_main.main(["score", f"--checkpoint={wd2}", "--text=hello world"]) == 0
    res = json.loads(capsys.readouterr().out)
    ref = score.score(wd, "hello world")
    assert {k: v for k, v in res.items() if k != "context"} == {k: v for k, v in ref.items() if k != "context"}
    # the imported copy knows the context its export recorded (the source workdir here records none: the default)
    exported_ctx = json.loads((out / "config.json").read_text())["max_position_embeddings"]
    assert res["context"]["window"] == exported_ctx and ref["context"]["window"] == score.DEFAULT_WINDOW
    assert score_main.main(["score", f"--checkpoint={wd}"]) == 1  # neither --text nor --input


# ---------------------------------------------------------------------------------------------------------------
# Integrity: digests in exports, contained shards, one-line refusals
# ---------------------------------------------------------------------------------------------------------------
def flip_bits(path: Path, tensor: str, flips: int = 100) -> None:
    """Flips an exponent bit in each of the first ``flips`` float32 words of ``tensor``'s data in a safetensors file."""
    b = bytearray(path.read_bytes())
    n = int.from_bytes(b[:8], "little")
    start, end = json.loads(b[8:8 + n])[tensor]["data_offsets"]
    assert end - start >= 4 * flips
    for i in range(8 + n + start, 8 + n + start + 4 * flips, 4):
        b[i + 3] ^= 0x40
    path.write_bytes(bytes(b))


def load_warnings(folder: Path) -> list[str]:
    """The warnings ``load_hf_folder(folder)`` gives (every one, none deduplicated)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf.load_hf_folder(folder)
    return [str(w.message) for w in caught]


def test_flipped_bits_in_an_export_are_refused_naming_the_tensor(tmp_path: Path, tokenizer_file: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_cfg(vocab_size=VOCAB, activation="relu")
    wd = make_workdir(tmp_path / "wd", cfg, random_params(cfg), tokenizer_file)
    out = model_io.export_hf(wd, tmp_path / "hf")
    text = "the quick brown fox jumps over the lazy dog"
    assert score.score(out, text)["num_tokens"] > 1  # the intact export scores
    tensor = "model.layers.1.mlp.up_proj.weight"
    flip_bits(out / "model.safetensors", tensor)
    with pytest.raises(InputError, match=rf"model\.safetensors: tensor '{re.escape(tensor)}' does not match"):
        score.score(out, text)
    assert score_main.main(["score", f"--checkpoint={out}", f"--text={text}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and tensor in err and "re-export or re-download" in err
    # import_hf refuses it too: the damaged weights never become a workdir with fresh digests of their own.
    assert import_hf.main(["import_hf", f"--hf={out}", f"--workdir={tmp_path / 'imported'}"]) == 1
    assert tensor in capsys.readouterr().err and not (tmp_path / "imported").exists()


def test_export_digests_are_of_the_stored_bytes_and_verify(tmp_path: Path) -> None:
    from safetensors import safe_open

    cfg = tiny_cfg(activation="relu")
    params = random_params(cfg)
    wd = make_workdir(tmp_path / "wd", cfg, params)
    for dtype in ("float32", "bfloat16"):
        out = model_io.export_hf(wd, tmp_path / dtype, dtype=dtype, max_shard_size="40KB")
        shards = sorted(out.glob("model-*.safetensors"))
        assert len(shards) > 2
        for shard in shards:
            with safe_open(str(shard), framework="numpy") as f:
                meta = f.metadata()
                stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            assert meta["format"] == "pt" and meta[hf.DIGEST_ALGORITHM_KEY] == DIGEST_ALGORITHM
            assert {a.dtype for a in stored.values()} == {np.dtype(hf.EXPORT_DTYPES[dtype])}
            assert json.loads(meta[hf.DIGESTS_KEY]) == digests({"t": stored})["t"]
        assert load_warnings(out) == []  # verified: no "unverified" warning
    model_io.import_hf(tmp_path / "float32", tmp_path / "wd2")  # the round trip stays bit-exact
    assert_params_equal(checkpoint.load_model(tmp_path / "wd2")[1], jax.tree.map(np.asarray, params))


def test_foreign_folder_loads_with_one_warning(tmp_path: Path) -> None:
    save_random_llama(tmp_path / "hf", act="relu", tied=False)
    assert [w for w in load_warnings(tmp_path / "hf") if "digests" in w] == [
        f"{tmp_path / 'hf'}: the weights carry no prosparse_jax digests (not an export of this project, or an older "
        "one), so damage to them cannot be detected; they load as they are"]
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    m.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    assert len([w for w in load_warnings(tmp_path / "sharded") if "digests" in w]) == 1  # once, not per shard


def test_shard_without_digests_among_export_shards_is_refused(tmp_path: Path) -> None:
    cfg = tiny_cfg()
    out = hf.save_hf_folder(cfg, random_params(cfg), tmp_path / "hf", max_shard_size="40KB")
    from safetensors.numpy import load_file, save_file

    shard = sorted(out.glob("model-*.safetensors"))[1]
    save_file(load_file(shard), shard, metadata={"format": "pt"})  # same tensors, digests stripped
    with pytest.raises(InputError, match=rf"{shard.name}: carries no prosparse_jax digests while"):
        hf.load_hf_folder(out)


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_shard_outside_the_folder_is_refused(tmp_path: Path, where: str) -> None:
    cfg = tiny_cfg()
    src = hf.save_hf_folder(cfg, random_params(cfg), tmp_path / "src", max_shard_size="40KB")
    trav = tmp_path / "trav"
    trav.mkdir()
    shutil.copyfile(src / "config.json", trav / "config.json")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    prefix = "../src/" if where == "parent" else f"{src.absolute()}/"
    index["weight_map"] = {k: prefix + v for k, v in index["weight_map"].items()}
    (trav / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match=r"model\.safetensors\.index\.json: shard '.*' lies outside"):
        hf.load_hf_folder(trav)
    assert import_hf.main(["import_hf", f"--hf={trav}", f"--workdir={tmp_path / 'wd'}"]) == 1
    assert not (tmp_path / "wd").exists()


def test_exported_files_share_one_mode(tmp_path: Path, tokenizer_file: Path) -> None:
    cfg = tiny_cfg(vocab_size=VOCAB)
    wd = make_workdir(tmp_path / "wd", cfg, random_params(cfg), tokenizer_file)
    old = os.umask(0o022)
    try:
        for name, shard_size in (("one", "2GB"), ("sharded", "40KB")):
            out = model_io.export_hf(wd, tmp_path / name, max_shard_size=shard_size)
            modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
            assert set(modes.values()) == {0o644}, modes
    finally:
        os.umask(old)


def test_config_json_that_is_not_an_object_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_cfg()
    wd = make_workdir(tmp_path / "wd", cfg, random_params(cfg))
    folder = hf.save_hf_folder(cfg, random_params(cfg), tmp_path / "hf")
    for d in (wd, folder):
        (d / "config.json").write_text("[]")
        with pytest.raises(InputError, match=r"config\.json: not a JSON object"):
            model_io.load_model(d)
        assert score_main.main(["score", f"--checkpoint={d}", "--text=hello"]) == 1
        assert import_hf.main(["import_hf", f"--hf={d}", f"--workdir={tmp_path / 'new'}"]) == 1
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 2 and all("config.json: not a JSON object" in line for line in err), err
    with pytest.raises(InputError, match=r"config\.json: not a JSON object but an array"):
        hf.load_hf_folder(folder)


def test_pickle_with_a_forbidden_global_is_one_line_and_never_runs(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    save_random_llama(tmp_path / "hf", act="relu", tied=False)
    folder, marker = tmp_path / "pickle", tmp_path / "executed"

    class Evil:
        def __reduce__(self) -> tuple:
            return os.mkdir, (str(marker),)  # would create ``marker`` if the file were ever unpickled unsafely

    folder.mkdir()
    shutil.copyfile(tmp_path / "hf" / "config.json", folder / "config.json")
    torch.save({"model.embed_tokens.weight": Evil()}, folder / "pytorch_model.bin")  # pickles; runs nothing
    with pytest.raises(InputError, match=r"pytorch_model\.bin: refused: loading it needs the Python global "
                                         r"(posix|os)\.mkdir.*nothing was executed"):
        hf.load_hf_folder(folder)
    capsys.readouterr()  # transformers' progress bar of save_random_llama
    assert import_hf.main(["import_hf", f"--hf={folder}", f"--workdir={tmp_path / 'wd'}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pytorch_model.bin: refused" in err
    assert not marker.exists() and not (tmp_path / "wd").exists()


def test_export_records_the_runs_context(tmp_path: Path, tokenizer_file: Path) -> None:
    cfg = tiny_cfg(vocab_size=VOCAB, activation="relu")
    wd = checkpoint.write_params_workdir(tmp_path / "wd", cfg, random_params(cfg), run_config={"data": {"seq_len": 8}})
    (wd / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    out = model_io.export_hf(wd, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 8
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 8
    # score on the export uses the context of the workdir: the same windows, the same log-probabilities.
    text = " ".join(TOKENIZER_TEXTS)
    on_wd, on_hf = score.score(wd, text), score.score(out, text)
    assert on_wd["context"]["window"] == on_hf["context"]["window"] == 8 and on_hf["context"]["windows"] > 1
    np.testing.assert_allclose(on_hf["logprobs"][1:], on_wd["logprobs"][1:], atol=1e-5, rtol=0)
    # An explicit value wins; an imported folder keeps its own through import and export.
    out2 = model_io.export_hf(wd, tmp_path / "hf2", max_position_embeddings=32)
    assert json.loads((out2 / "config.json").read_text())["max_position_embeddings"] == 32
    model_io.import_hf(out2, tmp_path / "imported")
    out3 = model_io.export_hf(tmp_path / "imported", tmp_path / "hf3")
    assert json.loads((out3 / "config.json").read_text())["max_position_embeddings"] == 32
    with pytest.raises(UsageError, match="max_position_embeddings"):
        model_io.export_hf(wd, tmp_path / "hf4", max_position_embeddings=0)


# ---------------------------------------------------------------------------------------------------------------
# Training from an HF folder
# ---------------------------------------------------------------------------------------------------------------
def test_train_init_from_hf_folder_starts_from_its_weights(tmp_path: Path, tokenizer_file: Path) -> None:
    from conftest import small_run_config, write_corpus

    from prosparse_jax.training import train as train_mod
    from prosparse_jax.training.metrics import read_metrics

    c = small_run_config(write_corpus(tmp_path / "corpus", 20), steps=2, activation="silu")
    m = c.model
    folder = tmp_path / "hf"
    save_random_llama(folder, act="silu", tied=False, kv_heads=m.n_kv_heads, vocab_size=m.vocab_size,
                      hidden_size=m.d_model, intermediate_size=m.d_ff, num_hidden_layers=m.n_layers,
                      num_attention_heads=m.n_heads, rms_norm_eps=m.norm_eps)
    (folder / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    c.model.update(rope_theta=5000.0)  # the HF model's; init_from takes weights, the rest of the model from config
    c.init_from = str(folder)
    c.optim.lr = 1e-9  # (almost) no update: the trained model is the HF model
    train_mod.train(c, tmp_path / "run")
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == tokenizer_file.read_bytes()
    assert [r["step"] for r in read_metrics(tmp_path / "run", "train")] == [1, 2]
    cfg, params, _ = checkpoint.load_model(tmp_path / "run")
    ids = ids_for(cfg)
    # A random init (init_from ignored) or a wrong weight mapping is off by O(1) here.
    np.testing.assert_allclose(our_logits(cfg, params, ids), torch_logits(folder, ids), atol=TOL, rtol=0)
