"""LM data pipeline: text corpus (TFDS array_record) -> byte-level BPE -> packed [batch, seq_len] batches via grain.

Sources (see `DataConfig.source`): the running interpreter's standard library ('stdlib', default, no download), local
text files ('files:<glob>') or a TFDS dataset already prepared in array_record form ('tfds:<name>'). Local sources are
written once into a fingerprinted TFDS dataset (`data_tfds.py`); later runs just read it.

Token stream of a split: its documents in stored order, each tokenized and followed by EOS, concatenated. It is cut
into consecutive, non-overlapping rows of seq_len + 1 tokens (no padding; a long document continues in the next
row); the last row wraps around to the start of the stream, so no token is dropped and even a stream shorter than
one row gives a row. These are exactly the rows grain's concat-then-split packer cuts from the documents in stored
order, repeated. A row's first seq_len tokens are the inputs and its last seq_len tokens the targets, so the last
token of a row is only ever a target.

Training pipeline per host, local sources ('stdlib', 'files:'): the whole train split is tokenized once (cached, see
`_split_stream`), then (grain, lazy) row indices `range(num_rows)` -> shard `process_index::process_count` ->
shuffle (seed; grain reshuffles every epoch) -> repeat forever -> batch -> rows gathered from the stream -> model
features. Every batch thus draws its rows from random places of the whole corpus: a short run (a miniature trains
~400K tokens, ~80 stdlib files) sees a sample of the whole train split, so its training loss tracks the held-out
loss, instead of a slice of ~100 consecutive documents of one shuffled order. Resume is exact: the iterator state is a
position in the index sequence.

Training pipeline per host, 'tfds:' sources (possibly huge, so not tokenized up front): documents of the split ->
shard -> shuffle (seed, reshuffled every epoch) -> repeat forever -> tokenize + append EOS on the fly -> concat-then-
split into rows of seq_len + 1 tokens -> shuffle rows within windows of `SHUFFLE_WINDOW_ROWS` (~100 documents of
the stdlib at seq_len 256) -> batch -> model features. Without the row shuffle a batch of 8 x 256 tokens would be one
or two consecutive documents, so successive gradients would come from the same document: noisy, strongly
correlated updates.

Model features, each [batch, seq_len]:
  inputs, targets (int32): targets[i] = the token after inputs[i] in the token stream.
  segment_ids (int32): 1, 2, 3... per document piece within a row; 0 = padding (only possible in principle).
  positions (int32): 0 at the start of each segment of the row (a document continued from the previous row restarts
    at 0 too, since rows are independent sequences for attention).
  weights (float32): 1 where the target belongs to the same document as the input, 0 for padding and for the EOS ->
    next-document transition. Predicting the EOS that ends a document does count.

Held-out split: a stratified systematic sample of the documents (`data_tfds.eval_document_mask`); eval batches are
rows spread evenly over the whole eval stream (`make_eval_batches`), `eval_split_stats` reports the split.

Cache layout: TFDS data under `data_dir/text_files_builder/fp<corpus fingerprint>/1.0.0/`; the token stream of the
eval split under `data_dir/prosparse_eval_tokens/<key>.npz`, that of the train split (local sources) under
`data_dir/prosparse_train_tokens/<key>.npz`, key = hash of corpus fingerprint + tokenizer; the tokenizer under
`<cache_dir>/tokenizer.json` with `<cache_dir>/tokenizer_fingerprint.json` beside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from prosparse_jax.config import DataConfig
from prosparse_jax.data_tfds import (
    EVAL_SPLIT,
    TRAIN_SPLIT,
    Corpus,
    DataError,
    load_corpus,
    resolve_data_dir,
    stratum,
)

EOS_TOKEN = "<|endoftext|>"  # id 0: document separator, appended to every document
_STATE_VERSION = 3  # 2: rows shuffled within windows; 3: local sources sample rows of the whole train split
SHUFFLE_WINDOW_ROWS = 2048  # 'tfds:' sources: packed rows per shuffle window (~526K tokens at seq_len 256)
_TOKENIZER_FORMAT = 1
_PREFETCH_DOCS = 16
_TOKENS_FORMAT = 1  # format of the cached token streams (part of their key)
# Under the TFDS data dir: the cached token stream of each split, see `_split_stream`.
_TOKENS_DIRS = {EVAL_SPLIT: "prosparse_eval_tokens", TRAIN_SPLIT: "prosparse_train_tokens"}
_TOKENIZE_CHUNK_CHARS = 1 << 20  # characters of text per `encode_batch` call: bounds the memory of the encodings


# ---- corpus + tokenizer -------------------------------------------------------------------------------------------
def _corpus(cfg: DataConfig) -> Corpus:
    return load_corpus(cfg.source, cfg.data_dir, cfg.eval_fraction, cfg.text_key)


def _text(record: Mapping[str, Any], text_key: str) -> str:
    if text_key not in record:
        raise DataError(f"data.text_key: feature {text_key!r} not in records (features: {sorted(record)})")
    t = record[text_key]
    return t.decode("utf-8", errors="replace") if isinstance(t, bytes) else str(t)


def corpus_stats(
    cfg: DataConfig, cache_dir: str | Path | None = None, *, tokenizer: tokenizers.Tokenizer | None = None,
) -> dict[str, Any]:
    """Documents and stored bytes per split, the corpus fingerprint and a report of the held-out split.

    Prepares the corpus on first use and reads the eval split (see `eval_split_stats`). Keys: source, fingerprint,
    train_documents, eval_documents, train_bytes, eval_bytes (stored array_record bytes), strata (strata of the
    whole corpus, None for 'tfds:' sources), and eval_strata, eval_missing_strata, eval_tokens, eval_windows,
    eval_largest_document, eval_largest_document_share, eval_share_of from `eval_split_stats(cfg, tokenizer)`.
    """
    del cache_dir  # The corpus lives under cfg.data_dir; kept for API symmetry.
    c = _corpus(cfg)
    held_out = _eval_split_stats(c, cfg, tokenizer)
    stats: dict[str, Any] = {
        "source": cfg.source,
        "fingerprint": c.fingerprint,
        "train_documents": c.num_documents(TRAIN_SPLIT),
        "eval_documents": c.num_documents(EVAL_SPLIT),
        "train_bytes": c.num_bytes(TRAIN_SPLIT),
        "eval_bytes": c.num_bytes(EVAL_SPLIT),
        "strata": held_out["corpus_strata"],
    }
    for k in ("strata", "missing_strata", "tokens", "windows", "largest_document", "largest_document_share",
              "share_of"):
        stats[f"eval_{k}"] = held_out[k]
    return stats


def eval_split_stats(cfg: DataConfig, tokenizer: tokenizers.Tokenizer | None = None) -> dict[str, Any]:
    """Report of the held-out split: its size, the strata it covers and how much its largest document weighs.

    Reads the whole eval split; with a `tokenizer` it also tokenizes it (cached, as `make_eval_batches` does).

    Args:
      cfg: Data config; its corpus is prepared on first use.
      tokenizer: Optional; without it `tokens` and `windows` are None and shares are of bytes.

    Returns:
      A dict with
        documents: number of held-out documents.
        strata: number of strata (`data_tfds.stratum`: first path component of the id, '.' for top-level files)
          with at least one held-out document.
        corpus_strata: number of strata of the whole corpus (None for 'tfds:' sources).
        missing_strata: sorted strata of the corpus without a held-out document (only strata with fewer than
          1 / eval_fraction documents can miss out); None for 'tfds:' sources.
        bytes: UTF-8 bytes of the held-out texts.
        tokens: tokens of the packed eval stream (each document's tokens + 1 EOS), None without tokenizer.
        windows: eval windows of seq_len + 1 tokens the stream is cut into, None without tokenizer.
        largest_document: id of the held-out document with the most tokens (bytes without tokenizer), or None.
        largest_document_share: its share of the split's tokens (bytes without tokenizer); 0.0 if empty.
        share_of: 'tokens' or 'bytes', the unit of `largest_document_share`.
    """
    return _eval_split_stats(_corpus(cfg), cfg, tokenizer)


def _eval_split_stats(corpus: Corpus, cfg: DataConfig, tokenizer: tokenizers.Tokenizer | None) -> dict[str, Any]:
    ids, texts = _split_records(corpus, EVAL_SPLIT)
    num_bytes = [len(t.encode("utf-8")) for t in texts]
    tokens = windows = None
    sizes = num_bytes
    if tokenizer is not None:
        lengths = _split_stream(corpus, tokenizer, cfg.data_dir, EVAL_SPLIT)[1] if ids else np.zeros(0, np.int64)
        sizes = lengths.tolist()
        tokens = int(lengths.sum())
        windows = -(-tokens // (cfg.seq_len + 1))
    covered = {stratum(i) for i in ids}
    all_strata = {stratum(d.doc_id) for d in corpus.documents} if corpus.documents else None
    largest = int(np.argmax(sizes)) if ids else None
    return {
        "documents": len(ids),
        "strata": len(covered),
        "corpus_strata": None if all_strata is None else len(all_strata),
        "missing_strata": None if all_strata is None else sorted(all_strata - covered),
        "bytes": sum(num_bytes),
        "tokens": tokens,
        "windows": windows,
        "largest_document": None if largest is None else ids[largest],
        "largest_document_share": 0.0 if largest is None else sizes[largest] / max(sum(sizes), 1),
        "share_of": "bytes" if tokenizer is None else "tokens",
    }


def eos_id(tokenizer: tokenizers.Tokenizer) -> int:
    """Id of the EOS / document-separator token '<|endoftext|>'."""
    i = tokenizer.token_to_id(EOS_TOKEN)
    if i is None:
        raise DataError(f"tokenizer has no {EOS_TOKEN!r} token; it is needed as the document separator")
    return int(i)


def get_tokenizer(cfg: DataConfig, cache_dir: str | Path) -> tokenizers.Tokenizer:
    """Loads `cfg.tokenizer`, or trains (once) and caches a byte-level BPE on the train split.

    The trained BPE has vocab `cfg.vocab_size`: special token '<|endoftext|>' (id 0, EOS), the 256 byte symbols, then
    merges (fewer tokens if a tiny corpus runs out of merges; ids are always < vocab_size). No '<unk>' token:
    byte-level BPE can encode any text. It is cached at `<cache_dir>/tokenizer.json` with a
    fingerprint (corpus, vocab size) in `tokenizer_fingerprint.json`; a later call with the same fingerprint loads it,
    one with a different fingerprint raises instead of overwriting it.
    """
    if cfg.tokenizer:
        path = Path(cfg.tokenizer).expanduser()
        if not path.is_file():
            raise DataError(f"data.tokenizer: {str(path)!r} does not exist; give a tokenizer.json or ''")
        tok = tokenizers.Tokenizer.from_file(str(path))
        eos_id(tok)
        return tok
    corpus = _corpus(cfg)
    fingerprint = {"format": _TOKENIZER_FORMAT, "corpus": corpus.fingerprint, "vocab_size": cfg.vocab_size}
    cache = Path(cache_dir)
    tok_path, fp_path = cache / "tokenizer.json", cache / "tokenizer_fingerprint.json"
    if tok_path.exists():
        stored = json.loads(fp_path.read_text()) if fp_path.exists() else None
        if stored != fingerprint:
            raise DataError(
                f"cached tokenizer {tok_path} was trained for {stored} but this run needs {fingerprint}; "
                "use another cache dir, delete the cached tokenizer, or set data.tokenizer to its path")
        return tokenizers.Tokenizer.from_file(str(tok_path))
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size, special_tokens=[EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False)
    src = corpus.data_source(TRAIN_SPLIT)
    tok.train_from_iterator((_text(src[i], corpus.text_key) for i in range(len(src))), trainer=trainer)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = tok_path.with_suffix(".json.tmp")
    tok.save(str(tmp))
    fp_path.write_text(json.dumps(fingerprint, indent=1))
    tmp.replace(tok_path)
    return tok


# ---- token streams of whole splits --------------------------------------------------------------------------------
def _split_records(corpus: Corpus, split: str) -> tuple[list[str], list[str]]:
    """Ids and texts of `split` in stored order (ids are record indices where records carry no 'id')."""
    src = corpus.data_source(split)
    ids, texts = [], []
    for i in range(len(src)):
        r = src[i]
        doc_id = r.get("id", str(i))
        ids.append(doc_id.decode() if isinstance(doc_id, bytes) else str(doc_id))
        texts.append(_text(r, corpus.text_key))
    return ids, texts


def _split_texts(corpus: Corpus, split: str) -> Iterator[str]:
    """Texts of `split` in stored order, read one record at a time."""
    src = corpus.data_source(split)
    for i in range(len(src)):
        yield _text(src[i], corpus.text_key)


def _tokenize_stream(texts: Iterable[str], tokenizer: tokenizers.Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (tokens int32 [L], tokens per text int64 [D]): each text's ids then EOS, as `_Tokenize` does.

    Texts are encoded in chunks of about `_TOKENIZE_CHUNK_CHARS` characters (one `encode_batch` call each, parallel
    over the cores), so the memory of the encodings stays bounded whatever the size of the split.
    """
    eos = eos_id(tokenizer)
    # Same ids as `encode_batch`, without computing the character offsets of every token.
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    pieces: list[np.ndarray] = []
    chunk: list[str] = []
    chars = 0

    def flush() -> None:
        for e in encode(chunk, add_special_tokens=False):
            ids = e.ids
            ids.append(eos)
            pieces.append(np.asarray(ids, dtype=np.int32))
        chunk.clear()

    for text in texts:
        chunk.append(text)
        chars += len(text)
        if chars >= _TOKENIZE_CHUNK_CHARS:
            flush()
            chars = 0
    if chunk:
        flush()
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    return tokens, lengths


def _stream_cache_path(corpus: Corpus, tokenizer: tokenizers.Tokenizer, data_dir: str, split: str) -> Path:
    """`<data_dir>/<_TOKENS_DIRS[split]>/<key>.npz`, key = hash of (format, corpus fingerprint, tokenizer)."""
    key = hashlib.sha256(json.dumps(
        [_TOKENS_FORMAT, corpus.fingerprint, _tokenizer_hash(tokenizer)]).encode()).hexdigest()[:16]
    return Path(resolve_data_dir(data_dir)) / _TOKENS_DIRS[split] / f"{key}.npz"


def _split_stream(
    corpus: Corpus, tokenizer: tokenizers.Tokenizer, data_dir: str, split: str,
) -> tuple[np.ndarray, np.ndarray]:
    """The token stream of `split`: (tokens int32 [L], tokens per document int64 [D]), documents in stored order.

    Every document of the split is tokenized (`_tokenize_stream`) and followed by EOS; the stream is their
    concatenation. It is cached, written atomically, at `_stream_cache_path` (a hash of corpus fingerprint and
    tokenizer, so it is independent of seq_len and paid once per data dir and tokenizer); a cache that does not match
    the split is recomputed, and a data dir that cannot be written to is simply not cached.

    Args:
      corpus: The prepared corpus.
      tokenizer: Tokenizer with the EOS token.
      data_dir: `DataConfig.data_dir` ('' -> the default data dir).
      split: 'train' or 'validation'.

    Returns:
      (tokens, lengths) with lengths.sum() == len(tokens); both empty for an empty split.
    """
    path = _stream_cache_path(corpus, tokenizer, data_dir, split)
    num_docs = corpus.num_documents(split)
    try:
        with np.load(path) as z:
            tokens, lengths = z["tokens"], z["lengths"]
        if tokens.dtype == np.int32 and len(lengths) == num_docs and int(lengths.sum()) == len(tokens):
            return tokens, lengths
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):  # absent or unreadable: recompute below
        pass
    tokens, lengths = _tokenize_stream(_split_texts(corpus, split), tokenizer)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            np.savez(f, tokens=tokens, lengths=lengths)
        tmp.chmod(0o644)  # NamedTemporaryFile creates 0600; the data dir may be shared
        os.replace(tmp, path)
    except OSError:  # read-only data dir: work without the cache
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return tokens, lengths


class _StreamRows:
    """A split's token stream cut into rows of seq_len + 1 tokens (module docstring); row indices -> model features.

    Row r is tokens[r * (seq_len + 1) + j mod L] for j <= seq_len: consecutive, non-overlapping rows, the last one
    wrapped around to the start of the stream. Callable on a [B] array of row indices (a grain map over batches of
    indices): returns the [B, seq_len] features of `_to_features`, identical to those of the packer's rows.
    """

    def __init__(self, tokens_L: np.ndarray, lengths_D: np.ndarray, seq_len: int):
        self.tokens_L = tokens_L
        self.doc_start_L = np.zeros(len(tokens_L), dtype=bool)
        self.doc_start_L[np.cumsum(lengths_D)[:-1]] = True
        if len(tokens_L):
            self.doc_start_L[0] = True
        self.row_len = seq_len + 1

    def __len__(self) -> int:
        return -(-len(self.tokens_L) // self.row_len)

    def __repr__(self) -> str:
        return f"_StreamRows(tokens={len(self.tokens_L)}, rows={len(self)}, row_len={self.row_len})"

    def __call__(self, rows_B: np.ndarray) -> dict[str, np.ndarray]:
        T1 = self.row_len
        idx_BxT1 = (np.asarray(rows_B, dtype=np.int64)[:, None] * T1 + np.arange(T1)) % len(self.tokens_L)
        starts_BxT1 = self.doc_start_L[idx_BxT1]
        starts_BxT1[:, 0] = True
        return _to_features({"tokens": self.tokens_L[idx_BxT1],
                             "tokens_segment_ids": np.cumsum(starts_BxT1, axis=1, dtype=np.int32)})


# ---- training batches ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Tokenize:
    """Record -> {'tokens': int32 [n + 1]}: the document's ids followed by EOS."""

    tokenizer: tokenizers.Tokenizer
    text_key: str
    eos: int

    def __call__(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        ids = self.tokenizer.encode(_text(record, self.text_key), add_special_tokens=False).ids
        ids.append(self.eos)
        return {"tokens": np.asarray(ids, dtype=np.int32)}


def _to_features(packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Packed rows of seq_len + 1 tokens -> model features of [batch, seq_len]."""
    tokens_BxT1, seg_BxT1 = packed["tokens"], packed["tokens_segment_ids"].astype(np.int32)
    B, T = tokens_BxT1.shape[0], tokens_BxT1.shape[1] - 1
    seg_BxT = seg_BxT1[:, :T]
    starts_BxT = np.ones((B, T), dtype=bool)
    starts_BxT[:, 1:] = seg_BxT[:, 1:] != seg_BxT[:, :-1]
    idx_T = np.arange(T, dtype=np.int32)
    last_start_BxT = np.maximum.accumulate(np.where(starts_BxT, idx_T, 0), axis=1)
    positions_BxT = np.where(seg_BxT > 0, idx_T - last_start_BxT, 0).astype(np.int32)
    weights_BxT = ((seg_BxT > 0) & (seg_BxT == seg_BxT1[:, 1:])).astype(np.float32)
    return {
        "inputs": tokens_BxT1[:, :T].astype(np.int32),
        "targets": tokens_BxT1[:, 1:].astype(np.int32),
        "segment_ids": seg_BxT,
        "positions": positions_BxT,
        "weights": weights_BxT,
    }


def _batches(
    source: Sequence[Any], tokenizer: tokenizers.Tokenizer, text_key: str, *, seq_len: int, batch_size: int,
    seed: int | None, process_index: int = 0, process_count: int = 1,
) -> grain.IterDataset:
    """Streaming pipeline of 'tfds:' sources (module docstring): documents -> tokenize -> pack -> window shuffle.

    With `seed=None` neither documents nor rows are shuffled: the rows are those of the split's stream, in order.
    """
    ds = grain.MapDataset.source(source)[process_index::process_count]
    if seed is not None:
        ds = ds.shuffle(seed)
    ds = ds.repeat().map(_Tokenize(tokenizer, text_key, eos_id(tokenizer)))
    # One background thread tokenizes a few documents ahead: ample for training speed, leaves the cores to the model.
    docs = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=_PREFETCH_DOCS))
    packed = grain.experimental.ConcatThenSplitIterDataset(docs, length_struct={"tokens": seq_len + 1})
    if seed is not None:  # mix rows of many documents into every batch (module docstring); resumes exactly
        packed = grain.experimental.WindowShuffleIterDataset(packed, window_size=SHUFFLE_WINDOW_ROWS, seed=seed)
    return packed.batch(batch_size, drop_remainder=True).map(_to_features)


def _row_batches(
    rows: _StreamRows, *, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1,
) -> grain.IterDataset:
    """Pipeline of local sources (module docstring): this host's rows, shuffled per epoch, forever, in batches."""
    ds = grain.MapDataset.range(len(rows))[process_index::process_count]
    # grain shuffles epoch e (an index of the repeated dataset // its length) with seed + e: a new order per epoch. The
    # seed is hashed first, else runs with seeds s and s + 1 would see the same orders one epoch apart.
    shuffle_seed = int.from_bytes(hashlib.sha256(f"prosparse train rows {seed}".encode()).digest()[:4], "little")
    ds = ds.shuffle(shuffle_seed).repeat()
    # The elements are in-memory ints: no reader threads (grain's advice for in-memory data); rows are gathered per
    # batch, vectorised.
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    return ds.batch(batch_size, drop_remainder=True).map(rows)


def _tokenizer_hash(tokenizer: tokenizers.Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]


class TrainIterator:
    """Infinite iterator over training batches (dicts of [batch, seq_len] numpy arrays) with exact resume.

    `get_state()` returns a JSON-serialisable dict; `set_state(state)` on an iterator built with the same config,
    tokenizer, batch size and host makes the next batch equal to the one the original iterator would have produced
    next. Resume uses grain's own iterator checkpointing (local sources: the position in the shuffled row indices;
    'tfds:' sources: source index, packing remainder and shuffle window).
    """

    def __init__(self, dataset: grain.IterDataset, identity: dict[str, Any]):
        self._iter = iter(dataset)
        self._identity = identity

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position of the iterator."""
        return {"version": _STATE_VERSION, "identity": self._identity, "grain": _jsonable(self._iter.get_state())}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restores a position from `get_state()`; raises if it came from a differently configured iterator."""
        if state.get("version") != _STATE_VERSION:
            raise DataError(
                f"data iterator state version {state.get('version')} != {_STATE_VERSION}: it was saved by another "
                "version of the data pipeline; resume with that version or start the data from the beginning")
        if dict(state["identity"]) != self._identity:
            raise DataError(
                f"data iterator state belongs to a different pipeline: saved {state['identity']}, "
                f"this one {self._identity}")
        self._iter.set_state(_from_jsonable(state["grain"]))


def _jsonable(x: Any) -> Any:
    """grain state -> JSON: tuples are tagged so they come back as tuples."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return {"__tuple__": [_jsonable(v) for v in x]}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.integer | np.floating | np.bool_):
        return x.item()
    return x


def _from_jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        if set(x) == {"__tuple__"}:
            return tuple(_from_jsonable(v) for v in x["__tuple__"])
        return {k: _from_jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_from_jsonable(v) for v in x]
    return x


def make_train_iterator(
    cfg: DataConfig, tokenizer: tokenizers.Tokenizer, *, batch_size: int, cache_dir: str | Path | None = None,
    process_index: int = 0, process_count: int = 1,
) -> TrainIterator:
    """Training batches of this host, forever (see the module docstring for the two pipelines).

    Local sources ('stdlib', 'files:'): the rows of seq_len + 1 tokens of the whole train stream (tokenized once and
    cached, see `_split_stream`), rows `process_index::process_count` for this host, shuffled per epoch, so every
    batch draws rows from random places of the whole split. 'tfds:' sources: train documents
    `process_index::process_count`, shuffled per epoch, tokenized on the fly, packed, rows shuffled within windows.

    Args:
      cfg: Data config; its corpus is prepared on first use.
      tokenizer: Tokenizer with the EOS token (`get_tokenizer`).
      batch_size: Rows per batch of this host (> 0).
      cache_dir: Unused; accepted for symmetry with `get_tokenizer` (the corpus and token caches live under
        `cfg.data_dir`).
      process_index: This host's index in [0, process_count).
      process_count: Number of hosts; each gets a disjoint shard.

    Returns:
      A `TrainIterator` of dicts of [batch_size, seq_len] arrays: inputs, targets, segment_ids, positions, weights.

    Raises:
      DataError: bad sizes, or a train split with fewer documents (or rows) than hosts.
    """
    del cache_dir
    if batch_size <= 0:
        raise DataError(f"batch_size: must be a positive integer, got {batch_size}")
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} not in [0, process_count={process_count})")
    corpus = _corpus(cfg)
    n = corpus.num_documents(TRAIN_SPLIT)
    if n < process_count:
        raise DataError(f"train split of {cfg.source!r} has {n} documents, fewer than process_count={process_count}")
    if cfg.source.startswith("tfds:"):  # possibly huge: stream the documents instead of tokenizing them up front
        pipeline = "documents"
        ds = _batches(
            corpus.data_source(TRAIN_SPLIT), tokenizer, corpus.text_key, seq_len=cfg.seq_len, batch_size=batch_size,
            seed=cfg.seed, process_index=process_index, process_count=process_count)
    else:
        pipeline = "rows"
        rows = _StreamRows(*_split_stream(corpus, tokenizer, cfg.data_dir, TRAIN_SPLIT), cfg.seq_len)
        if len(rows) < process_count:
            raise DataError(
                f"train split of {cfg.source!r} has {len(rows)} rows of data.seq_len + 1 = {cfg.seq_len + 1} tokens, "
                f"fewer than process_count={process_count}; lower data.seq_len or add documents")
        ds = _row_batches(rows, batch_size=batch_size, seed=cfg.seed, process_index=process_index,
                          process_count=process_count)
    identity = {
        "pipeline": pipeline, "corpus": corpus.fingerprint, "tokenizer": _tokenizer_hash(tokenizer),
        "seq_len": cfg.seq_len, "seed": cfg.seed, "batch_size": batch_size, "process_index": process_index,
        "process_count": process_count,
    }
    return TrainIterator(ds, identity)


# ---- eval batches -------------------------------------------------------------------------------------------------
def _window_indices(num_windows: int, batch_size: int, num_batches: int) -> np.ndarray:
    """[num_batches, batch_size] window indices, evenly spaced over `num_windows` (cycled if there are too few)."""
    n = batch_size * num_batches
    i = np.arange(n, dtype=np.int64)
    chosen = (2 * i + 1) * num_windows // (2 * n) if num_windows >= n else i % num_windows
    # Rank r goes to batch r % num_batches: every batch spans the split from its beginning to its end.
    return chosen.reshape(batch_size, num_batches).T


def make_eval_batches(
    cfg: DataConfig, tokenizer: tokenizers.Tokenizer, *, batch_size: int, num_batches: int,
    cache_dir: str | Path | None = None,
) -> list[dict[str, np.ndarray]]:
    """`num_batches` deterministic batches of `batch_size` sequences sampled across the whole held-out split.

    The eval split is tokenized once (and cached under the TFDS data dir, see `_split_stream`): its documents in
    stored order, each followed by EOS (as in training), form one token stream of L tokens. The stream is cut into
    W = ceil(L / (seq_len + 1)) consecutive windows of seq_len + 1 tokens, the rows of training; the last window
    wraps around to the start of the stream (so does the only window of a stream shorter than one row). Of these,
    n = batch_size * num_batches windows are chosen evenly spaced over the whole stream, window
    floor((2i + 1) * W / (2n)) for i < n (all distinct, the first and last within the first and last W / n
    windows). If W < n there are fewer windows than needed and they are cycled: window i mod W, so every window is
    used floor(n / W) or ceil(n / W) times. Batch b holds chosen windows b, b + num_batches, b + 2 * num_batches,
    ..., so each batch too spans the split from beginning to end.

    A window becomes model features exactly like a training row (see the module docstring): segment ids number
    the document pieces within it, positions restart at each piece, weight 0 only on the EOS -> next-document
    transition.

    Args:
      cfg: Data config; its corpus and eval split are prepared on first use.
      tokenizer: Tokenizer with the EOS token (`get_tokenizer`).
      batch_size: Sequences per batch (> 0).
      num_batches: Number of batches (> 0).
      cache_dir: Unused; accepted for symmetry with `get_tokenizer`.

    Returns:
      `num_batches` dicts of [batch_size, seq_len] arrays: inputs, targets, segment_ids, positions, weights.

    Raises:
      DataError: the eval split is empty (raise `data.eval_fraction`), or a size is not positive.
    """
    del cache_dir
    for name, v in (("batch_size", batch_size), ("num_batches", num_batches)):
        if not isinstance(v, int | np.integer) or isinstance(v, bool) or v <= 0:
            raise DataError(f"make_eval_batches: {name} must be a positive integer, got {v!r}")
    corpus = _corpus(cfg)
    if corpus.num_documents(EVAL_SPLIT) == 0:
        raise DataError(
            f"eval split of {cfg.source!r} is empty (data.eval_fraction={cfg.eval_fraction}); "
            "raise data.eval_fraction or add documents")
    rows = _StreamRows(*_split_stream(corpus, tokenizer, cfg.data_dir, EVAL_SPLIT), cfg.seq_len)
    return [rows(w_B) for w_B in _window_indices(len(rows), batch_size, num_batches)]


def iter_documents(cfg: DataConfig, split: str = TRAIN_SPLIT) -> Iterator[dict[str, str]]:
    """Yields {'id', 'text'} of every document of `split` ('train' or 'validation') in stored order (for tests)."""
    corpus = _corpus(cfg)
    src = corpus.data_source(split)
    for i in range(len(src)):
        r = src[i]
        doc_id = r.get("id", str(i))
        yield {"id": doc_id.decode() if isinstance(doc_id, bytes) else str(doc_id), "text": _text(r, corpus.text_key)}
