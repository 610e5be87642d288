"""TFDS side of the data pipeline: list documents, build/read an array_record TFDS dataset (no TensorFlow).

A text corpus ('stdlib' or 'files:<glob>') is written once by `TextFilesBuilder` into
`<data_dir>/text_files_builder/<config>/1.0.0/`, where `<config>` is `fp<fingerprint>` and the fingerprint covers the
sorted document ids, sizes, mtimes, `eval_fraction` and the versions of the split rule (`EVAL_SPLIT_RULE`) and of
the text rule (`TEXT_RULE`): a different file set, split or text rule never collides with a prepared one.

Text rule (`read_text`): a file is stored only if it is UTF-8 text, i.e. has no NUL byte and decodes as strict UTF-8
(a leading BOM is stripped). Any other file (binary, or text in another encoding such as Latin-1) is skipped, never
decoded with replacement characters; the build logs one warning naming how many files were skipped and the first
few, and the dataset's metadata.json keeps them (`Corpus.skipped`, reported by `data_stats`). A source whose files
are all skipped raises `DataError`.

Held-out split ('validation'), see `eval_document_mask`: a stratified systematic sample. Documents are ordered by
(stratum = first path component of the id, size, hash of the id) and every (1 / eval_fraction)-th one from a fixed,
hash-derived offset is held out, so every stratum and every size range within it contributes in proportion. The
sample is drawn from all listed files; files skipped by the text rule below are then left out of both splits, so the
rule never moves a text file from one split to the other.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import math
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

TRAIN_SPLIT = "train"
EVAL_SPLIT = "validation"
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
# Version of the held-out rule of `eval_document_mask`; part of `corpus_fingerprint`, so a dataset prepared under an
# older rule (1: sha256(id) < eval_fraction) is never reused. Bump it whenever the rule changes.
EVAL_SPLIT_RULE = 2
# Version of the text rule of `read_text`; part of `corpus_fingerprint`, so a dataset prepared under an older rule
# (1: every file decoded with errors="replace", binary files included) is never reused. Bump it when the rule changes.
TEXT_RULE = 2
SKIPPED_EXAMPLES = 5  # skipped files named in the build warning and in the reports
ROOT_STRATUM = "."  # stratum of the files directly under the corpus root


class _DropCustomConfigNotice(logging.Filter):
    """tfds warns 'Using custom data configuration' every time our fingerprinted builder opens; that is by design."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Using custom data configuration")


logging.getLogger("absl").addFilter(_DropCustomConfigNotice())


class DataError(ValueError):
    """A data source, tokenizer or iterator state is missing or invalid; the message names the fix."""

def resolve_data_dir(data_dir: str) -> str:
    """`data_dir`, else $PROSPARSE_DATA_DIR, else ~/.cache/prosparse_jax/tfds."""
    if data_dir:
        return os.path.expanduser(data_dir)
    return os.environ.get("PROSPARSE_DATA_DIR") or os.path.expanduser("~/.cache/prosparse_jax/tfds")


def stratum(doc_id: str) -> str:
    """Stratum of a document: the first component of its relative id, '.' for a file directly under the root.

    For 'stdlib' that is the top-level package ('asyncio', 'test', ...; the top-level modules share '.'); a
    'files:' source whose files all sit in one directory is a single stratum.
    """
    parts = [p for p in doc_id.replace(os.sep, "/").split("/") if p not in ("", ".")]
    return parts[0] if len(parts) > 1 else ROOT_STRATUM


def _hash_hex(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


# Fixed start of the systematic sample in [0, 1): derived from a hash, identical for every corpus.
_SAMPLE_OFFSET = int(_hash_hex(f"prosparse_jax eval split v{EVAL_SPLIT_RULE}")[:16], 16) / 2.0**64


def eval_document_mask(doc_ids: Sequence[str], sizes: Sequence[int], eval_fraction: float) -> list[bool]:
    """Which documents are held out: a deterministic stratified systematic sample (rule `EVAL_SPLIT_RULE`).

    The documents are ordered by (`stratum(doc_id)`, size, sha256(doc_id)) and the one at rank r (0-based) is held
    out iff floor((r + 1) * f + u) > floor(r * f + u), with f = `eval_fraction` and u a fixed hash-derived offset in
    [0, 1): every k-th document with k = 1 / f (k need not be an integer). Any run of n consecutive documents of that
    order holds floor(n * f) or ceil(n * f) held-out ones, so the split has round(N * f) +- 1 documents, every stratum
    of n documents gets floor(n * f) or ceil(n * f) of them (at least one when n >= 1 / f) spread over its size range,
    and the split is empty only when N * f < 1 (or f = 0). It depends on ids and sizes only, never on file order.

    Args:
      doc_ids: Location-independent document ids (paths relative to the corpus root).
      sizes: Document sizes in bytes, aligned with `doc_ids`.
      eval_fraction: Fraction f of documents to hold out, in [0, 1).

    Returns:
      A list aligned with `doc_ids`, True for held-out documents.

    Raises:
      DataError: `eval_fraction` is outside [0, 1) or the lengths differ.
    """
    if len(doc_ids) != len(sizes):
        raise DataError(f"eval_document_mask: {len(doc_ids)} ids but {len(sizes)} sizes; pass one size per id")
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"data.eval_fraction: must be a number in [0, 1), got {eval_fraction!r}")

    def key(i: int) -> tuple[str, int, str, str]:
        return stratum(doc_ids[i]), sizes[i], _hash_hex(doc_ids[i]), doc_ids[i]

    order = sorted(range(len(doc_ids)), key=key)
    mask = [False] * len(doc_ids)
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
      FileNotFoundError: the glob matches nothing, or only empty files.
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
    """The text of a UTF-8 text file (a leading BOM stripped), else None: it has a NUL byte or is not strict UTF-8."""
    data = Path(path).read_bytes()
    if b"\0" in data:  # binary: UTF-8 text files of any language have no NUL byte
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def skipped_summary(what: str, skipped: Sequence[str], total: int) -> str:
    """'<what>: skipped <n> of <total> files that are not UTF-8 text ...: <first few ids>, ...'."""
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


class TextFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes a list of text files as {'text', 'id'} records, split into train/validation by `eval_document_mask`.

    The split is drawn from all the listed files; those that are not UTF-8 text (`read_text`) are then left out of
    both splits, their ids kept in the dataset's metadata ('skipped_ids', also 'text_rule').
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # No checksums file next to this module; TFDS' lookup of it would need the optional `importlib_resources`.
    code_path = None

    def __init__(self, *, documents: Sequence[Document], eval_fraction: float, data_dir: str, source: str = ""):
        self._documents = list(documents)
        self._eval_fraction = eval_fraction
        self._source = source or "text files"
        fp = corpus_fingerprint(self._documents, eval_fraction)
        config = tfds.core.BuilderConfig(name=f"fp{fp}", description="text files, fingerprinted")
        super().__init__(data_dir=data_dir, config=config, file_format="array_record")

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({"text": tfds.features.Text(), "id": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, description="Local text files.", features=features,
                                     metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[str, dict[str, str]]]]:
        del dl_manager
        # The split is drawn from all listed files, then skipped ones are dropped: the text rule never moves a text
        # file from one split to the other (nor reshuffles the sample of the strata after a skipped file).
        docs = self._documents
        is_eval = eval_document_mask([d.doc_id for d in docs], [d.size for d in docs], self._eval_fraction)
        skipped = [d for d in docs if read_text(d.path) is None]
        if len(skipped) == len(docs):
            raise DataError(f"data.source: no file of {self._source!r} is UTF-8 text: all {len(skipped)} file(s) "
                            f"are binary or in another encoding (e.g. {', '.join(d.doc_id for d in skipped[:3])}); "
                            "convert them to UTF-8 or point the glob at text files")
        if skipped:
            logging.getLogger("absl").warning(
                skipped_summary(self._source, [d.doc_id for d in skipped], len(self._documents)))
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


def _skipped_ids(builder: tfds.core.DatasetBuilder) -> tuple[str, ...]:
    """Ids of the files skipped when `builder`'s dataset was written (metadata 'skipped_ids'; () if not recorded)."""
    metadata = builder.info.metadata
    return tuple(metadata.get("skipped_ids", ())) if metadata is not None else ()


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A prepared corpus with a 'train' and (maybe empty) 'validation' split.

    `fingerprint` names its content; `stored_split` maps our split names to the dataset's own (a 'tfds:' dataset
    without 'validation' serves 'test' as the eval split). `documents` lists the stored files of a local source (empty
    for 'tfds:' sources); `skipped` the ids of the files skipped as not UTF-8 text when it was written (see
    `read_text`; read from the dataset's metadata, so a cached dataset reports them too).
    """

    builder: tfds.core.DatasetBuilder
    fingerprint: str
    text_key: str
    stored_split: dict[str, str]
    documents: tuple[Document, ...] = ()
    skipped: tuple[str, ...] = ()

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


def load_corpus(source: str, data_dir: str, eval_fraction: float, text_key: str = "text") -> Corpus:
    """Prepares (first use only) and opens the TFDS dataset behind `source`.

    'tfds:<name>' datasets are never downloaded or built here: they must already be prepared under `data_dir` in
    array_record form. Their eval split is 'validation', else 'test', else empty.
    """
    data_dir = resolve_data_dir(data_dir)
    if source.startswith("tfds:"):
        name = source.removeprefix("tfds:")
        hint = (f"dataset {name!r} not found in TFDS or not prepared under {data_dir}; prepare it with "
                f"`tfds build {name.split(':')[0]} --data_dir={data_dir} --file_format=array_record` first")
        try:
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
        return Corpus(builder, f"tfds:{builder.info.full_name}", text_key, stored, skipped=_skipped_ids(builder))
    docs = list_documents(source)
    builder = TextFilesBuilder(documents=docs, eval_fraction=eval_fraction, data_dir=data_dir, source=source)
    if not builder.is_prepared():
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    stored = {s: s for s in builder.info.splits}
    skipped = _skipped_ids(builder)
    skipped_set = set(skipped)
    kept = tuple(d for d in docs if d.doc_id not in skipped_set)
    return Corpus(builder, builder.builder_config.name, "text", stored, kept, skipped)
