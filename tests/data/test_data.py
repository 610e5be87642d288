"""Tests for prosparse_jax.data.pipeline, data_tokens, data_stats and data_tfds: tokenizer cache, packed batch format,
determinism, exact resume, sharding, training rows sampled from the whole train stream (and the streaming pipeline of
'tfds:' sources), the token stream caches, the stratified held-out split and its eval windows, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from prosparse_jax.config import ConfigError, DataConfig, build_section
from prosparse_jax.data import corpus as data_tfds
from prosparse_jax.data import pipeline as dl
from prosparse_jax.data import tokens as data_tokens
from prosparse_jax.data.pipeline import DataError
from prosparse_jax.data.tokens import open_corpus, split_stream

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


def _stream(cfg: dl.DataConfig, tok, split: str = "validation") -> np.ndarray:
    """The (cached) token stream of a split."""
    return split_stream(open_corpus(cfg), tok, cfg.data_dir, split)[0]


def _row_lookup(tokens: np.ndarray, seq_len: int) -> dict[bytes, int]:
    """Row bytes -> index of the stream row (seq_len + 1 tokens, the last one wrapped) it is."""
    T1 = seq_len + 1
    W = -(-len(tokens) // T1)
    lookup = {tokens[(w * T1 + np.arange(T1)) % len(tokens)].tobytes(): w for w in range(W)}
    assert len(lookup) == W  # rows are distinguishable
    return lookup


def _row_ids(lookup: dict[bytes, int], batches: list[dict]) -> np.ndarray:
    """[num_batches, batch_size] index of the stream row each row of the batches is."""
    rows = [np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1) for b in batches]
    return np.array([[lookup[r.astype(np.int32).tobytes()] for r in rows_B] for rows_B in rows])


def _no_tokenizing(*a, **k):
    raise AssertionError("a split was tokenized again despite its cache")


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
    cfg = build_section(DataConfig, "data", {**env["cfg"].__dict__, "vocab_size": 320})
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
    batches = _take(dl.make_train_iterator(env["cfg"], tok, batch_size=4), 10)  # > one epoch of the 38 train rows
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
    """Hosts get disjoint shards of the train rows (rows, not documents: a document may span both), covering all."""
    cfg, tok = env["cfg"], env["tok"]
    lookup = _row_lookup(_stream(cfg, tok, "train"), SEQ_LEN)
    shards = [set(_row_ids(lookup, _take(dl.make_train_iterator(cfg, tok, batch_size=4, process_index=i,
                                                                process_count=2), 25)).reshape(-1).tolist())
              for i in range(2)]
    assert shards[0] and shards[1]
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == set(range(len(lookup)))
    assert [len(x) for x in shards] == [-(-len(lookup) // 2), len(lookup) // 2]  # rows i::2


def test_train_rows_are_the_stream_rows_shuffled_per_epoch(env):
    """Each epoch is a permutation of the rows of the whole train stream, a new one per epoch; a row's features are
    exactly those of the row the streaming packer cuts from the train documents in stored order."""
    cfg, tok = env["cfg"], env["tok"]
    lookup = _row_lookup(_stream(cfg, tok, "train"), SEQ_LEN)
    W = len(lookup)
    batches = _take(dl.make_train_iterator(cfg, tok, batch_size=1), 3 * W)
    order = _row_ids(lookup, batches).reshape(3, W)
    for epoch in order:
        assert sorted(epoch.tolist()) == list(range(W))
    assert not np.array_equal(order[0], order[1]) and not np.array_equal(order[1], order[2])
    assert not np.array_equal(order[0], np.arange(W))
    # Seed 1 is not seed 0 one epoch later (grain shuffles epoch e with its seed + e; ours is hashed first).
    seed1 = _take(dl.make_train_iterator(dl.DataConfig(**{**cfg.__dict__, "seed": 1}), tok, batch_size=1), W)
    assert not np.array_equal(_row_ids(lookup, seed1).reshape(-1), order[1])
    packer = iter(dl._batches(open_corpus(cfg).data_source("train"), tok, "text", seq_len=SEQ_LEN, batch_size=1,
                              seed=None))
    packed = [next(packer) for _ in range(W)]  # its row W - 1 wraps into the second pass, as ours does
    assert _same(batches[:W], [packed[w] for w in order[0]])


def test_old_or_foreign_iterator_state_refused(env):
    cfg, tok = env["cfg"], env["tok"]
    it = dl.make_train_iterator(cfg, tok, batch_size=2)
    state = json.loads(json.dumps(it.get_state()))
    assert state["identity"]["pipeline"] == "rows"
    with pytest.raises(DataError, match=r"state version 2 != 3: .*start the data from the beginning"):
        dl.make_train_iterator(cfg, tok, batch_size=2).set_state({**state, "version": 2})
    other = {**state, "identity": {**state["identity"], "pipeline": "documents"}}
    with pytest.raises(DataError, match="different pipeline"):
        dl.make_train_iterator(cfg, tok, batch_size=2).set_state(other)


def test_eval_split_disjoint_and_deterministic(env, tmp_path):
    cfg, tok = env["cfg"], env["tok"]
    train = {d["id"] for d in dl.iter_documents(cfg, "train")}
    held_out = {d["id"] for d in dl.iter_documents(cfg, "validation")}
    assert held_out and not train & held_out and len(train | held_out) == N_DOCS
    assert len(held_out) == N_DOCS // 4  # eval_fraction 0.25: systematic sample, exactly N * f here
    docs = data_tfds.list_documents(cfg.source)
    mask = data_tfds.eval_document_mask([d.doc_id for d in docs], [d.size for d in docs], cfg.eval_fraction)
    assert held_out == {d.doc_id for d, m in zip(docs, mask, strict=True) if m}
    stats = dl.corpus_stats(cfg)
    assert (stats["train_documents"], stats["eval_documents"]) == (len(train), len(held_out))
    assert stats["strata"] == stats["eval_strata"] == 2 and stats["eval_missing_strata"] == []
    e1 = dl.make_eval_batches(cfg, tok, batch_size=2, num_batches=40)  # > the split: cycles
    e2 = dl.make_eval_batches(cfg, tok, batch_size=2, num_batches=40)
    assert len(e1) == 40 and _same(e1, e2)
    eval_nums = {int(MARKER.search(d["text"]).group(1)) for d in dl.iter_documents(cfg, "validation")}
    assert _markers(tok, e1) == eval_nums
    # Same split when prepared again in another data dir (a rule on ids and sizes, not random).
    other = dl.DataConfig(**{**cfg.__dict__, "data_dir": str(tmp_path / "tfds")})
    assert {d["id"] for d in dl.iter_documents(other, "validation")} == held_out
    assert dl.corpus_stats(other)["fingerprint"] == stats["fingerprint"]


def test_changed_file_set_gets_new_dataset(env, tmp_path):
    root = tmp_path / "c"
    _write_corpus(root)
    cfg = dl.DataConfig(source=f"files:{root}/**/*.py", data_dir=str(env["tfds_dir"]), eval_fraction=0.25)
    s1 = dl.corpus_stats(cfg)
    (root / "extra.py").write_text("x = 1\n")
    s2 = dl.corpus_stats(cfg)
    assert s1["fingerprint"] != s2["fingerprint"]
    assert s2["train_documents"] + s2["eval_documents"] == N_DOCS + 1


def test_prepared_tfds_source(env, monkeypatch):
    """'tfds:' sources keep the streaming pipeline (documents -> packer -> window shuffle), with exact resume."""
    fp = dl.corpus_stats(env["cfg"])["fingerprint"]
    cfg = dl.DataConfig(source=f"tfds:text_files_builder/{fp}:1.0.0", data_dir=env["cfg"].data_dir, seq_len=SEQ_LEN,
                       tokenizer=str(env["cache"] / "tokenizer.json"))
    tok = env["tok"]
    stats = dl.corpus_stats(cfg)
    assert stats["train_documents"] == dl.corpus_stats(env["cfg"])["train_documents"]
    with monkeypatch.context() as m:  # nothing is tokenized up front
        m.setattr(data_tokens, "tokenize_stream", _no_tokenizing)
        it = dl.make_train_iterator(cfg, tok, batch_size=2)
        first = _take(it, 5)
    streamed = iter(dl._batches(open_corpus(env["cfg"]).data_source("train"), tok, "text", seq_len=SEQ_LEN,
                                batch_size=2, seed=cfg.seed))
    assert _same(first, _take(streamed, 5))
    state = json.loads(json.dumps(it.get_state()))
    assert state["identity"]["pipeline"] == "documents"
    expected = _take(it, 4)
    resumed = dl.make_train_iterator(cfg, tok, batch_size=2)
    resumed.set_state(state)
    assert _same(_take(resumed, 4), expected)
    with pytest.raises(DataError, match="different pipeline"):
        dl.make_train_iterator(env["cfg"], tok, batch_size=2).set_state(state)


# ---- held-out split: stratified systematic sample ------------------------------------------------------------------
STRATA = {".": 12, "p1": 2, "p2": 9, "p3": 30}  # documents per stratum of the `strata_env` corpus (p3 has subdirs)


def _write_strata_corpus(root: Path) -> None:
    k = 0
    for name, n in STRATA.items():
        for j in range(n):
            sub = root if name == "." else root / name / ("q" if name == "p3" and j % 3 == 0 else "")
            sub.mkdir(parents=True, exist_ok=True)
            lines = [f"doc{k:02d}x = {i} + len('doc{k:02d}x')" for i in range(2 + (7 * k) % 23)]
            (sub / f"g{k:02d}.py").write_text("\n".join(lines) + "\n")
            k += 1


@pytest.fixture(scope="module")
def strata_env(env, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("strata")
    _write_strata_corpus(root)
    cfg = dl.DataConfig(source=f"files:{root}/**/*.py", data_dir=str(tmp_path_factory.mktemp("tfds_strata")),
                        tokenizer=str(env["cache"] / "tokenizer.json"), seq_len=SEQ_LEN, eval_fraction=0.25)
    return {"cfg": cfg, "tok": env["tok"]}


def test_stratum():
    assert data_tfds.stratum("asyncio/events.py") == "asyncio"
    assert data_tfds.stratum("test/test_asyncio/test_base.py") == "test"
    assert data_tfds.stratum("os.py") == data_tfds.stratum("./typing.py") == data_tfds.ROOT_STRATUM


@pytest.mark.parametrize("f", [0.05, 0.1, 0.25, 0.3, 0.5])
def test_split_rule_is_proportional_per_stratum_and_size(f):
    rng = np.random.default_rng(1)
    counts = {"big": 400, "mid": 57, "small": 9, "tiny": 1, ".": 33}
    ids = [f"{s}/m{i}.py" if s != "." else f"m{i}.py" for s, n in counts.items() for i in range(n)]
    sizes = (1 + rng.choice(100_000, size=len(ids), replace=False)).tolist()  # distinct: no hash tie-breaks
    mask = data_tfds.eval_document_mask(ids, sizes, f)
    assert abs(sum(mask) - f * len(ids)) <= 1
    for s, n in counts.items():
        picked = [(z, m) for i, z, m in zip(ids, sizes, mask, strict=True) if data_tfds.stratum(i) == s]
        got = sum(m for _, m in picked)
        assert int(np.floor(n * f)) <= got <= int(np.ceil(n * f)), (s, n, got)
        if n >= 1 / f:
            assert got >= 1
        # Within a stratum the sample follows the size order: every run of 1/f size-sorted documents holds one.
        by_size = [m for _, m in sorted(picked)]
        run = int(np.ceil(1 / f))
        assert all(sum(by_size[a:a + run]) >= 1 for a in range(0, n - run + 1))
    # Independent of the input order.
    perm = rng.permutation(len(ids))
    mask_p = data_tfds.eval_document_mask([ids[i] for i in perm], [sizes[i] for i in perm], f)
    assert {ids[i] for i, m in zip(perm, mask_p, strict=True) if m} == {i for i, m in zip(ids, mask, strict=True) if m}


def test_split_rule_flat_directory_and_tiny_fraction():
    ids = [f"d{i:03d}.txt" for i in range(200)]
    sizes = [100 + i for i in range(200)]
    assert {data_tfds.stratum(i) for i in ids} == {data_tfds.ROOT_STRATUM}
    assert sum(data_tfds.eval_document_mask(ids, sizes, 0.05)) == 10
    assert sum(data_tfds.eval_document_mask(ids, sizes, 0.0)) == 0
    assert sum(data_tfds.eval_document_mask(ids, sizes, 0.001)) <= 1  # N * f < 1: empty or one document
    with pytest.raises(DataError, match="eval_fraction"):
        data_tfds.eval_document_mask(ids, sizes, 1.0)
    with pytest.raises(DataError, match="one size per id"):
        data_tfds.eval_document_mask(ids, sizes[:-1], 0.1)


@pytest.mark.parametrize("rule", ["EVAL_SPLIT_RULE", "TEXT_RULE"])
def test_fingerprint_covers_split_and_text_rule(monkeypatch, rule):
    docs = [data_tfds.Document("a/x.py", "/x", 10, 1), data_tfds.Document("y.py", "/y", 20, 2)]
    fp = data_tfds.corpus_fingerprint(docs, 0.05)
    assert data_tfds.corpus_fingerprint(docs, 0.1) != fp
    monkeypatch.setattr(data_tfds, rule, getattr(data_tfds, rule) + 1)
    assert data_tfds.corpus_fingerprint(docs, 0.05) != fp


def test_stratified_split_of_files_source(strata_env):
    cfg = strata_env["cfg"]
    held_out = [d["id"] for d in dl.iter_documents(cfg, "validation")]
    train = [d["id"] for d in dl.iter_documents(cfg, "train")]
    assert not set(held_out) & set(train) and len(held_out) + len(train) == sum(STRATA.values())
    per_stratum = {s: sum(data_tfds.stratum(i) == s for i in held_out) for s in STRATA}
    for s, n in STRATA.items():
        assert int(np.floor(n * 0.25)) <= per_stratum[s] <= int(np.ceil(n * 0.25)), per_stratum
    stats = dl.eval_split_stats(cfg, strata_env["tok"])
    assert stats["documents"] == len(held_out) and stats["corpus_strata"] == len(STRATA)
    assert stats["strata"] == sum(v > 0 for v in per_stratum.values())
    assert set(stats["missing_strata"]) == {s for s, v in per_stratum.items() if v == 0} <= {"p1"}
    tokens, lengths = split_stream(open_corpus(cfg), strata_env["tok"], cfg.data_dir, "validation")
    assert stats["tokens"] == len(tokens) == lengths.sum()
    assert stats["windows"] == -(-len(tokens) // (SEQ_LEN + 1))
    assert stats["largest_document_share"] == pytest.approx(lengths.max() / lengths.sum())
    assert stats["share_of"] == "tokens" and stats["largest_document"] in held_out


# ---- files that are not UTF-8 text --------------------------------------------------------------------------------
def _write_mixed_corpus(root: Path) -> dict[str, bytes]:
    """UTF-8 files (one with a BOM), a binary file and a Latin-1 file; returns the bad files' bytes by name."""
    root.mkdir(parents=True)
    for k in range(6):
        (root / f"good{k}.txt").write_text(f"doc{k:02d}x = 'héllo ☃ {k}'\n" * (k + 2), encoding="utf-8")
    (root / "bom.txt").write_bytes(b"\xef\xbb\xbf" + "doc06x = 'bom ü'\n".encode())
    bad = {"blob.bin": b"\x00\x01" + np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes(),
           "latin1.txt": "doc07x = 'café naïve señor'\n".encode("latin-1")}
    for name, data in bad.items():
        (root / name).write_bytes(data)
    return bad


def test_read_text_rule(tmp_path):
    cases = {"a": "x = 'ü ☃'\n".encode(), "bom": b"\xef\xbb\xbfx = 1\n", "nul": b"x = 1\x00\n",
             "latin1": "é".encode("latin-1"), "cut": "☃".encode()[:2]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    got = {name: data_tfds.read_text(tmp_path / name) for name in cases}
    assert got == {"a": "x = 'ü ☃'\n", "bom": "x = 1\n", "nul": None, "latin1": None, "cut": None}


def test_files_that_are_not_utf8_text_are_skipped_and_reported(tmp_path, caplog):
    root = tmp_path / "mixed"
    _write_mixed_corpus(root)
    cfg = dl.DataConfig(source=f"files:{root}/*", data_dir=str(tmp_path / "tfds"), vocab_size=300,
                        seq_len=SEQ_LEN, eval_fraction=0.25)
    with caplog.at_level("WARNING"):
        stats = dl.corpus_stats(cfg)
    warned = [r.getMessage() for r in caplog.records if "not UTF-8 text" in r.getMessage()]
    assert warned == [f"files:{root}/*: skipped 2 of 9 files that are not UTF-8 text (binary, or another "
                      "encoding): blob.bin, latin1.txt"]
    assert (stats["skipped_files"], stats["skipped_examples"]) == (2, ["blob.bin", "latin1.txt"])
    assert stats["train_documents"] + stats["eval_documents"] == 7 and stats["eval_documents"] >= 1
    # No replacement character (nor BOM) in any stored text; the BOM file's text starts with its first line.
    records = {i: t for split in ("train", "validation") for i, t in data_tokens.iter_records(open_corpus(cfg), split)}
    assert sorted(records) == ["bom.txt"] + [f"good{k}.txt" for k in range(6)]
    assert not any("\ufffd" in t or "\ufeff" in t for t in records.values())
    assert records["bom.txt"] == "doc06x = 'bom ü'\n"
    # Nor in the token streams the model trains and is evaluated on.
    tok = dl.get_tokenizer(cfg, tmp_path / "cache")
    for split in ("train", "validation"):
        text = tok.decode(_stream(cfg, tok, split).tolist(), skip_special_tokens=False)
        assert "doc" in text and "\ufffd" not in text and "\ufeff" not in text and "café" not in text
    # A later run reads the cached dataset: the report comes from its metadata, no second warning.
    caplog.clear()
    with caplog.at_level("WARNING"):
        again = dl.eval_split_stats(cfg, tok)
    assert not [r for r in caplog.records if "not UTF-8 text" in r.getMessage()]
    assert (again["skipped_files"], again["skipped_examples"]) == (2, ["blob.bin", "latin1.txt"])
    assert again["documents"] == stats["eval_documents"]
    meta = json.loads(next((tmp_path / "tfds").glob("text_files_builder/fp*/1.0.0/metadata.json")).read_text())
    assert meta == {"text_rule": data_tfds.TEXT_RULE, "skipped_ids": ["blob.bin", "latin1.txt"]}


def test_only_files_that_are_not_utf8_text_raise(tmp_path):
    root = tmp_path / "mixed"
    _write_mixed_corpus(root)
    source = f"files:{root}/[bl][la]*"  # blob.bin, latin1.txt
    cfg = dl.DataConfig(source=source, data_dir=str(tmp_path / "tfds"))
    assert {d.doc_id for d in data_tfds.list_documents(source)} == {"blob.bin", "latin1.txt"}
    for _ in range(2):  # nothing half-prepared is reused
        with pytest.raises(DataError, match=re.escape(f"no file of {source!r} is UTF-8 text")):
            dl.corpus_stats(cfg)
    # The one text file next to them would be held out at this eval_fraction: no train split, one clear error.
    cfg = dl.DataConfig(source=f"files:{root}/[gl][oa]*[0n]*", data_dir=str(tmp_path / "tfds"), eval_fraction=0.9)
    with pytest.raises(DataError, match="every UTF-8 text file of .* falls in the held-out split"):
        dl.corpus_stats(cfg)


# ---- eval windows -------------------------------------------------------------------------------------------------
def _window_ids(cfg: dl.DataConfig, tok, batches: list[dict]) -> np.ndarray:
    """[num_batches, batch_size] index of the packed-stream window each eval row was cut from."""
    return _row_ids(_row_lookup(_stream(cfg, tok), cfg.seq_len), batches)


def test_eval_windows_spread_across_split(strata_env):
    cfg, tok = strata_env["cfg"], strata_env["tok"]
    tokens = _stream(cfg, tok)
    W = -(-len(tokens) // (SEQ_LEN + 1))
    B, N = 3, 4
    assert W >= 3 * B * N, "corpus too small for this test"
    batches = dl.make_eval_batches(cfg, tok, batch_size=B, num_batches=N)
    assert len(batches) == N and all(b["inputs"].shape == (B, SEQ_LEN) for b in batches)
    w = _window_ids(cfg, tok, batches)
    n = B * N
    chosen = sorted(w.reshape(-1).tolist())
    assert chosen == [(2 * i + 1) * W // (2 * n) for i in range(n)]  # evenly spaced, all distinct
    assert chosen[0] < W / n and chosen[-1] >= W - W / n  # from the beginning to the end of the stream
    for b in range(N):  # every batch spans the split too
        assert w[b].min() < W / 3 and w[b].max() >= 2 * W / 3
    # Rows come from many documents, not from the first few of the stored order.
    order = [int(MARKER.search(d["text"]).group(1)) for d in dl.iter_documents(cfg, "validation")]
    seen = _markers(tok, batches)
    thirds = np.array_split(np.array(order), 3)
    assert all(seen & set(t.tolist()) for t in thirds) and len(seen) >= len(order) // 2


def test_eval_windows_equal_training_packing(strata_env):
    cfg, tok = strata_env["cfg"], strata_env["tok"]
    tokens = _stream(cfg, tok)
    W = -(-len(tokens) // (SEQ_LEN + 1))
    batches = dl.make_eval_batches(cfg, tok, batch_size=1, num_batches=W)  # exactly every window once
    assert sorted(_window_ids(cfg, tok, batches).reshape(-1).tolist()) == list(range(W))
    # Window w is the w-th row the training packer cuts from the eval documents in stored order.
    it = iter(dl._batches(open_corpus(cfg).data_source("validation"), tok, "text", seq_len=SEQ_LEN, batch_size=1,
                          seed=None))
    assert _same(batches, [next(it) for _ in range(W)])


def test_eval_windows_cycle_when_split_small(env):
    cfg, tok = env["cfg"], env["tok"]
    tokens = _stream(cfg, tok)
    W = -(-len(tokens) // (SEQ_LEN + 1))
    B, N = 3, W  # n = 3 W windows wanted
    w = _window_ids(cfg, tok, dl.make_eval_batches(cfg, tok, batch_size=B, num_batches=N))
    assert w.shape == (N, B)
    np.testing.assert_array_equal(np.bincount(w.reshape(-1), minlength=W), 3)


def test_eval_split_shorter_than_one_window(env, tmp_path):
    for k in range(4):
        (tmp_path / f"t{k}.py").write_text(f"doc{k:02d}x = {k}\n")
    cfg = dl.DataConfig(source=f"files:{tmp_path}/*.py", data_dir=str(tmp_path / "tfds"), seq_len=SEQ_LEN,
                        tokenizer=str(env["cache"] / "tokenizer.json"), eval_fraction=0.25)
    tok, eos = env["tok"], dl.eos_id(env["tok"])
    (doc,) = list(dl.iter_documents(cfg, "validation"))
    stream = tok.encode(doc["text"], add_special_tokens=False).ids + [eos]
    assert len(stream) < SEQ_LEN
    (b,) = dl.make_eval_batches(cfg, tok, batch_size=2, num_batches=1)
    tiled = np.resize(np.array(stream, np.int32), SEQ_LEN + 1)  # the stream, repeated
    for r in range(2):
        np.testing.assert_array_equal(b["inputs"][r], tiled[:-1])
        np.testing.assert_array_equal(b["targets"][r], tiled[1:])
        starts = np.arange(SEQ_LEN) % len(stream) == 0
        np.testing.assert_array_equal(b["segment_ids"][r], np.cumsum(starts))
        np.testing.assert_array_equal(b["positions"][r], np.arange(SEQ_LEN) % len(stream))
        np.testing.assert_array_equal(b["weights"][r] == 0, b["inputs"][r] == eos)


def test_eval_stream_cache(strata_env, monkeypatch):
    cfg, tok = strata_env["cfg"], strata_env["tok"]
    first = dl.make_eval_batches(cfg, tok, batch_size=2, num_batches=3)
    (cached,) = (Path(cfg.data_dir) / "prosparse_eval_tokens").glob("*.npz")
    assert not list(cached.parent.glob("*.tmp"))
    with monkeypatch.context() as m:
        m.setattr(data_tokens, "tokenize_stream", _no_tokenizing)
        assert _same(dl.make_eval_batches(cfg, tok, batch_size=2, num_batches=3), first)
    for broken in (b"not an npz", cached.read_bytes()[:200]):  # a broken cache is recomputed and rewritten
        cached.write_bytes(broken)
        assert _same(dl.make_eval_batches(cfg, tok, batch_size=2, num_batches=3), first)
    with np.load(cached) as z:
        assert z["tokens"].dtype == np.int32


def test_train_stream_cache(strata_env, tmp_path, monkeypatch):
    """The train split is tokenized once per (corpus, tokenizer); a changed tokenizer or corpus gets a new key."""
    cfg, tok = strata_env["cfg"], strata_env["tok"]
    cfg = dl.DataConfig(**{**cfg.__dict__, "data_dir": str(tmp_path / "tfds")})
    first = _take(dl.make_train_iterator(cfg, tok, batch_size=3), 4)
    (cached,) = (Path(cfg.data_dir) / "prosparse_train_tokens").glob("*.npz")
    assert [f.name for f in cached.parent.iterdir()] == [cached.name]  # no temporary file left behind
    corpus = open_corpus(cfg)
    assert cached == data_tokens.stream_cache_path(corpus, tok, cfg.data_dir, "train")
    with np.load(cached) as z:  # the train documents in stored order, each followed by EOS
        texts = [d["text"] for d in dl.iter_documents(cfg, "train")]
        expected = [tok.encode(t, add_special_tokens=False).ids + [dl.eos_id(tok)] for t in texts]
        np.testing.assert_array_equal(z["tokens"], np.concatenate(expected).astype(np.int32))
        np.testing.assert_array_equal(z["lengths"], [len(e) for e in expected])
    with monkeypatch.context() as m:
        m.setattr(data_tokens, "tokenize_stream", _no_tokenizing)
        assert _same(_take(dl.make_train_iterator(cfg, tok, batch_size=3), 4), first)
        # Another tokenizer: another key, so tokenized again (here: refused by the patched tokenize).
        other_tok = dl.get_tokenizer(dl.DataConfig(**{**cfg.__dict__, "tokenizer": "", "vocab_size": 290}),
                                     tmp_path / "tok290")
        assert data_tokens.stream_cache_path(corpus, other_tok, cfg.data_dir, "train") != cached
        with pytest.raises(AssertionError, match="tokenized again"):
            dl.make_train_iterator(cfg, other_tok, batch_size=3)
    # Another corpus (one more file): another fingerprint, another key; the eval split has its own directory.
    root = tmp_path / "c"
    _write_strata_corpus(root)
    (root / "extra.py").write_text("x = 1\n")
    other_corpus = open_corpus(dl.DataConfig(**{**cfg.__dict__, "source": f"files:{root}/**/*.py"}))
    assert other_corpus.fingerprint != corpus.fingerprint
    assert data_tokens.stream_cache_path(other_corpus, tok, cfg.data_dir, "train") != cached
    assert data_tokens.stream_cache_path(corpus, tok, cfg.data_dir, "validation").parent.name == "prosparse_eval_tokens"
    for broken in (b"not an npz", cached.read_bytes()[:200]):  # a broken cache is recomputed and rewritten
        cached.write_bytes(broken)
        assert _same(_take(dl.make_train_iterator(cfg, tok, batch_size=3), 4), first)


def test_eval_batches_bad_sizes(env):
    with pytest.raises(DataError, match="num_batches must be a positive integer"):
        dl.make_eval_batches(env["cfg"], env["tok"], batch_size=2, num_batches=0)


def test_stdlib_split_rule_is_stratified():
    """The default corpus (listing only, no TFDS preparation): every package with >= 20 modules is held out from."""
    docs = data_tfds.list_documents("stdlib")
    mask = data_tfds.eval_document_mask([d.doc_id for d in docs], [d.size for d in docs], 0.05)
    held = [d for d, m in zip(docs, mask, strict=True) if m]
    assert abs(len(held) - 0.05 * len(docs)) <= 1
    strata: dict[str, int] = {}
    for d in docs:
        strata[data_tfds.stratum(d.doc_id)] = strata.get(data_tfds.stratum(d.doc_id), 0) + 1
    covered = {data_tfds.stratum(d.doc_id) for d in held}
    assert {s for s, n in strata.items() if n >= 20} <= covered
    assert max(d.size for d in held) / sum(d.size for d in held) < 0.25


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
        build_section(DataConfig, "data", {field: value})


def test_config_from_configdict():
    ml_collections = pytest.importorskip("ml_collections")
    cfg = build_section(DataConfig, "data", ml_collections.ConfigDict({"seq_len": 64, "eval_fraction": 0}))
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


def test_short_run_samples_the_whole_train_split(tmp_path, monkeypatch):
    """A short run's batches draw rows from all over the train split, not from a few consecutive documents."""
    root = tmp_path / "long"
    root.mkdir()
    for k in range(16):  # each document spans ~30 rows of SEQ_LEN tokens
        (root / f"f{k:02d}.py").write_text("".join(f"doc{k:02d}x = {j}\n" for j in range(150)))
    cfg = dl.DataConfig(source=f"files:{root}/*.py", data_dir=str(tmp_path / "tfds"), vocab_size=300,
                        seq_len=SEQ_LEN, eval_fraction=0.0)
    tok = dl.get_tokenizer(cfg, tmp_path / "cache")
    lookup = _row_lookup(_stream(cfg, tok, "train"), SEQ_LEN)
    W = len(lookup)
    assert W >= 16 * 25
    batches = _take(dl.make_train_iterator(cfg, tok, batch_size=8), 6)  # 48 rows, ~10% of the split
    rows = _row_ids(lookup, batches).reshape(-1)
    assert len(set(rows.tolist())) == 48  # no row twice within an epoch
    assert all(((rows >= a * W // 3) & (rows < (a + 1) * W // 3)).sum() >= 8 for a in range(3))  # start, middle, end
    assert len(_markers(tok, batches)) >= 10
    # The same 48 rows of a document stream (documents shuffled, rows not) come from 2 or 3 documents.
    monkeypatch.setattr(dl, "SHUFFLE_WINDOW_ROWS", 1)  # a window of one row = no row shuffle
    stream = iter(dl._batches(open_corpus(cfg).data_source("train"), tok, "text", seq_len=SEQ_LEN, batch_size=8,
                              seed=cfg.seed))
    assert len(_markers(tok, _take(stream, 6))) <= 3
