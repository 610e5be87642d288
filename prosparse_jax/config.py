"""The run's configuration: one typed, frozen dataclass per section, each validated where it is built.

The dataclasses hold every field, its default and its comment. :func:`base_config` gives the ConfigDict that
``configs/*.py`` and ``--config.<section>.<field>`` overrides act on; :func:`resolve` turns it back into a validated
:class:`RunConfig`. A LLaMA model is a MiniCPM one (arXiv 2404.06395 §4) with ``scale_emb = 1``, ``scale_depth = 0``
and ``dim_model_base = 0``.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections

from prosparse_jax.errors import ConfigError, did_you_mean
from prosparse_jax.model.activations import ACTIVATIONS
from prosparse_jax.model.attention import NAMES as ATTENTIONS

Stages = list[tuple[float, int]]

DTYPES = ("float32", "bfloat16")
LR_SCHEDULES = ("cosine", "wsd", "constant")
L1_REDUCTIONS = ("sum", "mean", "blockffn")  # units of lambda (docs/training.md, "The λ unit")


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _int_at_least(v: Any, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _require(ok: bool, section: str, field: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{section}.{field}: {msg}")


def _require_choice(value: Any, choices: Iterable[str], section: str, field: str, what: str) -> None:
    choices = list(choices)
    _require(value in choices, section, field,
             f"unknown {what} {value!r}{did_you_mean(str(value), choices)}; choose one of: {', '.join(choices)}")


# ---------------------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only LLaMA / MiniCPM transformer with a gated FFN."""

    vocab_size: int = 4096  # tokens in the vocabulary (= data.vocab_size when the BPE is trained by us)
    d_model: int = 256  # residual stream width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # query heads
    n_kv_heads: int = 4  # key/value heads (GQA when < n_heads; must divide n_heads)
    d_ff: int = 704  # FFN hidden width (neurons per layer)
    head_dim: int = 0  # per-head width; 0 -> d_model // n_heads, resolved at construction (never 0 afterwards)
    activation: str = "silu"  # FFN activation, a key of model.activations.ACTIVATIONS
    activation_threshold: float = 0.0  # FATReLU threshold t (gate z >= t kept); read by 'fatrelu' only
    tie_embeddings: bool = False  # share the input embedding with the output head
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    scale_emb: float = 1.0  # MiniCPM: embeddings multiplied by this (12); LLaMA: 1
    scale_depth: float = 0.0  # MiniCPM: residual branches x scale_depth / sqrt(n_layers) (1.4); 0 disables
    dim_model_base: int = 0  # MiniCPM: logits from h / (d_model / dim_model_base) (256); 0 disables
    init_std: float = 0.02  # std of the matrix init (MiniCPM µP: 0.1 / sqrt(d_model / 256))
    dtype: str = "float32"  # compute dtype: float32 | bfloat16; parameters are always stored in float32
    remat: bool = False  # rematerialise each layer in the backward pass (less memory, ~1/3 more compute)
    attention: str = "auto"  # 'auto' (picked by platform; docs/model.md) | 'xla_blocks' | 'xla' | 'cudnn' | 'splash'
    # True: layers stacked under lax.scan (compile time flat in depth); False: unrolled per-layer groups (faster for
    # shallow models). Checkpoints are stacked either way.
    scan_layers: bool = True
    # Sparse mode (`analyze --metric=cett|pplp`): neuron i of layer l is zeroed iff |x1_i| * ||W_down[i]|| <= tau_l;
    # () = dense.
    neuron_thresholds: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.head_dim == 0 and _positive_int(self.d_model) and _positive_int(self.n_heads) \
                and self.d_model % self.n_heads == 0:
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        _validate_model(self)

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
        """Training FLOPs per token: 6 * N_matmul + 6 * L * n_heads * head_dim * (T + 1).

        N_matmul counts the non-embedding matrices and the output head (tied or not). Attention: scores and weighted sum
        cost 4 * n_heads * head_dim per attended position forward, a causal token attends to (T + 1) / 2 positions on
        average, and training is 3x the forward pass.
        """
        n_matmul = self.n_layers * (self.params_per_layer() - 2 * self.d_model) + self.d_model * self.vocab_size
        attn = 6 * self.n_layers * self.n_heads * self.head_dim * (seq_len + 1)
        return 6.0 * n_matmul + attn

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)


def _validate_model(c: ModelConfig) -> None:
    for f in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
        _require(_positive_int(getattr(c, f)), "model", f, f"must be a positive integer, got {getattr(c, f)!r}")
    _require(_int_at_least(c.head_dim, 0), "model", "head_dim",
             f"must be an integer >= 0 (0 means d_model // n_heads), got {c.head_dim!r}")
    _require(c.head_dim > 0, "model", "n_heads",
             f"n_heads={c.n_heads} must divide d_model={c.d_model} (or set model.head_dim explicitly)")
    _require(c.n_heads % c.n_kv_heads == 0, "model", "n_kv_heads",
             f"n_kv_heads={c.n_kv_heads} must divide n_heads={c.n_heads}")
    _require(c.head_dim % 2 == 0, "model", "head_dim", f"head dimension {c.head_dim} must be even for rotary "
             "embeddings")
    _require_choice(c.activation, ACTIVATIONS, "model", "activation", "activation")
    _require_choice(c.dtype, DTYPES, "model", "dtype", "dtype")
    _require_choice(c.attention, ATTENTIONS, "model", "attention", "attention implementation")
    _require(c.attention != "cudnn" or c.dtype == "bfloat16", "model", "attention",
             "'cudnn' (cuDNN flash attention) has no float32 kernel; set model.dtype='bfloat16', or "
             "model.attention='xla' (or 'auto') for float32")
    _require(_finite(c.activation_threshold) and c.activation_threshold >= 0, "model", "activation_threshold",
             f"must be a finite number >= 0, got {c.activation_threshold!r}")
    for f in ("norm_eps", "rope_theta", "init_std", "scale_emb"):
        _require(_finite(getattr(c, f)) and getattr(c, f) > 0, "model", f, f"must be > 0, got {getattr(c, f)!r}")
    for f in ("scale_depth", "dim_model_base"):
        _require(_finite(getattr(c, f)) and getattr(c, f) >= 0, "model", f,
                 f"must be >= 0 (0 disables it), got {getattr(c, f)!r}")
    for f in ("remat", "scan_layers", "tie_embeddings"):
        _require(isinstance(getattr(c, f), bool), "model", f, f"must be true or false, got {getattr(c, f)!r}")
    if c.neuron_thresholds:
        _require(len(c.neuron_thresholds) == c.n_layers, "model", "neuron_thresholds",
                 f"needs one value per layer ({c.n_layers}), got {len(c.neuron_thresholds)}")
        _require(all(_finite(t) and t >= 0 for t in c.neuron_thresholds), "model", "neuron_thresholds",
                 "every threshold must be a finite number >= 0")


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it becomes batches (:mod:`prosparse_jax.data.pipeline`)."""

    source: str = "stdlib"  # 'stdlib' (this interpreter's stdlib sources) | 'files:<glob>' | 'tfds:<name>'
    data_dir: str = ""  # TFDS data dir; '' -> $PROSPARSE_DATA_DIR or ~/.cache/prosparse_jax/tfds
    text_key: str = "text"  # feature holding the text ('tfds:' sources)
    tokenizer: str = ""  # path to a tokenizer.json; '' -> train a byte-level BPE on the train split (cached)
    vocab_size: int = 4096  # vocab size of the trained BPE (>= 257: 256 bytes + EOS; keep = model.vocab_size)
    seq_len: int = 256  # tokens per packed sequence
    eval_fraction: float = 0.05  # documents held out for eval: a sample stratified by package and size
    seed: int = 0  # data order seed

    def __post_init__(self) -> None:
        src = self.source
        kind, _, rest = src.partition(":") if isinstance(src, str) else ("", "", "")
        _require(src == "stdlib" or (kind in ("files", "tfds") and bool(rest.strip())), "data", "source",
                 f"must be 'stdlib', 'files:<glob>' or 'tfds:<name>', got {src!r}")
        for name in ("data_dir", "text_key", "tokenizer"):
            _require(isinstance(getattr(self, name), str), "data", name,
                     f"must be a string, got {getattr(self, name)!r}")
        _require(bool(self.text_key), "data", "text_key", "must be a non-empty feature name, got ''")
        _require(_int_at_least(self.vocab_size, 257), "data", "vocab_size",
                 f"must be an integer >= 257 (256 bytes + EOS), got {self.vocab_size!r}")
        _require(_positive_int(self.seq_len), "data", "seq_len", f"must be a positive integer, got {self.seq_len!r}")
        ef = self.eval_fraction
        _require(_finite(ef) and 0.0 <= ef < 1.0, "data", "eval_fraction", f"must be a number in [0, 1), got {ef!r}")
        _require(_int_at_least(self.seed, 0) and self.seed < 2**32, "data", "seed",
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
    decay_fraction: float = 0.1  # wsd: fraction of the run spent in the final decay
    min_lr_ratio: float = 0.1  # final LR / peak LR (cosine, wsd)
    b1: float = 0.9  # Adam first-moment decay
    b2: float = 0.95  # Adam second-moment decay
    eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.1  # decoupled (AdamW); not applied to norms and embeddings
    clip_norm: float = 1.0  # global-norm gradient clipping; 0 disables
    mup: bool = False  # MiniCPM µP: LR of matrices (not embeddings, not norms) x mup_base_dim / d_model
    mup_base_dim: int = 256  # µP base width (MiniCPM dim_model_base)

    def __post_init__(self) -> None:
        for f in ("lr", "decay_fraction", "min_lr_ratio", "b1", "b2", "eps", "weight_decay", "clip_norm"):
            _require(_finite(getattr(self, f)), "optim", f, f"must be a finite number, got {getattr(self, f)!r}")
        _require(self.lr > 0, "optim", "lr", f"must be > 0, got {self.lr}")
        _require_choice(self.schedule, LR_SCHEDULES, "optim", "schedule", "schedule")
        _require(_int_at_least(self.warmup_steps, 0), "optim", "warmup_steps",
                 f"must be an integer >= 0, got {self.warmup_steps!r}")
        _require(0 <= self.decay_fraction <= 1, "optim", "decay_fraction", f"must be in [0, 1], got "
                 f"{self.decay_fraction}")
        _require(0 <= self.min_lr_ratio <= 1, "optim", "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _require(self.schedule != "wsd" or self.min_lr_ratio > 0, "optim", "min_lr_ratio",
                 "the wsd decay is exponential and needs a ratio > 0 (e.g. 0.01), got 0")
        for f in ("b1", "b2"):
            _require(0 <= getattr(self, f) < 1, "optim", f, f"must be in [0, 1), got {getattr(self, f)}")
        _require(self.eps > 0, "optim", "eps", f"must be > 0, got {self.eps}")
        _require(self.weight_decay >= 0, "optim", "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.clip_norm >= 0, "optim", "clip_norm", f"must be >= 0 (0 disables clipping), got "
                 f"{self.clip_norm}")
        _require(isinstance(self.mup, bool), "optim", "mup", f"must be true or false, got {self.mup!r}")
        _require(_positive_int(self.mup_base_dim), "optim", "mup_base_dim",
                 f"must be a positive integer, got {self.mup_base_dim!r}")

    def replace(self, **kw: Any) -> OptimConfig:
        return dataclasses.replace(self, **kw)


def wsd_decay_steps(total_steps: int, decay_fraction: float) -> int:
    """Length of the wsd schedule's final decay: the last ``round(decay_fraction * total_steps)`` updates."""
    return round(decay_fraction * total_steps)


# ---------------------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Steps, batch, logging, checkpoints and mesh; batch semantics: docs/training.md."""

    steps: int = 1000  # optimizer steps (the sparsity stage table is rescaled to this if it ends elsewhere)
    batch_size: int = 8  # GLOBAL sequences per optimizer step (all devices, hosts and micro-steps)
    grad_accum: int = 1  # micro-steps per optimizer step (gradient accumulation)
    seed: int = 0  # parameter init seed
    log_every: int = 10  # steps between metrics.jsonl / TensorBoard entries
    eval_every: int = 200  # steps between held-out evaluations (and one at the end); 0 = only at the end
    eval_batches: int = 8  # held-out batches per evaluation
    checkpoint_every: int = 200  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3  # checkpoints kept on disk
    keep_period: int = 0  # checkpoints at multiples of this are never deleted (0 = off); law runs: checkpoint_every
    async_checkpoint: bool = True  # write checkpoints in the background
    progress_bar: bool = True  # tqdm progress bar on stderr
    mesh_data: int = -1  # data-parallel mesh axis size (-1 = all devices / mesh_fsdp)
    mesh_fsdp: int = 1  # FSDP axis size (parameters sharded over it)

    def __post_init__(self) -> None:
        for f in ("steps", "batch_size", "grad_accum", "log_every", "eval_batches", "checkpoint_every",
                  "keep_checkpoints", "mesh_fsdp"):
            _require(_positive_int(getattr(self, f)), "train", f,
                     f"must be a positive integer, got {getattr(self, f)!r}")
        for f in ("seed", "eval_every", "keep_period"):
            _require(_int_at_least(getattr(self, f), 0), "train", f,
                     f"must be an integer >= 0 (0 = off), got {getattr(self, f)!r}")
        _require(isinstance(self.mesh_data, int) and (self.mesh_data == -1 or self.mesh_data > 0), "train",
                 "mesh_data", f"must be a positive integer or -1 (all devices), got {self.mesh_data!r}")
        for f in ("async_checkpoint", "progress_bar"):
            _require(isinstance(getattr(self, f), bool), "train", f, f"must be true or false, got "
                     f"{getattr(self, f)!r}")
        _require(self.batch_size % self.grad_accum == 0, "train", "batch_size",
                 f"{self.batch_size} must be divisible by train.grad_accum={self.grad_accum}")


# ---------------------------------------------------------------------------------------------------------------
# sparsity
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SparsityConfig:
    """The ProSparse regularisation (arXiv 2402.13516 §3.2): stage table of lambda, L1 form, FATReLU threshold."""

    # ((lambda_i, T_i), ...), T_i cumulative optimizer steps: stage 0 and 1 (warm-up) constant, later stages
    # sine-interpolated (docs/training.md).
    stages: tuple[tuple[float, int], ...] = ((0.0, 1000),)
    # L1 term of a layer, i.e. the unit of lambda (ProSparse Eq. 2 leaves how tokens combine unstated): 'sum' =
    # ||x1||_1 per token (a sum over d_ff), averaged over valid tokens | 'mean' = 'sum' / d_ff | 'blockffn' = 'sum' x
    # 1e-8 x valid tokens of the micro-batch (1e-8 x the token sum, as thunlp/BlockFFN; micro-batches averaged).
    l1_reduction: str = "sum"
    final_threshold: float = 0.0  # FATReLU threshold t of the evaluation after training; 0 = no shifting

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(validate_stages(self.stages)))
        _require_choice(self.l1_reduction, L1_REDUCTIONS, "sparsity", "l1_reduction", "L1 reduction")
        _require(_finite(self.final_threshold) and self.final_threshold >= 0, "sparsity", "final_threshold",
                 f"must be a finite value >= 0, got {self.final_threshold!r}")


def _as_int(v: Any) -> int | None:
    """``v`` as an int if it is an integer or an integral float (5e3 from a config file), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, float):
        return int(v) if v.is_integer() else None
    try:
        return operator.index(v)
    except TypeError:
        return None


def validate_stages(stages: Sequence[Sequence[float]]) -> Stages:
    """Checks a stage table ``[(lambda_i, T_i), ...]`` (T_i cumulative updates) and returns it normalised.

    Raises:
        ConfigError: naming ``sparsity.stages`` when the table is empty, a pair is malformed, a factor is negative
            or not finite, or a step is not an integer (10.5 is an error, 5e3 is 5000) or not strictly increasing.
    """
    def bad(msg: str) -> ConfigError:
        return ConfigError(f"sparsity.stages: {msg}")

    try:
        items = [stages] if isinstance(stages, str) else list(stages)
        text = next((s for s in items if isinstance(s, str)), None)
        if text is not None:  # an override ml_collections could not read as a literal table: never evaluated
            raise bad(f"{text!r} is a string, not a table of numbers; give (lambda, steps) pairs, e.g. "
                      "[[0, 100], [5e-5, 200]]")
        pairs = [tuple(s) for s in items]
    except TypeError:
        raise bad(f"must be a list of (lambda, steps) pairs, got {stages!r}") from None
    if not pairs:
        raise bad("needs at least one (lambda, steps) stage, got an empty list")
    out: Stages = []
    for i, pair in enumerate(pairs):
        if len(pair) != 2:
            raise bad(f"stage {i} must be a (lambda, steps) pair, got {pair!r}")
        reg, steps = pair
        if not _finite(reg) or reg < 0:
            raise bad(f"stage {i}: lambda must be a number, finite and >= 0, got {reg!r}")
        steps_i = _as_int(steps)
        if steps_i is None or steps_i <= 0:
            raise bad(f"stage {i}: steps must be a positive integer (cumulative update count), got {steps!r}")
        if out and steps_i <= out[-1][1]:
            raise bad(f"steps must be strictly increasing (they are cumulative), but stage {i} ends at {steps_i} "
                      f"<= stage {i - 1} end {out[-1][1]}")
        out.append((float(reg), steps_i))
    return out


def scale_stages(stages: Sequence[Sequence[float]], total_steps: int, *, merge: bool = False) -> Stages:
    """Rescales the cumulative steps to end at ``total_steps``: ``T_i' = round(T_i * total_steps / T_last)``.

    With ``merge=True`` stages whose scaled ends collide are merged (the last stage ending at a step is kept) and
    stages ending at step 0 are dropped.

    Raises:
        ConfigError: (without ``merge``) ``total_steps`` is too small to keep the steps distinct and positive.
    """
    st = [(float(reg), int(T)) for reg, T in stages]
    last = st[-1][1]
    # Round half up in exact integer arithmetic.
    scaled = [(reg, (2 * T * total_steps + last) // (2 * last)) for reg, T in st]
    steps = [T for _, T in scaled]
    if merge:
        merged: Stages = []
        for reg, T in scaled:
            if T <= 0:
                continue
            if merged and merged[-1][1] == T:
                merged[-1] = (reg, T)
            else:
                merged.append((reg, T))
        return merged
    if steps[0] <= 0 or any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        # A scaled gap >= 1 before rounding keeps the rounded ends distinct, hence this sufficient bound.
        min_gap = min(b - a for a, b in zip([0] + [T for _, T in st], [T for _, T in st], strict=False))
        raise ConfigError(
            f"sparsity.stages: cannot scale {len(st)} stages ending at {last} to total_steps={total_steps}: the "
            f"stage ends would collide ({steps}); train for at least {math.ceil(last / min_gap)} steps or merge "
            "short stages"
        )
    return scaled


# ---------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run; checks what needs more than one section."""

    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig
    sparsity: SparsityConfig
    init_from: str = ""  # workdir (or HF folder) whose params start this run; model.activation replaces its own

    def __post_init__(self) -> None:
        if self.data.vocab_size > self.model.vocab_size and not self.data.tokenizer:
            raise ConfigError(f"data.vocab_size={self.data.vocab_size} exceeds model.vocab_size="
                              f"{self.model.vocab_size}; set them equal")
        o, steps = self.optim, self.train.steps
        if o.schedule != "constant":
            _require(o.warmup_steps <= steps, "optim", "warmup_steps",
                     f"{o.warmup_steps} exceeds train.steps={steps}; lower warmup_steps or train longer")
        if o.schedule == "wsd":
            start = steps - wsd_decay_steps(steps, o.decay_fraction)
            _require(o.warmup_steps <= start, "optim", "warmup_steps",
                     f"{o.warmup_steps} overlaps the wsd decay phase, which starts at update {start} (= train.steps "
                     f"{steps} - optim.decay_fraction {o.decay_fraction} * train.steps); lower warmup_steps or "
                     "decay_fraction")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig,
            "sparsity": SparsityConfig}


def _config_dict(cls: type) -> ml_collections.ConfigDict:
    """A ConfigDict of the fields of dataclass ``cls`` at their defaults (sections nested, as in ``SECTIONS``)."""
    c = ml_collections.ConfigDict()
    for f in dataclasses.fields(cls):
        if cls is RunConfig and f.name in SECTIONS:
            c[f.name] = _config_dict(SECTIONS[f.name])
        elif f.default is dataclasses.MISSING or f.default is None:
            # The ConfigDict types each field by its default, which --config overrides are parsed as.
            raise TypeError(f"{cls.__name__}.{f.name}: a config field needs a default that is not None")
        else:
            c[f.name] = f.default
    return c


def base_config() -> ml_collections.ConfigDict:
    """Every field of a run at its default, as the ConfigDict that experiment files start from."""
    return _config_dict(RunConfig)


def build_section(cls: type, section: str, d: Mapping[str, Any] | Any) -> Any:
    """A validated section dataclass from a ConfigDict or dict; unknown fields are an error naming the valid ones."""
    items = dict(d.to_dict() if hasattr(d, "to_dict") else d)
    valid = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(items) - set(valid))
    if unknown:
        raise ConfigError(f"{section}: unknown field(s) {unknown}{did_you_mean(unknown[0], valid)}; valid fields: "
                          f"{valid}")
    if cls is ModelConfig and "neuron_thresholds" in items:
        items["neuron_thresholds"] = _neuron_thresholds(items["neuron_thresholds"])
    return cls(**items)


def _neuron_thresholds(v: Any) -> tuple[float, ...]:
    """``model.neuron_thresholds`` as floats. An override ml_collections could not read as a tuple of numbers arrives
    as a string: an error (never evaluated), like any value that is not a sequence of numbers."""
    form = "one number >= 0 per layer, e.g. (0.1, 0.2, 0.3, 0.4) for 4 layers, or () for the dense model"
    try:
        values = () if v is None else (v,) if isinstance(v, str) else tuple(v)
        text = next((t for t in values if isinstance(t, str)), None)
        if text is not None:
            raise ConfigError(f"model.neuron_thresholds: {text!r} is a string, not a tuple of numbers; give {form}")
        return tuple(float(t) for t in values)
    except (TypeError, ValueError):
        raise ConfigError(f"model.neuron_thresholds: got {v!r}; give {form}") from None


def model_config_from_dict(d: Any) -> ModelConfig:
    """A validated ModelConfig from a ConfigDict or dict (a checkpoint's or an export's ``model`` section)."""
    return build_section(ModelConfig, "model", d)


def to_dict(section: Any) -> dict[str, Any]:
    """A section dataclass as a JSON-serialisable dict (tuples as lists); inverse of :func:`build_section`."""
    return {k: [list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(section).items()}


def resolve(c: Any) -> RunConfig:
    """The validated :class:`RunConfig` of an experiment ConfigDict (or dict).

    The stage table is rescaled to ``train.steps`` when it ends elsewhere (colliding stages of a run far shorter
    than the table are merged, with a warning).
    """
    parts = {}
    for name, cls in SECTIONS.items():
        if name not in c:
            raise ConfigError(f"config has no '{name}' section; start experiment configs from "
                              "prosparse_jax.config.base_config()")
        parts[name] = build_section(cls, name, c[name])
    stages = list(parts["sparsity"].stages)
    steps = parts["train"].steps
    if stages[-1][1] != steps:
        try:
            stages = scale_stages(stages, steps)
        except ConfigError:  # a quick check far shorter than the table: merge colliding stages, say so
            merged = scale_stages(stages, steps, merge=True)
            warnings.warn(f"sparsity.stages: {len(stages)} stages do not fit in train.steps={steps}; "
                          f"colliding stages merged to {merged}", stacklevel=2)
            stages = merged
        parts["sparsity"] = dataclasses.replace(parts["sparsity"], stages=tuple(stages))
    return RunConfig(**parts, init_from=str(c.get("init_from", "")))
