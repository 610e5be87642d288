"""Which steps a Sparsing Law fit uses: after the warm-up and up to --max_step, e.g. the start of a wsd run's LR
decay (fit_laws --min_step / --max_step); the steps used, dropped and inside the decay are named in the output, the
fit carries the steps it used, and the CETT-PPL inputs (law_ratios) are searched and measured inside the window."""

import json

import numpy as np
import pytest
from conftest import small_run_config, write_corpus

from prosparse_jax.analysis import law_fit, law_inputs
from prosparse_jax.config import base_config, resolve
from prosparse_jax.errors import CheckpointError, UsageError
from prosparse_jax.main import fit_laws
from prosparse_jax.training.memory_plan import describe
from prosparse_jax.training.train import json_config

STEPS, EVERY, WARMUP, DECAY = 100, 5, 10, 0.2  # wsd: the decay starts after step 80
TRUE = (0.05, 0.8, 0.4)  # silu law (c, alpha, A0) of the synthetic runs
TOKENS_PER_STEP = 1e8


def _config(schedule="wsd"):
    c = base_config()
    c.train.steps, c.optim.schedule, c.optim.warmup_steps, c.optim.decay_fraction = STEPS, schedule, WARMUP, DECAY
    return c


def _metrics_run(tmp_path, name="run", schedule="wsd"):
    """A workdir with a real config.json and metrics.jsonl train entries every EVERY steps, A on a silu law."""
    c = _config(schedule)
    wd = tmp_path / name
    wd.mkdir()
    (wd / "config.json").write_text(json.dumps(json_config(c)))
    rows = [{"step": s, "kind": "train", "tokens_seen": s * TOKENS_PER_STEP,
             "sparsity": float(1 - law_fit.silu_law(s * TOKENS_PER_STEP / 1e9, *TRUE))}
            for s in range(EVERY, STEPS + 1, EVERY)]
    (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return wd


def test_default_window_drops_the_warmup_and_names_the_decay_steps(tmp_path):
    wd = _metrics_run(tmp_path)
    lines = []
    (_, D, A, fit), = law_fit.fit_runs([wd], "silu", "exact_zero", echo=lines.append)
    assert fit["steps"] == list(range(15, 101, 5))  # 10 < step
    np.testing.assert_allclose(D, np.arange(15, 101, 5) * TOKENS_PER_STEP / 1e9)
    np.testing.assert_allclose(A, law_fit.silu_law(D, *TRUE), rtol=1e-12)
    text = "\n".join(lines)
    assert "fit on 18 metrics.jsonl train entries, steps [15, 20, 25, 30, 35, ..., 80, 85, 90, 95, 100]" in text
    assert "warm-up (step <= 10, the run's optim.warmup_steps) [5, 10]" in text
    # the decay starts after step 100 - 0.2 * 100
    assert "steps [85, 90, 95, 100] are in the run's LR decay (wsd, after step 80): --max_step=80" in text


def test_max_step_drops_the_later_checkpoints(tmp_path):
    wd = _metrics_run(tmp_path)
    lines = []
    (_, D, _, fit), = law_fit.fit_runs([wd], "silu", "exact_zero", max_step=50, echo=lines.append)
    assert fit["steps"] == [15, 20, 25, 30, 35, 40, 45, 50] and fit["n"] == 8 == len(D)
    assert D.max() == pytest.approx(50 * TOKENS_PER_STEP / 1e9)
    assert "after --max_step=50 [55, 60, 65, 70, 75, 80, 85, 90, 95, 100]" in "\n".join(lines)
    assert "LR decay" not in "\n".join(lines)  # no used step is in it
    # the points are on the law: the fit of the window recovers it
    assert fit["params"]["A0"] == pytest.approx(TRUE[2], rel=1e-6)
    (_, _, _, every), = law_fit.fit_runs([wd], "silu", "exact_zero", min_step=0, max_step=STEPS, echo=lambda s: None)
    assert every["steps"] == list(range(5, 101, 5))


def test_max_step_decay_start_is_the_runs_own_decay_start(tmp_path):
    wd = _metrics_run(tmp_path)
    window = law_fit.step_window(wd, "exact_zero", max_step=law_fit.DECAY_START)
    assert window.max_step == describe(resolve(_config()))["decay_start_step"] == 80  # what describe prints
    (_, _, _, fit), = law_fit.fit_runs([wd], "silu", "exact_zero", max_step=law_fit.DECAY_START, echo=lambda s: None)
    assert fit["steps"] == list(range(15, 81, 5))
    cosine = _metrics_run(tmp_path, "cosine", schedule="cosine")
    with pytest.raises(UsageError, match="max_step 'decay_start' needs a run with a wsd LR decay .*'cosine'"):
        law_fit.step_window(cosine, "exact_zero", max_step=law_fit.DECAY_START)
    with pytest.raises(UsageError, match="max_step must be a step number, None or 'decay_start', got 'end'"):
        law_fit.step_window(wd, "exact_zero", max_step="end")


def test_fit_laws_cli_takes_max_step_decay_start(tmp_path, capsys):
    wd = _metrics_run(tmp_path)
    out = tmp_path / "fit.png"
    assert fit_laws.main(["--form=silu", "--input=exact_zero", "--max_step=decay_start", f"--out={out}", str(wd)]) == 0
    text = capsys.readouterr().out
    assert "after --max_step=80 [85, 90, 95, 100]" in text and out.is_file()
    assert fit_laws.main(["--form=silu", "--input=exact_zero", "--max_step=end", f"--out={out}", str(wd)]) != 0
    assert "a step number or 'decay_start', got 'end'" in capsys.readouterr().err


def _checkpoint_dirs(tmp_path, steps):
    """A workdir as law_inputs plans it: config.json and checkpoints/<step>/params (nothing in them)."""
    wd = tmp_path / "ckpts"
    wd.mkdir()
    (wd / "config.json").write_text(json.dumps(json_config(_config())))
    for s in steps:
        (wd / "checkpoints" / str(s) / "params").mkdir(parents=True)
    return wd


def test_law_inputs_plan_keeps_only_the_window(tmp_path):
    wd = _checkpoint_dirs(tmp_path, range(EVERY, STEPS + 1, EVERY))
    plan = law_inputs.plan_checkpoints(wd, max_step=50)
    assert plan.kept_steps == (15, 20, 25, 30, 35, 40, 45, 50) and plan.dropped_steps == (5, 10)
    assert plan.late_steps == tuple(range(55, 101, 5)) and plan.max_step == 50
    every = law_inputs.plan_checkpoints(wd)  # default: no upper cut, the final (decayed) checkpoint kept
    assert every.kept_steps[-1] == 100 and every.late_steps == () and every.max_step is None
    with pytest.raises(UsageError, match="max_step 10 must exceed min_step 10"):
        law_inputs.plan_checkpoints(wd, max_step=10)
    with pytest.raises(CheckpointError, match=r"no checkpoint with step > 10 and <= 12 .*raise max_step"):
        law_inputs.compute_law_ratios(wd, max_step=12)


def test_other_schedules_have_no_decay_phase(tmp_path):
    window = law_fit.step_window(_metrics_run(tmp_path, schedule="cosine"), "exact_zero")
    assert (window.min_step, window.max_step, window.decay_start) == (WARMUP, None, None)
    assert window.split([5, 10, 15, 100]) == ([15, 100], [5, 10], [])
    assert "LR decay" not in window.describe([5, 10, 15, 100])


def test_cli_max_step_names_the_steps_used(tmp_path, capsys):
    wd = _metrics_run(tmp_path)
    rc = fit_laws.main(["--input=exact_zero", "--form=silu", "--max_step=40", f"--out={tmp_path / 'f.png'}", str(wd)])
    out = capsys.readouterr().out
    assert rc == 0 and (tmp_path / "f.png").stat().st_size > 0
    assert "steps [15, 20, 25, 30, 35, 40]" in out and "n 6)" in out


def test_an_empty_window_is_one_line(tmp_path, capsys):
    wd = _metrics_run(tmp_path)
    rc = fit_laws.main(["--input=exact_zero", "--form=silu", "--min_step=40", "--max_step=40",
                        f"--out={tmp_path / 'f.png'}", str(wd)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "max_step 40 must exceed min_step 40" in err[0]
    with pytest.raises(UsageError, match="min_step: must be >= 0"):
        law_fit.step_window(wd, "exact_zero", min_step=-1)


# ---------------------------------------------------------------------------------------------------------------
# The default input (CETT-PPL-1%, law_ratios.json) on a trained tiny wsd run
# ---------------------------------------------------------------------------------------------------------------
RUN_STEPS, RUN_EVERY = 30, 5  # wsd decay over the last 10 steps: starts after step 20


@pytest.fixture(scope="module")
def wsd_run(tmp_path_factory):
    from prosparse_jax.training import train as train_mod

    root = tmp_path_factory.mktemp("law_wsd")
    c = small_run_config(write_corpus(root / "corpus", 40), RUN_STEPS, activation="silu", batch_size=4,
                         checkpoint_every=RUN_EVERY)
    c.train.keep_checkpoints, c.train.keep_period = 1, RUN_EVERY
    c.optim.update(dict(schedule="wsd", warmup_steps=0, decay_fraction=1 / 3))
    train_mod.train(c, root / "run")
    return root / "run"


@pytest.mark.slow
def test_cett_ppl_fit_max_step_excludes_the_decay_checkpoints(wsd_run):
    settings = dict(num_batches=1, batch_size=2, n_search=2, search_steps=6)
    lines = []
    (_, _, _, fit), = law_fit.fit_runs([wsd_run], "silu", echo=lines.append, **settings)
    assert fit["steps"] == [5, 10, 15, 20, 25, 30]  # every kept checkpoint after the warm-up (0) ...
    assert "steps [25, 30] are in the run's LR decay (wsd, after step 20): --max_step=20" in "\n".join(lines)
    first = json.loads((wsd_run / "law_ratios.json").read_text())
    assert first["search_checkpoints"] == [25, 30]  # without max_step the target is searched in the decay
    # the file measured without max_step is not reused for another window
    with pytest.raises(law_inputs.StaleOutputError, match="max_step: file None vs now 20"):
        law_fit.fit_runs([wsd_run], "silu", max_step=20, echo=lambda s: None, **settings)
    assert json.loads((wsd_run / "law_ratios.json").read_text()) == first
    lines = []
    (_, D, A, fit), = law_fit.fit_runs([wsd_run], "silu", max_step=20, overwrite=True, echo=lines.append, **settings)
    res = json.loads((wsd_run / "law_ratios.json").read_text())
    assert res["settings"]["max_step"] == 20 and res["dropped_after_max_step"] == [25, 30]
    assert res["search_checkpoints"] == [15, 20]  # the last n_search checkpoints up to max_step
    assert [r["step"] for r in res["checkpoints"]] == fit["steps"] == [5, 10, 15, 20]  # only those measured
    np.testing.assert_allclose(A, [r["activation_ratio"] for r in res["checkpoints"]])
    np.testing.assert_allclose(D, [r["D"] for r in res["checkpoints"]])
    assert "after --max_step=20 [25, 30]" in "\n".join(lines)
    again = law_inputs.law_ratios(wsd_run, max_step=20, **settings)  # same window: read back
    assert again["reused"] and again["checkpoints"] == res["checkpoints"]
    with pytest.raises(CheckpointError, match=r"3 checkpoint\(s\) in the fit window .*raise --max_step"):
        law_fit.fit_runs([wsd_run], "silu", max_step=15, echo=lambda s: None, **settings)
