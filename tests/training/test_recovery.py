"""Recovery paths of a workdir: a start that saved no checkpoint, a lost or damaged config.json, a params-only
workdir, a checkpoint save that fails (disk full, quota, read-only) -- each one line, nothing saved lost."""

import errno
import json
import re
import resource
import shutil
import signal
import warnings
from pathlib import Path

import orbax.checkpoint as ocp
import pytest
from conftest import small_run_config, write_corpus

from prosparse_jax.errors import CheckpointError, InputError, NonFiniteLossError, TrainError
from prosparse_jax.main import train as train_cli
from prosparse_jax.training import checkpoint as ckpt
from prosparse_jax.training import model_io
from prosparse_jax.training import train as train_mod


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("c") / "corpus")


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):
    """(config, workdir) of a finished 4-step run with checkpoints 2 and 4; tests change copies of it."""
    c = small_run_config(corpus, 4)
    wd = tmp_path_factory.mktemp("finished") / "run"
    train_mod.train(c, wd)
    return c, wd


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


# ---------------------------------------------------------------------------------------------------------------
# A start that saved no checkpoint holds nothing to resume
# ---------------------------------------------------------------------------------------------------------------
def test_nan_stop_before_any_checkpoint_lets_the_fixed_config_run_in_the_same_workdir(corpus, tmp_path):
    """lambda = 1e38 from the first update overflows the loss before the first checkpoint: the error says nothing is
    lost, and the corrected command (another config) runs in the same workdir, replacing config.json with one
    warning naming what changed."""
    wd = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="at step 0 .*No checkpoint was saved.* same --workdir"):
        train_mod.train(small_run_config(corpus, 4, stages=[[1e38, 4]]), wd)
    assert (wd / "config.json").exists() and ckpt.latest_step(wd) is None
    fixed = small_run_config(corpus, 4)
    with pytest.warns(UserWarning, match=r"holds no checkpoint, so nothing to resume: its config\.json.* is replaced "
                      r"by this run's config \(sparsity\.stages: saved \[\[1e\+38, 4\]\] vs now \[\[0\.0, 4\]\]\)"):
        res = train_mod.train(fixed, wd)
    assert res.step == 4 and not res.interrupted
    assert json.loads((wd / "config.json").read_text()) == train_mod.json_config(fixed)


def test_nan_stop_after_a_checkpoint_keeps_the_config_check(corpus, tmp_path):
    """Once a checkpoint is saved, another config is refused as before (nothing saved is lost), and the NaN error
    says how to go on: a new workdir started from the last good checkpoint's weights."""
    wd = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=rf"Last good checkpoint: step 2 .*--config\.init_from={wd}"):
        train_mod.train(small_run_config(corpus, 4, stages=[[0.0, 2], [1e38, 4]]), wd)
    before = (wd / "config.json").read_text()
    with pytest.raises(TrainError, match=r"different config \(sparsity\.stages"):
        train_mod.train(small_run_config(corpus, 4), wd)
    assert (wd / "config.json").read_text() == before and ckpt.latest_step(wd) == 2


# ---------------------------------------------------------------------------------------------------------------
# config.json: lost (restored from the checkpoints) or not an object (one line)
# ---------------------------------------------------------------------------------------------------------------
def test_finished_run_restores_a_lost_config_json(finished, tmp_path):
    """Every checkpoint carries the run config: the rerun of a finished run restores config.json, with one warning."""
    c, src = finished
    wd = _copy(src, tmp_path / "run")
    saved = (wd / "config.json").read_text()
    (wd / "config.json").unlink()
    with pytest.warns(UserWarning, match=r"config\.json was missing: restored from checkpoint 4"):
        res = train_mod.train(c, wd)
    assert res.step == 4 and (wd / "config.json").read_text() == saved


def test_loading_a_workdir_restores_its_lost_config_json_once(finished, tmp_path):
    """generate / score / analyze / export_hf load through model_io: a lost config.json is restored from the latest
    checkpoint (one warning), not called "not a prosparse_jax workdir"; the export's context is the run's."""
    _, src = finished
    wd = _copy(src, tmp_path / "run")
    saved = json.loads((wd / "config.json").read_text())
    (wd / "config.json").unlink()
    with pytest.warns(UserWarning, match=r"config\.json was missing: restored from checkpoint 4"):
        mcfg, _, tok = model_io.load_model(wd)
    assert json.loads((wd / "config.json").read_text()) == saved and tok == wd / "tokenizer.json"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # restored once: no second warning
        assert model_io.load_model(wd)[0] == mcfg
    (wd / "config.json").unlink()
    with pytest.warns(UserWarning, match="restored from checkpoint 4"):
        assert model_io.model_context(wd) == saved["data"]["seq_len"]


@pytest.mark.parametrize("content", ["[]", '"run"', "3"])
def test_config_json_that_is_not_an_object_is_one_line(finished, tmp_path, content):
    """A config.json that is valid JSON but not an object is refused in one line saying how to get it back."""
    c, src = finished
    wd = _copy(src, tmp_path / "run")
    (wd / "config.json").write_text(content)
    match = (rf"config\.json: not a JSON object but [a-z ]+ {re.escape(content)}; delete it and rerun: it is "
             "restored from checkpoint 4")
    with pytest.raises(InputError, match=match):
        train_mod.train(c, wd)
    with pytest.raises(InputError, match=match):
        ckpt.load_model(wd)
    (wd / "config.json").unlink()  # the fix the message gives
    with pytest.warns(UserWarning, match="restored from checkpoint 4"):
        assert train_mod.train(c, wd).step == 4


# ---------------------------------------------------------------------------------------------------------------
# A params-only workdir (permute, import_hf) is trained from, not resumed
# ---------------------------------------------------------------------------------------------------------------
def test_params_only_workdir_is_refused_with_the_init_from_hint(finished, corpus, tmp_path):
    """A permuted workdir written with the run's own config (model.head_dim resolved: 0 -> 8) is refused without a
    spurious head_dim difference, naming --config.init_from; that command then trains from it."""
    c, src = finished
    run_config = json.loads((src / "config.json").read_text())
    assert run_config["model"]["head_dim"] == 0  # auto
    mcfg, params, _ = ckpt.load_model(src)
    perm = tmp_path / "perm"
    ckpt.write_params_workdir(perm, mcfg, params,
                              run_config=dict(run_config, permuted_from={"checkpoint": str(src), "order": "frequency"}))
    shutil.copyfile(src / "tokenizer.json", perm / "tokenizer.json")
    assert json.loads((perm / "config.json").read_text())["model"]["head_dim"] == 8  # resolved, as permute writes
    with pytest.raises(TrainError, match=rf"holds a params-only model \(permuted from {src}\).*differs in "
                       rf"permuted_from\.checkpoint, permuted_from\.order\)\. Train from it into a new workdir: "
                       rf"--config\.init_from={perm} --workdir=<new dir>") as e:
        train_mod.train(c, perm)
    assert "head_dim" not in str(e.value)
    c2 = small_run_config(corpus, 2)
    c2.init_from = str(perm)
    assert train_mod.train(c2, tmp_path / "continued").step == 2


def test_auto_and_resolved_values_of_the_same_model_are_no_change():
    saved = {"model": {"d_model": 32, "n_heads": 4, "head_dim": 8}, "optim": {"lr": 1e-3}}
    assert train_mod.config_changes(saved, {"model": {"d_model": 32, "n_heads": 4, "head_dim": 0},
                                            "optim": {"lr": 1e-3}}) == []
    assert train_mod.config_changes(saved, {"model": {"d_model": 32, "n_heads": 4, "head_dim": 16},
                                            "optim": {"lr": 1e-3}}) == [("model.head_dim", 8, 16)]


# ---------------------------------------------------------------------------------------------------------------
# A checkpoint save that fails: one line, the last completed checkpoint intact
# ---------------------------------------------------------------------------------------------------------------
def _assert_step_2_intact_and_resumable(c, wd):
    assert ckpt.latest_step(wd) == 2
    ckpt.load_model(wd, 2)  # reads back and matches its digests
    res = train_mod.train(c, wd)  # the rerun once the disk has room resumes from step 2
    assert res.step == 4 and ckpt.latest_step(wd) == 4
    assert not list((wd / "checkpoints").glob("*.orbax-checkpoint-tmp"))  # a half-written step was removed


def test_failed_checkpoint_save_is_one_checkpoint_error_and_keeps_the_last_one(finished, tmp_path, monkeypatch):
    c, src = finished
    wd = _copy(src, tmp_path / "run")
    shutil.rmtree(wd / "checkpoints" / "4")
    (wd / "final_eval.json").unlink()
    real_save = ocp.CheckpointManager.save

    def full(self, step, *a, **k):
        if step == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(wd / "checkpoints" / "4.orbax-checkpoint-tmp"))
        return real_save(self, step, *a, **k)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    with pytest.raises(CheckpointError, match=rf"^cannot save a checkpoint in {wd / 'checkpoints'}: no space left on "
                       r"device \(at .*4\.orbax-checkpoint-tmp\); the last completed checkpoint \(step 2\) is intact: "
                       r"free space and rerun the command to resume from it$"):
        train_mod.train(c, wd)
    monkeypatch.undo()
    _assert_step_2_intact_and_resumable(c, wd)


@pytest.mark.parametrize("error,message", [
    (OSError(errno.ENOSPC, "No space left on device", "/x/4/params"),
     r"no space left on device \(at /x/4/params\); .* free space and rerun"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), r"disk quota exceeded; .* free space \(or raise the quota\)"),
    (OSError(errno.EROFS, "Read-only file system"), r"read-only file system; .* make the directory writable"),
    (PermissionError(errno.EACCES, "Permission denied"), r"permission denied; .* make the directory writable"),
    (ValueError('RESOURCE_EXHAUSTED: Error writing local file "/x/4.orbax-checkpoint-tmp/_sharding": Failed to write '
                "6647 bytes to file 13: No space left on device [os_error_code='28']"),
     r"no space left on device \(at /x/4\.orbax-checkpoint-tmp/_sharding\); .* free space"),
])
def test_save_errors_names_the_cause_the_directory_and_the_intact_step(finished, error, message):
    """OSErrors the user can fix, and tensorstore's status text orbax raises as a ValueError, become one
    CheckpointError naming the checkpoint directory and the last completed step; anything else passes through."""
    _, wd = finished
    mgr = ocp.CheckpointManager(wd / "checkpoints")
    match = rf"^cannot save a checkpoint in {wd / 'checkpoints'}: {message}"
    with pytest.raises(CheckpointError, match=match) as e, ckpt.save_errors(mgr):
        raise error
    assert "the last completed checkpoint (step 4) is intact" in str(e.value) and "\n" not in str(e.value)
    for other in (ValueError("INVALID_ARGUMENT: bad shape"), OSError(errno.EIO, "Input/output error")):
        with pytest.raises(type(other)), ckpt.save_errors(mgr):
            raise other
    mgr.close()


def _file_size_limit_from_step_4(monkeypatch, limit: int = 100_000):
    """From the save of step 4 on, files cannot grow past ``limit`` bytes (``ulimit -f``): tensorstore's real
    failure, raised by orbax as a ValueError carrying the errno (EFBIG), as a full disk raises it (ENOSPC)."""
    real_save = ckpt.save
    old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.getsignal(signal.SIGXFSZ)

    def limited(mgr, step, *a, **k):
        if step == 4:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
        return real_save(mgr, step, *a, **k)

    def restore():
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)

    monkeypatch.setattr(ckpt, "save", limited)
    return restore


def test_real_write_failure_inside_orbax_is_one_checkpoint_error(finished, tmp_path, monkeypatch):
    """The failure raised by orbax's async writers (tensorstore's status, not an OSError) is recognised by its
    errno; the half-written step is removed by the rerun."""
    c, src = finished
    wd = _copy(src, tmp_path / "run")
    shutil.rmtree(wd / "checkpoints" / "4")
    (wd / "final_eval.json").unlink()
    c = c.copy_and_resolve_references()
    c.train.async_checkpoint = True
    restore = _file_size_limit_from_step_4(monkeypatch)
    try:
        with pytest.raises(CheckpointError, match=rf"^cannot save a checkpoint in {wd / 'checkpoints'}: file too large "
                           r"\(at .*4\.orbax-checkpoint-tmp.*\); the last completed checkpoint \(step 2\) is intact: "
                           r"raise the file-size limit"):
            train_mod.train(c, wd)
    finally:
        restore()
    monkeypatch.undo()
    _assert_step_2_intact_and_resumable(c, wd)


def test_failed_save_through_the_command_line_is_one_error_line(finished, corpus, tmp_path, monkeypatch, capfd):
    """`train` prints the failed save as one `train: error:` line: the tracebacks orbax's save threads log about it
    are dropped (they were ~720 lines on a full disk)."""
    _, src = finished
    wd = _copy(src, tmp_path / "run")
    shutil.rmtree(wd / "checkpoints" / "4")
    (wd / "final_eval.json").unlink()
    cfg = tmp_path / "cfg.py"
    cfg.write_text(f"import sys\nfrom pathlib import Path\nsys.path.insert(0, {str(Path(__file__).parents[1])!r})\n"
                   "from conftest import small_run_config\n\n\ndef get_config():\n"
                   f"    c = small_run_config(Path({str(corpus)!r}), 4)\n    c.train.async_checkpoint = True\n"
                   "    return c\n")
    restore = _file_size_limit_from_step_4(monkeypatch)
    capfd.readouterr()
    try:
        assert train_cli.main(["train", f"--config={cfg}", f"--workdir={wd}"]) == 1
    finally:
        restore()
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("WARNING:absl:Variant folder")]
    assert len(lines) == 1 and lines[0].startswith("train: error: cannot save a checkpoint in "), err
    assert "(step 2) is intact" in lines[0] and "Traceback" not in err
