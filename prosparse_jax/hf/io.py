"""Reads and writes HuggingFace model folders in transformers' ``save_pretrained`` layout: config, safetensors (or
``pytorch_model.bin``) weights, generation config, tokenizer files and, when needed, the remote code of
:mod:`prosparse_jax.hf.modeling`. Errors name the file that is missing or wrong.

Every safetensors file an export writes carries, in its ``__metadata__`` (which HF loaders ignore), the digest of each
of its tensors as stored (:mod:`prosparse_jax.digest`); reading verifies each tensor against it, so a damaged
export is refused instead of run. Folders without those digests (any other HF model) load unverified, with one warning.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from prosparse_jax import files
from prosparse_jax.config import ModelConfig
from prosparse_jax.data.corpus import EOS_TOKEN
from prosparse_jax.digest import DIGEST_ALGORITHM, digests
from prosparse_jax.errors import HFConversionError, InputError
from prosparse_jax.hf.config import (
    check_format,
    hf_config_from_model,
    model_config_from_hf,
    needs_remote_code,
)
from prosparse_jax.hf.modeling import MODELING_FILES
from prosparse_jax.hf.weights import from_hf_state_dict, to_hf_state_dict
from prosparse_jax.model.transformer import Params

EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
# safetensors ``__metadata__`` keys of an export: JSON {tensor name: digest} of the file's tensors, and the algorithm.
DIGESTS_KEY = "prosparse_jax.digests"
DIGEST_ALGORITHM_KEY = "prosparse_jax.digest_algorithm"
_MODELING_DIR = Path(__file__).parent / "modeling"
# Files an export writes; overwrite removes these (and old shards) but nothing else.
_EXPORT_FILE_RE = re.compile(
    r"^(model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|pytorch_model.*\.bin|"
    r"pytorch_model\.bin\.index\.json|config\.json|generation_config\.json|tokenizer\.json|tokenizer_config\.json|"
    r"special_tokens_map\.json|configuration_prosparse\.py|modeling_prosparse\.py)$"
)


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------
def read_config_json(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``config.json`` of a model folder (HF folder or workdir) as a dict, or None when it has none.

    Raises:
      InputError: the file is not valid JSON, or not a JSON object.
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    return files.read_json_object(path, "config.json")


def tensor_digests(tensors: Mapping[str, np.ndarray]) -> dict[str, str]:
    """{name: digest} of each (non-empty) tensor's bytes as stored, by the checkpoints' algorithm."""
    return digests({"tensors": dict(tensors)})["tensors"]


class _LazyTensors(Mapping[str, np.ndarray]):
    """Read-only mapping name -> float32 numpy array over safetensors / pytorch_model.bin files.

    A tensor of a file in ``digests`` (path -> {name: digest}) is checked against its digest as it is read.
    """

    def __init__(self, paths: dict[str, Path], kind: str, digests: dict[Path, dict[str, str]]) -> None:
        self._paths, self._kind, self._digests = paths, kind, digests

    def __getitem__(self, name: str) -> np.ndarray:
        path = self._paths[name]
        if self._kind != "safetensors":
            return _torch_load(path)[name].float().numpy()
        with _safetensors(path) as f:
            try:
                stored = np.asarray(f.get_tensor(name))
            except Exception as e:  # safetensors' SafetensorError: a damaged file
                raise _corrupt_weights(path, e) from None
        want = self._digests.get(path)
        if want is not None and tensor_digests({name: stored}).get(name) != want.get(name):
            raise InputError(f"{path}: tensor {name!r} does not match the digest written with it at export; the file "
                             "is damaged: re-export or re-download it (nothing was loaded)")
        return stored.astype(np.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


_TORCH_CACHE: dict[Path, Any] = {}


def _corrupt_weights(path: Path, e: BaseException) -> HFConversionError:
    why = " ".join(str(e).split())
    return HFConversionError(f"{path}: not a readable weight file ({type(e).__name__}: {why}); it is truncated or "
                             "damaged: re-download or re-export it")


@contextlib.contextmanager
def _safetensors(path: Path) -> Iterator[Any]:
    """``safe_open`` of ``path``; a truncated or damaged file is an HFConversionError naming it."""
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="numpy")
    except Exception as e:  # SafetensorError (header unreadable, file shorter than its header says) or OSError
        raise _corrupt_weights(path, e) from None
    with handle as f:
        yield f


def _torch_load(path: Path) -> Any:
    """The state dict in the PyTorch file ``path``; the last file read is cached so a shard is read once."""
    if path not in _TORCH_CACHE:
        try:
            import torch
        except ImportError:
            raise HFConversionError(f"{path} is a PyTorch checkpoint: install torch or convert it to safetensors") \
                from None
        _TORCH_CACHE.clear()
        try:
            _TORCH_CACHE[path] = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:  # weights_only refused a global, or the pickle stream is damaged
            blocked = re.search(r"GLOBAL (\S+)", str(e))
            if blocked is None:
                raise _corrupt_weights(path, e) from None
            raise InputError(f"{path}: refused: loading it needs the Python global {blocked.group(1)}, which a plain "
                             "weight file never does (nothing was executed); get the model as safetensors, or from "
                             "a source you trust") from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:  # torch's truncated / damaged archive errors
            raise _corrupt_weights(path, e) from None
    return _TORCH_CACHE[path]


def _file_digests(path: Path, metadata: Mapping[str, str] | None) -> dict[str, str] | str | None:
    """The digests in a safetensors file's metadata: {name: digest}, the algorithm name when it is not this
    version's (they cannot be checked), or None when the file carries none.

    Raises:
      InputError: the digests are there but unreadable (a damaged header).
    """
    if not metadata or DIGESTS_KEY not in metadata:
        return None
    algorithm = metadata.get(DIGEST_ALGORITHM_KEY)
    if algorithm != DIGEST_ALGORITHM:
        return str(algorithm)
    try:
        table = json.loads(metadata[DIGESTS_KEY])
    except ValueError:
        table = None
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise InputError(f"{path}: its {DIGESTS_KEY} metadata is not a JSON object of digests; the file is damaged: "
                         "re-export or re-download it")
    return table


def _check_shard_name(folder: Path, index: Path, shard: Any) -> Path:
    """``folder / shard`` for a shard name of a weight index; a name leaving the folder is refused."""
    if not isinstance(shard, str) or not shard:
        raise InputError(f"{index}: shard name {shard!r} is not a file name; re-download or re-export the folder")
    if Path(shard).is_absolute() or ".." in Path(shard).parts:
        raise InputError(f"{index}: shard {shard!r} lies outside {folder}; a weight index names files inside its "
                         "folder: re-download or re-export it (nothing was read)")
    return folder / shard


def _weight_files(path: Path) -> tuple[dict[str, Path], str] | None:
    """({tensor name: file}, kind) of the weights of the HF folder ``path``, or None when it has no weight file."""
    for index_name, kind in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
        index = path / index_name
        if index.is_file():
            data = files.read_json(index, "weight index")
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not weight_map or not isinstance(weight_map, dict):
                raise HFConversionError(f"{index}: no 'weight_map'; re-download or re-export the folder")
            shards = {shard: _check_shard_name(path, index, shard) for shard in set(weight_map.values())}
            for shard in sorted(shards):
                if not shards[shard].is_file():
                    raise HFConversionError(f"weight file {shards[shard]} named in {index_name} does not exist")
            return {k: shards[v] for k, v in weight_map.items()}, kind
    single = path / "model.safetensors"
    if single.is_file():
        with _safetensors(single) as f:
            return dict.fromkeys(f.keys(), single), "safetensors"  # noqa: SIM118
    binary = path / "pytorch_model.bin"
    if binary.is_file():
        return dict.fromkeys(_torch_load(binary), binary), "bin"
    return None


def read_hf_tensors(path: str | os.PathLike) -> Mapping[str, np.ndarray]:
    """Lazy mapping over the weights of a HF folder: model.safetensors, a sharded index, or pytorch_model.bin.

    Tensors of files that carry prosparse_jax digests (every export's) are verified as they are read; weights
    without them load unverified, with one warning.

    Raises:
      HFConversionError: no weight file, or an index naming a shard that does not exist.
      InputError: an index naming a shard outside the folder, a shard without digests beside shards with them,
        unreadable digests, or (when read) a tensor that does not match its digest.
    """
    path = Path(path)
    found = _weight_files(path)
    if found is None:
        raise HFConversionError(
            f"no weight file in {path}: expected model.safetensors, model.safetensors.index.json, pytorch_model.bin "
            "or pytorch_model.bin.index.json"
        )
    paths, kind = found
    by_file: dict[Path, dict[str, str] | str | None] = dict.fromkeys(sorted(set(paths.values())))
    if kind == "safetensors":
        for p in by_file:
            with _safetensors(p) as f:
                by_file[p] = _file_digests(p, f.metadata())
    checked = {p: d for p, d in by_file.items() if isinstance(d, dict)}
    if checked and len(checked) < len(by_file):
        bare = next(p for p in by_file if p not in checked)
        raise InputError(f"{bare}: carries no prosparse_jax digests while {next(iter(checked)).name} of the same "
                         "folder does: a shard was replaced or damaged; re-export or re-download the folder")
    others = sorted({d for d in by_file.values() if isinstance(d, str)})
    if others:
        warnings.warn(f"{path}: the weights carry digests of algorithm {others[0]!r}, which this version cannot check "
                      f"(it writes {DIGEST_ALGORITHM}); they load unverified", stacklevel=2)
    elif not checked:
        warnings.warn(f"{path}: the weights carry no prosparse_jax digests (not an export of this project, or an older "
                      "one), so damage to them cannot be detected; they load as they are", stacklevel=2)
    return _LazyTensors(paths, kind, checked)


def load_hf_folder(path: str | os.PathLike) -> tuple[ModelConfig, Params]:
    """Loads (ModelConfig, float32 numpy params) from a local HF model folder (see
    :func:`prosparse_jax.training.model_io.load_model`); an export's tensors are verified against their digests."""
    path = Path(path)
    raw = read_config_json(path)
    if raw is None:
        raise HFConversionError(f"{path / 'config.json'} not found: {path} is not a HuggingFace model folder")
    cfg = model_config_from_hf(raw)
    tensors = read_hf_tensors(path)
    if "tie_word_embeddings" not in raw and "lm_head.weight" in tensors:  # unstated: the weights decide
        cfg = cfg.replace(tie_embeddings=False)
    try:
        params = from_hf_state_dict(cfg, tensors)
    finally:
        _TORCH_CACHE.clear()
    return cfg, params


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------
def write_safetensors(tensors: Mapping[str, np.ndarray], out: Path, *, max_shard_size: int) -> list[str]:
    """Writes model.safetensors, or model-0000i-of-0000n.safetensors + index json above ``max_shard_size``; each file
    carries the digests of its tensors (:data:`DIGESTS_KEY`) and the mode a new file gets under the umask."""
    from safetensors.numpy import save_file

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, a in tensors.items():
        if shards[-1] and size + a.nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = a
        size += a.nbytes

    def save(shard: dict[str, np.ndarray], path: Path) -> None:
        meta = {"format": "pt", DIGEST_ALGORITHM_KEY: DIGEST_ALGORITHM, DIGESTS_KEY: json.dumps(tensor_digests(shard))}
        path.touch()  # safetensors creates files 0600; this one gets the mode every other file here gets (umask)
        mode = path.stat().st_mode & 0o777
        try:
            save_file(shard, str(path), metadata=meta)
        except OSError:
            raise
        except Exception as e:  # safetensors reports a failed write (disk full) as SafetensorError: an OSError here
            full = "os error 28" in str(e) or "No space left" in str(e)
            raise OSError(errno.ENOSPC if full else errno.EIO, " ".join(str(e).split()), str(path)) from e
        path.chmod(mode)

    if len(shards) == 1:
        save(shards[0], out / "model.safetensors")
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save(shard, out / name)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
    _write_json(out / "model.safetensors.index.json", index)
    return [*names, "model.safetensors.index.json"]


def special_token_id(tokenizer_json: Path | None) -> int | None:
    """Id of ``<|endoftext|>`` in a tokenizers file, or None."""
    if tokenizer_json is None:
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_json)).token_to_id(EOS_TOKEN)


def write_tokenizer_files(tokenizer_json: Path, out: Path, *, model_max_length: int) -> None:
    """Copies tokenizer.json and writes tokenizer_config.json for ``AutoTokenizer`` (PreTrainedTokenizerFast)."""
    shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    tok_cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    special = {}
    if special_token_id(tokenizer_json) is not None:
        special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN}
        tok_cfg.update(special)
    _write_json(out / "tokenizer_config.json", tok_cfg)
    _write_json(out / "special_tokens_map.json", special)


def remove_export_files(out: Path) -> None:
    """Removes from ``out`` the files an export writes (those of an earlier export); the others stay."""
    for p in out.iterdir():
        if p.is_file() and _EXPORT_FILE_RE.match(p.name):
            p.unlink()


def save_hf_folder(cfg: ModelConfig, params: Params, out: str | os.PathLike, *, fmt: str = "llama",
                   dtype: str = "float32", max_shard_size: str | int = "2GB", overwrite: bool = False,
                   tokenizer_json: str | os.PathLike | None = None,
                   max_position_embeddings: int = 4096) -> Path:
    """Writes a HF model folder (weights, configs, tokenizer, remote code if needed); returns ``out``.

    Args:
      out: output folder; must be empty or absent unless ``overwrite``.
      fmt: ``llama`` (folded, plain transformers where possible) or ``minicpm`` (unfolded, remote code).
      dtype: dtype of the stored weights (``float32`` or ``bfloat16``).
      max_shard_size: shard the safetensors above this size (e.g. ``2GB``).
      overwrite: allow a non-empty ``out`` (previous export files there are replaced).
      tokenizer_json: tokenizers file to ship; its ``<|endoftext|>`` becomes bos / eos.
      max_position_embeddings: written to config.json (RoPE has no length limit here).
    """
    out = Path(out)
    check_format(fmt)
    if dtype not in EXPORT_DTYPES:
        raise HFConversionError(f"unknown dtype {dtype!r}; choose one of: {', '.join(EXPORT_DTYPES)}")
    if isinstance(max_shard_size, str):
        max_shard_size = files.parse_size(max_shard_size, "max_shard_size")
    tok = Path(tokenizer_json) if tokenizer_json is not None else None
    if tok is not None and not tok.is_file():
        raise HFConversionError(f"tokenizer file {tok} not found")
    if overwrite:
        if files.check_output_path(out, "out").is_dir():
            remove_export_files(out)
    else:
        files.check_empty_dir(out, "out", "set overwrite to replace the export files, or choose an empty folder")
    special = special_token_id(tok)
    hf_cfg = hf_config_from_model(cfg, fmt, bos_token_id=special, eos_token_id=special,
                                  max_position_embeddings=max_position_embeddings, dtype=dtype)
    tensors = {k: v.astype(EXPORT_DTYPES[dtype]) for k, v in to_hf_state_dict(cfg, params, fold=fmt == "llama").items()}
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, out, max_shard_size=max_shard_size)
    _write_json(out / "config.json", hf_cfg)
    _write_json(out / "generation_config.json", {"bos_token_id": special, "eos_token_id": special, "do_sample": False})
    if needs_remote_code(cfg, fmt):
        for name in MODELING_FILES:
            shutil.copyfile(_MODELING_DIR / name, out / name)
    if tok is not None:
        write_tokenizer_files(tok, out, model_max_length=max_position_embeddings)
    return out


def _write_json(path: Path, obj: Any) -> None:
    """Writes ``obj`` as indented JSON (the layout transformers' ``save_pretrained`` uses)."""
    path.write_text(json.dumps(obj, indent=2))
