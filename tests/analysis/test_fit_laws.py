"""Sparsing Law fitter: recovers the published coefficients; CLI on the CETT-PPL-1% protocol (law_ratios, default)
and on metrics.jsonl (exact_zero)."""

import json

import numpy as np
import pytest

from prosparse_jax.analysis import law_fit
from prosparse_jax.errors import InputError
from prosparse_jax.main import fit_laws


def test_selftest_recovers_published_coefficients_all_scales_both_forms():
    # tolerances (law_fit's docstring): truth within 4 sigma for A0 and alpha, curve within 1%, SiLU A0 2% / alpha
    # 20%, ReLU A0 10%; 0.5% noise, 200 points on D in [5, 250] B tokens
    assert law_fit.selftest(seed=0, verbose=False) == []
    assert law_fit.selftest(seed=7, verbose=False) == []


def test_silu_fit_is_tight_at_larger_scales():
    D, A, (c, alpha, a0) = law_fit.sample_published("silu", "0.8B", seed=3)
    fit = law_fit.fit_silu_law(D, A)
    assert fit["params"]["A0"] == pytest.approx(a0, rel=0.01)
    assert fit["params"]["alpha"] == pytest.approx(alpha, rel=0.10)
    assert set(fit["stderr"]) == {"c", "alpha", "A0"} and all(v > 0 for v in fit["stderr"].values())


def test_noise_free_fit_is_exact():
    D = np.geomspace(5, 250, 50)
    A = law_fit.relu_law(D, 0.079, 0.683, -3.46, 0.069)
    p = law_fit.fit_relu_law(D, A)["params"]
    np.testing.assert_allclose([p["c"], p["alpha"], p["b"], p["A0"]], [0.079, 0.683, -3.46, 0.069], rtol=1e-4)


def _workdir(tmp_path, name, form, scale, seed):
    D, A, _ = law_fit.sample_published(form, scale, n=80, seed=seed)
    wd = tmp_path / name
    wd.mkdir()
    rows = [{"kind": "train", "step": i + 1, "tokens_seen": float(d * 1e9), "sparsity": float(1 - a)}
            for i, (d, a) in enumerate(zip(D, A, strict=True))]
    rows.insert(3, {"kind": "eval", "step": 3, "eval_loss": 1.0})
    (wd / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return wd


def test_cli_fits_several_workdirs_and_plots(tmp_path, capsys):
    wds = [_workdir(tmp_path, "a", "silu", "0.4B", 1), _workdir(tmp_path, "b", "silu", "1.2B", 2)]
    rc = fit_laws.main(["--input=exact_zero", "--form=silu", f"--out={tmp_path / 'f.png'}", *map(str, wds)])
    out = capsys.readouterr().out
    assert rc == 0 and (tmp_path / "f.png").stat().st_size > 0
    assert out.count("A0 = ") == 2 and "±" in out
    D, A = law_fit.load_run(wds[0])
    assert len(D) == 80 and D.min() == pytest.approx(5.0)


def test_cli_errors(tmp_path, capsys):
    assert fit_laws.main([f"--out={tmp_path / 'f.png'}", str(tmp_path)]) != 0
    assert "--form" in capsys.readouterr().err
    assert fit_laws.main(["--form=relu", f"--out={tmp_path / 'f.png'}", str(tmp_path / "missing")]) == 1
    with pytest.raises(InputError, match="points"):
        law_fit.fit_silu_law([1.0, 2.0], [0.3, 0.35])


# ---------------------------------------------------------------------------------------------------------------
# The default input: the CETT-PPL-1% protocol (Sparsing Law App. E) on a trained tiny SiLU run
# ---------------------------------------------------------------------------------------------------------------
STEPS, EVERY, WARMUP = 40, 5, 10
EVAL = dict(num_batches=2, batch_size=4)  # validation batches of the protocol (and of the analyze reference)


@pytest.fixture(scope="module")
def law_run(tmp_path_factory):
    """(workdir, corpus, law_ratios result) of a SiLU run with every 5th step kept by train.keep_period (~25 s)."""
    from conftest import small_run_config, write_corpus

    from prosparse_jax.analysis import law_inputs as law_ratios
    from prosparse_jax.training import train as train_mod

    root = tmp_path_factory.mktemp("law")
    corpus = write_corpus(root / "corpus", 60)
    c = small_run_config(corpus, STEPS, activation="silu", batch_size=8, checkpoint_every=EVERY)
    c.train.keep_checkpoints = 1  # without keep_period only the last checkpoint would survive
    c.train.keep_period = EVERY
    c.optim.warmup_steps = WARMUP
    res = train_mod.train(c, root / "run")
    assert res.final_eval["eval_loss"] < 4.5  # well below ln(320) = 5.77: the FFNs matter
    return root / "run", corpus, law_ratios.law_ratios(root / "run", **EVAL)


@pytest.mark.slow
def test_warmup_checkpoints_are_dropped_and_tokens_counted(law_run):
    from prosparse_jax.analysis import law_inputs as law_ratios

    wd, _, res = law_run
    assert law_ratios.checkpoint_steps(wd) == list(range(EVERY, STEPS + 1, EVERY))  # keep_period kept them all
    assert res["dropped_steps"] == [5, 10] and res["settings"]["min_step"] == WARMUP
    steps = [r["step"] for r in res["checkpoints"]]
    assert steps == [15, 20, 25, 30, 35, 40]
    for r in res["checkpoints"]:
        assert r["tokens"] == r["step"] * 8 * 32  # train.batch_size x data.seq_len
        assert r["D"] == pytest.approx(r["tokens"] / 1e9, rel=1e-12)
        assert len(r["activation_ratio_per_layer"]) == 2
    assert res["search_checkpoints"] == [20, 25, 30, 35, 40] and res["eval_tokens"] == 2 * 4 * 32
    plan = law_ratios.plan_checkpoints(wd, min_step=25)  # the cut is overridable
    assert plan.kept_steps == (30, 35, 40) and plan.dropped_steps == (5, 10, 15, 20, 25)
    assert json.loads((wd / "law_ratios.json").read_text())["cett_target"] == res["cett_target"]


@pytest.mark.slow
def test_max_step_leaves_later_checkpoints_out_of_the_search_and_the_measurement(law_run):
    from prosparse_jax.analysis import law_inputs as law_ratios

    wd, _, every = law_run
    assert every["search_checkpoints"] == [20, 25, 30, 35, 40] and every["dropped_after_max_step"] == []
    res = law_ratios.compute_law_ratios(wd, max_step=30, n_search=2, num_batches=1, batch_size=2, search_steps=6)
    assert res["search_checkpoints"] == [25, 30]  # not the final checkpoint (40)
    assert [r["step"] for r in res["checkpoints"]] == [15, 20, 25, 30]
    assert res["dropped_steps"] == [5, 10] and res["dropped_after_max_step"] == [35, 40]
    assert res["settings"]["max_step"] == 30 and res["settings"]["kept_steps"] == [15, 20, 25, 30]
    for t in res["search"]:  # no later checkpoint was evaluated in the search either
        assert set(t["ppl_ratio_per_step"]) <= {"25", "30"}


@pytest.mark.slow
def test_one_target_meets_the_ppl_bound_on_the_search_set_and_matches_analyze(law_run, tmp_path):
    """(b) one shared target, feasible on all of the last 5, target + 2^-12 infeasible on one of them; (c) each
    checkpoint's ratio and PPL ratio equal analyze --metric=cett at that target on the same batches."""
    from prosparse_jax.analysis import analyze as an

    wd, corpus, res = law_run
    t, limit = res["cett_target"], 1.01
    assert 0.0 < t < 1.0 and res["ppl_limit"] == pytest.approx(limit)
    src = f"files:{corpus}/*.txt"
    ref = {}
    for r in res["checkpoints"]:  # (c) the reference path, checkpoint by checkpoint
        a = an.analyze(wd, src, "cett", t, tmp_path / f"t{r['step']}", step=r["step"], progress=False, **EVAL)
        ref[r["step"]] = a
        assert r["activation_ratio"] == pytest.approx(a["activation_ratio"], rel=1e-6)
        np.testing.assert_allclose(r["activation_ratio_per_layer"], a["activation_ratio_per_layer"], rtol=1e-6)
        assert r["ppl_ratio"] == pytest.approx(a["ppl_ratio"], rel=1e-6)
        np.testing.assert_allclose(r["taus_per_layer"], a["thresholds_per_layer"], rtol=1e-6)
    for s in res["search_checkpoints"]:  # (b) the bound holds on every search checkpoint ...
        assert ref[s]["ppl_ratio"] <= limit
    above = t + 2.0 ** -res["settings"]["search_steps"]  # ... and the next bisection point breaks it on one
    worst = 0.0
    for s in reversed(res["search_checkpoints"]):
        a = an.analyze(wd, src, "cett", above, tmp_path / f"a{s}", step=s, progress=False, **EVAL)
        worst = max(worst, a["ppl_ratio"])
        if worst > limit:
            break
    assert worst > limit


@pytest.mark.slow
def test_silu_ratio_is_below_one_unlike_exact_zero(law_run):
    wd, _, res = law_run
    A = [r["activation_ratio"] for r in res["checkpoints"]]
    assert all(0.0 < a < 0.5 for a in A)  # CETT-PPL-1% truncates most SiLU neurons
    _, A_exact = law_fit.load_run(wd)
    assert A_exact.min() > 0.99  # SiLU has (almost) no exact zeros: the old input is a flat line at 1


@pytest.mark.slow
def test_cli_default_protocol_reuses_the_file_and_fits(law_run, tmp_path, capsys):
    wd, _, _ = law_run
    before = (wd / "law_ratios.json").read_bytes()
    rc = fit_laws.main(["--form=silu", "--num_batches=2", "--batch_size=4", f"--out={tmp_path / 'f.png'}", str(wd)])
    out = capsys.readouterr().out
    assert rc == 0 and (tmp_path / "f.png").stat().st_size > 0
    assert "CETT-PPL-1%" in out and "read from" in out and "PPL ratio" in out and "A0 = " in out
    rows = [line.split() for line in out.splitlines() if line.strip()]
    assert [r[0] for r in rows if r[0] in {"15", "20", "25", "30", "35", "40"}] == ["15", "20", "25", "30", "35", "40"]
    assert (wd / "law_ratios.json").read_bytes() == before
    rc = fit_laws.main(["--input=exact_zero", "--form=silu", f"--out={tmp_path / 'e.png'}", str(wd)])
    assert rc == 0 and "not the paper's A" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_too_few_checkpoints_is_a_clear_error(law_run, tmp_path, capsys):
    from prosparse_jax.analysis import law_inputs as law_ratios
    from prosparse_jax.errors import CheckpointError

    wd, _, _ = law_run
    rc = fit_laws.main(["--form=relu", "--min_step=30", f"--out={tmp_path / 'f.png'}", str(wd)])
    err = capsys.readouterr().err
    assert rc == 1 and not (tmp_path / "f.png").exists()
    assert len(err.strip().splitlines()) == 1
    assert "2 checkpoint(s)" in err and "needs at least 5" in err and "train.keep_period" in err
    with pytest.raises(CheckpointError, match="no checkpoint with step > 40"):
        law_ratios.compute_law_ratios(wd, min_step=40, **EVAL)


@pytest.mark.slow
def test_existing_file_with_other_settings_is_not_overwritten(law_run, tmp_path, capsys):
    from prosparse_jax.analysis import law_inputs as law_ratios

    wd, _, res = law_run
    before = (wd / "law_ratios.json").read_bytes()
    rc = fit_laws.main(["--form=silu", "--p=2", "--num_batches=2", "--batch_size=4", f"--out={tmp_path / 'f.png'}",
                        str(wd)])
    err = capsys.readouterr().err
    assert rc == 1 and "other settings" in err and "p: file 1.0 vs now 2.0" in err and "--overwrite" in err
    assert (wd / "law_ratios.json").read_bytes() == before
    rc = fit_laws.main(["--form=silu", "--max_step=30", "--num_batches=2", "--batch_size=4",
                        f"--out={tmp_path / 'f.png'}", str(wd)])  # measured on every checkpoint: not reused
    err = capsys.readouterr().err
    assert rc == 1 and "max_step: file None vs now 30" in err and "--overwrite" in err
    assert (wd / "law_ratios.json").read_bytes() == before
    out = tmp_path / "copy.json"
    out.write_bytes(before)
    with pytest.raises(law_ratios.StaleOutputError, match="num_batches: file 2 vs now 3"):
        law_ratios.law_ratios(wd, out, num_batches=3, batch_size=4)
    assert out.read_bytes() == before
    (tmp_path / "junk.json").write_text("not json")
    with pytest.raises(law_ratios.StaleOutputError, match="not a law_ratios file"):
        law_ratios.law_ratios(wd, tmp_path / "junk.json", **EVAL)
    again = law_ratios.law_ratios(wd, out, **EVAL)  # same settings: read back, not recomputed
    assert again["reused"] and again["checkpoints"] == res["checkpoints"]
    new = law_ratios.law_ratios(wd, out, overwrite=True, n_search=2, num_batches=1, batch_size=2)
    assert not new["reused"] and new["search_checkpoints"] == [35, 40]
    assert json.loads(out.read_text())["settings"]["n_search"] == 2
