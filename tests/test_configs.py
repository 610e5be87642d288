"""Every config file and arg builds (jax.eval_shape), describe matches the papers' numbers, bad configs fail clearly."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from ml_collections import config_flags

from prosparse_jax.config import ConfigError
from prosparse_jax.main.describe import describe
from prosparse_jax.model.transformer import abstract_params
from prosparse_jax.run_config import resolve

ROOT = Path(__file__).resolve().parents[1]
SL_ARGS = [f"{s}-{a}" for s in ("0.1b", "0.2b", "0.4b", "0.8b", "1.2b") for a in ("relu", "silu")] + [
    "0.1b-fatrelu", "0.1b-drelu", "0.1b-relu2", "0.1b-gelu"]
PS_ARGS = ["tiny", "tiny-silu", "minicpm-1b", "llama2-7b", "llama2-13b"]


def load(file: str, arg: str):
    return config_flags.config_flags._LoadConfigModule("cfg", str(ROOT / "configs" / file)).get_config(arg)


@pytest.mark.parametrize("file,arg", [("sparsing_law.py", a) for a in SL_ARGS] + [("prosparse.py", a) for a in PS_ARGS])
def test_every_config_builds_abstractly(file, arg):
    rc = resolve(load(file, arg))
    shapes = abstract_params(rc.model)
    assert sum(x.size for x in jax.tree.leaves(shapes)) == rc.model.params_total
    assert rc.sparsity.stages[-1][1] == rc.train.steps


@pytest.mark.parametrize("file,arg,key,expected,tol", [
    ("sparsing_law.py", "0.1b-relu", "params_non_embedding", 1.085e8, 0.01),
    ("sparsing_law.py", "1.2b-silu", "params_non_embedding", 1.182e9, 0.01),
    ("prosparse.py", "llama2-7b", "params_total", 6.74e9, 0.01),
    ("prosparse.py", "minicpm-1b", "params_total", 1.36e9, 0.02),
])
def test_describe_matches_reference(file, arg, key, expected, tol):
    d = describe(resolve(load(file, arg)))
    assert abs(d[key] - expected) / expected < tol, d[key]


def test_flops_per_token_formula():
    rc = resolve(load("prosparse.py", "llama2-7b"))
    m = rc.model
    d = describe(rc)
    n_matmul = d["params_non_embedding"] - (2 * m.n_layers + 1) * m.d_model + m.d_model * m.vocab_size
    assert d["flops_per_token"] == 6 * n_matmul + 6 * m.n_layers * m.d_model * (4096 + 1)


def test_sparsing_law_0_4b_published_shape():
    m = resolve(load("sparsing_law.py", "0.4b-relu")).model
    assert (m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff, m.vocab_size) == (1280, 24, 10, 10, 3200, 122753)


@pytest.mark.parametrize("override,field", [
    (dict(activation="rleu"), "model.activation"),
    (dict(n_heads=5), "model.n_heads"),
    (dict(n_kv_heads=3), "model.n_kv_heads"),
    (dict(d_ff=0), "model.d_ff"),
    (dict(activation_threshold=-0.1), "model.activation_threshold"),
    (dict(dtype="fp8"), "model.dtype"),
])
def test_bad_model_config_names_field(override, field):
    c = load("prosparse.py", "tiny")
    c.model.update(override)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        resolve(c)


@pytest.mark.parametrize("section,field,value,match", [
    ("sparsity", "stages", [[0.0, 10.5]], r"sparsity\.stages: stage 0: steps must be a positive integer"),
    ("sparsity", "stages", [[0.0, 10], ["1e-3", 20]], r"sparsity\.stages: stage 1: lambda must be a number"),
    ("sparsity", "final_threshold", -1.0, r"sparsity\.final_threshold"),
    ("train", "steps", 10.0, r"train\.steps: must be a positive integer"),
    ("train", "progress_bar", 1, r"train\.progress_bar: must be true or false"),
    ("data", "seq_len", 0, r"data\.seq_len"),
    ("optim", "lr", 0.0, r"optim\.lr"),
])
def test_bad_value_in_any_section_names_field(section, field, value, match):
    """Every section is validated before any value is converted (a step of 10.5 must not become 10)."""
    c = load("prosparse.py", "tiny").to_dict()  # a plain dict: ConfigDict's own type check would catch some first
    c[section][field] = value
    with pytest.raises(ConfigError, match=match):
        resolve(c)


@pytest.mark.parametrize("section", ["model", "data", "optim", "train", "sparsity"])
def test_unknown_field_in_any_section_is_an_error(section):
    c = load("prosparse.py", "tiny").to_dict()
    c[section]["nonexistent_field"] = 1
    with pytest.raises(ConfigError, match=rf"{section}: unknown field\(s\) \['nonexistent_field'\]; valid fields"):
        resolve(c)


def test_bad_config_arg():
    with pytest.raises(ConfigError, match="unknown scale"):
        load("sparsing_law.py", "3b-relu")
    with pytest.raises(ConfigError, match="unknown activation"):
        load("sparsing_law.py", "0.1b-swish")


def _describe_cli(*args):
    return subprocess.run([sys.executable, "-m", "prosparse_jax.main.describe", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_describe_cli_and_bad_config_exit_codes():
    ok = _describe_cli("--config=configs/sparsing_law.py:0.4b-relu")
    assert ok.returncode == 0, ok.stderr
    d = json.loads(ok.stdout)
    for k in ("params_total", "params_non_embedding", "flops_per_token", "d_model", "n_layers", "d_ff",
              "vocab_size", "activation"):
        assert k in d
    assert d["activation"] == "relu"
    bad = _describe_cli("--config=configs/prosparse.py:tiny", "--config.model.activation=rleu")
    assert bad.returncode != 0 and "model.activation" in bad.stderr and "choose one of" in bad.stderr
    bad = _describe_cli("--config=configs/prosparse.py:tiny", "--config.model.n_heads=3")
    assert bad.returncode != 0 and "model.n_heads" in bad.stderr


@pytest.mark.parametrize("scale,heads,tokens", [("0.1b", 6, 327_680), ("0.2b", 8, 589_824), ("0.4b", 10, 786_432),
                                                ("0.8b", 12, 1_179_648), ("1.2b", 14, 1_572_864)])
def test_sparsing_law_tokens_per_step_and_heads(scale, heads, tokens):
    """Sparsing Law Table 3 tokens per step; heads of the public configs (head width 128); every checkpoint kept."""
    rc = resolve(load("sparsing_law.py", f"{scale}-relu"))
    assert describe(rc)["tokens_per_step"] == tokens
    assert (rc.model.n_heads, rc.model.n_kv_heads, rc.model.head_dim) == (heads, heads, 128)
    assert rc.train.keep_period == rc.train.checkpoint_every


def test_describe_cli_prints_paper_tokens_per_step():
    out = subprocess.run([sys.executable, "-m", "prosparse_jax.main.describe",
                          "--config=configs/sparsing_law.py:1.2b-relu"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out)["tokens_per_step"] == 1_572_864


def test_minicpm_lr_decays_over_the_whole_last_stage():
    """ProSparse MiniCPM-1B: WSD decay from step 35k (end of the last lambda ramp) to 95k, lambda held at 5e-2."""
    from prosparse_jax.training import optim, schedules

    rc = resolve(load("prosparse.py", "minicpm-1b"))
    _, lr = optim.make_optimizer(rc.optim, rc.train.steps, rc.model.d_model)
    peak = rc.optim.lr
    assert float(lr(34_999)) == pytest.approx(peak, rel=1e-6) and float(lr(35_000)) == pytest.approx(peak, rel=1e-6)
    assert float(lr(35_100)) < peak and float(lr(95_000)) == pytest.approx(peak * rc.optim.min_lr_ratio, rel=1e-5)
    lam = schedules.reg_factor_numpy(rc.sparsity.stages, 35_000)
    assert lam == schedules.reg_factor_numpy(rc.sparsity.stages, 95_000) == pytest.approx(5e-2)


@pytest.mark.parametrize("arg", ["minicpm-1b", "llama2-7b", "llama2-13b"])
def test_paper_configs_use_the_literal_l1_sum(arg):
    assert resolve(load("prosparse.py", arg)).sparsity.l1_reduction == "sum"
