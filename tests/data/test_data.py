"""The data package: tokenizer cache, packed batch format, determinism, exact resume, sharding, training rows sampled
from the whole train stream (and the streaming pipeline of 'tfds:' sources), the token stream caches, the stratified
held-out split and its eval windows, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from prosparse_jax.config import DataConfig, build_section
from prosparse_jax.data import corpus as corpus_lib
from prosparse_jax.data import pipeline, stats
from prosparse_jax.data.corpus import Corpus, open_corpus
from prosparse_jax.errors import ConfigError, DataError

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
    cfg = DataConfig(source=f"files:{root}/**/*.py", data_dir=str(tfds_dir), vocab_size=300, seq_len=SEQ_LEN,
                     eval_fraction=0.25)
    corpus = open_corpus(cfg)
    tok = corpus_lib.get_tokenizer(cfg, corpus, cache)
    return {"root": root, "cfg": cfg, "corpus": corpus, "tok": tok, "cache": cache, "tfds_dir": tfds_dir}


def _train_iter(corpus: Corpus, tok, *, batch_size: int, seed: int = 0, **kw) -> pipeline.TrainIterator:
    return pipeline.make_train_iterator(corpus, tok, seq_len=SEQ_LEN, seed=seed, batch_size=batch_size, **kw)


def _eval_batches(corpus: Corpus, tok, *, batch_size: int, num_batches: int) -> list[dict[str, np.ndarray]]:
    return pipeline.make_eval_batches(corpus, tok, seq_len=SEQ_LEN, batch_size=batch_size, num_batches=num_batches)


def _streamed(corpus: Corpus, tok, split: str, *, batch_size: int, seed: int | None = None, **kw):
    """The streaming document pipeline of `split` ('tfds:' sources), as an iterator."""
    return iter(pipeline.streamed_document_batches(corpus, split, tok, seq_len=SEQ_LEN, batch_size=batch_size,
                                                   seed=seed, **kw))


def _texts(corpus: Corpus, split: str) -> dict[str, str]:
    return dict(corpus.records(split))


def _take(it, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


def _same(a: list[dict], b: list[dict]) -> bool:
    return all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True))


def _stream(corpus: Corpus, tok, split: str = "validation") -> np.ndarray:
    """The token stream of a split."""
    return corpus.token_stream(split, tok)[0]


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


def _file_id(path: Path) -> tuple[int, int]:
    """(inode, mtime): changes when the file is written again."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


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
    assert 257 < tok.get_vocab_size() <= 300 and corpus_lib.eos_id(tok) == 0  # fewer if merges run out
    text = "doc03x = 1 * 3 + len('héllo ☃')\n"
    assert tok.decode(tok.encode(text).ids) == text
    again = corpus_lib.get_tokenizer(cfg, open_corpus(cfg), cache)
    assert again.to_str() == tok.to_str()
    loaded = corpus_lib.load_tokenizer(cache / "tokenizer.json")
    assert loaded.encode(text).ids == tok.encode(text).ids


def test_tokenizer_fingerprint_mismatch_raises(env):
    cfg = build_section(DataConfig, "data", {**env["cfg"].__dict__, "vocab_size": 320})
    before = (env["cache"] / "tokenizer.json").read_text()
    with pytest.raises(DataError, match="cached tokenizer"):
        corpus_lib.get_tokenizer(cfg, env["corpus"], env["cache"])
    assert (env["cache"] / "tokenizer.json").read_text() == before


def test_tokenizer_missing_path_raises(tmp_path):
    with pytest.raises(DataError, match="data.tokenizer"):
        corpus_lib.load_tokenizer(tmp_path / "nope.json")


# ---- batches ------------------------------------------------------------------------------------------------------
def test_batch_format(env):
    tok, eos = env["tok"], corpus_lib.eos_id(env["tok"])
    batches = _take(_train_iter(env["corpus"], tok, batch_size=4), 10)  # > one epoch of the 38 train rows
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
    docs = {int(MARKER.search(t).group(1)): t for t in _texts(env["corpus"], "train").values()}
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
    corpus, tok = env["corpus"], env["tok"]
    a = _take(_train_iter(corpus, tok, batch_size=2), 8)
    b = _take(_train_iter(open_corpus(env["cfg"]), tok, batch_size=2), 8)
    c = _take(_train_iter(corpus, tok, batch_size=2, seed=1), 8)
    assert _same(a, b)
    assert not _same(a, c)


@pytest.mark.parametrize("n_before", [0, 3, 11])
def test_exact_resume_through_json(env, n_before):
    corpus, tok = env["corpus"], env["tok"]
    it = _train_iter(corpus, tok, batch_size=3)
    _take(it, n_before)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 7)
    resumed = _train_iter(corpus, tok, batch_size=3)
    resumed.set_state(state)
    assert _same(_take(resumed, 7), expected)
    other = _train_iter(corpus, tok, batch_size=2)
    with pytest.raises(DataError, match="different pipeline"):
        other.set_state(state)


def test_epochs_repeat_and_cover_train_docs(env):
    train_ids = {int(MARKER.search(t).group(1)) for t in _texts(env["corpus"], "train").values()}
    seen = _markers(env["tok"], _take(_train_iter(env["corpus"], env["tok"], batch_size=4), 40))
    assert seen == train_ids


def test_host_shards_are_disjoint(env):
    """Hosts get disjoint shards of the train rows (rows, not documents: a document may span both), covering all."""
    corpus, tok = env["corpus"], env["tok"]
    lookup = _row_lookup(_stream(corpus, tok, "train"), SEQ_LEN)
    shards = [set(_row_ids(lookup, _take(_train_iter(corpus, tok, batch_size=4, process_index=i, process_count=2),
                                         25)).reshape(-1).tolist())
              for i in range(2)]
    assert shards[0] and shards[1]
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == set(range(len(lookup)))
    assert [len(x) for x in shards] == [-(-len(lookup) // 2), len(lookup) // 2]  # rows i::2


def test_train_rows_are_the_stream_rows_shuffled_per_epoch(env):
    """Each epoch is a permutation of the rows of the whole train stream, a new one per epoch; a row's features are
    exactly those of the row the streaming packer cuts from the train documents in stored order."""
    corpus, tok = env["corpus"], env["tok"]
    lookup = _row_lookup(_stream(corpus, tok, "train"), SEQ_LEN)
    W = len(lookup)
    batches = _take(_train_iter(corpus, tok, batch_size=1), 3 * W)
    order = _row_ids(lookup, batches).reshape(3, W)
    for epoch in order:
        assert sorted(epoch.tolist()) == list(range(W))
    assert not np.array_equal(order[0], order[1]) and not np.array_equal(order[1], order[2])
    assert not np.array_equal(order[0], np.arange(W))
    # Seed 1 is not seed 0 one epoch later (grain shuffles epoch e with its seed + e; ours is hashed first).
    seed1 = _take(_train_iter(corpus, tok, batch_size=1, seed=1), W)
    assert not np.array_equal(_row_ids(lookup, seed1).reshape(-1), order[1])
    packer = _streamed(corpus, tok, "train", batch_size=1)
    packed = [next(packer) for _ in range(W)]  # its row W - 1 wraps into the second pass, as ours does
    assert _same(batches[:W], [packed[w] for w in order[0]])


def test_old_or_foreign_iterator_state_refused(env):
    corpus, tok = env["corpus"], env["tok"]
    state = json.loads(json.dumps(_train_iter(corpus, tok, batch_size=2).get_state()))
    assert state["identity"]["pipeline"] == "rows"
    older = {"version": 2, "identity": {k: v for k, v in state["identity"].items() if k != "pipeline"},
             "grain": state["grain"]}
    other = {**state, "identity": {**state["identity"], "pipeline": "documents"}}
    for foreign in (older, other):
        with pytest.raises(DataError, match="different pipeline: .*start the data from the beginning"):
            _train_iter(corpus, tok, batch_size=2).set_state(foreign)


def test_eval_split_disjoint_and_deterministic(env, tmp_path):
    cfg, corpus, tok = env["cfg"], env["corpus"], env["tok"]
    train, held_out = set(_texts(corpus, "train")), set(_texts(corpus, "validation"))
    assert held_out and not train & held_out and len(train | held_out) == N_DOCS
    assert len(held_out) == N_DOCS // 4  # eval_fraction 0.25: systematic sample, exactly N * f here
    docs = corpus_lib.list_documents(cfg.source)
    mask = corpus_lib.eval_document_mask([d.doc_id for d in docs], [d.size for d in docs], cfg.eval_fraction)
    assert held_out == {d.doc_id for d, m in zip(docs, mask, strict=True) if m}
    report = stats.corpus_stats(cfg)
    assert (report["train_documents"], report["eval_documents"]) == (len(train), len(held_out))
    assert report["strata"] == report["eval_strata"] == 2 and report["eval_missing_strata"] == []
    e1 = _eval_batches(corpus, tok, batch_size=2, num_batches=40)  # > the split: cycles
    e2 = _eval_batches(open_corpus(cfg), tok, batch_size=2, num_batches=40)
    assert len(e1) == 40 and _same(e1, e2)
    eval_nums = {int(MARKER.search(t).group(1)) for t in _texts(corpus, "validation").values()}
    assert _markers(tok, e1) == eval_nums
    # Same split when prepared again in another data dir (a rule on ids and sizes, not random).
    other = open_corpus(DataConfig(**{**cfg.__dict__, "data_dir": str(tmp_path / "tfds")}))
    assert set(_texts(other, "validation")) == held_out
    assert other.fingerprint == report["fingerprint"]


def test_changed_file_set_gets_new_dataset(env, tmp_path):
    root = tmp_path / "c"
    _write_corpus(root)
    cfg = DataConfig(source=f"files:{root}/**/*.py", data_dir=str(env["tfds_dir"]), eval_fraction=0.25)
    s1 = stats.corpus_stats(cfg)
    (root / "extra.py").write_text("x = 1\n")
    s2 = stats.corpus_stats(cfg)
    assert s1["fingerprint"] != s2["fingerprint"]
    assert s2["train_documents"] + s2["eval_documents"] == N_DOCS + 1


def test_prepared_tfds_source(env):
    """'tfds:' sources keep the streaming pipeline (documents -> packer -> window shuffle), with exact resume."""
    local = env["corpus"]
    cfg = DataConfig(source=f"tfds:text_files_builder/{local.fingerprint}:1.0.0", data_dir=env["cfg"].data_dir,
                     seq_len=SEQ_LEN)
    corpus, tok = open_corpus(cfg), env["tok"]
    assert corpus.num_documents("train") == local.num_documents("train")
    it = _train_iter(corpus, tok, batch_size=2)
    first = _take(it, 5)
    assert not corpus.token_stream_path("train", tok).exists()  # nothing tokenized up front
    assert _same(first, _take(_streamed(local, tok, "train", batch_size=2, seed=cfg.seed), 5))
    state = json.loads(json.dumps(it.get_state()))
    assert state["identity"]["pipeline"] == "documents"
    expected = _take(it, 4)
    resumed = _train_iter(corpus, tok, batch_size=2)
    resumed.set_state(state)
    assert _same(_take(resumed, 4), expected)
    with pytest.raises(DataError, match="different pipeline"):
        _train_iter(local, tok, batch_size=2).set_state(state)


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
    cfg = DataConfig(source=f"files:{root}/**/*.py", data_dir=str(tmp_path_factory.mktemp("tfds_strata")),
                     tokenizer=str(env["cache"] / "tokenizer.json"), seq_len=SEQ_LEN, eval_fraction=0.25)
    return {"cfg": cfg, "corpus": open_corpus(cfg), "tok": env["tok"]}


def test_stratum():
    assert corpus_lib.stratum("asyncio/events.py") == "asyncio"
    assert corpus_lib.stratum("test/test_asyncio/test_base.py") == "test"
    assert corpus_lib.stratum("os.py") == corpus_lib.stratum("./typing.py") == corpus_lib.ROOT_STRATUM


@pytest.mark.parametrize("f", [0.05, 0.1, 0.25, 0.3, 0.5])
def test_split_rule_is_proportional_per_stratum_and_size(f):
    rng = np.random.default_rng(1)
    counts = {"big": 400, "mid": 57, "small": 9, "tiny": 1, ".": 33}
    ids = [f"{s}/m{i}.py" if s != "." else f"m{i}.py" for s, n in counts.items() for i in range(n)]
    sizes = (1 + rng.choice(100_000, size=len(ids), replace=False)).tolist()  # distinct: no hash tie-breaks
    mask = corpus_lib.eval_document_mask(ids, sizes, f)
    assert abs(sum(mask) - f * len(ids)) <= 1
    for s, n in counts.items():
        picked = [(z, m) for i, z, m in zip(ids, sizes, mask, strict=True) if corpus_lib.stratum(i) == s]
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
    mask_p = corpus_lib.eval_document_mask([ids[i] for i in perm], [sizes[i] for i in perm], f)
    assert {ids[i] for i, m in zip(perm, mask_p, strict=True) if m} == {i for i, m in zip(ids, mask, strict=True) if m}


def test_split_rule_flat_directory_and_tiny_fraction():
    ids = [f"d{i:03d}.txt" for i in range(200)]
    sizes = [100 + i for i in range(200)]
    assert {corpus_lib.stratum(i) for i in ids} == {corpus_lib.ROOT_STRATUM}
    assert sum(corpus_lib.eval_document_mask(ids, sizes, 0.05)) == 10
    assert sum(corpus_lib.eval_document_mask(ids, sizes, 0.0)) == 0
    assert sum(corpus_lib.eval_document_mask(ids, sizes, 0.001)) <= 1  # N * f < 1: empty or one document
    with pytest.raises(ValueError):  # one size per id
        corpus_lib.eval_document_mask(ids, sizes[:-1], 0.1)


@pytest.mark.parametrize("rule", ["EVAL_SPLIT_RULE", "TEXT_RULE"])
def test_fingerprint_covers_split_and_text_rule(monkeypatch, rule):
    docs = [corpus_lib.Document("a/x.py", "/x", 10, 1), corpus_lib.Document("y.py", "/y", 20, 2)]
    fp = corpus_lib.corpus_fingerprint(docs, 0.05)
    assert corpus_lib.corpus_fingerprint(docs, 0.1) != fp
    monkeypatch.setattr(corpus_lib, rule, getattr(corpus_lib, rule) + 1)
    assert corpus_lib.corpus_fingerprint(docs, 0.05) != fp


def test_stratified_split_of_files_source(strata_env):
    cfg, corpus = strata_env["cfg"], strata_env["corpus"]
    held_out, train = list(_texts(corpus, "validation")), list(_texts(corpus, "train"))
    assert not set(held_out) & set(train) and len(held_out) + len(train) == sum(STRATA.values())
    per_stratum = {s: sum(corpus_lib.stratum(i) == s for i in held_out) for s in STRATA}
    for s, n in STRATA.items():
        assert int(np.floor(n * 0.25)) <= per_stratum[s] <= int(np.ceil(n * 0.25)), per_stratum
    report = stats.eval_split_stats(cfg, strata_env["tok"])
    assert report["documents"] == len(held_out) and report["corpus_strata"] == len(STRATA)
    assert report["strata"] == sum(v > 0 for v in per_stratum.values())
    assert set(report["missing_strata"]) == {s for s, v in per_stratum.items() if v == 0} <= {"p1"}
    tokens, lengths = corpus.token_stream("validation", strata_env["tok"])
    assert report["tokens"] == len(tokens) == lengths.sum()
    assert report["windows"] == -(-len(tokens) // (SEQ_LEN + 1))
    assert report["largest_document_share"] == pytest.approx(lengths.max() / lengths.sum())
    assert report["share_of"] == "tokens" and report["largest_document"] in held_out


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
    got = {name: corpus_lib.read_text(tmp_path / name) for name in cases}
    assert got == {"a": "x = 'ü ☃'\n", "bom": "x = 1\n", "nul": None, "latin1": None, "cut": None}


def test_files_that_are_not_utf8_text_are_skipped_and_reported(tmp_path, caplog):
    root = tmp_path / "mixed"
    _write_mixed_corpus(root)
    cfg = DataConfig(source=f"files:{root}/*", data_dir=str(tmp_path / "tfds"), vocab_size=300, seq_len=SEQ_LEN,
                     eval_fraction=0.25)
    with caplog.at_level("WARNING"):
        report = stats.corpus_stats(cfg)
    warned = [r.getMessage() for r in caplog.records if "not UTF-8 text" in r.getMessage()]
    assert warned == [f"files:{root}/*: skipped 2 of 9 files that are not UTF-8 text (binary, or another "
                      "encoding): blob.bin, latin1.txt"]
    assert (report["skipped_files"], report["skipped_examples"]) == (2, ["blob.bin", "latin1.txt"])
    assert report["train_documents"] + report["eval_documents"] == 7 and report["eval_documents"] >= 1
    # No replacement character (nor BOM) in any stored text; the BOM file's text starts with its first line.
    corpus = open_corpus(cfg)
    records = {i: t for split in ("train", "validation") for i, t in corpus.records(split)}
    assert sorted(records) == ["bom.txt"] + [f"good{k}.txt" for k in range(6)]
    assert not any("\ufffd" in t or "\ufeff" in t for t in records.values())
    assert records["bom.txt"] == "doc06x = 'bom ü'\n"
    # Nor in the token streams the model trains and is evaluated on.
    tok = corpus_lib.get_tokenizer(cfg, corpus, tmp_path / "cache")
    for split in ("train", "validation"):
        text = tok.decode(_stream(corpus, tok, split).tolist(), skip_special_tokens=False)
        assert "doc" in text and "\ufffd" not in text and "\ufeff" not in text and "café" not in text
    # A later run reads the cached dataset: the report comes from its metadata, no second warning.
    caplog.clear()
    with caplog.at_level("WARNING"):
        again = stats.eval_split_stats(cfg, tok)
    assert not [r for r in caplog.records if "not UTF-8 text" in r.getMessage()]
    assert (again["skipped_files"], again["skipped_examples"]) == (2, ["blob.bin", "latin1.txt"])
    assert again["documents"] == report["eval_documents"]
    meta = json.loads(next((tmp_path / "tfds").glob("text_files_builder/fp*/1.0.0/metadata.json")).read_text())
    assert meta == {"text_rule": corpus_lib.TEXT_RULE, "skipped_ids": ["blob.bin", "latin1.txt"]}


def test_only_files_that_are_not_utf8_text_raise(tmp_path):
    root = tmp_path / "mixed"
    _write_mixed_corpus(root)
    source = f"files:{root}/[bl][la]*"  # blob.bin, latin1.txt
    cfg = DataConfig(source=source, data_dir=str(tmp_path / "tfds"))
    assert {d.doc_id for d in corpus_lib.list_documents(source)} == {"blob.bin", "latin1.txt"}
    for _ in range(2):  # nothing half-prepared is reused
        with pytest.raises(DataError, match=re.escape(f"no file of {source!r} is UTF-8 text")):
            open_corpus(cfg)
    # The one text file next to them would be held out at this eval_fraction: no train split, one clear error.
    cfg = DataConfig(source=f"files:{root}/[gl][oa]*[0n]*", data_dir=str(tmp_path / "tfds"), eval_fraction=0.9)
    with pytest.raises(DataError, match="every UTF-8 text file of .* falls in the held-out split"):
        open_corpus(cfg)


# ---- eval windows -------------------------------------------------------------------------------------------------
def _window_ids(corpus: Corpus, tok, batches: list[dict]) -> np.ndarray:
    """[num_batches, batch_size] index of the packed-stream window each eval row was cut from."""
    return _row_ids(_row_lookup(_stream(corpus, tok), SEQ_LEN), batches)


def test_eval_windows_spread_across_split(strata_env):
    corpus, tok = strata_env["corpus"], strata_env["tok"]
    tokens = _stream(corpus, tok)
    W = -(-len(tokens) // (SEQ_LEN + 1))
    B, N = 3, 4
    assert W >= 3 * B * N, "corpus too small for this test"
    batches = _eval_batches(corpus, tok, batch_size=B, num_batches=N)
    assert len(batches) == N and all(b["inputs"].shape == (B, SEQ_LEN) for b in batches)
    w = _window_ids(corpus, tok, batches)
    n = B * N
    chosen = sorted(w.reshape(-1).tolist())
    assert chosen == [(2 * i + 1) * W // (2 * n) for i in range(n)]  # evenly spaced, all distinct
    assert chosen[0] < W / n and chosen[-1] >= W - W / n  # from the beginning to the end of the stream
    for b in range(N):  # every batch spans the split too
        assert w[b].min() < W / 3 and w[b].max() >= 2 * W / 3
    # Rows come from many documents, not from the first few of the stored order.
    order = [int(MARKER.search(t).group(1)) for t in _texts(corpus, "validation").values()]
    seen = _markers(tok, batches)
    thirds = np.array_split(np.array(order), 3)
    assert all(seen & set(t.tolist()) for t in thirds) and len(seen) >= len(order) // 2


def test_eval_windows_equal_training_packing(strata_env):
    corpus, tok = strata_env["corpus"], strata_env["tok"]
    tokens = _stream(corpus, tok)
    W = -(-len(tokens) // (SEQ_LEN + 1))
    batches = _eval_batches(corpus, tok, batch_size=1, num_batches=W)  # exactly every window once
    assert sorted(_window_ids(corpus, tok, batches).reshape(-1).tolist()) == list(range(W))
    # Window w is the w-th row the training packer cuts from the eval documents in stored order.
    it = _streamed(corpus, tok, "validation", batch_size=1)
    assert _same(batches, [next(it) for _ in range(W)])


def test_eval_windows_cycle_when_split_small(env):
    corpus, tok = env["corpus"], env["tok"]
    tokens = _stream(corpus, tok)
    W = -(-len(tokens) // (SEQ_LEN + 1))
    B, N = 3, W  # n = 3 W windows wanted
    w = _window_ids(corpus, tok, _eval_batches(corpus, tok, batch_size=B, num_batches=N))
    assert w.shape == (N, B)
    np.testing.assert_array_equal(np.bincount(w.reshape(-1), minlength=W), 3)


def test_eval_split_shorter_than_one_window(env, tmp_path):
    for k in range(4):
        (tmp_path / f"t{k}.py").write_text(f"doc{k:02d}x = {k}\n")
    corpus = open_corpus(DataConfig(source=f"files:{tmp_path}/*.py", data_dir=str(tmp_path / "tfds"),
                                    eval_fraction=0.25))
    tok, eos = env["tok"], corpus_lib.eos_id(env["tok"])
    (text,) = _texts(corpus, "validation").values()
    stream = tok.encode(text, add_special_tokens=False).ids + [eos]
    assert len(stream) < SEQ_LEN
    (b,) = _eval_batches(corpus, tok, batch_size=2, num_batches=1)
    tiled = np.resize(np.array(stream, np.int32), SEQ_LEN + 1)  # the stream, repeated
    for r in range(2):
        np.testing.assert_array_equal(b["inputs"][r], tiled[:-1])
        np.testing.assert_array_equal(b["targets"][r], tiled[1:])
        starts = np.arange(SEQ_LEN) % len(stream) == 0
        np.testing.assert_array_equal(b["segment_ids"][r], np.cumsum(starts))
        np.testing.assert_array_equal(b["positions"][r], np.arange(SEQ_LEN) % len(stream))
        np.testing.assert_array_equal(b["weights"][r] == 0, b["inputs"][r] == eos)


def test_eval_stream_cache(strata_env):
    """The eval split is tokenized once per data dir: a corpus opened again reads the cache, a broken one is redone."""
    cfg, tok = strata_env["cfg"], strata_env["tok"]
    first = _eval_batches(strata_env["corpus"], tok, batch_size=2, num_batches=3)
    (cached,) = (Path(cfg.data_dir) / "prosparse_eval_tokens").glob("*.npz")
    assert not list(cached.parent.glob("*.tmp"))
    written = _file_id(cached)
    assert _same(_eval_batches(open_corpus(cfg), tok, batch_size=2, num_batches=3), first)
    assert _file_id(cached) == written  # read, not tokenized and written again
    for broken in (b"not an npz", cached.read_bytes()[:200]):  # a broken cache is recomputed and rewritten
        cached.write_bytes(broken)
        assert _same(_eval_batches(open_corpus(cfg), tok, batch_size=2, num_batches=3), first)
    with np.load(cached) as z:
        assert z["tokens"].dtype == np.int32


def test_train_stream_cache(strata_env, tmp_path):
    """The train split is tokenized once per (corpus, tokenizer); a changed tokenizer or corpus gets a new key."""
    cfg, tok = strata_env["cfg"], strata_env["tok"]
    cfg = DataConfig(**{**cfg.__dict__, "data_dir": str(tmp_path / "tfds")})
    corpus = open_corpus(cfg)
    first = _take(_train_iter(corpus, tok, batch_size=3), 4)
    (cached,) = (Path(cfg.data_dir) / "prosparse_train_tokens").glob("*.npz")
    assert [f.name for f in cached.parent.iterdir()] == [cached.name]  # no temporary file left behind
    assert cached == corpus.token_stream_path("train", tok)
    with np.load(cached) as z:  # the train documents in stored order, each followed by EOS
        texts = _texts(corpus, "train").values()
        expected = [tok.encode(t, add_special_tokens=False).ids + [corpus_lib.eos_id(tok)] for t in texts]
        np.testing.assert_array_equal(z["tokens"], np.concatenate(expected).astype(np.int32))
        np.testing.assert_array_equal(z["lengths"], [len(e) for e in expected])
    written = _file_id(cached)
    assert _same(_take(_train_iter(open_corpus(cfg), tok, batch_size=3), 4), first)
    assert _file_id(cached) == written  # read, not tokenized and written again
    # Another tokenizer: another key, so tokenized again into a file of its own.
    other_tok = corpus_lib.get_tokenizer(DataConfig(**{**cfg.__dict__, "tokenizer": "", "vocab_size": 290}), corpus,
                                         tmp_path / "tok290")
    other_path = corpus.token_stream_path("train", other_tok)
    assert other_path != cached and not other_path.exists()
    _train_iter(corpus, other_tok, batch_size=3)
    assert other_path.is_file() and _file_id(cached) == written
    # Another corpus (one more file): another fingerprint, another key; the eval split has its own directory.
    root = tmp_path / "c"
    _write_strata_corpus(root)
    (root / "extra.py").write_text("x = 1\n")
    other_corpus = open_corpus(DataConfig(**{**cfg.__dict__, "source": f"files:{root}/**/*.py"}))
    assert other_corpus.fingerprint != corpus.fingerprint
    assert other_corpus.token_stream_path("train", tok) != cached
    assert corpus.token_stream_path("validation", tok).parent.name == "prosparse_eval_tokens"
    for broken in (b"not an npz", cached.read_bytes()[:200]):  # a broken cache is recomputed and rewritten
        cached.write_bytes(broken)
        assert _same(_take(_train_iter(open_corpus(cfg), tok, batch_size=3), 4), first)


def test_eval_batches_bad_sizes(env):
    with pytest.raises(DataError, match="num_batches must be a positive integer"):
        _eval_batches(env["corpus"], env["tok"], batch_size=2, num_batches=0)


def test_stdlib_split_rule_is_stratified():
    """The default corpus (listing only, no TFDS preparation): every package with >= 20 modules is held out from."""
    docs = corpus_lib.list_documents("stdlib")
    mask = corpus_lib.eval_document_mask([d.doc_id for d in docs], [d.size for d in docs], 0.05)
    held = [d for d, m in zip(docs, mask, strict=True) if m]
    assert abs(len(held) - 0.05 * len(docs)) <= 1
    strata: dict[str, int] = {}
    for d in docs:
        strata[corpus_lib.stratum(d.doc_id)] = strata.get(corpus_lib.stratum(d.doc_id), 0) + 1
    covered = {corpus_lib.stratum(d.doc_id) for d in held}
    assert {s for s, n in strata.items() if n >= 20} <= covered
    assert max(d.size for d in held) / sum(d.size for d in held) < 0.25


# ---- errors -------------------------------------------------------------------------------------------------------
def test_missing_glob(tmp_path):
    with pytest.raises(DataError, match="matches no files"):
        open_corpus(DataConfig(source=f"files:{tmp_path}/nothing/*.txt", data_dir=str(tmp_path / "t")))


def test_glob_of_empty_files(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("")
    with pytest.raises(DataError, match="all are empty"):
        open_corpus(DataConfig(source=f"files:{tmp_path}/*.txt", data_dir=str(tmp_path / "t")))


def test_unknown_tfds_name(tmp_path):
    with pytest.raises(DataError, match="dataset .no_such_ds_xyz. not found.*tfds build"):
        open_corpus(DataConfig(source="tfds:no_such_ds_xyz", data_dir=str(tmp_path)))


def test_empty_eval_split(env):
    corpus = open_corpus(DataConfig(**{**env["cfg"].__dict__, "eval_fraction": 0.0}))
    with pytest.raises(DataError, match="eval split .* is empty"):
        _eval_batches(corpus, env["tok"], batch_size=1, num_batches=1)


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
    cfg = DataConfig(data_dir=str(tmp_path / "tfds"), vocab_size=512, seq_len=128)
    report = stats.corpus_stats(cfg)
    assert report["train_documents"] > 1000 and report["eval_documents"] > 0 and report["train_bytes"] > 10_000_000
    corpus = open_corpus(cfg)
    tok = corpus_lib.get_tokenizer(cfg, corpus, tmp_path / "cache")
    b = next(pipeline.make_train_iterator(corpus, tok, seq_len=128, seed=0, batch_size=4))
    assert b["inputs"].shape == (4, 128) and b["weights"].sum() > 0
    assert "def" in tok.decode(b["inputs"].reshape(-1).tolist())


def test_short_run_samples_the_whole_train_split(tmp_path):
    """A short run's batches draw rows from all over the train split, not from a few consecutive documents."""
    root = tmp_path / "long"
    root.mkdir()
    for k in range(16):  # each document spans ~30 rows of SEQ_LEN tokens
        (root / f"f{k:02d}.py").write_text("".join(f"doc{k:02d}x = {j}\n" for j in range(150)))
    cfg = DataConfig(source=f"files:{root}/*.py", data_dir=str(tmp_path / "tfds"), vocab_size=300, seq_len=SEQ_LEN,
                     eval_fraction=0.0)
    corpus = open_corpus(cfg)
    tok = corpus_lib.get_tokenizer(cfg, corpus, tmp_path / "cache")
    lookup = _row_lookup(_stream(corpus, tok, "train"), SEQ_LEN)
    W = len(lookup)
    assert W >= 16 * 25
    batches = _take(_train_iter(corpus, tok, batch_size=8), 6)  # 48 rows, ~10% of the split
    rows = _row_ids(lookup, batches).reshape(-1)
    assert len(set(rows.tolist())) == 48  # no row twice within an epoch
    assert all(((rows >= a * W // 3) & (rows < (a + 1) * W // 3)).sum() >= 8 for a in range(3))  # start, middle, end
    assert len(_markers(tok, batches)) >= 10
    # The same 48 rows of a document stream (documents shuffled, rows not) come from 2 or 3 documents.
    stream = _streamed(corpus, tok, "train", batch_size=8, seed=cfg.seed, shuffle_window=1)
    assert len(_markers(tok, _take(stream, 6))) <= 3
