"""HuggingFace <-> prosparse_jax conversion: configs, weights, safetensors I/O, tokenizer files.

Formats written by :func:`save_hf_folder` (transformers' Llama layout; MiniCPM folded into it):

- ``llama``: plain ``LlamaForCausalLM`` (loads without remote code). MiniCPM scales are folded into the weights:
  embed *= scale_emb; o_proj and down_proj *= scale_depth / sqrt(L); the head is untied and lm_head = embed /
  (d_model / dim_model_base). Activations transformers cannot express (``fatrelu``, ``drelu``) and per-layer
  ``neuron_thresholds`` switch to model_type ``prosparse_llama`` with the remote-code files of
  :mod:`prosparse_jax.hf_modeling` referenced from ``auto_map``; ``hidden_act`` then names something transformers'
  ``ACT2FN`` lacks (``fatrelu``, ``drelu``, or ``<act>_neuron_thresholds``), so a plain ``LlamaForCausalLM`` refuses
  to build it instead of silently running another activation.
- ``minicpm``: model_type ``minicpm`` with unfolded weights and ``scale_emb`` / ``scale_depth`` / ``dim_model_base``,
  remote code only.

Weight mapping (HF [out, in] -> ours): q_proj [N*H, D] -> wq [D, N, H] = W.T.reshape(D, N, H) (k / v with K heads);
o_proj [D, N*H] -> wo [N, H, D] = W.T.reshape(N, H, D); gate / up [F, D] -> [D, F]; down [D, F] -> [F, D];
embed [V, D] as is; lm_head [V, D] -> [D, V]. HF RoPE is half-split like ours: no permutation.

Every export also carries a ``prosparse_jax_model`` block (our ModelConfig) so that import restores fields HF has no
name for (``init_std``, ``dtype``, ``remat``) and, when the weights were not folded, the exact config.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from prosparse_jax.config import ConfigError, ModelConfig, model_config_from_dict, model_config_to_dict
from prosparse_jax.hf_modeling import MODELING_FILES
from prosparse_jax.model import Params

FORMATS = ("llama", "minicpm")
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
#: Activations a plain LlamaForCausalLM computes exactly like we do (HF ``gelu`` is exact erf, ``relu2`` = relu^2).
NATIVE_ACTIVATIONS = frozenset({"silu", "relu", "gelu", "relu2"})
#: HF ``hidden_act`` names accepted on import -> our activation name.
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "relu": "relu", "gelu": "gelu", "relu2": "relu2",
                  "fatrelu": "fatrelu", "drelu": "drelu"}
MODEL_TYPES = ("llama", "mistral", "minicpm", "prosparse_llama")
SPECIAL_TOKEN = "<|endoftext|>"
PROVENANCE_KEY = "prosparse_jax_model"
_THRESHOLD_SUFFIX = "_neuron_thresholds"
_MODELING_DIR = Path(__file__).parent / "hf_modeling"
# Files an export writes; --overwrite removes these (and old shards) but nothing else.
_EXPORT_FILE_RE = re.compile(
    r"^(model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|pytorch_model.*\.bin|"
    r"pytorch_model\.bin\.index\.json|config\.json|generation_config\.json|tokenizer\.json|tokenizer_config\.json|"
    r"special_tokens_map\.json|configuration_prosparse\.py|modeling_prosparse\.py)$"
)


class HFConversionError(ValueError):
    """A HuggingFace folder or config cannot be converted; the message names the field / tensor / file."""


# ---------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------
def needs_remote_code(cfg: ModelConfig, fmt: str = "llama") -> bool:
    """Whether an export in ``fmt`` needs the remote-code modeling files (``trust_remote_code=True``)."""
    return fmt == "minicpm" or cfg.activation not in NATIVE_ACTIVATIONS or bool(cfg.neuron_thresholds)


def hf_config_from_model(cfg: ModelConfig, fmt: str = "llama", *, bos_token_id: int | None = None,
                         eos_token_id: int | None = None, max_position_embeddings: int = 4096,
                         dtype: str = "float32") -> dict[str, Any]:
    """The HF ``config.json`` dict of an export of ``cfg`` in format ``fmt`` (see module docstring)."""
    if fmt not in FORMATS:
        raise HFConversionError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    fold = fmt == "llama"
    remote = needs_remote_code(cfg, fmt)
    hidden_act = cfg.activation
    if cfg.neuron_thresholds and hidden_act in NATIVE_ACTIVATIONS:
        hidden_act += _THRESHOLD_SUFFIX  # not in ACT2FN: a plain LlamaForCausalLM cannot run it densely by mistake
    out: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": hidden_act,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings and (not fold or not cfg.is_minicpm),
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if remote:
        out["prosparse_activation"] = cfg.activation
        if cfg.activation == "fatrelu":
            out["hidden_act_param"] = cfg.activation_threshold
        if cfg.neuron_thresholds:
            # Folding scales W_down by r, so the neuron output norm |x1_i| * ||W_down_i|| scales by r too.
            r = cfg.residual_scale if fold else 1.0
            out["neuron_thresholds"] = [float(t) * r for t in cfg.neuron_thresholds]
    if fmt == "minicpm":
        out.update(
            architectures=["MiniCPMForCausalLM"],
            model_type="minicpm",
            scale_emb=cfg.scale_emb,
            # 0 = off in ours; MiniCPM always scales, sqrt(L) / sqrt(L) == 1 exactly.
            scale_depth=cfg.scale_depth or math.sqrt(cfg.n_layers),
            dim_model_base=cfg.dim_model_base or cfg.d_model,
            auto_map={"AutoConfig": "configuration_prosparse.MiniCPMConfig",
                      "AutoModelForCausalLM": "modeling_prosparse.MiniCPMForCausalLM"},
        )
    elif remote:
        out.update(
            architectures=["ProSparseLlamaForCausalLM"],
            model_type="prosparse_llama",
            auto_map={"AutoConfig": "configuration_prosparse.ProSparseConfig",
                      "AutoModelForCausalLM": "modeling_prosparse.ProSparseLlamaForCausalLM"},
        )
    out[PROVENANCE_KEY] = model_config_to_dict(cfg)
    return out


def _get(raw: Mapping[str, Any], key: str, default: Any = None, *, required: bool = False) -> Any:
    if key not in raw or raw[key] is None:
        if required:
            raise HFConversionError(f"config.json: required field {key!r} is missing")
        return default
    return raw[key]


def model_config_from_hf(raw: Mapping[str, Any]) -> ModelConfig:
    """Validated ModelConfig of a HF ``config.json`` dict; unsupported features raise naming the field."""
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise HFConversionError(
            f"config.json: model_type {model_type!r} is not supported; supported: {', '.join(MODEL_TYPES)} "
            "(LLaMA-style decoders)"
        )
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key):
            raise HFConversionError(f"config.json: {key}=true is not supported (prosparse_jax has no biases)")
    if raw.get("rope_scaling"):
        raise HFConversionError(f"config.json: rope_scaling={raw['rope_scaling']!r} is not supported (plain RoPE only)")
    rope_params = raw.get("rope_parameters") or {}
    if rope_params.get("rope_type", "default") != "default":
        raise HFConversionError(
            f"config.json: rope_parameters.rope_type={rope_params['rope_type']!r} is not supported (plain RoPE only)"
        )
    if raw.get("sliding_window") is not None and raw.get("use_sliding_window", True):
        raise HFConversionError(f"config.json: sliding_window={raw['sliding_window']} is not supported")
    hidden_act = _get(raw, "prosparse_activation") or _get(raw, "hidden_act", "silu")
    if hidden_act.endswith(_THRESHOLD_SUFFIX):
        hidden_act = hidden_act[: -len(_THRESHOLD_SUFFIX)]
    if hidden_act not in HF_ACTIVATIONS:
        raise HFConversionError(
            f"config.json: hidden_act {hidden_act!r} is not supported; choose one of: {', '.join(HF_ACTIVATIONS)}"
        )
    d_model = int(_get(raw, "hidden_size", required=True))
    n_heads = int(_get(raw, "num_attention_heads", required=True))
    head_dim = int(_get(raw, "head_dim", 0))
    kw: dict[str, Any] = dict(
        vocab_size=int(_get(raw, "vocab_size", required=True)),
        d_model=d_model,
        n_layers=int(_get(raw, "num_hidden_layers", required=True)),
        n_heads=n_heads,
        n_kv_heads=int(_get(raw, "num_key_value_heads", n_heads)),
        d_ff=int(_get(raw, "intermediate_size", required=True)),
        head_dim=head_dim,
        activation=HF_ACTIVATIONS[hidden_act],
        activation_threshold=float(_get(raw, "hidden_act_param", 0.0)) if hidden_act == "fatrelu" else 0.0,
        tie_embeddings=bool(_get(raw, "tie_word_embeddings", model_type == "minicpm")),
        rope_theta=float(rope_params.get("rope_theta") or _get(raw, "rope_theta", 10000.0)),
        norm_eps=float(_get(raw, "rms_norm_eps", 1e-6)),
        init_std=float(_get(raw, "initializer_range", 0.02)),
        neuron_thresholds=tuple(float(t) for t in (_get(raw, "neuron_thresholds") or ())),
    )
    if model_type == "minicpm":
        scale_emb = float(_get(raw, "scale_emb", required=True))
        scale_depth = float(_get(raw, "scale_depth", required=True))
        dmb = float(_get(raw, "dim_model_base", required=True))
        if not (scale_emb > 0 and scale_depth > 0 and dmb > 0 and dmb == int(dmb)):
            raise HFConversionError(
                "config.json: MiniCPM needs scale_emb > 0, scale_depth > 0 and an integer dim_model_base > 0, got "
                f"{scale_emb}, {scale_depth}, {dmb}"
            )
        kw.update(scale_emb=scale_emb, scale_depth=scale_depth, dim_model_base=int(dmb))
    try:
        cfg = ModelConfig(**kw)
    except ConfigError as e:
        raise HFConversionError(f"config.json does not give a valid model: {e}") from None
    return _apply_provenance(cfg, raw.get(PROVENANCE_KEY))


def _apply_provenance(cfg: ModelConfig, block: Any) -> ModelConfig:
    """Restores our own fields from an export's provenance block when they agree with the HF fields.

    Fields HF has no name for (dtype, remat, scan_layers) are always taken from it; the whole block is taken when it
    describes the same computation (same architecture and activation, scales equal up to MiniCPM's "0 = off" spellings).
    """
    if not isinstance(block, Mapping):
        return cfg
    try:
        ours = model_config_from_dict(block)
    except ConfigError:
        return cfg
    cfg = cfg.replace(dtype=ours.dtype, remat=ours.remat, scan_layers=ours.scan_layers)
    same = (
        all(getattr(ours, f) == getattr(cfg, f) for f in (
            "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "activation",
            "tie_embeddings", "rope_theta", "norm_eps", "scale_emb", "neuron_thresholds"))
        and (ours.activation != "fatrelu" or ours.activation_threshold == cfg.activation_threshold)
        and ours.head_dim == cfg.head_dim
        and ours.residual_scale == cfg.residual_scale
        and ours.logits_divisor == cfg.logits_divisor
    )
    return ours if same else cfg


# ---------------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------------
def hf_weight_shapes(cfg: ModelConfig, *, include_lm_head: bool | None = None) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> expected shape for ``cfg`` (lm_head only when untied, unless ``include_lm_head``)."""
    D, N, K, H, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (N * H, D),
            p + "self_attn.k_proj.weight": (K * H, D),
            p + "self_attn.v_proj.weight": (K * H, D),
            p + "self_attn.o_proj.weight": (D, N * H),
            p + "post_attention_layernorm.weight": (D,),
            p + "mlp.gate_proj.weight": (F, D),
            p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F),
        })
    shapes["model.norm.weight"] = (D,)
    if include_lm_head if include_lm_head is not None else not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes


def to_hf_state_dict(cfg: ModelConfig, params: Params, *, fold: bool) -> dict[str, np.ndarray]:
    """HF state dict (float32 numpy, HF order) of our params; ``fold`` folds MiniCPM scales (module docstring)."""
    D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    lp = {k: f32(v) for k, v in params["layers"].items()}
    embed_VxD = f32(params["embed_VxD"])
    r = np.float32(cfg.residual_scale if fold else 1.0)
    out: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": embed_VxD * np.float32(cfg.scale_emb) if fold else embed_VxD
    }
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        wo = lp["wo_LxNxHxD"][i].reshape(N * H, D).T
        down = lp["w_down_LxFxD"][i].T
        out.update({
            p + "input_layernorm.weight": lp["attn_norm_LxD"][i],
            p + "self_attn.q_proj.weight": lp["wq_LxDxNxH"][i].reshape(D, N * H).T,
            p + "self_attn.k_proj.weight": lp["wk_LxDxKxH"][i].reshape(D, K * H).T,
            p + "self_attn.v_proj.weight": lp["wv_LxDxKxH"][i].reshape(D, K * H).T,
            p + "self_attn.o_proj.weight": wo * r if r != 1 else wo,
            p + "post_attention_layernorm.weight": lp["ffn_norm_LxD"][i],
            p + "mlp.gate_proj.weight": lp["w_gate_LxDxF"][i].T,
            p + "mlp.up_proj.weight": lp["w_up_LxDxF"][i].T,
            p + "mlp.down_proj.weight": down * r if r != 1 else down,
        })
    out["model.norm.weight"] = f32(params["final_norm_D"])
    head_VxD = embed_VxD if cfg.tie_embeddings else f32(params["lm_head_DxV"]).T
    if fold and cfg.is_minicpm:
        out["lm_head.weight"] = head_VxD / np.float32(cfg.logits_divisor) if cfg.dim_model_base else head_VxD
    elif not cfg.tie_embeddings:
        out["lm_head.weight"] = head_VxD
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def from_hf_state_dict(cfg: ModelConfig, tensors: Mapping[str, Any]) -> Params:
    """Our float32 params from HF tensors (a mapping name -> array-like); checks names and shapes.

    Raises:
      HFConversionError: a tensor is missing, has the wrong shape, or is not part of the architecture.
    """
    expected = hf_weight_shapes(cfg)
    names = set(tensors)
    missing = [k for k in expected if k not in names]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise HFConversionError(f"weight {missing[0]!r} is missing from the checkpoint{more}")
    ignorable = re.compile(r"(^lm_head\.weight$)|(rotary_emb\.inv_freq$)")
    unexpected = sorted(k for k in names - set(expected) if not ignorable.search(k))
    if unexpected:
        raise HFConversionError(
            f"unexpected weight {unexpected[0]!r} (not part of a bias-free LLaMA with this config; "
            f"{len(unexpected)} unexpected in total)"
        )

    def get(name: str) -> np.ndarray:
        a = np.asarray(tensors[name])
        if tuple(a.shape) != expected[name]:
            raise HFConversionError(
                f"weight {name!r} has shape {tuple(a.shape)} but the config implies {expected[name]}"
            )
        return a.astype(np.float32)

    D, N, K, H, L = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers

    def stack(suffix: str, fn: Any) -> np.ndarray:
        return np.stack([fn(get(f"model.layers.{i}.{suffix}")) for i in range(L)])

    params: Params = {
        "embed_VxD": get("model.embed_tokens.weight"),
        "layers": {
            "attn_norm_LxD": stack("input_layernorm.weight", lambda w: w),
            "wq_LxDxNxH": stack("self_attn.q_proj.weight", lambda w: w.T.reshape(D, N, H)),
            "wk_LxDxKxH": stack("self_attn.k_proj.weight", lambda w: w.T.reshape(D, K, H)),
            "wv_LxDxKxH": stack("self_attn.v_proj.weight", lambda w: w.T.reshape(D, K, H)),
            "wo_LxNxHxD": stack("self_attn.o_proj.weight", lambda w: w.T.reshape(N, H, D)),
            "ffn_norm_LxD": stack("post_attention_layernorm.weight", lambda w: w),
            "w_gate_LxDxF": stack("mlp.gate_proj.weight", lambda w: w.T),
            "w_up_LxDxF": stack("mlp.up_proj.weight", lambda w: w.T),
            "w_down_LxFxD": stack("mlp.down_proj.weight", lambda w: w.T),
        },
        "final_norm_D": get("model.norm.weight"),
    }
    if not cfg.tie_embeddings:
        params["lm_head_DxV"] = np.ascontiguousarray(get("lm_head.weight").T)
    return params


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------
class _LazyTensors(Mapping[str, np.ndarray]):
    """Read-only mapping name -> float32 numpy array over safetensors / pytorch_model.bin files."""

    def __init__(self, files: dict[str, Path], kind: str) -> None:
        self._files, self._kind = files, kind

    def __getitem__(self, name: str) -> np.ndarray:
        path = self._files[name]
        if self._kind == "safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                return np.asarray(f.get_tensor(name)).astype(np.float32)
        return _torch_load(path)[name].float().numpy()

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


_TORCH_CACHE: dict[Path, Any] = {}


def _torch_load(path: Path) -> Any:
    if path not in _TORCH_CACHE:
        try:
            import torch
        except ImportError:
            raise HFConversionError(f"{path} is a PyTorch checkpoint: install torch or convert it to safetensors") \
                from None
        _TORCH_CACHE.clear()
        _TORCH_CACHE[path] = torch.load(path, map_location="cpu", weights_only=True)
    return _TORCH_CACHE[path]


def read_hf_tensors(path: str | os.PathLike) -> Mapping[str, np.ndarray]:
    """Lazy mapping over the weights of a HF folder: model.safetensors, a sharded index, or pytorch_model.bin.

    Raises:
      HFConversionError: no weight file, or an index naming a shard that does not exist.
    """
    path = Path(path)
    for index_name, kind in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
        index = path / index_name
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            for shard in sorted(set(weight_map.values())):
                if not (path / shard).is_file():
                    raise HFConversionError(f"weight file {path / shard} named in {index_name} does not exist")
            return _LazyTensors({k: path / v for k, v in weight_map.items()}, kind)
    single = path / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="numpy") as f:
            return _LazyTensors({k: single for k in f.keys()}, "safetensors")  # noqa: SIM118
    binary = path / "pytorch_model.bin"
    if binary.is_file():
        return _LazyTensors({k: binary for k in _torch_load(binary)}, "bin")
    raise HFConversionError(
        f"no weight file in {path}: expected model.safetensors, model.safetensors.index.json, pytorch_model.bin or "
        "pytorch_model.bin.index.json"
    )


def load_hf_folder(path: str | os.PathLike) -> tuple[ModelConfig, Params]:
    """Loads (ModelConfig, float32 numpy params) from a local HF model folder (used by ``checkpoint.load_model``)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise HFConversionError(f"{cfg_file} not found: {path} is not a HuggingFace model folder")
    raw = json.loads(cfg_file.read_text())
    cfg = model_config_from_hf(raw)
    tensors = read_hf_tensors(path)
    if "tie_word_embeddings" not in raw and "lm_head.weight" in tensors:  # unstated: the weights decide
        cfg = cfg.replace(tie_embeddings=False)
    params = from_hf_state_dict(cfg, tensors)
    _TORCH_CACHE.clear()
    return cfg, params


def parse_size(size: str | int) -> int:
    """Bytes of a size such as ``2GB``, ``500MB``, ``10KB`` or ``123`` (decimal units, like transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KIB|MIB|GIB)?\s*", size.upper())
    if not m:
        raise HFConversionError(f"invalid size {size!r}; use e.g. 2GB, 500MB, 64KB or a byte count")
    unit = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    return int(float(m.group(1)) * unit[m.group(2)])


def write_safetensors(tensors: Mapping[str, np.ndarray], out: Path, *, max_shard_size: int) -> list[str]:
    """Writes model.safetensors, or model-0000i-of-0000n.safetensors + index json above ``max_shard_size``."""
    from safetensors.numpy import save_file

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, a in tensors.items():
        if shards[-1] and size + a.nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = a
        size += a.nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(out / name), metadata=meta)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return [*names, "model.safetensors.index.json"]


def special_token_id(tokenizer_json: Path | None) -> int | None:
    """Id of ``<|endoftext|>`` in a tokenizers file, or None."""
    if tokenizer_json is None:
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_json)).token_to_id(SPECIAL_TOKEN)


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
        special = {"bos_token": SPECIAL_TOKEN, "eos_token": SPECIAL_TOKEN}
        tok_cfg.update(special)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuses a non-empty ``out`` unless ``overwrite``; with it, removes only files an export writes."""
    if out.exists() and not out.is_dir():
        raise HFConversionError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise HFConversionError(f"--out {out} is not empty; pass --overwrite or choose an empty folder "
                                    "(nothing was written)")
        for p in out.iterdir():
            if p.is_file() and _EXPORT_FILE_RE.match(p.name):
                p.unlink()


def save_hf_folder(cfg: ModelConfig, params: Params, out: str | os.PathLike, *, fmt: str = "llama",
                   dtype: str = "float32", max_shard_size: str | int = "2GB", overwrite: bool = False,
                   tokenizer_json: str | os.PathLike | None = None,
                   max_position_embeddings: int = 4096) -> Path:
    """Writes a HF model folder (weights, config.json, generation_config.json, tokenizer, remote code if needed).

    Args:
      cfg: model config.
      params: our parameter pytree.
      out: output folder; must be empty or absent unless ``overwrite``.
      fmt: ``llama`` (folded, plain transformers where possible) or ``minicpm`` (unfolded, remote code).
      dtype: dtype of the stored weights (``float32`` or ``bfloat16``).
      max_shard_size: shard the safetensors above this size (e.g. ``2GB``).
      overwrite: allow a non-empty ``out`` (previous export files there are replaced).
      tokenizer_json: tokenizers file to ship; its ``<|endoftext|>`` becomes bos / eos.
      max_position_embeddings: written to config.json (RoPE has no length limit here).

    Returns:
      The output folder.
    """
    out = Path(out)
    if fmt not in FORMATS:
        raise HFConversionError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if dtype not in EXPORT_DTYPES:
        raise HFConversionError(f"unknown dtype {dtype!r}; choose one of: {', '.join(EXPORT_DTYPES)}")
    shard_bytes = parse_size(max_shard_size)
    tok = Path(tokenizer_json) if tokenizer_json is not None else None
    if tok is not None and not tok.is_file():
        raise HFConversionError(f"tokenizer file {tok} not found")
    check_output_dir(out, overwrite)
    special = special_token_id(tok)
    hf_cfg = hf_config_from_model(cfg, fmt, bos_token_id=special, eos_token_id=special,
                                  max_position_embeddings=max_position_embeddings, dtype=dtype)
    tensors = to_hf_state_dict(cfg, params, fold=fmt == "llama")
    np_dtype = EXPORT_DTYPES[dtype]
    tensors = {k: v.astype(np_dtype) for k, v in tensors.items()}
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, out, max_shard_size=shard_bytes)
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    gen = {"bos_token_id": special, "eos_token_id": special, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if needs_remote_code(cfg, fmt):
        for name in MODELING_FILES:
            shutil.copyfile(_MODELING_DIR / name, out / name)
    if tok is not None:
        write_tokenizer_files(tok, out, model_max_length=max_position_embeddings)
    return out
