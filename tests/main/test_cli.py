"""Every CLI (prosparse_jax.main.*, experiments/): --help, and each user error as ONE line on stderr, exit code 1, no
traceback (--verbose shows it), while a bug keeps its traceback: unknown flags and config fields (did-you-mean), a
missing config file, an output path in the way (refused before any work), corrupt JSON / safetensors / checkpoints
(named), a full disk (the previous outputs kept)."""

import errno
import importlib
import json
import shutil
import warnings
from pathlib import Path

import matplotlib.figure
import pytest
from absl import flags
from conftest import one_error_line, random_params, tiny_model_config, write_bpe_tokenizer

from prosparse_jax.errors import DataError, InputError
from prosparse_jax.hf import io as hf
from prosparse_jax.main import analyze, common, describe, export_hf, generate, import_hf, permute, score, train
from prosparse_jax.main import predictor as predictor_cli
from prosparse_jax.training import checkpoint

ROOT = Path(__file__).resolve().parents[2]
CLIS = {"analyze": (analyze, "--metric"), "describe": (describe, "--config"), "export_hf": (export_hf, "--format"),
        "generate": (generate, "--prompt"), "import_hf": (import_hf, "--hf"), "permute": (permute, "--order"),
        "predictor": (predictor_cli, "--rank"), "score": (score, "--text"), "train": (train, "--workdir")}
VOCAB = 300
SEQ_LEN = 16  # the params-only workdir's data.seq_len: score's context window


def _experiment(name):
    """An ``experiments/`` script, imported as the module ``experiments.<name>`` (the repository root is on
    the path: pyproject's pytest ``pythonpath``)."""
    return importlib.import_module(f"experiments.{name}")


def boom(*args, **kwargs):
    raise AssertionError("work was done before the output path was checked")


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: a params-only workdir with a tokenizer, and its HF export (no training: built in a second)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    return write_bpe_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", VOCAB)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory, tokenizer_file):
    """(workdir, HF folder) of the same tiny random model; the workdir's run config has data.seq_len = SEQ_LEN."""
    root = tmp_path_factory.mktemp("model")
    cfg = tiny_model_config(vocab_size=VOCAB)
    params = random_params(cfg)
    wd = checkpoint.write_params_workdir(root / "wd", cfg, params, run_config={"data": {"seq_len": SEQ_LEN}})
    shutil.copyfile(tokenizer_file, wd / "tokenizer.json")
    hf_dir = hf.save_hf_folder(cfg, params, root / "hf", tokenizer_json=tokenizer_file)
    return wd, hf_dir


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------------------------
# common.run / common.call: user errors are one line, bugs keep their traceback
# ---------------------------------------------------------------------------------------------------------------
def _raise(e):
    def body():
        raise e
    return body


def test_run_prints_a_user_error_as_one_line_and_lets_a_bug_through(capsys):
    assert common.run("tool", flags.FlagValues(), ["tool"], _raise(DataError("no corpus"))) == 1
    assert one_error_line(capsys, "tool") == "tool: error: no corpus"
    with pytest.raises(DataError):  # --verbose: the traceback, for a bug report
        common.run("tool", flags.FlagValues(), ["tool", "--verbose"], _raise(DataError("no corpus")))
    with pytest.raises(ValueError, match="a bug"):
        common.run("tool", flags.FlagValues(), ["tool"], _raise(ValueError("a bug")))
    assert common.run("tool", flags.FlagValues(), ["tool"], lambda: ("stopped", 130)) == 130
    assert capsys.readouterr().out == "stopped\n"


def test_a_library_warning_is_one_line_naming_the_tool(capsys):
    def body():
        warnings.warn("the weights carry no digests;\n  loading them unverified", UserWarning, stacklevel=1)
        return "done"

    assert common.run("tool", flags.FlagValues(), ["tool"], body) == 0
    captured = capsys.readouterr()
    assert captured.out == "done\n"
    assert captured.err == "tool: warning: the weights carry no digests; loading them unverified\n"


def test_call_prints_a_user_error_as_one_line_and_lets_a_bug_through(capsys):
    assert common.call("tool", [], _raise(InputError("x.json: not valid JSON"))) == 1
    assert one_error_line(capsys, "tool") == "tool: error: x.json: not valid JSON"
    with pytest.raises(InputError):
        common.call("tool", ["--verbose"], _raise(InputError("x.json: not valid JSON")))
    with pytest.raises(OSError):
        common.call("tool", [], _raise(OSError("a bug")))


# ---------------------------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CLIS))
def test_help_prints_the_tool_and_its_flags(name, capsys):
    mod, flag = CLIS[name]
    assert mod.main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert mod.__doc__.strip().splitlines()[0] in out and flag in out and "--[no]verbose" in out


@pytest.mark.parametrize("name", sorted(CLIS))
def test_unknown_flag_is_one_line_error(name, capsys):
    mod, _ = CLIS[name]
    assert mod.main([name, "--no_such_flag=1"]) == 1
    assert "no_such_flag" in one_error_line(capsys, name)


def test_argparse_usage_errors_are_one_line(capsys):
    from prosparse_jax.main import fit_laws

    assert fit_laws.main(["--form=relux", "--out=f.png", "wd"]) == 1
    assert "relux" in one_error_line(capsys, "fit_laws")
    bench = _experiment("bench_train")
    assert bench.main(["--shapes=tiny,huge"]) == 1  # a typo in a list flag is refused before any measurement
    assert "'huge'" in one_error_line(capsys, "bench_train")


# ---------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,expected", [
    ("--config.model.d_modle=3", "'model' has no field 'd_modle' (did you mean 'd_model'?)"),
    ("--config.optim.lrr=0.1", "'optim' has no field 'lrr' (did you mean 'lr'?)"),
    ("--config.modle.d_model=3", "no section or field 'modle' (did you mean 'model'?)"),
    ("--config.init_frm=x", "no section or field 'init_frm' (did you mean 'init_from'?)"),
])
def test_unknown_config_override_names_the_field_and_the_nearest(override, expected, capsys):
    assert describe.main(["describe", f"--config={ROOT}/configs/prosparse.py:tiny", override]) == 1
    line = one_error_line(capsys, "describe")
    assert override.split("=")[0] in line and expected in line


def test_unknown_field_in_a_config_file_suggests_the_nearest(tmp_path, capsys):
    (tmp_path / "typo.py").write_text("from prosparse_jax.config import base_config\n\n\ndef get_config():\n"
                                      "    c = base_config()\n    c.train.stpes = 3\n    return c\n")
    assert describe.main(["describe", f"--config={tmp_path / 'typo.py'}"]) == 1
    assert "['stpes'] (did you mean 'steps'?)" in one_error_line(capsys, "describe")


def test_missing_or_broken_config_file(tmp_path, capsys):
    assert describe.main(["describe", f"--config={tmp_path / 'nope.py'}:tiny"]) == 1
    line = one_error_line(capsys, "describe")
    assert "--config" in line and "nope.py" in line and "No such file" in line
    (tmp_path / "broken.py").write_text("def get_config(:\n")
    assert describe.main(["describe", f"--config={tmp_path / 'broken.py'}"]) == 1
    assert "broken.py line 1" in one_error_line(capsys, "describe")
    assert describe.main(["describe", f"--config={ROOT}/configs/prosparse.py:tinyy"]) == 1
    assert "unknown name 'tinyy'" in one_error_line(capsys, "describe")


def test_train_config_errors_are_one_line(tmp_path, capsys):
    tiny = f"--config={ROOT}/configs/prosparse.py:tiny"
    assert train.main(["train", tiny, "--config.model.d_modle=3", f"--workdir={tmp_path}/w"]) == 1
    assert "(did you mean 'd_model'?)" in one_error_line(capsys, "train")
    assert train.main(["train", f"--config={tmp_path / 'nope.py'}:tiny", f"--workdir={tmp_path}/w"]) == 1
    assert "nope.py" in one_error_line(capsys, "train")
    assert train.main(["train", tiny]) == 1
    assert "--workdir: required" in one_error_line(capsys, "train")
    assert not (tmp_path / "w").exists()  # nothing was started


def test_describe_still_describes(capsys):
    assert describe.main(["describe", f"--config={ROOT}/configs/prosparse.py:tiny", "--config.model.n_layers=2"]) == 0
    assert json.loads(capsys.readouterr().out)["n_layers"] == 2


# ---------------------------------------------------------------------------------------------------------------
# Output paths in the way: refused before anything is loaded
# ---------------------------------------------------------------------------------------------------------------
def test_output_that_is_a_file_is_refused_before_any_work(model_files, tmp_path, capsys, monkeypatch):
    # models that fail to load: an error naming the output proves that it was checked first
    wd, hf_dir = _copy(model_files[0], tmp_path / "wd"), _copy(model_files[1], tmp_path / "hf")
    shutil.rmtree(wd / "checkpoints")
    (hf_dir / "model.safetensors").unlink()
    afile = tmp_path / "afile"
    afile.write_text("keep")
    for name, mod, args in (
        ("analyze", analyze, [f"--checkpoint={wd}", f"--out={afile}", "--metric=exact"]),
        ("export_hf", export_hf, [f"--workdir={wd}", f"--out={afile}"]),
        ("export_hf", export_hf, [f"--workdir={wd}", f"--out={afile}", "--overwrite"]),
        ("import_hf", import_hf, [f"--hf={hf_dir}", f"--workdir={afile / 'sub'}"]),
        ("permute", permute, [f"--checkpoint={wd}", f"--out={afile}"]),
    ):
        assert mod.main([name, *args]) == 1
        assert str(afile) in one_error_line(capsys, name)
    mini = _experiment("prosparse_miniature")
    monkeypatch.setattr(mini, "train", boom)
    assert mini.main(["prosparse_miniature", f"--workdir={afile}"]) == 1
    assert "--workdir" in one_error_line(capsys, "prosparse_miniature")
    from prosparse_jax.main import fit_laws

    assert fit_laws.main(["--form=relu", f"--out={tmp_path}", str(wd)]) == 1  # --out names a PNG, not a folder
    assert "is a directory" in one_error_line(capsys, "fit_laws")
    bench = _experiment("bench_train")
    assert bench.main(["--shapes=tiny", f"--out={afile / 'bench.json'}"]) == 1
    assert "--out" in one_error_line(capsys, "bench_train")
    assert afile.read_text() == "keep"


# ---------------------------------------------------------------------------------------------------------------
# Corrupt inputs: the message names the file
# ---------------------------------------------------------------------------------------------------------------
def test_corrupt_json_names_the_file(model_files, tmp_path, capsys):
    wd, hf_dir = model_files
    bad_wd, bad_hf = _copy(wd, tmp_path / "wd"), _copy(hf_dir, tmp_path / "hf")
    (bad_wd / "config.json").write_text('{"model": ')
    (bad_hf / "config.json").write_text("{bad")
    for name, mod, args in (
        ("score", score, [f"--checkpoint={bad_wd}", "--text=hello"]),
        ("score", score, [f"--checkpoint={bad_hf}", "--text=hello"]),
        ("export_hf", export_hf, [f"--workdir={bad_wd}", f"--out={tmp_path / 'o1'}"]),
        ("import_hf", import_hf, [f"--hf={bad_hf}", f"--workdir={tmp_path / 'o2'}"]),
        ("analyze", analyze, [f"--checkpoint={bad_wd}", f"--out={tmp_path / 'o3'}", "--metric=exact"]),
    ):
        assert mod.main([name, *args]) == 1
        line = one_error_line(capsys, name)
        assert "config.json" in line and "not valid JSON" in line and str(tmp_path) in line
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))
    with pytest.raises(InputError, match="config.json"):  # --verbose: the traceback, for a bug report
        score.main(["score", f"--checkpoint={bad_wd}", "--text=hello", "--verbose"])


@pytest.mark.parametrize("damage", ["truncate_header", "truncate_data", "garbage"])
def test_corrupt_safetensors_names_the_file(model_files, tmp_path, capsys, damage):
    _, hf_dir = model_files
    bad = _copy(hf_dir, tmp_path / "hf")
    st = bad / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes({"truncate_header": data[:100], "truncate_data": data[: len(data) // 2],
                    "garbage": b"\0" * 1000}[damage])
    assert import_hf.main(["import_hf", f"--hf={bad}", f"--workdir={tmp_path / 'wd'}"]) == 1
    assert str(st) in one_error_line(capsys, "import_hf")
    assert not (tmp_path / "wd").exists()
    assert score.main(["score", f"--checkpoint={bad}", "--text=hello"]) == 1
    assert str(st) in one_error_line(capsys, "score")


def test_truncated_checkpoint_suggests_the_intact_older_step(model_files, tmp_path, capsys):
    wd = _copy(model_files[0], tmp_path / "wd")
    mcfg, params, _ = checkpoint.load_model(wd)
    mgr = checkpoint.manager(wd, async_save=False)
    checkpoint.save(mgr, 5, params, None, {"step": 5, "model": {}}, force=True)
    mgr.wait_until_finished()
    mgr.close()
    biggest = max((wd / "checkpoints" / "5" / "params").rglob("*"), key=lambda p: p.stat().st_size if p.is_file()
                  else 0)
    biggest.write_bytes(biggest.read_bytes()[:100])
    assert score.main(["score", f"--checkpoint={wd}", "--text=hello"]) == 1
    line = one_error_line(capsys, "score")
    assert "checkpoints/5" in line and "--step=0" in line


def test_score_missing_input_file(model_files, tmp_path, capsys):
    assert score.main(["score", f"--checkpoint={model_files[0]}", f"--input={tmp_path / 'nope.txt'}"]) == 1
    line = one_error_line(capsys, "score")
    assert "--input" in line and "nope.txt" in line


# ---------------------------------------------------------------------------------------------------------------
# Disk full: the path is named and the previous outputs are untouched
# ---------------------------------------------------------------------------------------------------------------
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(args[0]) if args else None)


def _assert_disk_full_line(line: str, path: Path) -> None:
    assert str(path) in line and "no space left on device" in line and "not touched" in line


def test_disk_full_during_export_keeps_the_previous_export(model_files, tmp_path, capsys, monkeypatch):
    wd, _ = model_files
    out = tmp_path / "hf"
    assert export_hf.main(["export_hf", f"--workdir={wd}", f"--out={out}"]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(hf, "_write_json", _enospc)  # the weights are written, then config.json fails
    assert export_hf.main(["export_hf", f"--workdir={wd}", f"--out={out}", "--overwrite", "--dtype=bfloat16"]) == 1
    _assert_disk_full_line(one_error_line(capsys, "export_hf"), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no staging folder left behind


def test_disk_full_writing_a_plot_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    from prosparse_jax.main import fit_laws

    wd = tmp_path / "wd"
    wd.mkdir()
    rows = [{"kind": "train", "step": i, "tokens_seen": 1e9 * i, "sparsity": 0.5 - 0.1 / i} for i in range(1, 9)]
    (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = tmp_path / "fit.png"
    png.write_bytes(b"previous plot")

    def full_disk(fig, out, *args, **kw):
        Path(out).write_bytes(b"half a pl")
        _enospc(out)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    assert fit_laws.main(["--input=exact_zero", "--form=silu", f"--out={png}", str(wd)]) == 1
    _assert_disk_full_line(one_error_line(capsys, "fit_laws"), png)
    assert png.read_bytes() == b"previous plot" and sorted(p.name for p in tmp_path.iterdir()) == ["fit.png", "wd"]


# ---------------------------------------------------------------------------------------------------------------
# score: a text longer than the context is scored in windows, with a warning (the windows: tests/inference)
# ---------------------------------------------------------------------------------------------------------------
def test_score_warns_when_the_text_is_scored_in_windows(model_files, capsys):
    text = "the quick brown fox jumps over the lazy dog, hello world " * 4
    assert score.main(["score", f"--checkpoint={model_files[0]}", f"--text={text}"]) == 0
    captured = capsys.readouterr()
    n = json.loads(captured.out)["num_tokens"]
    err = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("score: warning:") and f"{n} tokens" in err[0]
    assert f"context of {SEQ_LEN} tokens" in err[0] and "--window" in err[0]


def test_main_job_refuses_a_grid_it_cannot_read_before_training(tmp_path, monkeypatch, capsys):
    mini = _experiment("prosparse_miniature")

    def boom(*a, **k):
        raise AssertionError("trained before the flags were checked")

    monkeypatch.setattr(mini, "train", boom)
    for args, named in ((["--lambdas=1e-4,2e-4"], "--lambdas"), (["--lambdas=0"], "--lambdas"),
                        (["--relative_thresholds=0.5,1"], "start the grid at 0"),
                        (["--cett_targets=0,abc"], "--cett_targets"), (["--seeds=0"], "--seeds"),
                        (["--lambdas=0,-1e-4"], "--lambdas")):
        assert mini.main(["prosparse_miniature", f"--workdir={tmp_path / 'mj'}", *args]) == 1
        assert named in one_error_line(capsys, "prosparse_miniature")
    assert not (tmp_path / "mj").exists()
