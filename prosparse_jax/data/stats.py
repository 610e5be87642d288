"""Reports of a corpus and of its held-out split: documents and bytes per split, strata covered, token counts."""

from __future__ import annotations

from typing import Any

import numpy as np
import tokenizers

from prosparse_jax.config import DataConfig
from prosparse_jax.data.corpus import EVAL_SPLIT, SKIPPED_EXAMPLES, TRAIN_SPLIT, Corpus, open_corpus, stratum


def corpus_stats(cfg: DataConfig, *, tokenizer: tokenizers.Tokenizer | None = None) -> dict[str, Any]:
    """Documents and stored bytes per split, the corpus fingerprint and a report of the held-out split.

    Prepares the corpus on first use and reads the eval split (see `eval_split_stats`). Keys: source, fingerprint,
    train_documents, eval_documents, train_bytes, eval_bytes (stored array_record bytes), strata (strata of the
    whole corpus, None for 'tfds:' sources), skipped_files and skipped_examples (files not stored as not UTF-8
    text, see `eval_split_stats`), and eval_strata, eval_missing_strata, eval_tokens, eval_windows,
    eval_largest_document, eval_largest_document_share, eval_share_of from `eval_split_stats(cfg, tokenizer)`.
    """
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

    Reads the whole eval split; with a `tokenizer` it also tokenizes it (`Corpus.token_stream`, cached).

    Args:
      cfg: Data config; its corpus is prepared on first use.
      tokenizer: Optional; without it `tokens` and `windows` are None and shares are of bytes.

    Returns:
      A dict with
        documents: number of held-out documents.
        strata: number of strata (`corpus.stratum`: first path component of the id, '.' for top-level files)
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
        skipped_files: number of files of the corpus skipped when it was written because they are not UTF-8 text
          (binary, or another encoding; `corpus.read_text`): in neither split. 0 if none or not recorded.
        skipped_examples: ids of the first `corpus.SKIPPED_EXAMPLES` of them (sorted), [] if none.
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
