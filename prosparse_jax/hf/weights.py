"""Maps a HuggingFace LLaMA state dict (``LlamaForCausalLM`` names, [out, in] matrices) to our params pytree and back.

Matrices are transposed and heads split out (q_proj [N*H, D] -> ``wq_LxDxNxH``); transformers' RoPE is half-split like
ours, so q / k need no permutation. The exporter can fold MiniCPM's scales (arXiv:2404.06395) into the weights; the
importer checks every tensor name and shape against the config.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from prosparse_jax.config import ModelConfig
from prosparse_jax.errors import HFConversionError
from prosparse_jax.model.transformer import Params, fold_minicpm_scales

# HF tensors an importer may find besides the architecture's (a tied checkpoint's head, old RoPE buffers).
_IGNORABLE = re.compile(r"(^lm_head\.weight$)|(rotary_emb\.inv_freq$)")


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


# ---------------------------------------------------------------------------------------------------------------
# ours -> HF
# ---------------------------------------------------------------------------------------------------------------
def to_hf_state_dict(cfg: ModelConfig, params: Params, *, fold: bool) -> dict[str, np.ndarray]:
    """HF state dict (contiguous float32 numpy, HF order) of our stacked params.

    ``fold`` folds MiniCPM's scales into the weights (``transformer.fold_minicpm_scales``; a no-op for a LLaMA
    config) and unties the head.
    """
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    if fold and cfg.is_minicpm:
        params, cfg = fold_minicpm_scales(params, cfg)
    D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    lp = params["layers"]
    out: dict[str, np.ndarray] = {"model.embed_tokens.weight": params["embed_VxD"]}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": lp["attn_norm_LxD"][i],
            p + "self_attn.q_proj.weight": lp["wq_LxDxNxH"][i].reshape(D, N * H).T,
            p + "self_attn.k_proj.weight": lp["wk_LxDxKxH"][i].reshape(D, K * H).T,
            p + "self_attn.v_proj.weight": lp["wv_LxDxKxH"][i].reshape(D, K * H).T,
            p + "self_attn.o_proj.weight": lp["wo_LxNxHxD"][i].reshape(N * H, D).T,
            p + "post_attention_layernorm.weight": lp["ffn_norm_LxD"][i],
            p + "mlp.gate_proj.weight": lp["w_gate_LxDxF"][i].T,
            p + "mlp.up_proj.weight": lp["w_up_LxDxF"][i].T,
            p + "mlp.down_proj.weight": lp["w_down_LxFxD"][i].T,
        })
    out["model.norm.weight"] = params["final_norm_D"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = params["lm_head_DxV"].T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------------------
# HF -> ours
# ---------------------------------------------------------------------------------------------------------------
def from_hf_state_dict(cfg: ModelConfig, tensors: Mapping[str, Any]) -> Params:
    """Our float32 params from HF tensors (a mapping name -> array-like); checks names and shapes.

    ``tensors`` is read one tensor at a time (it may be lazy).

    Raises:
      HFConversionError: a tensor is missing, has the wrong shape, or is not part of the architecture.
    """
    expected = hf_weight_shapes(cfg)
    _check_names(set(tensors), expected)

    def get(name: str) -> np.ndarray:
        w = np.asarray(tensors[name])
        if tuple(w.shape) != expected[name]:
            raise HFConversionError(
                f"weight {name!r} has shape {tuple(w.shape)} but the config implies {expected[name]}"
            )
        return w.astype(np.float32)

    D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def stack(suffix: str, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        return np.stack([fn(get(f"model.layers.{i}.{suffix}")) for i in range(cfg.n_layers)])

    params: Params = {
        "embed_VxD": get("model.embed_tokens.weight"),
        "layers": {
            "attn_norm_LxD": stack("input_layernorm.weight", lambda w_D: w_D),
            "wq_LxDxNxH": stack("self_attn.q_proj.weight", lambda w_NHxD: w_NHxD.T.reshape(D, N, H)),
            "wk_LxDxKxH": stack("self_attn.k_proj.weight", lambda w_KHxD: w_KHxD.T.reshape(D, K, H)),
            "wv_LxDxKxH": stack("self_attn.v_proj.weight", lambda w_KHxD: w_KHxD.T.reshape(D, K, H)),
            "wo_LxNxHxD": stack("self_attn.o_proj.weight", lambda w_DxNH: w_DxNH.T.reshape(N, H, D)),
            "ffn_norm_LxD": stack("post_attention_layernorm.weight", lambda w_D: w_D),
            "w_gate_LxDxF": stack("mlp.gate_proj.weight", lambda w_FxD: w_FxD.T),
            "w_up_LxDxF": stack("mlp.up_proj.weight", lambda w_FxD: w_FxD.T),
            "w_down_LxFxD": stack("mlp.down_proj.weight", lambda w_DxF: w_DxF.T),
        },
        "final_norm_D": get("model.norm.weight"),
    }
    if not cfg.tie_embeddings:
        params["lm_head_DxV"] = np.ascontiguousarray(get("lm_head.weight").T)
    return params


def _check_names(names: set[str], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Refuses a checkpoint that lacks a tensor of the architecture or has one it cannot place."""
    missing = [k for k in expected if k not in names]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise HFConversionError(f"weight {missing[0]!r} is missing from the checkpoint{more}")
    unexpected = sorted(k for k in names - set(expected) if not _IGNORABLE.search(k))
    if unexpected:
        raise HFConversionError(
            f"unexpected weight {unexpected[0]!r} (not part of a bias-free LLaMA with this config; "
            f"{len(unexpected)} unexpected in total)"
        )
