"""LM data pipeline: text corpus (TFDS array_record) -> byte-level BPE -> packed [batch, seq_len] batches via grain.

Sources (see `DataConfig.source`): the running interpreter's standard library ('stdlib', default, no download), local
text files ('files:<glob>') or a TFDS dataset already prepared in array_record form ('tfds:<name>'). Local sources are
written once into a fingerprinted TFDS dataset (`data_tfds.py`); later runs just read it. Their files that are not
UTF-8 text (binary, or another encoding) are skipped, with one warning at the build and a count in the reports
(`data_tfds.read_text`); a source with no UTF-8 text file raises `DataError`. The tokenizer and the
cached token stream of a split are in `data_tokens.py`, reports of the corpus and its held-out split in
`data_stats.py`; this module holds the pipelines and is the entry point (it re-exports `get_tokenizer`, `eos_id`,
`corpus_stats`, `eval_split_stats`, `DataError` and `DataConfig`).

Token stream of a split (`data_tokens.split_stream`): its documents in stored order, each tokenized and followed by
EOS, concatenated. It is cut into consecutive, non-overlapping rows of seq_len + 1 tokens (no padding; a long document
continues in the next row); the last row wraps around to the start of the stream, so no token is dropped and even a
stream shorter than one row gives a row. These are exactly the rows grain's concat-then-split packer cuts from the
documents in stored order, repeated. A row's first seq_len tokens are the inputs and its last seq_len tokens the
targets, so the last token of a row is only ever a target.

Training pipeline per host, local sources ('stdlib', 'files:'): the whole train split is tokenized once (cached, see
`data_tokens.split_stream`), then (grain, lazy) row indices `range(num_rows)` -> shard
`process_index::process_count` -> shuffle (seed; grain reshuffles every epoch) -> repeat forever -> batch -> rows
gathered from the stream -> model features. Every batch thus draws its rows from random places of the whole corpus: a
short run (a miniature trains ~400K tokens, ~80 stdlib files) sees a sample of the whole train split, so its training
loss tracks the held-out loss, instead of a slice of ~100 consecutive documents of one shuffled order. Resume is
exact: the iterator state is a position in the index sequence.

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
rows spread evenly over the whole eval stream (`make_eval_batches`), `data_stats.eval_split_stats` reports the split.

Cache layout: TFDS data under `data_dir/text_files_builder/fp<corpus fingerprint>/1.0.0/`; token streams under
`data_dir/prosparse_{eval,train}_tokens/` and the tokenizer under `<cache_dir>/` (see `data_tokens.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
import tokenizers

from prosparse_jax.config import DataConfig
from prosparse_jax.data.corpus import EVAL_SPLIT, TRAIN_SPLIT, DataError
from prosparse_jax.data.stats import corpus_stats, eval_split_stats
from prosparse_jax.data.tokens import (
    document_text,
    eos_id,
    get_tokenizer,
    iter_records,
    open_corpus,
    split_stream,
    tokenizer_hash,
)

__all__ = [
    "DataConfig", "DataError", "TrainIterator", "corpus_stats", "eos_id", "eval_split_stats", "get_tokenizer",
    "iter_documents", "make_eval_batches", "make_train_iterator",
]

_STATE_VERSION = 3  # 2: rows shuffled within windows; 3: local sources sample rows of the whole train split
SHUFFLE_WINDOW_ROWS = 2048  # 'tfds:' sources: packed rows per shuffle window (~526K tokens at seq_len 256)
_PREFETCH_DOCS = 16


# ---- rows of a token stream ---------------------------------------------------------------------------------------
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
        ids = self.tokenizer.encode(document_text(record, self.text_key), add_special_tokens=False).ids
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
    cached, see `data_tokens.split_stream`), rows `process_index::process_count` for this host, shuffled per epoch,
    so every batch draws rows from random places of the whole split. 'tfds:' sources: train documents
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
    corpus = open_corpus(cfg)
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
        rows = _StreamRows(*split_stream(corpus, tokenizer, cfg.data_dir, TRAIN_SPLIT), cfg.seq_len)
        if len(rows) < process_count:
            raise DataError(
                f"train split of {cfg.source!r} has {len(rows)} rows of data.seq_len + 1 = {cfg.seq_len + 1} tokens, "
                f"fewer than process_count={process_count}; lower data.seq_len or add documents")
        ds = _row_batches(rows, batch_size=batch_size, seed=cfg.seed, process_index=process_index,
                          process_count=process_count)
    identity = {
        "pipeline": pipeline, "corpus": corpus.fingerprint, "tokenizer": tokenizer_hash(tokenizer),
        "seq_len": cfg.seq_len, "seed": cfg.seed, "batch_size": batch_size, "process_index": process_index,
        "process_count": process_count,
    }
    return TrainIterator(ds, identity)


# ---- eval batches -------------------------------------------------------------------------------------------------
def window_indices(num_windows: int, batch_size: int, num_batches: int) -> np.ndarray:
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

    The eval split is tokenized once (and cached under the TFDS data dir, see `data_tokens.split_stream`): its
    documents in stored order, each followed by EOS (as in training), form one token stream of L tokens. The stream is
    cut into W = ceil(L / (seq_len + 1)) consecutive windows of seq_len + 1 tokens, the rows of training; the last
    window wraps around to the start of the stream (so does the only window of a stream shorter than one row). Of these,
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
    corpus = open_corpus(cfg)
    if corpus.num_documents(EVAL_SPLIT) == 0:
        raise DataError(
            f"eval split of {cfg.source!r} is empty (data.eval_fraction={cfg.eval_fraction}); "
            "raise data.eval_fraction or add documents")
    rows = _StreamRows(*split_stream(corpus, tokenizer, cfg.data_dir, EVAL_SPLIT), cfg.seq_len)
    return [rows(w_B) for w_B in window_indices(len(rows), batch_size, num_batches)]


def iter_documents(cfg: DataConfig, split: str = TRAIN_SPLIT) -> Iterator[dict[str, str]]:
    """Yields {'id', 'text'} of every document of `split` ('train' or 'validation') in stored order (for tests)."""
    for doc_id, text in iter_records(open_corpus(cfg), split):
        yield {"id": doc_id, "text": text}


def prefetch(it: TrainIterator, depth: int = 2) -> Iterator[tuple[dict[str, np.ndarray], dict]]:
    """Batches from a background thread, each paired with the iterator state *after* it (checkpoints resume
    exactly)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            while not stop.is_set():
                b = next(it)
                q.put((b, it.get_state()))
        except BaseException as e:  # noqa: BLE001 - surfaced in the consumer
            q.put(e)

    threading.Thread(target=produce, daemon=True).start()
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
