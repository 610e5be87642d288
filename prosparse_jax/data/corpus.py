"""The text corpus of a run and its token streams: documents, held-out split, TFDS dataset, tokenizer (docs/data.md).

A local source ('stdlib', 'files:<glob>') is written once into a fingerprinted array_record TFDS dataset; a
'tfds:<name>' source must already be prepared. A :class:`Corpus` serves each split as records and, per tokenizer, as
one token stream cached on disk and on the object, so the train and eval pipelines tokenize a split at most once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import math
import os
import sysconfig
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from prosparse_jax.config import DataConfig
from prosparse_jax.errors import ConfigError, DataError, InputError, UsageError

TRAIN_SPLIT = "train"
EVAL_SPLIT = "validation"
EOS_TOKEN = "<|endoftext|>"  # ends every document; id 0 in the trained BPE
# Version of the held-out rule of `eval_document_mask`; part of `corpus_fingerprint`, so a dataset prepared under
# another rule is never reused. Bump it whenever the rule changes.
EVAL_SPLIT_RULE = 2
# Version of the text rule of `read_text`; part of `corpus_fingerprint` like `EVAL_SPLIT_RULE`.
TEXT_RULE = 2
SKIPPED_EXAMPLES = 5  # skipped files named in the build warning and in the reports
ROOT_STRATUM = "."  # stratum of the files directly under the corpus root
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_TOKENIZER_FORMAT = 1
_TOKENS_FORMAT = 1  # format of the cached token streams (part of their key)
_TOKENS_DIRS = {EVAL_SPLIT: "prosparse_eval_tokens", TRAIN_SPLIT: "prosparse_train_tokens"}  # under the data dir
_TOKENIZE_CHUNK_CHARS = 1 << 20  # characters of text per `encode_batch` call: bounds the memory of the encodings


def resolve_data_dir(data_dir: str) -> str:
    """`data_dir`, else $PROSPARSE_DATA_DIR, else ~/.cache/prosparse_jax/tfds."""
    if data_dir:
        return os.path.expanduser(data_dir)
    return os.environ.get("PROSPARSE_DATA_DIR") or os.path.expanduser("~/.cache/prosparse_jax/tfds")


# ---- documents and the held-out split -----------------------------------------------------------------------------
def stratum(doc_id: str) -> str:
    """Stratum of a document: the first component of its relative id ('stdlib': the top-level package), '.' for a
    file directly under the root."""
    parts = [p for p in doc_id.replace(os.sep, "/").split("/") if p not in ("", ".")]
    return parts[0] if len(parts) > 1 else ROOT_STRATUM


def _hash_hex(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


# Fixed start of the systematic sample in [0, 1): derived from a hash, identical for every corpus.
_SAMPLE_OFFSET = int(_hash_hex(f"prosparse_jax eval split v{EVAL_SPLIT_RULE}")[:16], 16) / 2.0**64


def eval_document_mask(doc_ids: Sequence[str], sizes: Sequence[int], eval_fraction: float) -> list[bool]:
    """Which documents are held out (True, aligned with `doc_ids`): a deterministic stratified systematic sample.

    The documents are ordered by (`stratum(doc_id)`, size in bytes, sha256(doc_id)) and the one at rank r (0-based)
    is held out iff floor((r + 1) * f + u) > floor(r * f + u), with f = `eval_fraction` in [0, 1) and u a fixed
    hash-derived offset in [0, 1): every (1 / f)-th document. Any run of n consecutive documents of that order holds
    floor(n * f) or ceil(n * f) held-out ones, so every stratum (and size range within it) contributes in
    proportion, and the split is empty only when N * f < 1. It depends on ids and sizes only, never on file order.
    """
    keys = [(stratum(i), s, _hash_hex(i), i) for i, s in zip(doc_ids, sizes, strict=True)]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    mask = [False] * len(keys)
    f, u = float(eval_fraction), _SAMPLE_OFFSET
    for rank, i in enumerate(order):
        mask[i] = math.floor((rank + 1) * f + u) > math.floor(rank * f + u)
    return mask


@dataclasses.dataclass(frozen=True)
class Document:
    """One text file: `doc_id` is a location-independent id (path relative to the corpus root)."""

    doc_id: str
    path: str
    size: int
    mtime_ns: int


def list_documents(source: str) -> list[Document]:
    """Non-empty files of a 'stdlib' or 'files:<glob>' source, sorted by id (not yet checked to be text: `read_text`).

    Raises:
      DataError: the glob matches nothing, or only empty files.
    """
    if source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        paths = []
        for dirpath, dirnames, filenames in os.walk(root):  # Like rglob (no symlinked dirs), minus excluded trees.
            dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
            paths += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
        what = f"the standard library under {root}"
    else:
        pattern = os.path.expanduser(source.removeprefix("files:"))
        static = pattern.split("*")[0].split("?")[0].split("[")[0]
        root = Path(static if static.endswith(os.sep) else os.path.dirname(static) or ".")
        paths = [Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
        what = f"glob {pattern!r}"
        if not paths:
            raise DataError(f"data.source: {what} matches no files; check the path (recursive ** is allowed)")
    docs = []
    for p in paths:
        st = p.stat()
        if st.st_size > 0:
            docs.append(Document(os.path.relpath(p, root), str(p), st.st_size, st.st_mtime_ns))
    if not docs:
        raise DataError(f"data.source: {what} matches {len(paths)} file(s) but all are empty")
    return sorted(docs, key=lambda d: d.doc_id)


def read_text(path: str | os.PathLike) -> str | None:
    """The text of a UTF-8 text file (a leading BOM stripped), else None: it has a NUL byte or is not strict UTF-8
    (files of another encoding are skipped, never decoded with replacement characters)."""
    data = Path(path).read_bytes()
    if b"\0" in data:  # binary: UTF-8 text files of any language have no NUL byte
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def _skipped_summary(what: str, skipped: Sequence[str], total: int) -> str:
    names = ", ".join(skipped[:SKIPPED_EXAMPLES]) + (", ..." if len(skipped) > SKIPPED_EXAMPLES else "")
    return (f"{what}: skipped {len(skipped)} of {total} files that are not UTF-8 text (binary, or another "
            f"encoding): {names}")


def corpus_fingerprint(docs: Sequence[Document], eval_fraction: float) -> str:
    """16-hex-digit fingerprint of (ids, sizes, mtimes, eval_fraction, split and text rule versions)."""
    h = hashlib.sha256(json.dumps(
        {"eval_fraction": eval_fraction, "split_rule": EVAL_SPLIT_RULE, "text_rule": TEXT_RULE}).encode())
    for d in docs:
        h.update(f"{d.doc_id}\0{d.size}\0{d.mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# ---- the TFDS dataset ---------------------------------------------------------------------------------------------
class TextFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes a list of text files as {'text', 'id'} records, split into train/validation by `eval_document_mask`.

    The split is drawn from all the listed files; those that are not UTF-8 text (`read_text`) are then left out of
    both splits (so skipping never moves a text file between splits), their ids kept in the dataset's metadata.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # No checksums file next to this module; TFDS' lookup of it would need the optional `importlib_resources`.
    code_path = None

    def __init__(self, *, documents: Sequence[Document], eval_fraction: float, data_dir: str, source: str):
        self._documents = list(documents)
        self._eval_fraction = eval_fraction
        self._source = source
        fp = corpus_fingerprint(self._documents, eval_fraction)
        config = tfds.core.BuilderConfig(name=f"fp{fp}", description="text files, fingerprinted")
        with _without_custom_config_notice():
            super().__init__(data_dir=data_dir, config=config, file_format="array_record")

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({"text": tfds.features.Text(), "id": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, description="Local text files.", features=features,
                                     metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[str, dict[str, str]]]]:
        del dl_manager
        docs = self._documents
        is_eval = eval_document_mask([d.doc_id for d in docs], [d.size for d in docs], self._eval_fraction)
        skipped = [d for d in docs if read_text(d.path) is None]
        if len(skipped) == len(docs):
            raise DataError(f"data.source: no file of {self._source!r} is UTF-8 text: all {len(skipped)} file(s) "
                            f"are binary or in another encoding (e.g. {', '.join(d.doc_id for d in skipped[:3])}); "
                            "convert them to UTF-8 or point the glob at text files")
        if skipped:
            logging.getLogger("absl").warning(_skipped_summary(self._source, [d.doc_id for d in skipped], len(docs)))
        self.info.metadata.update(text_rule=TEXT_RULE, skipped_ids=[d.doc_id for d in skipped])
        skip = {d.doc_id for d in skipped}
        splits = {name: [d for d, e in zip(docs, is_eval, strict=True) if e == held_out and d.doc_id not in skip]
                  for name, held_out in ((TRAIN_SPLIT, False), (EVAL_SPLIT, True))}
        if not splits[TRAIN_SPLIT]:
            raise DataError(f"data.source: every UTF-8 text file of {self._source!r} falls in the held-out split "
                            f"({len(skipped)} of its {len(docs)} files are not text); add text files or lower "
                            "data.eval_fraction")
        if not splits[EVAL_SPLIT]:  # TFDS rejects an empty split; a missing 'validation' split reads as empty.
            del splits[EVAL_SPLIT]
        return {name: self._generate_examples(docs) for name, docs in splits.items()}

    def _generate_examples(self, docs: Sequence[Document]) -> Iterator[tuple[str, dict[str, str]]]:
        for d in docs:
            text = read_text(d.path)
            if text is None:
                raise DataError(f"data.source: {d.path} changed while the corpus was being written; run again")
            yield d.doc_id, {"text": text, "id": d.doc_id}


class _DropCustomConfigNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Using custom data configuration")


@contextlib.contextmanager
def _without_custom_config_notice() -> Iterator[None]:
    """TFDS warns 'Using custom data configuration' whenever a fingerprinted builder opens: by design here."""
    logger, notice = logging.getLogger("absl"), _DropCustomConfigNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def document_text(record: Mapping[str, Any], text_key: str) -> str:
    """The text of a stored record; invalid bytes in a record of a 'tfds:' dataset become U+FFFD."""
    if text_key not in record:
        raise DataError(f"data.text_key: feature {text_key!r} not in records (features: {sorted(record)})")
    t = record[text_key]
    return t.decode("utf-8", errors="replace") if isinstance(t, bytes) else str(t)


def _skipped_ids(builder: tfds.core.DatasetBuilder) -> tuple[str, ...]:
    """Ids of the files skipped when `builder`'s dataset was written (metadata 'skipped_ids'; () if not recorded)."""
    metadata = builder.info.metadata
    return tuple(metadata.get("skipped_ids", ())) if metadata is not None else ()


# ---- the corpus ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """A prepared corpus with a 'train' and (maybe empty) 'validation' split.

    Attributes:
      data_dir: The resolved data dir holding the dataset and the cached token streams.
      fingerprint: Names the content (files, split and text rules).
      stored_split: Our split names -> the dataset's (a 'tfds:' dataset without 'validation' serves 'test').
      documents: The stored files of a local source (empty for 'tfds:' sources).
      skipped: Ids of the files left out as not UTF-8 text when the dataset was written.
    """

    source: str
    data_dir: str
    builder: tfds.core.DatasetBuilder
    fingerprint: str
    text_key: str
    stored_split: dict[str, str]
    documents: tuple[Document, ...] = ()
    skipped: tuple[str, ...] = ()
    _streams: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = dataclasses.field(
        default_factory=dict, init=False, repr=False)

    def num_documents(self, split: str) -> int:
        """Number of documents in `split` (0 if absent)."""
        name = self.stored_split.get(split)
        return int(self.builder.info.splits[name].num_examples) if name else 0

    def num_bytes(self, split: str) -> int:
        """Stored size of `split` in bytes (array_record shards; 0 if absent)."""
        name = self.stored_split.get(split)
        return int(self.builder.info.splits[name].num_bytes) if name else 0

    def data_source(self, split: str) -> Sequence[dict[str, Any]]:
        """Random-access records of `split` (ArrayRecord data source); an empty list if the split is absent/empty."""
        if self.num_documents(split) == 0:
            return []
        return self.builder.as_data_source(split=self.stored_split[split])

    def records(self, split: str) -> Iterator[tuple[str, str]]:
        """(id, text) of every document of `split` in stored order; the id is the 'id' feature, else the index."""
        src = self.data_source(split)
        for i in range(len(src)):
            r = src[i]
            doc_id = r.get("id", str(i))
            yield doc_id.decode() if isinstance(doc_id, bytes) else str(doc_id), document_text(r, self.text_key)

    def token_stream_path(self, split: str, tokenizer: tokenizers.Tokenizer) -> Path:
        """Where the token stream of `split` is cached: keyed by corpus fingerprint and tokenizer, not seq_len."""
        key = hashlib.sha256(json.dumps(
            [_TOKENS_FORMAT, self.fingerprint, tokenizer_hash(tokenizer)]).encode()).hexdigest()[:16]
        return Path(self.data_dir) / _TOKENS_DIRS[split] / f"{key}.npz"

    def token_stream(self, split: str, tokenizer: tokenizers.Tokenizer) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int32 [L], tokens per document int64 [D]) of `split`: each document's tokens then EOS, in order.

        Cached at `token_stream_path` (recomputed when the cache does not match the split; not cached in a read-only
        data dir) and on this object.
        """
        key = (split, tokenizer_hash(tokenizer))
        if key not in self._streams:
            self._streams[key] = self._load_or_tokenize(split, tokenizer)
        return self._streams[key]

    def _load_or_tokenize(self, split: str, tokenizer: tokenizers.Tokenizer) -> tuple[np.ndarray, np.ndarray]:
        path = self.token_stream_path(split, tokenizer)
        try:
            with np.load(path) as z:
                tokens, lengths = z["tokens"], z["lengths"]
            if (tokens.dtype == np.int32 and len(lengths) == self.num_documents(split)
                    and int(lengths.sum()) == len(tokens)):
                return tokens, lengths
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):  # absent or unreadable: recompute
            pass
        tokens, lengths = tokenize_stream((text for _, text in self.records(split)), tokenizer)
        _save_npz_atomically(path, tokens=tokens, lengths=lengths)
        return tokens, lengths


def open_corpus(cfg: DataConfig) -> Corpus:
    """The corpus of `cfg.source`; a local source is written into its TFDS dataset on first use.

    'tfds:<name>' datasets are never downloaded or built here: they must already be prepared under the data dir in
    array_record form. Their eval split is 'validation', else 'test', else empty.
    """
    data_dir = resolve_data_dir(cfg.data_dir)
    if cfg.source.startswith("tfds:"):
        return _open_tfds(cfg.source, data_dir, cfg.text_key)
    docs = list_documents(cfg.source)
    builder = TextFilesBuilder(documents=docs, eval_fraction=cfg.eval_fraction, data_dir=data_dir, source=cfg.source)
    if not builder.is_prepared():
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    skipped = _skipped_ids(builder)
    skipped_set = set(skipped)
    kept = tuple(d for d in docs if d.doc_id not in skipped_set)
    return Corpus(cfg.source, data_dir, builder, builder.builder_config.name, "text",
                  {s: s for s in builder.info.splits}, kept, skipped)


def _open_tfds(source: str, data_dir: str, text_key: str) -> Corpus:
    name = source.removeprefix("tfds:")
    hint = (f"dataset {name!r} not found in TFDS or not prepared under {data_dir}; prepare it with "
            f"`tfds build {name.split(':')[0]} --data_dir={data_dir} --file_format=array_record` first")
    try:
        with _without_custom_config_notice():
            builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except Exception as e:  # tfds raises several registry/parse errors; all mean the same to the user.
        raise DataError(f"data.source: {hint} ({type(e).__name__})") from e
    if not builder.is_prepared():
        raise DataError(f"data.source: {hint}")
    splits = list(builder.info.splits)
    if TRAIN_SPLIT not in splits:
        raise DataError(f"data.source: {name!r} has no 'train' split (splits: {splits})")
    stored = {TRAIN_SPLIT: TRAIN_SPLIT}
    eval_name = next((s for s in (EVAL_SPLIT, "test") if s in splits), None)
    if eval_name:
        stored[EVAL_SPLIT] = eval_name
    return Corpus(source, data_dir, builder, f"tfds:{builder.info.full_name}", text_key, stored,
                  skipped=_skipped_ids(builder))


# ---- tokenizer ----------------------------------------------------------------------------------------------------
def eos_id(tokenizer: tokenizers.Tokenizer) -> int:
    """Id of the EOS / document-separator token `EOS_TOKEN`."""
    i = tokenizer.token_to_id(EOS_TOKEN)
    if i is None:
        raise DataError(f"tokenizer has no {EOS_TOKEN!r} token; it is needed as the document separator")
    return int(i)


def tokenizer_hash(tokenizer: tokenizers.Tokenizer) -> str:
    """16 hex digits naming the tokenizer (its serialised form): part of cache keys and iterator identities."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]


def load_tokenizer(path: str | os.PathLike) -> tokenizers.Tokenizer:
    """A tokenizer.json that has the EOS token."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data.tokenizer: {str(path)!r} does not exist; give a tokenizer.json or ''")
    tok = tokenizers.Tokenizer.from_file(str(path))
    eos_id(tok)
    return tok


def load_model_tokenizer(path: str | os.PathLike, vocab: int) -> tokenizers.Tokenizer:
    """A trained model's tokenizer.json, refused (:class:`InputError`) when larger than the model's vocabulary."""
    tok = load_tokenizer(path)
    if tok.get_vocab_size() > vocab:
        raise InputError(f"checkpoint: tokenizer has {tok.get_vocab_size()} tokens > model vocab {vocab}")
    return tok


def run_data_config(run_data: Mapping[str, Any], source: str | None = None, data_dir: str | None = None,
                    seq_len: int | None = None) -> DataConfig:
    """The DataConfig of a trained model's run: its ``data`` section (``{}`` for an HF folder) with the overrides
    given (``source``, ``data_dir``, ``seq_len``).

    Raises:
      UsageError: no data source (an HF folder records none: pass --data), or a bad override.
    """
    src = source or run_data.get("source")
    if not src:
        raise UsageError("data: the checkpoint records no data source (an HF folder?); pass --data=<source> "
                         "(stdlib, files:<glob>, tfds:<name>)")
    try:
        return DataConfig(
            source=src, data_dir=data_dir if data_dir is not None else run_data.get("data_dir", ""),
            text_key=run_data.get("text_key", "text"), seq_len=seq_len or run_data.get("seq_len", 256),
            eval_fraction=float(run_data.get("eval_fraction", DataConfig.eval_fraction)))
    except ConfigError as e:
        raise UsageError(f"data / seq_len: {e}") from e


def get_tokenizer(cfg: DataConfig, corpus: Corpus, cache_dir: str | Path) -> tokenizers.Tokenizer:
    """`cfg.tokenizer`, or else a byte-level BPE trained once on the train split of `corpus` (the corpus of `cfg`).

    The trained BPE has at most `cfg.vocab_size` tokens: `EOS_TOKEN` (id 0), the 256 byte symbols, then merges (fewer
    if a tiny corpus runs out of merges); no '<unk>', byte-level BPE encodes any text. It is cached at
    `<cache_dir>/tokenizer.json` with its fingerprint (corpus, vocab size) in `tokenizer_fingerprint.json`: a later
    call with the same fingerprint loads it, one with another fingerprint raises instead of overwriting it.
    """
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
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
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False)
    tok.train_from_iterator((text for _, text in corpus.records(TRAIN_SPLIT)), trainer=trainer)
    return tok


# ---- token streams ------------------------------------------------------------------------------------------------
def tokenize_stream(texts: Iterable[str], tokenizer: tokenizers.Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (tokens int32 [L], tokens per text int64 [D]): each text's ids then EOS.

    One parallel `encode_batch` call per ~`_TOKENIZE_CHUNK_CHARS` characters bounds the encodings' memory.
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
