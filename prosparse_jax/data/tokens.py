"""Text -> tokens: the corpus of a `DataConfig`, its byte-level BPE tokenizer and the token stream of a whole split.

Tokenizer (`get_tokenizer`): the tokenizer.json named by `DataConfig.tokenizer`, else a byte-level BPE trained once on
the train split and cached at `<cache_dir>/tokenizer.json`, with `<cache_dir>/tokenizer_fingerprint.json` beside it.
Its '<|endoftext|>' token (`EOS_TOKEN`, id 0 in the trained BPE) ends every document.

Token stream of a split (`split_stream`): its documents in stored order, each tokenized and followed by EOS,
concatenated; the pipelines of `data.py` cut it into rows of seq_len + 1 tokens. It is computed once and cached under
`data_dir/prosparse_eval_tokens/<key>.npz` (eval split) or `data_dir/prosparse_train_tokens/<key>.npz` (train split,
local sources), key = hash of corpus fingerprint + tokenizer, so the cache does not depend on seq_len.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from prosparse_jax.config import DataConfig
from prosparse_jax.data.corpus import EVAL_SPLIT, TRAIN_SPLIT, Corpus, DataError, load_corpus, resolve_data_dir

EOS_TOKEN = "<|endoftext|>"  # id 0: document separator, appended to every document
_TOKENIZER_FORMAT = 1
_TOKENS_FORMAT = 1  # format of the cached token streams (part of their key)
# Under the TFDS data dir: the cached token stream of each split, see `split_stream`.
_TOKENS_DIRS = {EVAL_SPLIT: "prosparse_eval_tokens", TRAIN_SPLIT: "prosparse_train_tokens"}
_TOKENIZE_CHUNK_CHARS = 1 << 20  # characters of text per `encode_batch` call: bounds the memory of the encodings


# ---- corpus -------------------------------------------------------------------------------------------------------
def open_corpus(cfg: DataConfig) -> Corpus:
    """The corpus of `cfg.source`, prepared on first use (`data_tfds.load_corpus`)."""
    return load_corpus(cfg.source, cfg.data_dir, cfg.eval_fraction, cfg.text_key)


def document_text(record: Mapping[str, Any], text_key: str) -> str:
    """The text of a stored record (feature `text_key`, UTF-8 decoded).

    Local sources store only files that are UTF-8 text (`data_tfds.read_text`), so their records decode exactly;
    invalid bytes in a record of a 'tfds:' dataset become U+FFFD.
    """
    if text_key not in record:
        raise DataError(f"data.text_key: feature {text_key!r} not in records (features: {sorted(record)})")
    t = record[text_key]
    return t.decode("utf-8", errors="replace") if isinstance(t, bytes) else str(t)


def iter_records(corpus: Corpus, split: str) -> Iterator[tuple[str, str]]:
    """(id, text) of every document of `split` in stored order, read one record at a time.

    The id is the record's 'id' feature, else its index in the split.
    """
    src = corpus.data_source(split)
    for i in range(len(src)):
        r = src[i]
        doc_id = r.get("id", str(i))
        yield doc_id.decode() if isinstance(doc_id, bytes) else str(doc_id), document_text(r, corpus.text_key)


# ---- tokenizer ----------------------------------------------------------------------------------------------------
def eos_id(tokenizer: tokenizers.Tokenizer) -> int:
    """Id of the EOS / document-separator token '<|endoftext|>'."""
    i = tokenizer.token_to_id(EOS_TOKEN)
    if i is None:
        raise DataError(f"tokenizer has no {EOS_TOKEN!r} token; it is needed as the document separator")
    return int(i)


def tokenizer_hash(tokenizer: tokenizers.Tokenizer) -> str:
    """16 hex digits naming the tokenizer (its serialised form): part of cache keys and iterator identities."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]


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
    corpus = open_corpus(cfg)
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
    tok = _train_bpe(corpus, cfg.vocab_size)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = tok_path.with_suffix(".json.tmp")
    tok.save(str(tmp))
    fp_path.write_text(json.dumps(fingerprint, indent=1))
    tmp.replace(tok_path)
    return tok


def _train_bpe(corpus: Corpus, vocab_size: int) -> tokenizers.Tokenizer:
    """A byte-level BPE of at most `vocab_size` tokens ('<|endoftext|>' first) trained on the train split."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False)
    tok.train_from_iterator((text for _, text in iter_records(corpus, TRAIN_SPLIT)), trainer=trainer)
    return tok


# ---- token streams of whole splits --------------------------------------------------------------------------------
def tokenize_stream(texts: Iterable[str], tokenizer: tokenizers.Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (tokens int32 [L], tokens per text int64 [D]): each text's ids then EOS (as `data._Tokenize` does).

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


def stream_cache_path(corpus: Corpus, tokenizer: tokenizers.Tokenizer, data_dir: str, split: str) -> Path:
    """`<data_dir>/<_TOKENS_DIRS[split]>/<key>.npz`, key = hash of (format, corpus fingerprint, tokenizer)."""
    key = hashlib.sha256(json.dumps(
        [_TOKENS_FORMAT, corpus.fingerprint, tokenizer_hash(tokenizer)]).encode()).hexdigest()[:16]
    return Path(resolve_data_dir(data_dir)) / _TOKENS_DIRS[split] / f"{key}.npz"


def split_stream(
    corpus: Corpus, tokenizer: tokenizers.Tokenizer, data_dir: str, split: str,
) -> tuple[np.ndarray, np.ndarray]:
    """The token stream of `split`: (tokens int32 [L], tokens per document int64 [D]), documents in stored order.

    Every document of the split is tokenized (`tokenize_stream`) and followed by EOS; the stream is their
    concatenation. It is cached, written atomically, at `stream_cache_path` (a hash of corpus fingerprint and
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
    path = stream_cache_path(corpus, tokenizer, data_dir, split)
    num_docs = corpus.num_documents(split)
    try:
        with np.load(path) as z:
            tokens, lengths = z["tokens"], z["lengths"]
        if tokens.dtype == np.int32 and len(lengths) == num_docs and int(lengths.sum()) == len(tokens):
            return tokens, lengths
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):  # absent or unreadable: recompute below
        pass
    tokens, lengths = tokenize_stream((text for _, text in iter_records(corpus, split)), tokenizer)
    _save_npz_atomically(path, tokens=tokens, lengths=lengths)
    return tokens, lengths


def _save_npz_atomically(path: Path, **arrays: np.ndarray) -> None:
    """Writes `arrays` to `path` (.npz, mode 0644) via a temporary file; a data dir we cannot write to is skipped."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            np.savez(f, **arrays)
        tmp.chmod(0o644)  # NamedTemporaryFile creates 0600; the data dir may be shared
        os.replace(tmp, path)
    except OSError:  # read-only data dir: work without the cache
        if tmp is not None:
            tmp.unlink(missing_ok=True)
