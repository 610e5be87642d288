"""Every config section as a typed, frozen dataclass with its validation.

The experiment files in ``configs/`` are ml_collections ConfigDicts (defaults and a comment on every field in
:func:`prosparse_jax.run_config.base_config`). At the library boundary ``run_config.resolve`` turns one into a
:class:`RunConfig` of :class:`ModelConfig`, :class:`DataConfig`, :class:`OptimConfig`, :class:`TrainConfig` and
:class:`SparsityConfig`, validated once; every violation names its ``section.field`` and the fix, and an unknown
field in any section is an error that lists the valid ones. The modules that consume a section import it from here:
configuration walks one way, ``config -> model / data / optim -> train``. The field checks and the stage-table rules
are in :mod:`prosparse_jax.config_checks`.

MiniCPM vs LLaMA (MiniCPM, arXiv 2404.06395 §4 and its modeling code): a LLaMA model is a MiniCPM model with
``scale_emb = 1``, ``scale_depth = 0`` (residual branches not scaled) and ``dim_model_base = 0`` (logits not divided).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping, Sequence
from typing import Any

from prosparse_jax.config_checks import (
    ConfigError,
    Stages,
    finite,
    int_at_least,
    positive_int,
    require,
    validate_stages,
)
from prosparse_jax.model.activations import ACTIVATIONS
from prosparse_jax.model.attention import NAMES as ATTENTIONS

__all__ = ["ConfigError", "Stages", "validate_stages"]  # re-exported: the rules live in config_checks

DTYPES = ("float32", "bfloat16")
LR_SCHEDULES = ("cosine", "wsd", "constant")
L1_REDUCTIONS = ("sum", "mean")  # sparsity.l1_reduction: 'sum' is ProSparse Eq. 2's literal form (default)


# ---------------------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------------------
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
    # Attention backend (prosparse_jax.model.attention): 'auto' picks by platform when traced (cpu: xla_blocks, gpu: cudnn
    # for bfloat16 else xla, tpu: splash); 'xla_blocks' | 'xla' | 'cudnn' | 'splash' force one. KV-cache decoding
    # always runs xla_blocks.
    attention: str = "auto"
    # Training layout: True keeps the layers stacked under lax.scan (compile time independent of depth); False trains
    # one parameter group per layer, unrolled (no scan buffers: faster for shallow models, compiles grow with depth).
    # Checkpoints are stacked either way.
    scan_layers: bool = True
    # Sparse mode (PPL-p% / CETT): per-layer threshold tau_l on the neuron output norm |x1_i| * ||W_down[i, :]||;
    # neurons below it are zeroed. Empty tuple = dense.
    neuron_thresholds: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.head_dim == 0 and positive_int(self.d_model) and positive_int(self.n_heads) \
                and self.d_model % self.n_heads == 0:
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        _validate_model(self)

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


def _validate_model(c: ModelConfig) -> None:
    for f in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
        require(positive_int(getattr(c, f)), "model", f, f"must be a positive integer, got {getattr(c, f)!r}")
    require(int_at_least(c.head_dim, 0), "model", "head_dim",
             f"must be an integer >= 0 (0 means d_model // n_heads), got {c.head_dim!r}")
    require(c.head_dim > 0, "model", "n_heads",
             f"n_heads={c.n_heads} must divide d_model={c.d_model} (or set model.head_dim explicitly)")
    require(c.n_heads % c.n_kv_heads == 0, "model", "n_kv_heads",
             f"n_kv_heads={c.n_kv_heads} must divide n_heads={c.n_heads}")
    require(c.head_dim % 2 == 0, "model", "head_dim", f"head dimension {c.head_dim} must be even for rotary "
             "embeddings")
    require(c.activation in ACTIVATIONS, "model", "activation",
             f"unknown activation {c.activation!r}; choose one of: {', '.join(ACTIVATIONS)}")
    require(c.dtype in DTYPES, "model", "dtype", f"unknown dtype {c.dtype!r}; choose one of: {', '.join(DTYPES)}")
    require(c.attention in ATTENTIONS, "model", "attention", f"unknown attention implementation {c.attention!r}"
             f"{did_you_mean(str(c.attention), ATTENTIONS)}; choose one of: {', '.join(ATTENTIONS)}")
    require(c.attention != "cudnn" or c.dtype == "bfloat16", "model", "attention",
             "'cudnn' (cuDNN flash attention) has no float32 kernel; set model.dtype='bfloat16', or "
             "model.attention='xla' (or 'auto') for float32")
    require(finite(c.activation_threshold) and c.activation_threshold >= 0, "model", "activation_threshold",
             f"must be a finite number >= 0, got {c.activation_threshold!r}")
    for f in ("norm_eps", "rope_theta", "init_std", "scale_emb"):
        require(finite(getattr(c, f)) and getattr(c, f) > 0, "model", f, f"must be > 0, got {getattr(c, f)!r}")
    for f in ("scale_depth", "dim_model_base"):
        require(finite(getattr(c, f)) and getattr(c, f) >= 0, "model", f,
                 f"must be >= 0 (0 disables it), got {getattr(c, f)!r}")
    for f in ("remat", "scan_layers", "tie_embeddings"):
        require(isinstance(getattr(c, f), bool), "model", f, f"must be true or false, got {getattr(c, f)!r}")
    if c.neuron_thresholds:
        require(len(c.neuron_thresholds) == c.n_layers, "model", "neuron_thresholds",
                 f"needs one value per layer ({c.n_layers}), got {len(c.neuron_thresholds)}")
        require(all(finite(t) and t >= 0 for t in c.neuron_thresholds), "model", "neuron_thresholds",
                 "every threshold must be a finite number >= 0")


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it becomes batches (:mod:`prosparse_jax.data.pipeline`)."""

    source: str = "stdlib"  # 'stdlib' | 'files:<glob>' (** allowed) | 'tfds:<name>' (prepared as array_record)
    data_dir: str = ""  # TFDS data dir; '' -> $PROSPARSE_DATA_DIR or ~/.cache/prosparse_jax/tfds
    text_key: str = "text"  # feature holding the text ('tfds:' sources)
    tokenizer: str = ""  # path to a tokenizer.json; '' -> train a byte-level BPE on the train split, cached
    vocab_size: int = 4096  # vocab size of the trained BPE (>= 257: 256 bytes + EOS)
    seq_len: int = 256  # tokens per packed sequence
    eval_fraction: float = 0.05  # fraction of documents held out for eval: stratified systematic sample
    seed: int = 0  # shuffling seed

    def __post_init__(self) -> None:
        src = self.source
        kind, _, rest = src.partition(":") if isinstance(src, str) else ("", "", "")
        require(src == "stdlib" or (kind in ("files", "tfds") and bool(rest.strip())), "data", "source",
                 f"must be 'stdlib', 'files:<glob>' or 'tfds:<name>', got {src!r}")
        for name in ("data_dir", "text_key", "tokenizer"):
            require(isinstance(getattr(self, name), str), "data", name,
                     f"must be a string, got {getattr(self, name)!r}")
        require(bool(self.text_key), "data", "text_key", "must be a non-empty feature name, got ''")
        require(int_at_least(self.vocab_size, 257), "data", "vocab_size",
                 f"must be an integer >= 257 (256 bytes + EOS), got {self.vocab_size!r}")
        require(positive_int(self.seq_len), "data", "seq_len", f"must be a positive integer, got {self.seq_len!r}")
        ef = self.eval_fraction
        require(finite(ef) and 0.0 <= ef < 1.0, "data", "eval_fraction", f"must be a number in [0, 1), got {ef!r}")
        require(int_at_least(self.seed, 0) and self.seed < 2**32, "data", "seed",
                 f"must be an integer in [0, 2**32), got {self.seed!r}")
        object.__setattr__(self, "eval_fraction", float(ef))


# ---------------------------------------------------------------------------------------------------------------
# optim
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer hyper-parameters (:mod:`prosparse_jax.training.optim`)."""

    lr: float = 1e-3  # peak learning rate
    schedule: str = "cosine"  # 'cosine' | 'wsd' | 'constant'
    warmup_steps: int = 100  # linear warmup 0 -> lr over this many updates
    decay_fraction: float = 0.1  # wsd: fraction of total steps spent decaying
    min_lr_ratio: float = 0.1  # final LR / peak (cosine, wsd)
    b1: float = 0.9  # Adam first-moment decay
    b2: float = 0.95  # Adam second-moment decay
    eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.1  # decoupled (AdamW); not applied to norms and embeddings
    clip_norm: float = 1.0  # global-norm gradient clipping; 0 disables
    mup: bool = False  # MiniCPM µP: LR of matrices (not embeddings, not norms) x mup_base_dim / d_model
    mup_base_dim: int = 256  # µP base width (MiniCPM dim_model_base)

    def __post_init__(self) -> None:
        for f in ("lr", "decay_fraction", "min_lr_ratio", "b1", "b2", "eps", "weight_decay", "clip_norm"):
            require(finite(getattr(self, f)), "optim", f, f"must be a finite number, got {getattr(self, f)!r}")
        require(self.lr > 0, "optim", "lr", f"must be > 0, got {self.lr}")
        require(self.schedule in LR_SCHEDULES, "optim", "schedule",
                 f"unknown schedule {self.schedule!r}; choose one of: {', '.join(LR_SCHEDULES)}")
        require(int_at_least(self.warmup_steps, 0), "optim", "warmup_steps",
                 f"must be an integer >= 0, got {self.warmup_steps!r}")
        require(0 <= self.decay_fraction <= 1, "optim", "decay_fraction", f"must be in [0, 1], got "
                 f"{self.decay_fraction}")
        require(0 <= self.min_lr_ratio <= 1, "optim", "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        require(self.schedule != "wsd" or self.min_lr_ratio > 0, "optim", "min_lr_ratio",
                 "the wsd decay is exponential and needs a ratio > 0 (e.g. 0.01), got 0")
        for f in ("b1", "b2"):
            require(0 <= getattr(self, f) < 1, "optim", f, f"must be in [0, 1), got {getattr(self, f)}")
        require(self.eps > 0, "optim", "eps", f"must be > 0, got {self.eps}")
        require(self.weight_decay >= 0, "optim", "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.clip_norm >= 0, "optim", "clip_norm", f"must be >= 0 (0 disables clipping), got "
                 f"{self.clip_norm}")
        require(isinstance(self.mup, bool), "optim", "mup", f"must be true or false, got {self.mup!r}")
        require(positive_int(self.mup_base_dim), "optim", "mup_base_dim",
                 f"must be a positive integer, got {self.mup_base_dim!r}")

    def replace(self, **kw: Any) -> OptimConfig:
        return dataclasses.replace(self, **kw)


# ---------------------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Steps, batch semantics, logging, checkpoints and mesh (:mod:`prosparse_jax.training.train`)."""

    steps: int = 1000
    batch_size: int = 8  # GLOBAL sequences per optimizer step (all devices, hosts and micro-steps)
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    keep_period: int = 0
    async_checkpoint: bool = True
    progress_bar: bool = True
    mesh_data: int = -1
    mesh_fsdp: int = 1

    def __post_init__(self) -> None:
        for f in ("steps", "batch_size", "grad_accum", "log_every", "eval_batches", "checkpoint_every",
                  "keep_checkpoints", "mesh_fsdp"):
            require(positive_int(getattr(self, f)), "train", f,
                     f"must be a positive integer, got {getattr(self, f)!r}")
        for f in ("seed", "eval_every", "keep_period"):
            require(int_at_least(getattr(self, f), 0), "train", f,
                     f"must be an integer >= 0 (0 = off), got {getattr(self, f)!r}")
        require(isinstance(self.mesh_data, int) and (self.mesh_data == -1 or self.mesh_data > 0), "train",
                 "mesh_data", f"must be a positive integer or -1 (all devices), got {self.mesh_data!r}")
        for f in ("async_checkpoint", "progress_bar"):
            require(isinstance(getattr(self, f), bool), "train", f, f"must be true or false, got "
                     f"{getattr(self, f)!r}")
        require(self.batch_size % self.grad_accum == 0, "train", "batch_size",
                 f"{self.batch_size} must be divisible by train.grad_accum={self.grad_accum}")


# ---------------------------------------------------------------------------------------------------------------
# sparsity
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SparsityConfig:
    """The ProSparse regularisation: stage table of lambda (``reg_factor``), L1 form, final FATReLU threshold."""

    stages: tuple[tuple[float, int], ...] = ((0.0, 1000),)
    final_threshold: float = 0.0
    l1_reduction: str = "sum"

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(validate_stages(self.stages)))
        require(self.l1_reduction in L1_REDUCTIONS, "sparsity", "l1_reduction",
                 f"{self.l1_reduction!r}; choose one of: {', '.join(L1_REDUCTIONS)}")
        require(finite(self.final_threshold) and self.final_threshold >= 0, "sparsity", "final_threshold",
                 f"must be a finite value >= 0, got {self.final_threshold!r}")


# ---------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig
    sparsity: SparsityConfig
    init_from: str = ""


def section_items(cls: type, section: str, d: Any) -> dict[str, Any]:
    """The fields of config section ``section`` (a ConfigDict or dict) for dataclass ``cls``, as a plain dict.

    Raises:
        ConfigError: naming the section's unknown field(s) and the valid ones.
    """
    items = dict(d.to_dict() if hasattr(d, "to_dict") else d)
    valid = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(items) - set(valid))
    if unknown:
        raise ConfigError(f"{section}: unknown field(s) {unknown}{did_you_mean(unknown[0], valid)}; valid fields: "
                          f"{valid}")
    return items


def did_you_mean(name: str, valid: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` with the valid name nearest to ``name`` (difflib), or '' when none is close."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def build_section(cls: type, section: str, d: Mapping[str, Any] | Any) -> Any:
    """A validated section dataclass from a ConfigDict / dict (unknown or missing fields are errors naming them)."""
    items = section_items(cls, section, d)
    if cls is ModelConfig and "neuron_thresholds" in items:
        items["neuron_thresholds"] = tuple(float(t) for t in (items["neuron_thresholds"] or ()))
    try:
        return cls(**items)
    except TypeError as e:  # a missing required field
        raise ConfigError(f"{section}: {e}") from None


def model_config_from_dict(d: Any) -> ModelConfig:
    """Builds a validated ModelConfig from a ConfigDict / dict; unknown keys are an error naming them."""
    return build_section(ModelConfig, "model", d)


def to_dict(section: Any) -> dict[str, Any]:
    """A section dataclass as a JSON-serialisable dict (tuples as lists); inverse of :func:`build_section`."""
    return {k: [list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(section).items()}


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig,
            "sparsity": SparsityConfig}

