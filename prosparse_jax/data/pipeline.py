"""Packed [batch, seq_len] training and eval batches of a corpus, with grain (docs/data.md).

A split's token stream is cut into rows of seq_len + 1 tokens, the last wrapping to the start (no padding, no token
dropped): inputs = a row's first seq_len tokens, targets = its last seq_len. Features, each [batch, seq_len], int32
but weights: inputs, targets, segment_ids (1, 2, ... per document piece of a row), positions (restart at every piece),
weights (float32: 0 on the EOS -> next-document transition, so predicting the EOS that ends a document counts).
"""

from __future__ import annotations

import dataclasses
import hashlib
import queue
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import numpy as np
import tokenizers

from prosparse_jax.data.corpus import EVAL_SPLIT, TRAIN_SPLIT, Corpus, document_text, eos_id, tokenizer_hash
from prosparse_jax.errors import DataError

SHUFFLE_WINDOW_ROWS = 2048  # 'tfds:' sources: packed rows per shuffle window (~526K tokens at seq_len 256)
_PREFETCH_DOCS = 16


# ---- rows of a token stream ---------------------------------------------------------------------------------------
class _StreamRows:
    """A token stream cut into rows of seq_len + 1 tokens; called on [B] row indices, returns their features.

    Row r is tokens[r * (seq_len + 1) + j mod L] for j <= seq_len. Its features equal those of the row grain's
    concat-then-split packer cuts from the split's documents in stored order.
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


def streamed_document_batches(
    corpus: Corpus, split: str, tokenizer: tokenizers.Tokenizer, *, seq_len: int, batch_size: int, seed: int | None,
    shuffle_window: int = SHUFFLE_WINDOW_ROWS, process_index: int = 0, process_count: int = 1,
) -> grain.IterDataset:
    """Batches of a split's documents streamed from TFDS, forever: shuffled, tokenized on the fly, packed into rows.

    Rows are shuffled within windows of `shuffle_window` rows, else a batch would hold one or two consecutive
    documents. `seed=None` shuffles nothing: the rows of the split's token stream, in order.
    """
    ds = grain.MapDataset.source(corpus.data_source(split))[process_index::process_count]
    if seed is not None:
        ds = ds.shuffle(seed)
    ds = ds.repeat().map(_Tokenize(tokenizer, corpus.text_key, eos_id(tokenizer)))
    # One background thread tokenizes a few documents ahead: ample for training speed, leaves the cores to the model.
    docs = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=_PREFETCH_DOCS))
    packed = grain.experimental.ConcatThenSplitIterDataset(docs, length_struct={"tokens": seq_len + 1})
    if seed is not None:
        packed = grain.experimental.WindowShuffleIterDataset(packed, window_size=shuffle_window, seed=seed)
    return packed.batch(batch_size, drop_remainder=True).map(_to_features)


def _cached_stream_row_batches(
    rows: _StreamRows, *, batch_size: int, seed: int, process_index: int, process_count: int,
) -> grain.IterDataset:
    """Batches of rows of a cached local token stream, forever: this host's rows, shuffled anew every epoch."""
    ds = grain.MapDataset.range(len(rows))[process_index::process_count]
    # grain shuffles epoch e with seed + e; the seed is hashed first, else seeds s and s + 1 would see the same orders
    # one epoch apart.
    shuffle_seed = int.from_bytes(hashlib.sha256(f"prosparse train rows {seed}".encode()).digest()[:4], "little")
    ds = ds.shuffle(shuffle_seed).repeat()
    # In-memory ints: no reader threads (grain's advice for in-memory data); rows are gathered per batch, vectorised.
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    return ds.batch(batch_size, drop_remainder=True).map(rows)


class TrainIterator:
    """Infinite iterator over training batches (dicts of [batch, seq_len] numpy arrays) with exact resume.

    `get_state()` returns a JSON-serialisable dict; `set_state(state)` on an iterator built with the same corpus,
    tokenizer, sizes and host makes the next batch equal to the one the original iterator would have produced next
    (grain's own iterator checkpointing).
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
        return {"identity": self._identity, "grain": _jsonable(self._iter.get_state())}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restores a position from `get_state()`; raises if it came from a differently configured iterator."""
        if not isinstance(state, Mapping) or dict(state.get("identity", {})) != self._identity:
            saved = state.get("identity") if isinstance(state, Mapping) else state
            raise DataError(
                f"data iterator state belongs to a different pipeline: saved {saved}, this one {self._identity}; "
                "resume with the data config and version it was saved with, or start the data from the beginning")
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
    corpus: Corpus, tokenizer: tokenizers.Tokenizer, *, seq_len: int, seed: int, batch_size: int,
    process_index: int = 0, process_count: int = 1,
) -> TrainIterator:
    """Training batches of this host (a disjoint shard of `process_count`), forever.

    Local sources: the rows of the whole train stream, shuffled per epoch, so a short run samples the whole corpus.
    'tfds:' sources (maybe huge): the documents streamed (:func:`streamed_document_batches`).

    Raises:
      DataError: the train split has fewer documents (or rows) than hosts.
    """
    if batch_size <= 0 or not 0 <= process_index < process_count:
        raise ValueError(f"batch_size {batch_size} must be > 0, process_index {process_index} in [0, {process_count})")
    shard = {"process_index": process_index, "process_count": process_count}
    n = corpus.num_documents(TRAIN_SPLIT)
    if n < process_count:
        raise DataError(f"train split of {corpus.source!r} has {n} documents, fewer than process_count={process_count}")
    if corpus.source.startswith("tfds:"):  # possibly huge: stream the documents instead of tokenizing them up front
        pipeline = "documents"
        ds = streamed_document_batches(corpus, TRAIN_SPLIT, tokenizer, seq_len=seq_len, batch_size=batch_size,
                                       seed=seed, **shard)
    else:
        pipeline = "rows"
        rows = _StreamRows(*corpus.token_stream(TRAIN_SPLIT, tokenizer), seq_len)
        if len(rows) < process_count:
            raise DataError(f"train split of {corpus.source!r} has {len(rows)} rows of data.seq_len + 1 = "
                            f"{seq_len + 1} tokens, fewer than process_count={process_count}; lower data.seq_len or "
                            "add documents")
        ds = _cached_stream_row_batches(rows, batch_size=batch_size, seed=seed, **shard)
    identity = {"pipeline": pipeline, "corpus": corpus.fingerprint, "tokenizer": tokenizer_hash(tokenizer),
                "seq_len": seq_len, "seed": seed, "batch_size": batch_size, **shard}
    return TrainIterator(ds, identity)


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


# ---- eval batches -------------------------------------------------------------------------------------------------
def window_indices(num_windows: int, batch_size: int, num_batches: int) -> np.ndarray:
    """[num_batches, batch_size] indices of the eval rows among `num_windows` rows of a stream.

    The n = batch_size * num_batches rows are spaced evenly over the stream, row floor((2i + 1) * W / (2n)) for i < n
    (all distinct), or cycled (row i mod W) when W < n. Rank r goes to batch r % num_batches, so every batch spans
    the split from its beginning to its end.
    """
    n = batch_size * num_batches
    i = np.arange(n, dtype=np.int64)
    chosen = (2 * i + 1) * num_windows // (2 * n) if num_windows >= n else i % num_windows
    return chosen.reshape(batch_size, num_batches).T


def make_eval_batches(
    corpus: Corpus, tokenizer: tokenizers.Tokenizer, *, seq_len: int, batch_size: int, num_batches: int,
) -> list[dict[str, np.ndarray]]:
    """`num_batches` deterministic batches of `batch_size` rows spread over the held-out split (:func:`window_indices`).

    Raises:
      DataError: the eval split is empty (raise `data.eval_fraction`), or a size is not positive.
    """
    for name, v in (("batch_size", batch_size), ("num_batches", num_batches)):
        if not isinstance(v, int | np.integer) or isinstance(v, bool) or v <= 0:
            raise DataError(f"make_eval_batches: {name} must be a positive integer, got {v!r}")
    if corpus.num_documents(EVAL_SPLIT) == 0:
        raise DataError(f"eval split of {corpus.source!r} is empty; raise data.eval_fraction or add documents")
    rows = _StreamRows(*corpus.token_stream(EVAL_SPLIT, tokenizer), seq_len)
    return [rows(w_B) for w_B in window_indices(len(rows), batch_size, num_batches)]
