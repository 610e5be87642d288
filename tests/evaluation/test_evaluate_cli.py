"""``python -m prosparse_jax.main.evaluate`` end to end: the offline tasks in dense and one sparse mode on a tiny
workdir (lm-eval's JSON per mode, the table, the figure, the sparsity of each task), and bad input in one line."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import one_error_line, random_params, tiny_model_config, write_bpe_tokenizer

pytest.importorskip("lm_eval")

from prosparse_jax.main import evaluate  # noqa: E402
from prosparse_jax.training import checkpoint  # noqa: E402

VOCAB = 300


def make_workdir(root, activation: str = "relu"):
    tok = write_bpe_tokenizer(root / "tokenizer.json", VOCAB)
    cfg = tiny_model_config(vocab_size=VOCAB, activation=activation)
    wd = checkpoint.write_params_workdir(root / f"wd_{activation}", cfg, random_params(cfg, seed=2),
                                         run_config={"data": {"seq_len": 32}})
    shutil.copyfile(tok, wd / "tokenizer.json")
    return wd


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory):
    return make_workdir(tmp_path_factory.mktemp("cli"))


def test_offline_tasks_in_dense_and_fatrelu(workdir, tmp_path, capsys) -> None:
    out = tmp_path / "eval"
    rc = evaluate.main(["evaluate", f"--checkpoint={workdir}", "--tasks=stdlib_next_line,stdlib_ppl",
                        "--modes=dense,fatrelu:0.02", f"--out={out}", "--limit=3", "--progress=false",
                        "--compilation_cache="])  # on, it would hold the test process's every later compilation
    printed = capsys.readouterr().out
    assert rc == 0
    assert "| stdlib_next_line | acc |" in printed and "| stdlib_ppl | word_perplexity |" in printed
    rows = json.loads((out / "table.json").read_text())
    assert {(r["task"], r["mode"]) for r in rows} == {(t, m) for t in ("stdlib_next_line", "stdlib_ppl")
                                                      for m in ("dense", "fatrelu:0.02")}
    sp = {(r["task"], r["mode"]): r["sparsity"] for r in rows}
    for t in ("stdlib_next_line", "stdlib_ppl"):
        assert 0 < sp[(t, "dense")] < sp[(t, "fatrelu:0.02")] < 1  # the threshold adds zeros to ReLU's
    for slug in ("dense", "fatrelu_0.02"):
        res = json.loads((out / f"{slug}.json").read_text())
        entry = res["results"]["stdlib_next_line"]
        assert 0 <= entry["acc,none"] <= 1 and len(entry["sparsity"]["sparsity_per_layer"]) == 2
        assert res["prosparse"]["add_bos"] is True and res["prosparse"]["tokens"] > 0
    assert json.loads((out / "fatrelu_0.02.json").read_text())["prosparse"]["settings"]["threshold"] == 0.02
    assert (out / "accuracy_vs_sparsity.png").stat().st_size > 0 and (out / "tasks" / "manifest.json").is_file()
    # a second run into the same folder is refused before any work
    assert evaluate.main(["evaluate", f"--checkpoint={workdir}", "--tasks=stdlib_ppl", f"--out={out}",
                          "--compilation_cache="]) == 1
    assert "already holds evaluation results" in one_error_line(capsys, "evaluate")


def local_task(d, data: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "d.jsonl").write_text(data)
    (d / "mine.yaml").write_text(f"task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                 f"    test: {d}/d.jsonl\n"
                                 "output_type: loglikelihood\ntest_split: test\ndoc_to_text: q\ndoc_to_target: a\n"
                                 "metric_list:\n  - metric: acc\n")


@pytest.mark.parametrize(("args", "expected"), [
    (["--modes=dense,topk:2.5"], "mode 'topk:2.5': k must be a fraction"),
    (["--modes=thresholds"], "prosparse_jax.main.analyze --checkpoint="),
    (["--tasks=mine", "--include_path={tmp}/empty"], "no documents"),
    (["--tasks=mine", "--include_path={tmp}/broken"], "d.jsonl line 2: not valid JSON"),
])
def test_bad_input_is_one_line(tmp_path, capsys, args: list[str], expected: str) -> None:
    wd = make_workdir(tmp_path, "silu")
    local_task(tmp_path / "empty", "")
    local_task(tmp_path / "broken", '{"q": "a", "a": " b"}\n{"q": \n')
    base = {"--tasks": "--tasks=stdlib_ppl", "--modes": "--modes=dense"}
    argv = [a.format(tmp=tmp_path) for a in args]
    argv += [v for k, v in base.items() if not any(a.startswith(k + "=") for a in argv)]
    rc = evaluate.main(["evaluate", f"--checkpoint={wd}", f"--out={tmp_path}/out", "--compilation_cache=", *argv])
    assert rc == 1
    assert expected in one_error_line(capsys, "evaluate")
    assert not (tmp_path / "out" / "table.md").exists()
