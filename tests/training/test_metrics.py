"""metrics.jsonl as a resumed run sees it: entries after the restored step and a line cut by a crash are moved aside,
never deleted; a corrupt line before the last one is an error naming the file and line."""

import json

import pytest

from prosparse_jax.errors import InputError
from prosparse_jax.training.metrics import IntervalMeans, MetricsWriter, read_metrics


def _write_log(workdir, steps, tail=""):
    lines = [json.dumps({"step": s, "kind": "train", "loss": float(s)}) for s in steps]
    (workdir / "metrics.jsonl").write_text("".join(x + "\n" for x in lines) + tail)


def test_a_line_cut_by_a_crash_is_skipped_by_readers(tmp_path):
    _write_log(tmp_path, [1, 2], tail='{"step": 3, "kind": "train", "lo')
    assert [r["step"] for r in read_metrics(tmp_path, "train")] == [1, 2]


def test_resume_moves_later_entries_and_the_cut_line_aside(tmp_path):
    _write_log(tmp_path, [1, 2, 3, 4], tail='{"step": 5, "kind": "train", "lo')
    writer = MetricsWriter(tmp_path, resume_step=2)
    writer.write(3, {"loss": 30.0})
    writer.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    discarded = (tmp_path / "metrics.discarded.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in discarded[:2]] == [3, 4] and discarded[2].endswith('"lo')


def test_a_corrupt_line_before_the_last_is_an_error(tmp_path):
    _write_log(tmp_path, [1, 2, 3])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(InputError, match=r"metrics\.jsonl:2: not a metrics entry"):
        read_metrics(tmp_path)
    with pytest.raises(InputError, match=r"metrics\.jsonl:2: not a metrics entry"):
        MetricsWriter(tmp_path, resume_step=3)
    assert (tmp_path / "metrics.jsonl").read_text().splitlines()[1] == "garbage"  # nothing was changed


def test_a_disabled_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=False)
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert list(tmp_path.iterdir()) == []


def test_interval_means_average_scalars_and_per_layer_vectors():
    means = IntervalMeans(("loss", "sparsity_per_layer"))
    means.add({"loss": 1.0, "sparsity_per_layer": [0.0, 0.5], "ignored": 7})
    means.add({"loss": 3.0, "sparsity_per_layer": [1.0, 0.5]})
    mean, n = means.pop()
    assert n == 2 and mean["loss"] == 2.0 and list(mean["sparsity_per_layer"]) == [0.5, 0.5]
    assert means.pop() == ({}, 0)
