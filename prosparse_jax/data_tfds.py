"""TFDS side of the data pipeline: list documents, build/read an array_record TFDS dataset (no TensorFlow).

A text corpus ('stdlib' or 'files:<glob>') is written once by `TextFilesBuilder` into
`<data_dir>/text_files_builder/<config>/1.0.0/`, where `<config>` is `fp<fingerprint>` and the fingerprint covers the
sorted document ids, sizes, mtimes and `eval_fraction`: a different file set never collides with a prepared one.
Documents go to 'validation' when a hash of their id falls below `eval_fraction` (deterministic, not random).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

TRAIN_SPLIT = "train"
EVAL_SPLIT = "validation"
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})



class DataError(ValueError):
    """A data source, tokenizer or iterator state is missing or invalid; the message names the fix."""

def resolve_data_dir(data_dir: str) -> str:
    """`data_dir`, else $PROSPARSE_DATA_DIR, else ~/.cache/prosparse_jax/tfds."""
    if data_dir:
        return os.path.expanduser(data_dir)
    return os.environ.get("PROSPARSE_DATA_DIR") or os.path.expanduser("~/.cache/prosparse_jax/tfds")


def is_eval_document(doc_id: str, eval_fraction: float) -> bool:
    """Deterministic held-out assignment: sha256(doc_id) mapped to [0, 1) compared with `eval_fraction`."""
    u = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") / 2.0**64
    return u < eval_fraction


@dataclasses.dataclass(frozen=True)
class Document:
    """One text file: `doc_id` is a location-independent id (path relative to the corpus root)."""

    doc_id: str
    path: str
    size: int
    mtime_ns: int


def list_documents(source: str) -> list[Document]:
    """Non-empty documents of a 'stdlib' or 'files:<glob>' source, sorted by id.

    Raises:
      FileNotFoundError: the glob matches nothing, or only empty files.
    """
    if source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        paths = [p for p in root.rglob("*.py") if not _EXCLUDED_DIRS & set(p.relative_to(root).parts)]
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


def corpus_fingerprint(docs: Sequence[Document], eval_fraction: float) -> str:
    """16-hex-digit fingerprint of (ids, sizes, mtimes, eval_fraction)."""
    h = hashlib.sha256(json.dumps({"eval_fraction": eval_fraction}).encode())
    for d in docs:
        h.update(f"{d.doc_id}\0{d.size}\0{d.mtime_ns}\n".encode())
    return h.hexdigest()[:16]


class TextFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes a list of text files as {'text', 'id'} records, split into train/validation by id hash."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # No checksums file next to this module; TFDS' lookup of it would need the optional `importlib_resources`.
    code_path = None

    def __init__(self, *, documents: Sequence[Document], eval_fraction: float, data_dir: str):
        self._documents = list(documents)
        self._eval_fraction = eval_fraction
        fp = corpus_fingerprint(self._documents, eval_fraction)
        config = tfds.core.BuilderConfig(name=f"fp{fp}", description="text files, fingerprinted")
        super().__init__(data_dir=data_dir, config=config, file_format="array_record")

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({"text": tfds.features.Text(), "id": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, description="Local text files.", features=features)

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[str, dict[str, str]]]]:
        del dl_manager
        is_eval = [is_eval_document(d.doc_id, self._eval_fraction) for d in self._documents]
        splits = {TRAIN_SPLIT: [d for d, e in zip(self._documents, is_eval, strict=True) if not e]}
        if any(is_eval):  # TFDS rejects an empty split; a missing 'validation' split reads as empty.
            splits[EVAL_SPLIT] = [d for d, e in zip(self._documents, is_eval, strict=True) if e]
        return {name: self._generate_examples(docs) for name, docs in splits.items()}

    def _generate_examples(self, docs: Sequence[Document]) -> Iterator[tuple[str, dict[str, str]]]:
        for d in docs:
            yield d.doc_id, {"text": Path(d.path).read_bytes().decode("utf-8", errors="replace"), "id": d.doc_id}


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A prepared corpus with a 'train' and (maybe empty) 'validation' split.

    `fingerprint` names its content; `stored_split` maps our split names to the dataset's own (a 'tfds:' dataset
    without 'validation' serves 'test' as the eval split).
    """

    builder: tfds.core.DatasetBuilder
    fingerprint: str
    text_key: str
    stored_split: dict[str, str]

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
        return Corpus(builder, f"tfds:{builder.info.full_name}", text_key, stored)
    docs = list_documents(source)
    builder = TextFilesBuilder(documents=docs, eval_fraction=eval_fraction, data_dir=data_dir)
    if not builder.is_prepared():
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    stored = {s: s for s in builder.info.splits}
    return Corpus(builder, builder.builder_config.name, "text", stored)
