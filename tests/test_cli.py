"""The library's absl CLIs share one shape (prosparse_jax.cli.run): --help, flag errors, exit codes."""

import pytest

from prosparse_jax import analyze, export_hf, import_hf, score

CLIS = {"analyze": (analyze, "--metric"), "export_hf": (export_hf, "--format"), "import_hf": (import_hf, "--hf"),
        "score": (score, "--text")}


@pytest.mark.parametrize("name", sorted(CLIS))
def test_help_prints_the_tool_and_its_flags(name, capsys):
    mod, flag = CLIS[name]
    assert mod.main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert mod.__doc__.strip().splitlines()[0] in out and flag in out


@pytest.mark.parametrize("name", sorted(CLIS))
def test_unknown_flag_is_one_line_error(name, capsys):
    mod, _ = CLIS[name]
    assert mod.main([name, "--no_such_flag=1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{name}: error:") and "no_such_flag" in err and "\n" not in err
