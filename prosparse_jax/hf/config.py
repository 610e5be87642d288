"""Maps a HuggingFace ``config.json`` dict to our :class:`~prosparse_jax.config.ModelConfig` and back (docs/hf.md).

Format ``llama`` is a plain ``LlamaConfig`` when transformers' ``ACT2FN`` computes our activation exactly, MiniCPM's
scales (arXiv:2404.06395) folded into the weights. FATReLU / dReLU (ProSparse, arXiv:2402.13516; Turbo Sparse,
arXiv:2406.05955) and ``neuron_thresholds`` need the remote code of :mod:`prosparse_jax.hf.modeling`, with a
``hidden_act`` that ``ACT2FN`` lacks so that plain transformers refuses to run another activation. The
``prosparse_jax_model`` block of every export restores the fields HF has no name for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from prosparse_jax.config import ModelConfig, model_config_from_dict, to_dict
from prosparse_jax.errors import ConfigError, HFConversionError

FORMATS = ("llama", "minicpm")
#: Activations a plain LlamaForCausalLM computes exactly like we do (HF ``gelu`` is exact erf, ``relu2`` = relu^2).
NATIVE_ACTIVATIONS = frozenset({"silu", "relu", "gelu", "relu2"})
#: HF ``hidden_act`` names accepted on import -> our activation name.
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "relu": "relu", "gelu": "gelu", "relu2": "relu2",
                  "fatrelu": "fatrelu", "drelu": "drelu"}
MODEL_TYPES = ("llama", "mistral", "minicpm", "prosparse_llama")
PROVENANCE_KEY = "prosparse_jax_model"
_THRESHOLD_SUFFIX = "_neuron_thresholds"
# Our fields restored from the provenance block only when they agree with what the HF fields say.
_PROVENANCE_CHECKED = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "head_dim", "activation",
                       "tie_embeddings", "rope_theta", "norm_eps", "scale_emb", "neuron_thresholds",
                       "residual_scale", "logits_divisor")


def check_format(fmt: str) -> None:
    """Raises :class:`HFConversionError` unless ``fmt`` is one of :data:`FORMATS`."""
    if fmt not in FORMATS:
        raise HFConversionError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")


def needs_remote_code(cfg: ModelConfig, fmt: str = "llama") -> bool:
    """Whether an export of ``cfg`` in ``fmt`` needs the remote-code modeling files (``trust_remote_code=True``)."""
    return fmt == "minicpm" or cfg.activation not in NATIVE_ACTIVATIONS or bool(cfg.neuron_thresholds)


# ---------------------------------------------------------------------------------------------------------------
# ModelConfig -> config.json
# ---------------------------------------------------------------------------------------------------------------
def hf_config_from_model(cfg: ModelConfig, fmt: str = "llama", *, bos_token_id: int | None = None,
                         eos_token_id: int | None = None, max_position_embeddings: int = 4096,
                         dtype: str = "float32") -> dict[str, Any]:
    """The HF ``config.json`` dict of an export of ``cfg`` in format ``fmt`` (see the module docstring).

    Args:
      fmt: ``llama`` (MiniCPM scales folded into the weights) or ``minicpm`` (unfolded, remote code).
      bos_token_id: None leaves it unset; likewise ``eos_token_id``.
      max_position_embeddings: written as is (our RoPE has no length limit).
      dtype: dtype of the stored weights, written as ``torch_dtype`` / ``dtype``.

    Raises:
      HFConversionError: ``fmt`` is not one of :data:`FORMATS`.
    """
    check_format(fmt)
    out = _llama_fields(cfg, fold=fmt == "llama", max_position_embeddings=max_position_embeddings, dtype=dtype)
    out.update(bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    if needs_remote_code(cfg, fmt):
        out.update(_remote_code_fields(cfg, fmt))
    out[PROVENANCE_KEY] = to_dict(cfg)
    return out


def _llama_fields(cfg: ModelConfig, *, fold: bool, max_position_embeddings: int, dtype: str) -> dict[str, Any]:
    """The ``LlamaConfig`` fields of ``cfg``; ``fold``: MiniCPM scales go into the weights (the head is untied)."""
    hidden_act = cfg.activation
    if cfg.neuron_thresholds and hidden_act in NATIVE_ACTIVATIONS:
        hidden_act += _THRESHOLD_SUFFIX  # not in ACT2FN: a plain LlamaForCausalLM cannot run it densely by mistake
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": hidden_act, "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}, "rope_scaling": None,
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings and (not fold or not cfg.is_minicpm),
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "use_cache": True,
        "torch_dtype": dtype, "dtype": dtype,
    }


def _remote_code_fields(cfg: ModelConfig, fmt: str) -> dict[str, Any]:
    """Fields of a remote-code export: our activation, its threshold(s), and ``auto_map`` to the shipped classes."""
    out: dict[str, Any] = {"prosparse_activation": cfg.activation}
    if cfg.activation == "fatrelu":
        out["hidden_act_param"] = cfg.activation_threshold
    if cfg.neuron_thresholds:
        # Folding scales W_down by r, so the neuron output norm |x1_i| * ||W_down_i|| scales by r too.
        r = cfg.residual_scale if fmt == "llama" else 1.0
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
    else:
        out.update(
            architectures=["ProSparseLlamaForCausalLM"],
            model_type="prosparse_llama",
            auto_map={"AutoConfig": "configuration_prosparse.ProSparseConfig",
                      "AutoModelForCausalLM": "modeling_prosparse.ProSparseLlamaForCausalLM"},
        )
    return out


# ---------------------------------------------------------------------------------------------------------------
# config.json -> ModelConfig
# ---------------------------------------------------------------------------------------------------------------
def model_config_from_hf(raw: Mapping[str, Any]) -> ModelConfig:
    """Validated ModelConfig of a HF ``config.json`` dict.

    Raises:
      HFConversionError: an unsupported model type or feature, a missing required field, or values that give no
        valid model; the message names the field.
    """
    _check_supported(raw)
    hidden_act = _hidden_act(raw)
    d_model = int(_get(raw, "hidden_size", required=True))
    n_heads = int(_get(raw, "num_attention_heads", required=True))
    rope_params = raw.get("rope_parameters") or {}
    kw: dict[str, Any] = dict(
        vocab_size=int(_get(raw, "vocab_size", required=True)),
        d_model=d_model,
        n_layers=int(_get(raw, "num_hidden_layers", required=True)),
        n_heads=n_heads,
        n_kv_heads=int(_get(raw, "num_key_value_heads", n_heads)),
        d_ff=int(_get(raw, "intermediate_size", required=True)),
        head_dim=int(_get(raw, "head_dim", 0)),
        activation=HF_ACTIVATIONS[hidden_act],
        activation_threshold=float(_get(raw, "hidden_act_param", 0.0)) if hidden_act == "fatrelu" else 0.0,
        tie_embeddings=bool(_get(raw, "tie_word_embeddings", raw["model_type"] == "minicpm")),
        rope_theta=float(rope_params.get("rope_theta") or _get(raw, "rope_theta", 10000.0)),
        norm_eps=float(_get(raw, "rms_norm_eps", 1e-6)),
        init_std=float(_get(raw, "initializer_range", 0.02)),
        neuron_thresholds=tuple(float(t) for t in (_get(raw, "neuron_thresholds") or ())),
    )
    if raw["model_type"] == "minicpm":
        kw.update(_minicpm_scales(raw))
    try:
        cfg = ModelConfig(**kw)
    except ConfigError as e:
        raise HFConversionError(f"config.json does not give a valid model: {e}") from None
    return _apply_provenance(cfg, raw.get(PROVENANCE_KEY))


def _get(raw: Mapping[str, Any], key: str, default: Any = None, *, required: bool = False) -> Any:
    """``raw[key]``, or ``default`` when it is absent or null (an error naming ``key`` if ``required``)."""
    if key not in raw or raw[key] is None:
        if required:
            raise HFConversionError(f"config.json: required field {key!r} is missing")
        return default
    return raw[key]


def _check_supported(raw: Mapping[str, Any]) -> None:
    """Refuses model types and features we cannot compute exactly (other models, biases, RoPE variants, SWA)."""
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


def _hidden_act(raw: Mapping[str, Any]) -> str:
    """The HF activation name (a key of :data:`HF_ACTIVATIONS`), our ``prosparse_activation`` taking precedence."""
    hidden_act = _get(raw, "prosparse_activation") or _get(raw, "hidden_act", "silu")
    if hidden_act.endswith(_THRESHOLD_SUFFIX):
        hidden_act = hidden_act[: -len(_THRESHOLD_SUFFIX)]
    if hidden_act not in HF_ACTIVATIONS:
        raise HFConversionError(
            f"config.json: hidden_act {hidden_act!r} is not supported; choose one of: {', '.join(HF_ACTIVATIONS)}"
        )
    return hidden_act


def _minicpm_scales(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``scale_emb``, ``scale_depth`` and ``dim_model_base`` of a MiniCPM config, validated."""
    scale_emb = float(_get(raw, "scale_emb", required=True))
    scale_depth = float(_get(raw, "scale_depth", required=True))
    dmb = float(_get(raw, "dim_model_base", required=True))
    if not (scale_emb > 0 and scale_depth > 0 and dmb > 0 and dmb == int(dmb)):
        raise HFConversionError(
            "config.json: MiniCPM needs scale_emb > 0, scale_depth > 0 and an integer dim_model_base > 0, got "
            f"{scale_emb}, {scale_depth}, {dmb}"
        )
    return {"scale_emb": scale_emb, "scale_depth": scale_depth, "dim_model_base": int(dmb)}


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
    same = all(getattr(ours, f) == getattr(cfg, f) for f in _PROVENANCE_CHECKED) and (
        ours.activation != "fatrelu" or ours.activation_threshold == cfg.activation_threshold)
    return ours if same else cfg
