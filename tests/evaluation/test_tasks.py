"""Offline tasks from a corpus's held-out split (deterministic, loadable by lm-eval); local task files checked with
the file and line of a problem named; unknown task names refused with the closest one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from prosparse_jax.data import corpus as corpus_lib  # noqa: E402
from prosparse_jax.errors import DataError, InputError, UsageError  # noqa: E402
from prosparse_jax.evaluation import tasks  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("pycorpus")
    for k in range(60):
        body = "".join(f"    value_{k}_{j} = compute({k}, {j * j})  # step {j}\n" for j in range(12))
        (d / f"m{k:02d}.py").write_text(f"def function_{k}(argument):\n{body}    return value_{k}_3\n")
    return f"files:{d}/*.py"


def test_offline_tasks_are_deterministic_and_from_the_held_out_split(corpus, tmp_path) -> None:
    a = tasks.build_offline_tasks(tmp_path / "a", source=corpus, eval_fraction=0.2, max_items=20, ppl_docs=5)
    b = tasks.build_offline_tasks(tmp_path / "b", source=corpus, eval_fraction=0.2, max_items=20, ppl_docs=5)
    for name in tasks.OFFLINE_TASKS:
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (tmp_path / "b" / f"{name}.jsonl").read_bytes()
        assert a["tasks"][name] == b["tasks"][name]
    docs = corpus_lib.list_documents(corpus)
    held = {d.doc_id for d, m in zip(docs, corpus_lib.eval_document_mask(
        [d.doc_id for d in docs], [d.size for d in docs], 0.2), strict=True) if m}
    items = [json.loads(ln) for ln in (tmp_path / "a" / f"{tasks.NEXT_LINE}.jsonl").read_text().splitlines()]
    assert len(items) == 20 and {it["doc_id"] for it in items} <= held
    for it in items:
        assert len(it["choices"]) == len(set(it["choices"])) == 4
        assert it["choices"][it["label"]] == it["target"]
        src = next(d for d in docs if d.doc_id == it["doc_id"])  # the item is the file's true next line
        lines = Path(src.path).read_text().split("\n")
        assert lines[it["line"] - 1] == it["target"] and it["context"].endswith(lines[it["line"] - 2] + "\n")
    assert tasks.check_task_dir(tmp_path / "a").keys() == set(tasks.OFFLINE_TASKS)


def test_an_empty_held_out_split_is_one_clear_error(corpus, tmp_path) -> None:
    with pytest.raises(DataError, match="gives no items"):
        tasks.build_offline_tasks(tmp_path, source=corpus, eval_fraction=0.0)


def test_malformed_task_yaml_names_the_file_and_line(tmp_path) -> None:
    (tmp_path / "bad.yaml").write_text("task: mine\ndataset_path: json\ndoc_to_text: [unclosed\nfoo: bar\n")
    with pytest.raises(InputError, match=r"bad\.yaml line \d+: malformed task YAML"):
        tasks.check_task_dir(tmp_path)


def test_malformed_jsonl_names_the_line(tmp_path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"a": 1}\n{"a": 2,\n')
    (tmp_path / "t.yaml").write_text(f"task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                     f"    test: {data}\n")
    with pytest.raises(InputError, match=r"d\.jsonl line 2: not valid JSON"):
        tasks.check_task_dir(tmp_path)
    data.write_text("")
    with pytest.raises(InputError, match="no documents"):
        tasks.check_task_dir(tmp_path)
    data.unlink()
    with pytest.raises(InputError, match="not found"):
        tasks.check_task_dir(tmp_path)


def test_a_function_tag_is_accepted(tmp_path) -> None:
    (tmp_path / "t.yaml").write_text("task: mine\ndoc_to_text: !function utils.text\n")
    assert tasks.check_task_dir(tmp_path) == {"mine": tmp_path / "t.yaml"}


@pytest.mark.slow
def test_an_unknown_task_is_refused_with_the_closest_name() -> None:
    with pytest.raises(UsageError, match="unknown task 'hellaswagg' \\(did you mean 'hellaswag'"):
        tasks.task_manager(["hellaswagg"], [])
