"""Tests for prosparse_jax.data: tokenizer cache, packed batch format, determinism, exact resume, sharding, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from prosparse_jax import data as dl
from prosparse_jax.config import ConfigError
from prosparse_jax.data import DataError

SEQ_LEN = 32
N_DOCS = 12
MARKER = re.compile(r"doc(\d\d)x")


def _write_corpus(root: Path) -> None:
    for k in range(N_DOCS):
        sub = root / ("a" if k % 2 else "b") / "deep"
        sub.mkdir(parents=True, exist_ok=True)
        lines = [f"doc{k:02d}x = {j} * {k} + len('doc{k:02d}x')" for j in range(3 + 4 * (k % 5))]
        (sub / f"f{k:02d}.py").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("corpus")
    _write_corpus(root)
    tfds_dir = tmp_path_factory.mktemp("tfds")
    cache = tmp_path_factory.mktemp("cache")
    cfg = dl.DataConfig(source=f"files:{root}/**/*.py", data_dir=str(tfds_dir), vocab_size=300, seq_len=SEQ_LEN,
                       eval_fraction=0.25)
    tok = dl.get_tokenizer(cfg, cache)
    return {"root": root, "cfg": cfg, "tok": tok, "cache": cache, "tfds_dir": tfds_dir}


def _take(it, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


def _same(a: list[dict], b: list[dict]) -> bool:
    return all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True))


def _markers(tok, batches: list[dict]) -> set[int]:
    """Document numbers found in the segments of the batches (each segment comes from one document)."""
    found = set()
    for b in batches:
        for inputs_T, seg_T in zip(b["inputs"], b["segment_ids"], strict=True):
            for s in np.unique(seg_T[seg_T > 0]):
                ids = MARKER.findall(tok.decode(inputs_T[seg_T == s].tolist()))
                assert len(set(ids)) <= 1, "a segment mixes documents"
                found.update(int(i) for i in ids)
    return found


# ---- tokenizer ----------------------------------------------------------------------------------------------------
def test_tokenizer_trains_caches_reloads(env):
    cfg, tok, cache = env["cfg"], env["tok"], env["cache"]
    assert (cache / "tokenizer.json").is_file() and (cache / "tokenizer_fingerprint.json").is_file()
    assert 257 < tok.get_vocab_size() <= 300 and dl.eos_id(tok) == 0  # fewer if merges run out
    text = "doc03x = 1 * 3 + len('héllo ☃')\n"
    assert tok.decode(tok.encode(text).ids) == text
    again = dl.get_tokenizer(cfg, cache)
    assert again.to_str() == tok.to_str()
    loaded = dl.get_tokenizer(dl.DataConfig(tokenizer=str(cache / "tokenizer.json")), cache)
    assert loaded.encode(text).ids == tok.encode(text).ids


def test_tokenizer_fingerprint_mismatch_raises(env):
    cfg = dl.data_config_from_dict({**env["cfg"].__dict__, "vocab_size": 320})
    before = (env["cache"] / "tokenizer.json").read_text()
    with pytest.raises(DataError, match="cached tokenizer"):
        dl.get_tokenizer(cfg, env["cache"])
    assert (env["cache"] / "tokenizer.json").read_text() == before


def test_tokenizer_missing_path_raises(tmp_path):
    with pytest.raises(DataError, match="data.tokenizer"):
        dl.get_tokenizer(dl.DataConfig(tokenizer=str(tmp_path / "nope.json")), tmp_path)


# ---- batches ------------------------------------------------------------------------------------------------------
def test_batch_format(env):
    tok, eos = env["tok"], dl.eos_id(env["tok"])
    batches = _take(dl.make_train_iterator(env["cfg"], tok, batch_size=4), 6)
    dtypes = {"inputs": np.int32, "targets": np.int32, "segment_ids": np.int32, "positions": np.int32,
              "weights": np.float32}
    for b in batches:
        assert {k: (v.shape, v.dtype) for k, v in b.items()} == {k: ((4, SEQ_LEN), dt) for k, dt in dtypes.items()}
        # Targets are the next tokens of the stream.
        np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
        seg, pos, w = b["segment_ids"], b["positions"], b["weights"]
        assert (seg >= 1).all()  # infinite stream: no padding
        np.testing.assert_array_equal(seg[:, 0], 1)
        assert (np.diff(seg, axis=1) >= 0).all() and (np.diff(seg, axis=1) <= 1).all()
        # Positions restart at every segment start and count up within a segment.
        starts = np.ones_like(seg, dtype=bool)
        starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
        np.testing.assert_array_equal(pos[starts], 0)
        np.testing.assert_array_equal(pos[:, 1:][~starts[:, 1:]], pos[:, :-1][~starts[:, 1:]] + 1)
        # Weight 0 exactly where the input is the EOS ending a document (its target starts the next document).
        np.testing.assert_array_equal(w == 0, b["inputs"] == eos)
        np.testing.assert_array_equal(w[:, :-1] == 0, starts[:, 1:])
    # A segment after an in-row EOS starts a document: it decodes to a prefix of that document.
    docs = {int(MARKER.search(d["text"]).group(1)): d["text"] for d in dl.iter_documents(env["cfg"], "train")}
    checked = 0
    for b in batches:
        for inputs_T, seg_T in zip(b["inputs"], b["segment_ids"], strict=True):
            for s in range(2, seg_T.max() + 1):
                text = tok.decode([t for t in inputs_T[seg_T == s].tolist() if t != eos])
                k = int(MARKER.search(text).group(1)) if MARKER.search(text) else None
                if k is not None:
                    assert docs[k].startswith(text)
                    checked += 1
    assert checked >= 3


def test_determinism_and_seed(env):
    cfg, tok = env["cfg"], env["tok"]
    a = _take(dl.make_train_iterator(cfg, tok, batch_size=2), 8)
    b = _take(dl.make_train_iterator(cfg, tok, batch_size=2), 8)
    c = _take(dl.make_train_iterator(dl.DataConfig(**{**cfg.__dict__, "seed": 1}), tok, batch_size=2), 8)
    assert _same(a, b)
    assert not _same(a, c)


@pytest.mark.parametrize("n_before", [0, 3, 11])
def test_exact_resume_through_json(env, n_before):
    cfg, tok = env["cfg"], env["tok"]
    it = dl.make_train_iterator(cfg, tok, batch_size=3)
    _take(it, n_before)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 7)
    resumed = dl.make_train_iterator(cfg, tok, batch_size=3)
    resumed.set_state(state)
    assert _same(_take(resumed, 7), expected)
    other = dl.make_train_iterator(cfg, tok, batch_size=2)
    with pytest.raises(DataError, match="different pipeline"):
        other.set_state(state)


def test_epochs_repeat_and_cover_train_docs(env):
    train_ids = {int(MARKER.search(d["text"]).group(1)) for d in dl.iter_documents(env["cfg"], "train")}
    seen = _markers(env["tok"], _take(dl.make_train_iterator(env["cfg"], env["tok"], batch_size=4), 40))
    assert seen == train_ids


def test_host_shards_are_disjoint(env):
    cfg, tok = env["cfg"], env["tok"]
    shards = [_markers(tok, _take(dl.make_train_iterator(cfg, tok, batch_size=4, process_index=i, process_count=2), 25))
              for i in range(2)]
    train_ids = {int(MARKER.search(d["text"]).group(1)) for d in dl.iter_documents(cfg, "train")}
    assert shards[0] and shards[1]
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == train_ids


def test_eval_split_disjoint_and_deterministic(env):
    cfg, tok = env["cfg"], env["tok"]
    train = {d["id"] for d in dl.iter_documents(cfg, "train")}
    held_out = {d["id"] for d in dl.iter_documents(cfg, "validation")}
    assert held_out and not train & held_out and len(train | held_out) == N_DOCS
    stats = dl.corpus_stats(cfg)
    assert (stats["train_documents"], stats["eval_documents"]) == (len(train), len(held_out))
    e1 = dl.make_eval_batches(cfg, tok, batch_size=2, num_batches=40)  # > the split: cycles
    e2 = dl.make_eval_batches(cfg, tok, batch_size=2, num_batches=40)
    assert len(e1) == 40 and _same(e1, e2)
    eval_nums = {int(MARKER.search(d["text"]).group(1)) for d in dl.iter_documents(cfg, "validation")}
    assert _markers(tok, e1) == eval_nums
    # Same split on a second preparation in another data dir (hash of the id, not random).
    assert dl.corpus_stats(cfg)["fingerprint"] == stats["fingerprint"]


def test_changed_file_set_gets_new_dataset(env, tmp_path):
    root = tmp_path / "c"
    _write_corpus(root)
    cfg = dl.DataConfig(source=f"files:{root}/**/*.py", data_dir=str(env["tfds_dir"]), eval_fraction=0.25)
    s1 = dl.corpus_stats(cfg)
    (root / "extra.py").write_text("x = 1\n")
    s2 = dl.corpus_stats(cfg)
    assert s1["fingerprint"] != s2["fingerprint"]
    assert s2["train_documents"] + s2["eval_documents"] == N_DOCS + 1


def test_prepared_tfds_source(env):
    fp = dl.corpus_stats(env["cfg"])["fingerprint"]
    cfg = dl.DataConfig(source=f"tfds:text_files_builder/{fp}:1.0.0", data_dir=env["cfg"].data_dir, seq_len=SEQ_LEN,
                       tokenizer=str(env["cache"] / "tokenizer.json"))
    stats = dl.corpus_stats(cfg)
    assert stats["train_documents"] == dl.corpus_stats(env["cfg"])["train_documents"]
    assert _same(_take(dl.make_train_iterator(cfg, env["tok"], batch_size=2), 1),
                 _take(dl.make_train_iterator(env["cfg"], env["tok"], batch_size=2), 1))


# ---- errors -------------------------------------------------------------------------------------------------------
def test_missing_glob(tmp_path):
    with pytest.raises(DataError, match="matches no files"):
        dl.corpus_stats(dl.DataConfig(source=f"files:{tmp_path}/nothing/*.txt", data_dir=str(tmp_path / "t")))


def test_glob_of_empty_files(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("")
    with pytest.raises(DataError, match="all are empty"):
        dl.corpus_stats(dl.DataConfig(source=f"files:{tmp_path}/*.txt", data_dir=str(tmp_path / "t")))


def test_unknown_tfds_name(tmp_path):
    with pytest.raises(DataError, match="dataset .no_such_ds_xyz. not found.*tfds build"):
        dl.corpus_stats(dl.DataConfig(source="tfds:no_such_ds_xyz", data_dir=str(tmp_path)))


def test_empty_eval_split(env):
    cfg = dl.DataConfig(**{**env["cfg"].__dict__, "eval_fraction": 0.0})
    with pytest.raises(DataError, match="eval split .* is empty"):
        dl.make_eval_batches(cfg, env["tok"], batch_size=1, num_batches=1)


@pytest.mark.parametrize("field,value,msg", [
    ("seq_len", 0, r"data.seq_len: must be a positive integer, got 0"),
    ("vocab_size", 100, r"data.vocab_size"),
    ("eval_fraction", 1.0, r"data.eval_fraction"),
    ("seed", -1, r"data.seed"),
    ("source", "http://x", r"data.source"),
    ("source", "files:", r"data.source"),
    ("seq_len", True, r"data.seq_len"),
    ("bogus", 1, r"data: unknown field\(s\) \['bogus'\]"),
])
def test_bad_config(field, value, msg):
    with pytest.raises(ConfigError, match=msg):
        dl.data_config_from_dict({field: value})


def test_config_from_configdict():
    ml_collections = pytest.importorskip("ml_collections")
    cfg = dl.data_config_from_dict(ml_collections.ConfigDict({"seq_len": 64, "eval_fraction": 0}))
    assert cfg.seq_len == 64 and cfg.eval_fraction == 0.0 and cfg.source == "stdlib"


# ---- real corpus --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_stdlib_smoke(tmp_path):
    cfg = dl.DataConfig(data_dir=str(tmp_path / "tfds"), vocab_size=512, seq_len=128)
    stats = dl.corpus_stats(cfg)
    assert stats["train_documents"] > 1000 and stats["eval_documents"] > 0 and stats["train_bytes"] > 10_000_000
    tok = dl.get_tokenizer(cfg, tmp_path / "cache")
    b = next(dl.make_train_iterator(cfg, tok, batch_size=4))
    assert b["inputs"].shape == (4, 128) and b["weights"].sum() > 0
    assert "def" in tok.decode(b["inputs"].reshape(-1).tolist())
