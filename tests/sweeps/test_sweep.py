"""Sweeps (``python -m prosparse_jax.main.sweep``, configs/sweeps/): every run validated before anything trains, the
SLURM array script, the launcher (parallel runs, skip finished, resume interrupted, Ctrl-C), the aggregate."""

import csv
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import killed_after, write_corpus

from prosparse_jax.config import resolve
from prosparse_jax.errors import ConfigError
from prosparse_jax.main import sweep
from prosparse_jax.sweeps import progress as sweep_progress
from prosparse_jax.sweeps.spec import grid, load_sweep
from prosparse_jax.training import checkpoint as ckpt
from prosparse_jax.training.metrics import read_metrics

# ml_collections' config_flags loads config files with the deprecated SourceFileLoader.load_module()
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

STEPS, EVERY, WARMUP = 12, 2, 2  # 6 checkpoints, 5 after the warm-up: enough for the ReLU law (4 parameters)

# A sweep of 2-layer models on a small file corpus (seconds per run); {corpus} / {data_dir} / {extra} filled in.
SWEEP_FILE = '''
from prosparse_jax.sweeps.spec import analysis, grid, sweep

FIXED = {{"data.source": "files:{corpus}/*.txt", "data.data_dir": "{data_dir}", "data.vocab_size": 320,
          "model.vocab_size": 320, "data.seq_len": 32, "data.eval_fraction": 0.1, "train.batch_size": 4,
          "train.steps": {steps}, "train.checkpoint_every": {every}, "train.keep_period": {every},
          "train.log_every": {every}, "train.eval_every": 0, "train.eval_batches": 2, "train.progress_bar": False,
          "optim.warmup_steps": {warmup}, "optim.lr": 3e-3, {extra}}}
SCALES = {{"s16": {{"model.d_model": 16, "model.n_layers": 1, "model.n_heads": 2, "model.n_kv_heads": 2,
                    "model.d_ff": 40}},
          "s32": {{"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.n_kv_heads": 2,
                    "model.d_ff": 80}}}}
ACTS = {{"relu": {{"model.activation": "relu"}}, "silu": {{"model.activation": "silu"}}}}


def get_config(arg="2x2"):
    scales = SCALES if arg == "2x2" else {{"s16": SCALES["s16"]}}
    return sweep("test_sweep", "configs/prosparse.py:tiny-silu", grid({{"scale": scales, "activation": ACTS}}, FIXED),
                 analysis("cett_ppl", num_batches=1, batch_size=4, search_steps=6))
'''


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("sweep_corpus") / "corpus")


def write_sweep(path: Path, corpus: Path, extra: str = "", steps: int = STEPS) -> str:
    path.write_text(SWEEP_FILE.format(corpus=corpus, data_dir=corpus.parent / "tfds", extra=extra, steps=steps,
                                      every=EVERY, warmup=WARMUP))
    return str(path)


def main(capsys, *args: str) -> tuple[int, str, str]:
    rc = sweep.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def load(ref: str):
    return load_sweep(ref, sweep.parse_train_config)


def snapshot(d: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(d)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(d.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# Validation, configs, SLURM: no training
# ---------------------------------------------------------------------------------------------------------------
def test_grid_is_the_product_of_the_axes_and_refuses_clashing_axes():
    runs = grid({"a": {"x": {"f.a": 1}, "y": {"f.a": 2}}, "b": {"p": {"f.b": 0}, "q": {"f.b": 1}}}, {"f.c": 9})
    assert [r["name"] for r in runs] == ["x-p", "x-q", "y-p", "y-q"]
    assert runs[1] == {"name": "x-q", "overrides": {"f.c": 9, "f.a": 1, "f.b": 1}, "axes": {"a": "x", "b": "q"}}
    with pytest.raises(ConfigError, match="axes 'a' and 'b' both set 'f.a'"):
        grid({"a": {"x": {"f.a": 1}}, "b": {"p": {"f.a": 2}}})


@pytest.mark.parametrize("override, expected", [
    ('"model.actvation": "relu"', ["'model.actvation' is not a config field", "did you mean 'model.activation'?"]),
    ('"train.stpes": 3', ["'train.stpes' is not a config field", "did you mean 'train.steps'?"]),
    ('"model": 3', ["'model' is a config section", "not a field"]),
    ('"train.batch_size": 0', ["train.batch_size: must be a positive integer, got 0"]),
    ('"train.steps": 2.5', ["--config.train.steps=2.5"]),
])
def test_bad_sweep_field_is_one_error_before_anything_is_created(tmp_path, corpus, capsys, override, expected):
    ref = write_sweep(tmp_path / "bad.py", corpus, extra=override) + ":2x2"
    root = tmp_path / "root"
    for cmd in ("run", "slurm", "task", "status"):
        extra = {"slurm": [f"--out={tmp_path / 's.sbatch'}"], "task": ["--index=0"]}.get(cmd, [])
        rc, out, err = main(capsys, cmd, f"--sweep={ref}", f"--root={root}", *extra)
        assert rc == 1 and out == ""
        assert len(err.strip().splitlines()) == 1 and err.startswith("sweep: error: ")
        assert "run 0 ('s16-relu')" in err and all(e in err for e in expected), err
    assert not root.exists() and not (tmp_path / "s.sbatch").exists()  # nothing created, nothing trained


def test_shipped_sweeps_validate_and_match_their_configs():
    from configs import sparsing_law as law_configs

    full = load("configs/sweeps/sparsing_law.py:full")
    assert len(full.runs) == 10
    for r in full.runs:  # each run is exactly configs/sparsing_law.py:<scale>-<act>
        assert r.rc == resolve(law_configs.get_config(f"{r.axes['scale']}-{r.axes['activation']}")), r.name
    tiny = load("configs/sweeps/sparsing_law.py:tiny")
    assert [r.name for r in tiny.runs] == ["t64-relu", "t64-silu", "t128-relu", "t128-silu"]
    for r in tiny.runs:
        t = r.rc.train
        assert t.keep_period == t.checkpoint_every and (t.steps - r.rc.optim.warmup_steps) // t.checkpoint_every >= 5
    abl = load("configs/sweeps/prosparse_ablations.py:tiny")
    stages = {r.name: r.rc.sparsity.stages for r in abl.runs}
    assert stages["constant-lam2e-4"] == ((0.0, 10), (2e-4, 100))
    assert stages["progressive-lam2e-4"] == ((0.0, 10), (5e-5, 25), (2e-4, 60), (2e-4, 100))  # the tiny table
    assert stages["progressive-lam4e-4"][-1] == (4e-4, 100)
    assert len(load("configs/sweeps/prosparse_ablations.py:llama2-7b").runs) == 6
    thr = load("configs/sweeps/prosparse_ablations.py:tiny-threshold")
    assert [r.rc.sparsity.final_threshold for r in thr.runs] == [0.0, 0.01, 0.1, 0.5]


def test_full_sweep_fits_each_runs_stable_phase(tmp_path):
    """The shipped law sweep's max_step is each run's own LR-decay start, read from the run's config (describe's
    decay_start_step, the stable_steps of configs/sparsing_law.py); the tiny sweep fits every checkpoint."""
    from configs import sparsing_law as law_configs
    from prosparse_jax.analysis import law_fit
    from prosparse_jax.training.memory_plan import describe
    from prosparse_jax.training.train import json_config

    full = load("configs/sweeps/sparsing_law.py:full")
    assert full.analysis["max_step"] == law_fit.DECAY_START
    for r in full.runs:
        wd = tmp_path / r.name
        wd.mkdir()
        (wd / "config.json").write_text(json.dumps(json_config(r.config)))
        window = law_fit.step_window(wd, full.analysis["law_input"], max_step=full.analysis["max_step"])
        stable = law_configs.SCALES[r.axes["scale"]].stable_steps
        assert window.max_step == describe(r.rc)["decay_start_step"] == stable, r.name
        assert window.min_step == r.rc.optim.warmup_steps
    assert load("configs/sweeps/sparsing_law.py:tiny").analysis["max_step"] is None


def test_slurm_script_has_one_task_per_run_and_each_task_runs_its_run(tmp_path, corpus, capsys):
    ref = write_sweep(tmp_path / "sw.py", corpus) + ":2x2"
    root, out = tmp_path / "root", tmp_path / "sweep.sbatch"
    rc, stdout, err = main(capsys, "slurm", f"--sweep={ref}", f"--root={root}", f"--out={out}", "--sbatch=--time=1:00")
    assert rc == 0, err
    text = out.read_text()
    assert "#SBATCH --array=0-3\n" in text and "#SBATCH --time=1:00\n" in text and os.access(out, os.X_OK)
    assert text.rstrip().splitlines()[-1].endswith('--index="$SLURM_ARRAY_TASK_ID"')
    assert " -m prosparse_jax.main.sweep task " in text
    assert (root / "logs").is_dir() and not list(root.glob("s??-*"))  # no workdir: nothing trained

    s = load(ref)
    for r in s.runs:  # task i -> run i: its workdir and its overrides, exactly the plan's command
        rc, cmd, _ = main(capsys, "task", f"--sweep={ref}", f"--root={root}", f"--index={r.index}", "--dry_run")
        assert rc == 0 and cmd.strip() == shlex.join(s.command(root, r))
        assert f"--workdir={root / r.name}" in cmd and f"--config.model.activation={r.axes['activation']}" in cmd
    # the script's own cd and command, with the array index from the environment
    cd, last = text.rstrip().splitlines()[-2:]
    res = subprocess.run(["bash", "-c", f"{cd} && {last.removeprefix('exec ')} --dry_run"],
                         env={**os.environ, "SLURM_ARRAY_TASK_ID": "2"}, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert shlex.split(res.stdout.strip())[1:] == s.command(root, s.runs[2])[1:]  # (python may be a symlink)
    rc, _, err = main(capsys, "task", f"--sweep={ref}", f"--root={root}", "--index=4", "--dry_run")
    assert rc == 1 and "--index=4: the sweep has 4 runs (0-3)" in err

    rc, stdout, _ = main(capsys, "status", f"--sweep={ref}", f"--root={root}")
    assert rc == 0 and "4 pending" in stdout and "0/12" in stdout


def test_existing_sbatch_is_refused_without_overwrite(tmp_path, corpus, capsys):
    ref = write_sweep(tmp_path / "sw.py", corpus) + ":2x2"
    out = tmp_path / "sweep.sbatch"
    out.write_text("#!/bin/bash\n# mine\n")
    rc, _, err = main(capsys, "slurm", f"--sweep={ref}", f"--root={tmp_path / 'r'}", f"--out={out}")
    assert rc == 1 and "exists; pass --overwrite" in err and out.read_text() == "#!/bin/bash\n# mine\n"
    rc, _, _ = main(capsys, "slurm", f"--sweep={ref}", f"--root={tmp_path / 'r'}", f"--out={out}", "--overwrite")
    assert rc == 0 and "#SBATCH --array=0-3" in out.read_text()


def test_sbatch_out_that_is_a_directory_is_refused_as_such_at_once(tmp_path, corpus, capsys):
    """A directory as --out: "give a file name" right away (--overwrite would not help), nothing written into it."""
    ref = write_sweep(tmp_path / "sw.py", corpus) + ":2x2"
    out = tmp_path / "a_dir"
    out.mkdir()
    for extra in ([], ["--overwrite"]):
        rc, _, err = main(capsys, "slurm", f"--sweep={ref}", f"--root={tmp_path / 'r'}", f"--out={out}", *extra)
        assert rc == 1 and f"--out: {out} is a directory; give a file name" in err and "--overwrite" not in err
        assert list(out.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# Running: end to end, resume, Ctrl-C
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, corpus):
    d = tmp_path_factory.mktemp("sweep_e2e")
    ref = write_sweep(d / "sw.py", corpus) + ":2x2"
    t0 = time.time()
    rc = sweep.main(["run", f"--sweep={ref}", f"--root={d / 'root'}", "--parallel=2", "--interval=2"])
    return ref, d / "root", rc, time.time() - t0


@pytest.mark.slow
def test_sweep_runs_end_to_end_with_a_progress_table(finished_sweep, capsys):
    ref, root, rc, _ = finished_sweep
    assert rc == 0, [p.read_text()[-2000:] for p in (root / "logs").glob("*.log")]
    s = load(ref)
    for r in s.runs:
        assert sweep_progress.is_finished(root / r.name, STEPS) and not (root / "logs" / f"{r.name}.running").exists()
    rc, out, _ = main(capsys, "status", f"--sweep={ref}", f"--root={root}")
    assert rc == 0 and "4 done" in out and out.count(f"{STEPS}/{STEPS}") == 4
    assert json.loads((root / "sweep.json").read_text())["runs"][3]["name"] == "s32-silu"


@pytest.mark.slow
def test_aggregate_writes_one_csv_row_per_run_and_both_law_plots(finished_sweep, capsys):
    ref, root, rc, _ = finished_sweep
    assert rc == 0
    rc, out, err = main(capsys, "aggregate", f"--sweep={ref}", f"--root={root}")
    assert rc == 0, err
    res = root / "results"
    rows = list(csv.DictReader((res / "results.csv").open()))
    assert [r["run"] for r in rows] == ["s16-relu", "s16-silu", "s32-relu", "s32-silu"]
    for col in ("overrides", "axis_scale", "activation", "params_total", "params_non_embedding", "tokens",
                "train_loss", "eval_loss", "eval_sparsity", "eval_activation_ratio", "law_input", "law_points",
                "cett_target", "law_A0", "law_A0_err", "law_alpha", "law_error"):
        assert col in rows[0], col
    for r in rows:
        assert r["state"] == "done" and int(r["tokens"]) == STEPS * 4 * 32 and r["law_input"] == "cett_ppl"
        assert int(r["law_points"]) == STEPS // EVERY - WARMUP // EVERY and r["law_error"] == "", r
        assert math.isfinite(float(r["law_A0"])) and 0.0 <= float(r["A_last"]) <= 1.0  # 12 steps: A0 means nothing
        assert 0.0 < float(r["cett_target"]) <= 1.0 and float(r["eval_loss"]) > 0
        assert json.loads(r["overrides"])["model.activation"] == r["activation"] == r["axis_activation"]
    assert float(rows[0]["eval_sparsity"]) > 0.2 and float(rows[1]["eval_sparsity"]) == 0.0  # relu / silu
    assert int(rows[2]["params_non_embedding"]) > int(rows[0]["params_non_embedding"])
    points = list(csv.DictReader((res / "law_points.csv").open()))
    assert len(points) == 4 * (STEPS // EVERY - 1) and {p["run"] for p in points} == {r["run"] for r in rows}
    for png in ("law_fit.png", "law_limits.png"):
        assert (res / png).stat().st_size > 10_000, png
    cached = (res / "law_ratios" / "s16-relu.json").read_bytes()
    rc, _, _ = main(capsys, "aggregate", f"--sweep={ref}", f"--root={root}", "--input=exact_zero")  # cheap input
    assert rc == 0 and (res / "law_ratios" / "s16-relu.json").read_bytes() == cached
    assert {r["law_input"] for r in csv.DictReader((res / "results.csv").open())} == {"exact_zero"}


@pytest.mark.slow
def test_aggregate_fits_only_the_steps_up_to_the_sweeps_max_step(finished_sweep, tmp_path):
    import dataclasses

    from prosparse_jax.analysis import law_fit
    from prosparse_jax.sweeps import aggregate
    from prosparse_jax.training.memory_plan import describe

    ref, root, rc, _ = finished_sweep
    assert rc == 0
    s = load(ref)
    out, lines = tmp_path / "agg", []
    # cett_ppl, max_step = 10: checkpoints 4..10 searched and measured, 12 (in the LR decay) left out
    aggregate.aggregate(dataclasses.replace(s, analysis={**s.analysis, "max_step": 10}), root, out,
                        echo=lines.append)
    points = list(csv.DictReader((out / "law_points.csv").open()))
    rows = list(csv.DictReader((out / "results.csv").open()))
    for r in rows:
        assert [int(p["step"]) for p in points if p["run"] == r["run"]] == [4, 6, 8, 10]
        assert (r["law_min_step"], r["law_max_step"], r["law_points"]) == (str(WARMUP), "10", "4")
        cache = json.loads((out / "law_ratios" / f"{r['run']}.json").read_text())
        assert cache["search_checkpoints"] == [4, 6, 8, 10] and cache["dropped_after_max_step"] == [12]
        # 4 points: the SiLU law (3 parameters) fits, the ReLU law (4) needs more
        assert (r["law_error"] == "") == (r["activation"] == "silu"), r
    assert sum("after --max_step=10 [12]" in line for line in lines) == 4
    # the cache of another window is recomputed, not reused
    aggregate.aggregate(dataclasses.replace(s, analysis={**s.analysis, "max_step": 8}), root, out, echo=lines.append)
    assert json.loads((out / "law_ratios" / "s16-relu.json").read_text())["search_checkpoints"] == [4, 6, 8]
    # decay_start: each run's own (describe's decay_start_step: 12 - round(0.4 * 12) = 7), on the cheap input
    decay_start = describe(s.runs[0].rc)["decay_start_step"]
    assert decay_start == 7
    aggregate.aggregate(dataclasses.replace(s, analysis={**s.analysis, "max_step": law_fit.DECAY_START}), root, out,
                        law_input="exact_zero", echo=lines.append)
    points = list(csv.DictReader((out / "law_points.csv").open()))
    assert [int(p["step"]) for p in points if p["run"] == "s32-silu"] == [4, 6]  # train entries in (2, 7]
    assert {r["law_max_step"] for r in csv.DictReader((out / "results.csv").open())} == {str(decay_start)}


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_redoing_finished_runs(tmp_path, corpus, capfd):
    from prosparse_jax.training.train import train

    ref = write_sweep(tmp_path / "sw.py", corpus) + ":1x2"
    root = tmp_path / "root"
    s = load(ref)
    assert sweep.main(["task", f"--sweep={ref}", f"--root={root}", "--index=0"]) == 0  # s16-relu: finished
    train(s.runs[1].config, root / "s16-silu")
    killed_after(root / "s16-silu", 6)  # s16-silu: killed right after its checkpoint of step 6
    assert ckpt.latest_step(root / "s16-silu") == 6
    before = snapshot(root / "s16-relu")
    capfd.readouterr()
    assert sweep.main(["status", f"--sweep={ref}", f"--root={root}"]) == 0
    table = {ln.split()[1]: ln.split()[2:4] for ln in capfd.readouterr().out.splitlines()[2:]}
    assert table == {"s16-relu": ["done", f"{STEPS}/{STEPS}"], "s16-silu": ["partial", f"6/{STEPS}"]}

    assert sweep.main(["run", f"--sweep={ref}", f"--root={root}", "--parallel=2", "--interval=1"]) == 0
    out = capfd.readouterr().out
    assert "skipping 1 finished run(s): s16-relu" in out and "started s16-silu" in out and "resuming from step 6" in out
    assert "started s16-relu" not in out
    assert snapshot(root / "s16-relu") == before  # not touched: same files, contents and mtimes
    assert sweep_progress.is_finished(root / "s16-silu", STEPS)
    assert "resuming" in (root / "logs" / "s16-silu.log").read_text()
    steps = [e["step"] for e in read_metrics(root / "s16-silu", "train")]
    assert steps == list(range(EVERY, STEPS + 1, EVERY))  # one uninterrupted log: 2..6 kept, 8..12 resumed

    assert sweep.main(["run", f"--sweep={ref}", f"--root={root}"]) == 0  # all finished: nothing is started
    assert "started" not in capfd.readouterr().out and snapshot(root / "s16-relu") == before


@pytest.mark.slow
def test_ctrl_c_stops_every_run_with_a_checkpoint(tmp_path, corpus):
    ref = write_sweep(tmp_path / "sw.py", corpus, steps=4000) + ":1x2"
    root = tmp_path / "root"
    cmd = [sys.executable, "-m", "prosparse_jax.main.sweep", "run", f"--sweep={ref}", f"--root={root}",
           "--parallel=2", "--interval=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not all(
            (e := sweep_progress.last_train_entry(root / n / "metrics.jsonl")) and e["step"] >= 4
            for n in ("s16-relu", "s16-silu")):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 130, out
    assert "rerun the command to resume" in out
    for n in ("s16-relu", "s16-silu"):
        step = ckpt.latest_step(root / n)
        assert step is not None and 4 <= step < 4000, out  # saved on SIGTERM, not finished
        assert not (root / "logs" / f"{n}.running").exists()
    status = subprocess.run([*cmd[:3], "status", f"--sweep={ref}", f"--root={root}"], capture_output=True,
                            text=True)
    assert [ln.split()[2] for ln in status.stdout.splitlines()[2:]] == ["partial", "partial"], status.stdout


@pytest.mark.slow
def test_a_run_its_trainer_still_holds_is_waited_for_not_started_twice(tmp_path, corpus, capfd):
    """A trainer left running by a launcher that died holds its workdir's lock: status shows the run running, task
    refuses it in one line, and run waits for it instead of starting a second trainer on the same workdir."""
    from prosparse_jax.sweeps.launch import prepare_corpora

    steps = 200
    ref = write_sweep(tmp_path / "sw.py", corpus, steps=steps,
                      extra='"train.checkpoint_every": 50, "train.keep_period": 50') + ":1x2"
    root = tmp_path / "root"
    s = load(ref)
    prepare_corpora(s.runs, print)  # before the orphan starts: one process prepares the dataset
    wd = root / "s16-relu"
    orphan = subprocess.Popen(s.command(root, s.runs[0]), cwd=Path(__file__).resolve().parents[2],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (wd / ".lock").exists() and orphan.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        capfd.readouterr()
        assert sweep.main(["status", f"--sweep={ref}", f"--root={root}"]) == 0
        table = {ln.split()[1]: ln.split()[2] for ln in capfd.readouterr().out.splitlines()[2:]}
        assert table == {"s16-relu": "running", "s16-silu": "pending"}, table
        assert sweep.main(["task", f"--sweep={ref}", f"--root={root}", "--index=0"]) == 1
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is in use by train (pid {orphan.pid} " in err[0], err
        assert sweep.main(["run", f"--sweep={ref}", f"--root={root}", "--parallel=2", "--interval=1"]) == 0
        out = capfd.readouterr().out
    finally:
        if orphan.poll() is None:
            orphan.kill()
        orphan.wait()
    assert f"s16-relu is being trained by train (pid {orphan.pid} " in out and "started s16-relu" not in out, out
    assert "started s16-silu" in out and f"finished s16-relu (trained by train (pid {orphan.pid} " in out, out
    assert [e["step"] for e in read_metrics(wd, "train")] == list(range(EVERY, steps + 1, EVERY))  # one writer
    assert orphan.returncode == 0 and sweep_progress.is_finished(wd, steps)
