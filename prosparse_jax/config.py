"""Typed, validated model configuration built from an ml_collections ConfigDict.

The experiment files in ``configs/`` are flat ConfigDicts with a comment on every field. At the library boundary
they become the frozen dataclass :class:`ModelConfig`, validated once; every violation names the field.

MiniCPM vs LLaMA (MiniCPM, arXiv 2404.06395 §4 and its modeling code): a LLaMA model is a MiniCPM model with
``scale_emb = 1``, ``scale_depth = 0`` (residual branches not scaled) and ``dim_model_base = 0`` (logits not divided).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from prosparse_jax.activations import ACTIVATIONS

DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only LLaMA / MiniCPM transformer with a gated FFN."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    head_dim: int = 0  # per-head width; 0 -> d_model // n_heads, resolved at construction (never 0 afterwards)
    activation: str = "silu"
    activation_threshold: float = 0.0  # FATReLU threshold t (z >= t kept)
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    scale_emb: float = 1.0  # MiniCPM: embeddings multiplied by this
    scale_depth: float = 0.0  # MiniCPM: residual branches scaled by scale_depth / sqrt(n_layers); 0 disables
    dim_model_base: int = 0  # MiniCPM: logits computed from h / (d_model / dim_model_base); 0 disables
    init_std: float = 0.02  # std of the matrix init (MiniCPM µP: 0.1 / sqrt(d_model / 256))
    dtype: str = "float32"  # compute dtype; parameters are always stored in float32
    remat: bool = False  # rematerialise each layer in the backward pass
    # Training layout: True keeps the layers stacked under lax.scan (compile time independent of depth); False trains
    # one parameter group per layer, unrolled (no scan buffers: faster for shallow models, compiles grow with depth).
    # Checkpoints are stacked either way.
    scan_layers: bool = True
    # Sparse mode (PPL-p% / CETT): per-layer threshold tau_l on the neuron output norm |x1_i| * ||W_down[i, :]||;
    # neurons below it are zeroed. Empty tuple = dense.
    neuron_thresholds: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.head_dim == 0 and _positive_int(self.d_model) and _positive_int(self.n_heads) \
                and self.d_model % self.n_heads == 0:
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        _validate(self)

    # ---- derived quantities -------------------------------------------------------------------------------

    @property
    def residual_scale(self) -> float:
        """Multiplier of each residual branch (MiniCPM scale_depth / sqrt(L); 1 for LLaMA)."""
        return self.scale_depth / math.sqrt(self.n_layers) if self.scale_depth else 1.0

    @property
    def logits_divisor(self) -> float:
        """MiniCPM divides the final hidden state by d_model / dim_model_base before the head; 1 for LLaMA."""
        return self.d_model / self.dim_model_base if self.dim_model_base else 1.0

    @property
    def is_minicpm(self) -> bool:
        return self.scale_emb != 1.0 or bool(self.scale_depth) or bool(self.dim_model_base)

    def params_per_layer(self) -> int:
        attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.d_model * self.d_ff
        return attn + ffn + 2 * self.d_model

    @property
    def params_embedding(self) -> int:
        """Input embedding plus the untied output head (both are vocab x d_model)."""
        return self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)

    @property
    def params_non_embedding(self) -> int:
        return self.n_layers * self.params_per_layer() + self.d_model

    @property
    def params_total(self) -> int:
        return self.params_non_embedding + self.params_embedding

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * N_matmul + causal attention term.

        N_matmul counts every weight used in a matmul: the non-embedding matrices and the output head
        (d_model * vocab, tied or not); the embedding lookup and norms cost no matmul FLOPs. The attention scores
        and the weighted sum cost 2 * 2 * n_heads * head_dim FLOPs per attended position in the forward pass; with a
        causal mask a token attends on average to (seq_len + 1) / 2 positions, and training is 3x the forward pass:
        6 * n_layers * n_heads * head_dim * (seq_len + 1) / 2 * 2 = 6 * L * N * H * (T + 1).
        """
        n_matmul = self.n_layers * (self.params_per_layer() - 2 * self.d_model) + self.d_model * self.vocab_size
        attn = 6 * self.n_layers * self.n_heads * self.head_dim * (seq_len + 1)
        return 6.0 * n_matmul + attn

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _validate(c: ModelConfig) -> None:
    def bad(field: str, msg: str) -> None:
        raise ConfigError(f"model.{field}: {msg}")

    for f in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
        v = getattr(c, f)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            bad(f, f"must be a positive integer, got {v!r}")
    if c.head_dim < 0:
        bad("head_dim", f"must be >= 0 (0 means d_model // n_heads), got {c.head_dim}")
    if not c.head_dim and c.d_model % c.n_heads:
        bad("n_heads", f"n_heads={c.n_heads} must divide d_model={c.d_model} (or set model.head_dim explicitly)")
    if c.n_heads % c.n_kv_heads:
        bad("n_kv_heads", f"n_kv_heads={c.n_kv_heads} must divide n_heads={c.n_heads}")
    if c.head_dim % 2:
        bad("head_dim", f"head dimension {c.head_dim} must be even for rotary embeddings")
    if c.activation not in ACTIVATIONS:
        bad("activation", f"unknown activation {c.activation!r}; choose one of: {', '.join(ACTIVATIONS)}")
    if not c.activation_threshold >= 0:
        bad("activation_threshold", f"must be >= 0, got {c.activation_threshold}")
    if c.dtype not in DTYPES:
        bad("dtype", f"unknown dtype {c.dtype!r}; choose one of: {', '.join(DTYPES)}")
    if not c.norm_eps > 0:
        bad("norm_eps", f"must be > 0, got {c.norm_eps}")
    if not c.rope_theta > 0:
        bad("rope_theta", f"must be > 0, got {c.rope_theta}")
    if not c.init_std > 0:
        bad("init_std", f"must be > 0, got {c.init_std}")
    if c.scale_depth < 0 or c.dim_model_base < 0 or not c.scale_emb > 0:
        bad("scale_*", "scale_emb must be > 0; scale_depth and dim_model_base must be >= 0 (0 disables them)")
    for f in ("remat", "scan_layers", "tie_embeddings"):
        if not isinstance(getattr(c, f), bool):
            bad(f, f"must be true or false, got {getattr(c, f)!r}")
    if c.neuron_thresholds:
        if len(c.neuron_thresholds) != c.n_layers:
            bad("neuron_thresholds", f"needs one value per layer ({c.n_layers}), got {len(c.neuron_thresholds)}")
        if any(not t >= 0 for t in c.neuron_thresholds):
            bad("neuron_thresholds", "every threshold must be >= 0")


def section_items(cls: type, section: str, d: Any) -> dict[str, Any]:
    """The fields of config section ``section`` (a ConfigDict or dict) for dataclass ``cls``, as a plain dict.

    Raises:
        ConfigError: naming the section's unknown field(s) and the valid ones.
    """
    items = dict(d.to_dict() if hasattr(d, "to_dict") else d)
    valid = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(items) - set(valid))
    if unknown:
        raise ConfigError(f"{section}: unknown field(s) {unknown}; valid fields: {valid}")
    return items


def model_config_from_dict(d: Any) -> ModelConfig:
    """Builds a validated ModelConfig from a ConfigDict / dict; unknown keys are an error naming them."""
    items = section_items(ModelConfig, "model", d)
    if "neuron_thresholds" in items:
        items["neuron_thresholds"] = tuple(float(t) for t in (items["neuron_thresholds"] or ()))
    try:
        return ModelConfig(**items)
    except TypeError as e:  # missing required field
        raise ConfigError(f"model: {e}") from None


def model_config_to_dict(c: ModelConfig) -> dict[str, Any]:
    d = dataclasses.asdict(c)
    d["neuron_thresholds"] = list(c.neuron_thresholds)
    return d
