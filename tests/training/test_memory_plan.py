"""prosparse_jax.training.memory_plan: the train step compiled ahead of time for a mesh of abstract devices -- exact
argument bytes, temporaries that grow with the micro-batch, the fit flag and a suggested grad_accum that fits when
compiled; describe's --mesh / --device_memory errors as one line, refused before any compile."""

import json
import math
from pathlib import Path

import jax
import pytest
from conftest import load_config, one_error_line

from prosparse_jax.config import base_config, resolve
from prosparse_jax.errors import ConfigError, UsageError
from prosparse_jax.main import describe
from prosparse_jax.model.transformer import abstract_params
from prosparse_jax.training import memory_plan
from prosparse_jax.training import optim as optim_lib
from prosparse_jax.training import sharding as shard_lib

ROOT = Path(__file__).resolve().parents[2]
MESH = {"data": 2, "fsdp": 4}


def tiny_rc(grad_accum: int = 1, batch_size: int = 8, **model):
    """A 2-layer model, 4 sequences of 64 tokens per device on a data:2 mesh at grad_accum=1."""
    c = base_config()
    c.model.update({**dict(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64), **model})
    c.data.vocab_size, c.data.seq_len = 320, 64
    c.train.batch_size, c.train.grad_accum = batch_size, grad_accum
    return resolve(c)


@pytest.fixture(scope="module")
def compiled():
    """Compile results the plans of this module share (plan()'s ``compiled``)."""
    return {}


# ---------------------------------------------------------------------------------------------------------------
# The 1.2B Sparsing Law model on data:2,fsdp:4 (8 abstract devices)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plan_1p2b(compiled):
    rc = resolve(load_config("configs/sparsing_law.py:1.2b-relu"))
    return rc, memory_plan.plan(rc, MESH, 80 * 10**9, compiled=compiled)


def expected_argument_bytes(rc, mesh_shape) -> int:
    """Params + optimizer state + step + batch per device, from the shapes and sharding.FSDP_RULES alone."""
    fsdp, n = mesh_shape["fsdp"], math.prod(mesh_shape.values())
    tx, _ = optim_lib.make_optimizer(rc.optim, rc.train.steps, rc.model.d_model)
    params = abstract_params(rc.model)
    state = (params, jax.eval_shape(tx.init, params))
    specs = shard_lib.param_specs(state, fsdp)
    per_leaf = jax.tree.map(lambda leaf, spec: math.prod(leaf.shape) // math.prod(
        fsdp for ax in spec if ax == "fsdp") * leaf.dtype.itemsize, state, specs)
    total = sum(jax.tree.leaves(per_leaf))
    batch = 5 * rc.train.batch_size // n * rc.data.seq_len * 4  # inputs, targets, segment_ids, positions, weights
    return total + 4 + batch  # + the int32 step counter


@pytest.mark.slow
def test_1p2b_plan_arguments_are_exact(plan_1p2b):
    rc, out = plan_1p2b
    assert out["per_device_bytes"]["arguments"] == expected_argument_bytes(rc, MESH)
    assert out["compiled_for"] == "cpu (8 abstract XLA:CPU devices)" and out["attention"] == "xla_blocks"


@pytest.mark.slow
def test_1p2b_fit_flips_and_the_suggestion_fits_when_compiled(plan_1p2b, compiled):
    rc, out = plan_1p2b
    total = out["per_device_bytes"]["total"]
    assert not out["fits"] and total > 80e9  # 48 sequences of 4096 tokens per device: far too many for 80 GB
    # the same compiled step (no new compile), other memories
    assert memory_plan.plan(rc, MESH, total, compiled=compiled)["fits"]
    assert not memory_plan.plan(rc, MESH, total - 1, compiled=compiled)["fits"]
    s = out["suggestion"]
    assert s["verified_by_compile"] and s["total_bytes"] <= 80e9 and s["grad_accum"] > 1
    assert out["largest_per_device_batch"] >= s["per_device_batch"]
    # what the user runs next: the config with the suggested grad_accum, compiled afresh, fits
    c = load_config("configs/sparsing_law.py:1.2b-relu", f"--config.train.grad_accum={s['grad_accum']}")
    again = memory_plan.plan(resolve(c), MESH)  # compiled afresh
    assert again["per_device_bytes"]["total"] <= 80e9 and again["per_device_batch"] == s["per_device_batch"]


# ---------------------------------------------------------------------------------------------------------------
# Tiny configs: behaviour of the estimate and the search
# ---------------------------------------------------------------------------------------------------------------
def test_temporaries_grow_with_the_micro_batch(compiled):
    mesh = {"data": 2}  # 4 sequences per device and step: micro-batches of 1, 2, 4 at grad_accum 4, 2, 1
    temps = [memory_plan.plan(tiny_rc(a), mesh, compiled=compiled)["per_device_bytes"] for a in (4, 2, 1)]
    assert temps[0]["temporaries"] < temps[1]["temporaries"] < temps[2]["temporaries"]
    assert len({t["arguments"] for t in temps}) == 1  # the same batch, split differently


def test_search_suggests_a_grad_accum_that_fits(compiled):
    rc, mesh = tiny_rc(batch_size=16), {"data": 2}  # 8 sequences per device: micro-batches 1, 2, 4, 8
    totals = {b: memory_plan.plan(tiny_rc(8 // b, batch_size=16), mesh, compiled=compiled)["per_device_bytes"]["total"]
              for b in (1, 2, 4, 8)}
    budget = (totals[2] + totals[4]) // 2  # micro-batch 2 fits, 4 does not
    out = memory_plan.plan(rc, mesh, budget, compiled=compiled)
    assert not out["fits"]
    s = out["suggestion"]
    assert s["per_device_batch"] == 2 and s["grad_accum"] == 4 and s["total_bytes"] == totals[2] <= budget
    assert s["override"] == "--config.train.grad_accum=4"
    assert memory_plan.plan(rc, mesh, totals[8], compiled=compiled)["suggestion"]["grad_accum"] == 1
    small = memory_plan.plan(rc, mesh, totals[1] - 1, compiled=compiled)
    assert small["suggestion"] is None and "does not fit even at 1 sequence" in small["advice"]


def test_fast_compile_options_keep_the_estimate(compiled):
    rc, mesh = tiny_rc(), {"data": 2}
    fast = memory_plan.plan(rc, mesh, compiled=compiled)["per_device_bytes"]  # FAST_CPU_COMPILE on CPU
    default = memory_plan.plan(rc, mesh, compiled=compiled, compiler_options={})["per_device_bytes"]
    assert fast["arguments"] == default["arguments"] and fast["outputs"] == default["outputs"]
    assert abs(fast["temporaries"] - default["temporaries"]) <= max(4096, 1e-3 * default["temporaries"])


def test_parse_mesh():
    assert memory_plan.parse_mesh("data:2,fsdp:4") == {"data": 2, "fsdp": 4}
    assert memory_plan.parse_mesh("fsdp:8") == {"data": 1, "fsdp": 8}
    for bad in ("data:0", "data:-1", "data:x", "data", "data:2,data:2", "model:2"):
        with pytest.raises(UsageError, match=f"mesh={bad}: "):
            memory_plan.parse_mesh(bad)
    with pytest.raises(ConfigError, match="multiple of 3"):
        memory_plan.plan(tiny_rc(), {"data": 3})


# ---------------------------------------------------------------------------------------------------------------
# describe --mesh / --device_memory: one error line, before any compile
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,expected", [
    (["--mesh=data:3,fsdp:4"], "8 sequences per micro-step do not split over the 12 devices of the mesh data:3,fsdp:4"),
    (["--mesh=foo:2"], "--mesh=foo:2: unknown axis 'foo'; the axes are data, fsdp"),
    (["--mesh=data:0"], "axis 'data' needs a positive integer size"),
    (["--mesh=data:2", "--device_memory=eighty"], "--device_memory=eighty: expected a positive size with a unit"),
    (["--device_memory=80GB"], "--device_memory needs --mesh"),
])
def test_describe_flag_errors_are_one_line_before_compiling(flags, expected, capsys, monkeypatch):
    monkeypatch.setattr(memory_plan, "compile_memory", lambda *a, **k: pytest.fail("compiled a bad request"))
    argv = ["describe", f"--config={ROOT}/configs/prosparse.py:tiny", "--config.train.batch_size=8", *flags]
    assert describe.main(argv) == 1
    assert expected in one_error_line(capsys, "describe")


def test_describe_with_mesh_adds_the_plan(capsys):
    argv = ["describe", f"--config={ROOT}/configs/prosparse.py:tiny", "--config.model.n_layers=2",
            "--config.train.batch_size=8", "--mesh=data:2", "--device_memory=1GiB"]
    assert describe.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_layers"] == 2 and out["memory_plan"]["fits"] and out["memory_plan"]["devices"] == 2
    assert out["memory_plan"]["device_memory_bytes"] == 2**30 and "estimate" in out["memory_plan"]["note"]


# ---------------------------------------------------------------------------------------------------------------
# What fsdp shards: stated in the plan, a note and a UserWarning when it is less than half of the parameter bytes
# ---------------------------------------------------------------------------------------------------------------
def test_fsdp_coverage_counts_the_bytes_each_device_holds():
    m = tiny_rc().model  # vocab 320, d_model 32, d_ff 64, 4 heads / 2 kv heads of 8, untied head, fp32
    total = 4 * m.params_total
    norms = 4 * (2 * m.n_layers + 1) * m.d_model  # never sharded
    half = memory_plan.fsdp_coverage(m, 2)  # every matrix splits in two
    assert (half["sharded_bytes"], half["replicated_bytes"]) == (total - norms, norms)
    assert half["per_device_param_bytes"] == (total - norms) // 2 + norms and half["note"] is None
    wide = tiny_rc(d_ff=128).model
    five = memory_plan.fsdp_coverage(wide, 5)  # only the vocabulary dimension (320) divides by 5
    vocab, wide_total = 4 * 2 * 320 * 32, 4 * wide.params_total  # embedding + head: 40% of the bytes
    assert (five["sharded_bytes"], five["replicated_bytes"]) == (vocab, wide_total - vocab)
    assert five["per_device_param_bytes"] == vocab // 5 + wide_total - vocab
    assert vocab < wide_total / 2
    assert five["note"].startswith(f"fsdp=5 shards {vocab / wide_total:.1%} of the parameter bytes")
    assert "fsdp sizes that shard more: 2 (" in five["note"]
    none = memory_plan.fsdp_coverage(m, 3)  # nothing divides by 3
    assert (none["sharded_bytes"], none["per_device_param_bytes"]) == (0, total)
    assert memory_plan.fsdp_coverage(m, 1)["note"] is None  # no fsdp axis: nothing to say
    with pytest.warns(UserWarning, match=r"fsdp=3 shards 0.0% of the parameter bytes .* each device holds"):
        memory_plan.warn_fsdp_coverage(m, 3)


def test_plan_states_what_fsdp_shards(compiled):
    rc = tiny_rc(batch_size=12)
    with pytest.warns(UserWarning, match="fsdp=3 shards 0.0%"):
        out = memory_plan.plan(rc, {"fsdp": 3}, compiled=compiled)
    cov = out["fsdp_sharding"]
    assert cov["per_device_param_bytes"] == out["per_device_bytes"]["params"] == 4 * rc.model.params_total
    out = memory_plan.plan(tiny_rc(), {"fsdp": 2}, compiled=compiled)  # the compiled step agrees on a real split
    assert out["fsdp_sharding"]["per_device_param_bytes"] == out["per_device_bytes"]["params"]
    assert out["fsdp_sharding"]["note"] is None


def test_describe_says_fsdp_3_replicates_the_tiny_model(capsys):
    """reliability review D7: every leaf of the tiny config stays whole on fsdp=3; describe says so."""
    argv = ["describe", f"--config={ROOT}/configs/prosparse.py:tiny", "--config.train.batch_size=24", "--mesh=fsdp:3"]
    assert describe.main(argv) == 0
    captured = capsys.readouterr()
    cov = json.loads(captured.out)["memory_plan"]["fsdp_sharding"]
    params = json.loads(captured.out)["params_total"]
    assert (cov["sharded_bytes"], cov["replicated_bytes"], cov["sharded_fraction"]) == (0, 4 * params, 0.0)
    assert cov["note"] and "21.2 MB" in cov["note"]
    err = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert err == [f"describe: warning: {cov['note']}"]


# ---------------------------------------------------------------------------------------------------------------
# describe: warm-up and tokens of the Sparsing Law configs
# ---------------------------------------------------------------------------------------------------------------
# thunlp/SparsingLaw (commit a64dfaa): warmup_iters of src/configs/train_configs/<scale>.json; the last pre-decay step
# of the ReLU law-fit list in scripts/get_ckpt_list.sh; tokens per step of the paper's Table 3
PUBLIC = {"0.1b": (1325, 130_000, 327_680), "0.2b": (1635, 150_000, 589_824), "0.4b": (2100, 200_000, 786_432),
          "0.8b": (2576, 480_000, 1_179_648), "1.2b": (1502, 360_000, 1_572_864)}


@pytest.mark.parametrize("scale", list(PUBLIC))
def test_describe_prints_sparsing_law_warmup_and_tokens(scale, capsys):
    warmup, stable, tokens_per_step = PUBLIC[scale]
    assert describe.main(["describe", f"--config={ROOT}/configs/sparsing_law.py:{scale}-relu"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["warmup_steps"], d["warmup_tokens"]) == (warmup, warmup * tokens_per_step)
    assert (d["decay_start_step"], d["pre_decay_tokens"]) == (stable, stable * tokens_per_step)
    assert d["train_tokens"] == d["train_steps"] * tokens_per_step == (stable + d["decay_steps"]) * tokens_per_step
    assert stable % d["checkpoint_every"] == 0 and d["keep_period"] == d["checkpoint_every"]  # the last stable step
    # the decay halves the LR every 560 steps, the public scheduler's rate (WarmupStableExp drop_iter=560)
    rc = resolve(load_config(f"configs/sparsing_law.py:{scale}-relu"))
    _, lr = optim_lib.make_optimizer(rc.optim, rc.train.steps, rc.model.d_model)
    assert float(lr(stable)) == pytest.approx(rc.optim.lr, rel=1e-6)
    assert float(lr(stable + 560)) / float(lr(stable)) == pytest.approx(0.5, rel=1e-3)
