"""Every config file and arg builds (jax.eval_shape) and matches the papers; a bad config names its field."""

import jax
import pytest
from conftest import load_config

from prosparse_jax.config import (
    SECTIONS,
    RunConfig,
    base_config,
    resolve,
    scale_stages,
    validate_stages,
)
from prosparse_jax.errors import ConfigError
from prosparse_jax.model.transformer import abstract_params
from prosparse_jax.training import optim, schedules
from prosparse_jax.training.memory_plan import describe

SL_ARGS = [f"{s}-{a}" for s in ("0.1b", "0.2b", "0.4b", "0.8b", "1.2b") for a in ("relu", "silu")] + [
    "0.1b-fatrelu", "0.1b-drelu", "0.1b-relu2", "0.1b-gelu"]
PS_ARGS = ["tiny", "tiny-silu", "minicpm-1b", "llama2-7b", "llama2-13b"]


@pytest.mark.parametrize("ref", [f"configs/sparsing_law.py:{a}" for a in SL_ARGS] +
                         [f"configs/prosparse.py:{a}" for a in PS_ARGS])
def test_every_config_builds_abstractly(ref):
    rc = resolve(load_config(ref))
    shapes = abstract_params(rc.model)
    assert sum(x.size for x in jax.tree.leaves(shapes)) == rc.model.params_total
    assert rc.sparsity.stages[-1][1] == rc.train.steps


def test_base_config_resolves_to_the_dataclass_defaults():
    """base_config() is generated from the sections: resolving it gives every section at its defaults."""
    rc = resolve(base_config())
    assert rc == RunConfig(**{name: cls() for name, cls in SECTIONS.items()})


def test_list_fields_are_overridable_on_the_command_line():
    c = load_config("configs/prosparse.py:tiny", "--config.sparsity.stages=((0, 10), (5e-5, 20))",
                    "--config.train.steps=20", "--config.model.neuron_thresholds=(0.1, 0.2, 0.3, 0.4)")
    rc = resolve(c)
    assert rc.sparsity.stages == ((0.0, 10), (5e-5, 20))
    assert rc.model.neuron_thresholds == (0.1, 0.2, 0.3, 0.4)


@pytest.mark.parametrize("override,match", [
    ("--config.model.neuron_thresholds=abc",
     r"^model\.neuron_thresholds: 'abc' is a string, not a tuple of numbers; give one number >= 0 per layer, e\.g\. "
     r"\(0\.1, 0\.2, 0\.3, 0\.4\)"),
    ("--config.model.neuron_thresholds=(0.1, abc, 0.3, 0.4)",
     r"^model\.neuron_thresholds: '\(0\.1, abc, .*' is a string"),
    ("--config.model.neuron_thresholds=[[0.1], 0.2, 0.3, 0.4]", r"^model\.neuron_thresholds: got .*; give one number"),
    ("--config.sparsity.stages=abc",
     r"^sparsity\.stages: 'abc' is a string, not a table of numbers; give \(lambda, steps\) pairs, e\.g\. "
     r"\[\[0, 100\], \[5e-5, 200\]\]$"),
    ("--config.sparsity.stages=[(0, 10), (5e-5, x)]", r"^sparsity\.stages: '\[\(0, 10\), \(5e-5, x\)\]' is a string"),
])
def test_override_that_is_not_a_literal_is_one_line_naming_the_field_and_the_form(override, match):
    """An override ml_collections cannot read as a literal arrives as a string: one ConfigError naming the field and
    the expected form, never a raw ValueError nor the string split into characters."""
    with pytest.raises(ConfigError, match=match) as e:
        resolve(load_config("configs/prosparse.py:tiny", override))
    assert "\n" not in str(e.value) and "'a', 'b'" not in str(e.value)


def test_a_stages_string_carrying_code_is_refused_not_evaluated(tmp_path):
    marker = tmp_path / "executed"
    override = f"--config.sparsity.stages=[(0, __import__('pathlib').Path({str(marker)!r}).touch())]"
    with pytest.raises(ConfigError, match=r"^sparsity\.stages: .* is a string, not a table of numbers"):
        resolve(load_config("configs/prosparse.py:tiny", override))
    assert not marker.exists()


@pytest.mark.parametrize("ref,key,expected,tol", [
    ("configs/sparsing_law.py:0.1b-relu", "params_non_embedding", 1.085e8, 0.01),
    ("configs/sparsing_law.py:1.2b-silu", "params_non_embedding", 1.182e9, 0.01),
    ("configs/prosparse.py:llama2-7b", "params_total", 6.74e9, 0.01),
    ("configs/prosparse.py:minicpm-1b", "params_total", 1.36e9, 0.02),
])
def test_describe_matches_reference(ref, key, expected, tol):
    d = describe(resolve(load_config(ref)))
    assert abs(d[key] - expected) / expected < tol, d[key]


def test_flops_per_token_of_llama2_7b():
    """LLaMA2-7B at T=4096: 6 x its 6,738,415,616 published parameters less the input embedding (32000 x 4096, a
    lookup), plus causal attention: half of PaLM's 12 * L * d * T (Chowdhery et al. 2022, App. B)."""
    m = resolve(load_config("configs/prosparse.py:llama2-7b")).model
    expected = 6 * (6_738_415_616 - 32000 * 4096) + 12 * 32 * 4096 * 4096 / 2
    assert m.flops_per_token(4096) == pytest.approx(expected, rel=1e-3)


def test_sparsing_law_0_4b_published_shape():
    m = resolve(load_config("configs/sparsing_law.py:0.4b-relu")).model
    assert (m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff, m.vocab_size) == (1280, 24, 10, 10, 3200, 122753)


@pytest.mark.parametrize("scale,heads,tokens", [("0.1b", 6, 327_680), ("0.2b", 8, 589_824), ("0.4b", 10, 786_432),
                                                ("0.8b", 12, 1_179_648), ("1.2b", 14, 1_572_864)])
def test_sparsing_law_tokens_per_step_and_heads(scale, heads, tokens):
    """Sparsing Law Table 3 tokens per step; heads of the public configs (head width 128); every checkpoint kept."""
    rc = resolve(load_config(f"configs/sparsing_law.py:{scale}-relu"))
    assert describe(rc)["tokens_per_step"] == tokens
    assert (rc.model.n_heads, rc.model.n_kv_heads, rc.model.head_dim) == (heads, heads, 128)
    assert rc.train.keep_period == rc.train.checkpoint_every


def test_minicpm_lr_decays_over_the_whole_last_stage():
    """ProSparse MiniCPM-1B: WSD decay from step 35k (end of the last lambda ramp) to 95k, lambda held at 5e-2."""
    rc = resolve(load_config("configs/prosparse.py:minicpm-1b"))
    _, lr = optim.make_optimizer(rc.optim, rc.train.steps, rc.model.d_model)
    peak = rc.optim.lr
    assert float(lr(34_999)) == pytest.approx(peak, rel=1e-6) and float(lr(35_000)) == pytest.approx(peak, rel=1e-6)
    assert float(lr(35_100)) < peak and float(lr(95_000)) == pytest.approx(peak * rc.optim.min_lr_ratio, rel=1e-5)
    lam = jax.jit(schedules.reg_factor_schedule(rc.sparsity.stages))
    assert float(lam(35_000)) == float(lam(95_000)) == pytest.approx(5e-2)


# ---------------------------------------------------------------------------------------------------------------
# Bad configs: one error naming section.field and the fix
# ---------------------------------------------------------------------------------------------------------------
def test_bad_value_on_the_command_line_names_the_field_and_the_nearest_choice():
    c = load_config("configs/prosparse.py:tiny", "--config.model.activation=rleu")
    with pytest.raises(ConfigError, match=r"^model\.activation: unknown activation 'rleu' \(did you mean 'relu'\?\); "
                                          r"choose one of: silu, relu"):
        resolve(c)


@pytest.mark.parametrize("override,field", [
    (dict(n_heads=5), "model.n_heads"),
    (dict(n_kv_heads=3), "model.n_kv_heads"),
    (dict(d_ff=0), "model.d_ff"),
    (dict(activation_threshold=-0.1), "model.activation_threshold"),
    (dict(dtype="fp8"), "model.dtype"),
])
def test_bad_model_config_names_field(override, field):
    c = load_config("configs/prosparse.py:tiny")
    c.model.update(override)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        resolve(c)


@pytest.mark.parametrize("section,field,value,match", [
    ("sparsity", "stages", [[0.0, 10.5]], r"sparsity\.stages: stage 0: steps must be a positive integer"),
    ("sparsity", "stages", [[0.0, 10], ["1e-3", 20]], r"sparsity\.stages: stage 1: lambda must be a number"),
    ("sparsity", "final_threshold", -1.0, r"sparsity\.final_threshold"),
    ("sparsity", "l1_reduction", "l2", r"sparsity\.l1_reduction: unknown L1 reduction 'l2'; choose one of: sum, mean"),
    ("train", "steps", 10.0, r"train\.steps: must be a positive integer"),
    ("train", "progress_bar", 1, r"train\.progress_bar: must be true or false"),
    ("data", "seq_len", 0, r"data\.seq_len"),
    ("optim", "lr", 0.0, r"optim\.lr"),
])
def test_bad_value_in_any_section_names_field(section, field, value, match):
    """Every section is validated before any value is converted (a step of 10.5 must not become 10)."""
    c = load_config("configs/prosparse.py:tiny").to_dict()  # a plain dict: ConfigDict's own type check catches some
    c[section][field] = value
    with pytest.raises(ConfigError, match=match):
        resolve(c)


@pytest.mark.parametrize("optim_fields,match", [
    (dict(schedule="cosine", warmup_steps=101), r"optim\.warmup_steps: 101 exceeds train\.steps=100"),
    (dict(schedule="wsd", warmup_steps=61, decay_fraction=0.4), r"optim\.warmup_steps: 61 overlaps the wsd decay "
                                                                r"phase, which starts at update 60"),
])
def test_warmup_must_fit_in_the_run(optim_fields, match):
    c = load_config("configs/prosparse.py:tiny")  # 100 steps
    c.optim.update(optim_fields)
    with pytest.raises(ConfigError, match=match):
        resolve(c)
    c.optim.warmup_steps -= 1
    resolve(c)


def test_model_vocab_must_hold_the_trained_tokenizer():
    c = load_config("configs/prosparse.py:tiny")
    c.data.vocab_size = c.model.vocab_size + 1
    with pytest.raises(ConfigError, match=r"data\.vocab_size=4097 exceeds model\.vocab_size=4096"):
        resolve(c)


@pytest.mark.parametrize("section", ["model", "data", "optim", "train", "sparsity"])
def test_unknown_field_in_any_section_is_an_error(section):
    c = load_config("configs/prosparse.py:tiny").to_dict()
    c[section]["nonexistent_field"] = 1
    with pytest.raises(ConfigError, match=rf"{section}: unknown field\(s\) \['nonexistent_field'\]; valid fields"):
        resolve(c)


def test_bad_config_arg():
    with pytest.raises(ConfigError, match="unknown scale"):
        load_config("configs/sparsing_law.py:3b-relu")
    with pytest.raises(ConfigError, match="unknown activation"):
        load_config("configs/sparsing_law.py:0.1b-swish")


# ---------------------------------------------------------------------------------------------------------------
# The stage table
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "stages, match",
    [
        ([], "at least one"),
        ([(0.0, 10), (1e-2, 10)], "strictly increasing"),
        ([(0.0, 10), (1e-2, 5)], "strictly increasing"),
        ([(-1e-3, 10)], "finite and >= 0"),
        ([(0.0, 10), (float("nan"), 20)], "finite and >= 0"),
        ([(0.0, 10), (float("inf"), 20)], "finite and >= 0"),
        ([(0.0, 0)], "positive integer"),
        ([(0.0, 10.5)], "positive integer"),
        ([(0.0, True)], "positive integer"),
        ([(0.0, 10, 3)], "pair"),
        (5, "list of"),
    ],
)
def test_stage_table_errors(stages, match: str) -> None:
    with pytest.raises(ConfigError, match=r"sparsity\.stages: .*" + match):
        validate_stages(stages)


def test_stage_table_is_normalised() -> None:
    assert validate_stages([[0, 5e3], (1e-2, 6000)]) == [(0.0, 5000), (1e-2, 6000)]


def test_scale_stages_keeps_shape() -> None:
    st = schedules.PROSPARSE_STAGES["llama2-7b"]
    assert scale_stages(st, 1650) == [(lam, T // 10) for lam, T in st]
    scaled = scale_stages(st, 300)
    assert [lam for lam, _ in scaled] == [lam for lam, _ in st] and scaled[-1][1] == 300
    for (_, T), (_, Ts) in zip(st, scaled, strict=True):
        assert abs(Ts - T * 300 / 16500) <= 0.5
    # the curve keeps its shape: lambda at half of the run matches
    lam, lam_scaled = (jax.jit(schedules.reg_factor_schedule(s)) for s in (st, scaled))
    assert float(lam_scaled(150)) == pytest.approx(float(lam(8250)), rel=0.05)


def test_scale_stages_too_short_and_merge() -> None:
    with pytest.raises(ConfigError, match=r"sparsity\.stages: cannot scale .* at least 64 steps"):
        scale_stages(schedules.PROSPARSE_STAGES["llama2-13b"], 10)  # stage 3 is only 250 / 16000 of the run
    scale_stages(schedules.PROSPARSE_STAGES["llama2-13b"], 64)
    table = [(0.0, 40), (0.05, 80), (0.2, 160), (0.2, 200), (0.5, 300)]
    # ends 40..300 -> 0.4, 0.8, 1.6, 2, 3 -> rounded 0, 1, 2, 2, 3: the step-0 stage is dropped, the two stages
    # ending at 2 merge into the later one
    assert scale_stages(table, 3, merge=True) == [(0.05, 1), (0.2, 2), (0.5, 3)]
    assert scale_stages(table, 300, merge=True) == scale_stages(table, 300)


def test_a_short_run_merges_colliding_stages_with_a_warning():
    c = load_config("configs/prosparse.py:tiny", "--config.train.steps=3", "--config.optim.warmup_steps=1")
    with pytest.warns(UserWarning, match="colliding stages merged"):
        rc = resolve(c)  # tiny's stage ends 10, 25, 60, 100 scale to 0, 1, 2, 3: the step-0 stage is dropped
    assert rc.sparsity.stages == ((5e-5, 1), (2e-4, 2), (2e-4, 3))
