"""Reports of a corpus and of its held-out split: documents and bytes per split, strata covered, token counts."""

from __future__ import annotations

from typing import Any

import numpy as np
import tokenizers

from prosparse_jax.config import DataConfig
from prosparse_jax.data.corpus import EVAL_SPLIT, SKIPPED_EXAMPLES, TRAIN_SPLIT, Corpus, open_corpus, stratum


def corpus_stats(cfg: DataConfig, *, tokenizer: tokenizers.Tokenizer | None = None) -> dict[str, Any]:
    """Documents and stored array_record bytes per split, the fingerprint, the corpus's strata (None for 'tfds:'),
    skipped files, and the held-out report of :func:`eval_split_stats` as ``eval_strata``, ``eval_tokens``, ..."""
    c = open_corpus(cfg)
    held_out = _eval_split_stats(c, cfg, tokenizer)
    stats: dict[str, Any] = {
        "source": cfg.source,
        "fingerprint": c.fingerprint,
        "train_documents": c.num_documents(TRAIN_SPLIT),
        "eval_documents": c.num_documents(EVAL_SPLIT),
        "train_bytes": c.num_bytes(TRAIN_SPLIT),
        "eval_bytes": c.num_bytes(EVAL_SPLIT),
        "strata": held_out["corpus_strata"],
        "skipped_files": held_out["skipped_files"],
        "skipped_examples": held_out["skipped_examples"],
    }
    for k in ("strata", "missing_strata", "tokens", "windows", "largest_document", "largest_document_share",
              "share_of"):
        stats[f"eval_{k}"] = held_out[k]
    return stats


def eval_split_stats(cfg: DataConfig, tokenizer: tokenizers.Tokenizer | None = None) -> dict[str, Any]:
    """Report of the held-out split: its size, the strata it covers and how much its largest document weighs.

    Without a `tokenizer`, `tokens` and `windows` are None and sizes and shares are in bytes.

    Returns:
      A dict with documents, bytes (UTF-8 bytes of the texts), tokens (each document's tokens + 1 EOS), windows (of
      seq_len + 1 tokens), strata (covered by a held-out document), corpus_strata and missing_strata (sorted; only
      strata with fewer than 1 / eval_fraction documents can miss out; None for 'tfds:'), largest_document (id or
      None), largest_document_share (0.0 if empty), share_of ('tokens' or 'bytes'), skipped_files (files in neither
      split as not UTF-8 text) and skipped_examples (the first `corpus.SKIPPED_EXAMPLES` ids).
    """
    return _eval_split_stats(open_corpus(cfg), cfg, tokenizer)


def _eval_split_stats(corpus: Corpus, cfg: DataConfig, tokenizer: tokenizers.Tokenizer | None) -> dict[str, Any]:
    records = list(corpus.records(EVAL_SPLIT))
    ids = [doc_id for doc_id, _ in records]
    num_bytes = [len(text.encode("utf-8")) for _, text in records]
    tokens = windows = None
    sizes = num_bytes
    if tokenizer is not None:
        lengths = corpus.token_stream(EVAL_SPLIT, tokenizer)[1] if ids else np.zeros(0, np.int64)
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
        "skipped_files": len(corpus.skipped),
        "skipped_examples": list(corpus.skipped[:SKIPPED_EXAMPLES]),
    }
