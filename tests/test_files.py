"""prosparse_jax.files: sizes with units, JSON named in its errors, outputs checked before work and written whole."""

import errno
from pathlib import Path

import pytest

from prosparse_jax import files
from prosparse_jax.errors import InputError, OutputError, UsageError


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("text,expected", [
    ("80GB", 80 * 10**9), ("80GiB", 80 * 2**30), ("512 mib", 512 * 2**20), ("1.5GB", 1_500_000_000),
    ("2TB", 2 * 10**12), ("64KB", 64_000), ("100B", 100),
])
def test_parse_size_reads_decimal_and_binary_units(text, expected):
    assert files.parse_size(text) == expected


@pytest.mark.parametrize("text", ["eighty", "80", "80XB", "0GB", "-1GB", ""])
def test_parse_size_refuses_a_size_without_a_unit_or_not_positive(text):
    with pytest.raises(UsageError, match=f"--max_shard_size={text}: expected a positive size with a unit"):
        files.parse_size(text, "--max_shard_size")


def test_read_json_names_the_missing_or_corrupt_file(tmp_path):
    with pytest.raises(InputError, match=f"{tmp_path / 'a.json'}: config not found"):
        files.read_json(tmp_path / "a.json", "config")
    (tmp_path / "a.json").write_text('{"x": ')
    with pytest.raises(InputError, match=r"a\.json: not valid JSON \(line 1 column 7"):
        files.read_json(tmp_path / "a.json")


def test_output_checks_refuse_what_is_in_the_way(tmp_path):
    (tmp_path / "afile").write_text("keep")
    with pytest.raises(UsageError, match="out: .*afile is a file"):
        files.check_output_path(tmp_path / "afile", "out")
    with pytest.raises(UsageError, match="out: .*afile is a file, so"):
        files.check_output_path(tmp_path / "afile" / "sub", "out")
    assert files.check_output_path(tmp_path / "new" / "dir", "out") == tmp_path / "new" / "dir"
    with pytest.raises(UsageError, match="out: .* is not empty; pass --force"):
        files.check_empty_dir(tmp_path, "out", "pass --force")
    (tmp_path / "empty").mkdir()
    assert files.check_empty_dir(tmp_path / "empty", "out") == tmp_path / "empty"


def test_write_text_atomic_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    files.write_text_atomic(path, "old")
    monkeypatch.setattr(Path, "write_text", _enospc)
    with pytest.raises(OutputError, match="no space left on device.*not touched") as e:
        files.write_text_atomic(path, "new")
    monkeypatch.undo()
    assert isinstance(e.value.__cause__, OSError)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_staged_output_replaces_all_files_or_none(tmp_path):
    out = tmp_path / "out"
    with files.staged_output(out) as stage:
        (stage / "a.json").write_text("a1")
        (stage / "b.png").write_text("b1")
    with pytest.raises(OutputError, match="no space left on device.*not touched"), files.staged_output(out) as stage:
        (stage / "a.json").write_text("a2")
        _enospc()
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a.json": "a1", "b.png": "b1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind
