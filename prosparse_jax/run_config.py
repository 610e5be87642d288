"""The experiment config: one ml_collections ConfigDict with sections model / data / optim / train / sparsity.

``base_config()`` holds every field with its default and a comment; the files in ``configs/`` start from it and
set what their experiment needs. ``resolve(config)`` turns the ConfigDict into the frozen, validated
:class:`RunConfig` the library works with (every error names its field).

Batch semantics (printed at start-up by train): ``train.batch_size`` is the GLOBAL number of sequences per optimizer
step, summed over all devices, hosts and accumulation micro-steps. Per step each of ``train.grad_accum`` micro-steps
processes batch_size / grad_accum sequences, split evenly across the data-parallel devices (per-device batch =
batch_size / grad_accum / num_devices). Tokens per step = batch_size * data.seq_len.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import ml_collections

from prosparse_jax.config import ConfigError, ModelConfig, model_config_from_dict, section_items


def model_fields(**kw: Any) -> ml_collections.ConfigDict:
    """The ``model`` section (fields of :class:`prosparse_jax.config.ModelConfig`), with overrides."""
    m = ml_collections.ConfigDict()
    m.vocab_size = 4096  # tokens in the vocabulary (= data.vocab_size when the BPE is trained by us)
    m.d_model = 256  # residual stream width
    m.n_layers = 4  # transformer blocks
    m.n_heads = 4  # query heads
    m.n_kv_heads = 4  # key/value heads (GQA when < n_heads; must divide n_heads)
    m.d_ff = 704  # FFN hidden width (number of neurons per layer)
    m.head_dim = 0  # per-head width; 0 -> d_model // n_heads
    m.activation = "silu"  # FFN activation: silu | relu | fatrelu | drelu | relu2 | gelu
    m.activation_threshold = 0.0  # FATReLU threshold t (kept iff gate >= t); only read by 'fatrelu'
    m.tie_embeddings = False  # share the input embedding with the output head
    m.rope_theta = 10000.0  # RoPE base
    m.norm_eps = 1e-5  # RMSNorm epsilon
    m.scale_emb = 1.0  # MiniCPM: embedding multiplier (12); LLaMA: 1
    m.scale_depth = 0.0  # MiniCPM: residual branches x scale_depth/sqrt(n_layers) (1.4); 0 disables (LLaMA)
    m.dim_model_base = 0  # MiniCPM: logits from h / (d_model/dim_model_base) (256); 0 disables (LLaMA)
    m.init_std = 0.02  # std of matrix init (MiniCPM µP: 0.1/sqrt(d_model/256))
    m.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
    m.remat = False  # rematerialise each layer in the backward pass (less memory, ~1/3 more compute)
    m.scan_layers = True  # train layers stacked under lax.scan; False: one param group per layer, unrolled (faster on
    # CPU / shallow models, compile time grows with depth); checkpoints are stacked either way
    m.neuron_thresholds = ()  # sparse mode: per-layer CETT threshold on |x1_i|*||W_down row i|| (from analyze pplp)
    m.update(kw)
    return m


def base_config() -> ml_collections.ConfigDict:
    """All fields of a run with defaults; experiment files override what they need."""
    c = ml_collections.ConfigDict()
    c.model = model_fields()

    c.data = ml_collections.ConfigDict()
    c.data.source = "stdlib"  # 'stdlib' (this interpreter's stdlib sources) | 'files:<glob>' | 'tfds:<name>'
    c.data.data_dir = ""  # TFDS data dir; '' -> $PROSPARSE_DATA_DIR or ~/.cache/prosparse_jax/tfds
    c.data.text_key = "text"  # text feature of a tfds source
    c.data.tokenizer = ""  # tokenizer.json path; '' -> train a byte-level BPE (cached in the workdir)
    c.data.vocab_size = 4096  # vocab of the trained BPE (keep equal to model.vocab_size)
    c.data.seq_len = 256  # tokens per packed training sequence
    c.data.eval_fraction = 0.05  # fraction of documents held out for evaluation (stratified by package and size)
    c.data.seed = 0  # data order seed

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3  # peak learning rate
    c.optim.schedule = "cosine"  # cosine | wsd | constant
    c.optim.warmup_steps = 100  # linear LR warmup steps
    c.optim.decay_fraction = 0.1  # wsd: fraction of the run spent in the final decay
    c.optim.min_lr_ratio = 0.1  # final LR / peak LR
    c.optim.b1 = 0.9  # Adam beta1
    c.optim.b2 = 0.95  # Adam beta2
    c.optim.eps = 1e-8  # Adam epsilon
    c.optim.weight_decay = 0.1  # AdamW decoupled weight decay (not on norms and embeddings)
    c.optim.clip_norm = 1.0  # clip gradients by global norm; 0 disables
    c.optim.mup = False  # MiniCPM µP: LR of matrices x mup_base_dim / d_model
    c.optim.mup_base_dim = 256  # µP base width

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000  # optimizer steps (the sparsity stage table is rescaled to this if it ends elsewhere)
    c.train.batch_size = 8  # GLOBAL sequences per optimizer step (all devices, hosts and micro-steps)
    c.train.grad_accum = 1  # micro-steps per optimizer step (gradient accumulation)
    c.train.seed = 0  # parameter init seed
    c.train.log_every = 10  # steps between metrics.jsonl / TensorBoard entries
    c.train.eval_every = 200  # steps between held-out evaluations (and one at the end); 0 = only at the end
    c.train.eval_batches = 8  # held-out batches per evaluation
    c.train.checkpoint_every = 200  # steps between checkpoints (and one at the end)
    c.train.keep_checkpoints = 3  # checkpoints kept on disk
    c.train.keep_period = 0  # checkpoints at multiples of this step are never deleted (0 = off); the Sparsing
    # Law fit (experiments/fit_laws.py) measures every kept checkpoint: set it to checkpoint_every there
    c.train.async_checkpoint = True  # write checkpoints in the background
    c.train.progress_bar = True  # tqdm progress bar on stderr
    c.train.mesh_data = -1  # data-parallel mesh axis size (-1 = all devices / fsdp)
    c.train.mesh_fsdp = 1  # FSDP axis size (parameters sharded over it)

    c.sparsity = ml_collections.ConfigDict()
    # ProSparse stage table: [[lambda_i, T_i], ...], T_i cumulative optimizer steps, stage 0 first (lambda 0 =
    # activation substitution only), stage 1 constant warmup, later stages sine-interpolated (ProSparse §3.2).
    c.sparsity.stages = [[0.0, 1000]]
    # Regulariser: lambda(t) * sum over layers of the layer's L1 term, reduced as l1_reduction says:
    # 'sum'  = ||x1||_1 of each token's d_ff vector (ProSparse Eq. 2, a sum over d_ff), averaged over valid tokens;
    #          the paper's lambda tables mean this.
    # 'mean' = mean |x1| over valid tokens x d_ff = 'sum' / d_ff (lambda ~d_ff x larger for the same pull).
    c.sparsity.l1_reduction = "sum"
    c.sparsity.final_threshold = 0.0  # FATReLU threshold t for the evaluation after training; 0 = no shifting

    c.init_from = ""  # workdir (or HF folder) whose params start this run; model.activation replaces its activation
    return c


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    grad_accum: int
    seed: int
    log_every: int
    eval_every: int
    eval_batches: int
    checkpoint_every: int
    keep_checkpoints: int
    keep_period: int
    async_checkpoint: bool
    progress_bar: bool
    mesh_data: int
    mesh_fsdp: int

    def __post_init__(self) -> None:
        for f in ("steps", "batch_size", "grad_accum", "log_every", "eval_batches", "checkpoint_every",
                  "keep_checkpoints", "mesh_fsdp"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"train.{f}: must be a positive integer, got {v!r}")
        if self.eval_every < 0:
            raise ConfigError(f"train.eval_every: must be >= 0, got {self.eval_every}")
        if not isinstance(self.keep_period, int) or self.keep_period < 0:
            raise ConfigError(f"train.keep_period: must be an integer >= 0 (0 = off), got {self.keep_period!r}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"train.batch_size={self.batch_size} must be divisible by train.grad_accum={self.grad_accum}"
            )


L1_REDUCTIONS = ("sum", "mean")  # sparsity.l1_reduction: see base_config; 'sum' is ProSparse Eq. 2's literal form


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
    stages: tuple[tuple[float, int], ...]
    final_threshold: float
    l1_reduction: str = "sum"

    def __post_init__(self) -> None:
        if self.l1_reduction not in L1_REDUCTIONS:
            raise ConfigError(f"sparsity.l1_reduction: {self.l1_reduction!r}; choose one of: "
                              f"{', '.join(L1_REDUCTIONS)}")
        if not self.final_threshold >= 0 or not math.isfinite(self.final_threshold):
            raise ConfigError(f"sparsity.final_threshold: must be a finite value >= 0, got {self.final_threshold}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    data: Any  # prosparse_jax.data.DataConfig
    optim: Any  # prosparse_jax.optim.OptimConfig
    train: TrainConfig
    sparsity: SparsityConfig
    init_from: str


def _section(c: ml_collections.ConfigDict, name: str) -> dict[str, Any]:
    if name not in c:
        raise ConfigError(f"config has no '{name}' section; start experiment configs from run_config.base_config()")
    return c[name].to_dict()


def resolve(c: ml_collections.ConfigDict) -> RunConfig:
    """Validates the ConfigDict and returns the typed RunConfig; the stage table is rescaled to train.steps."""
    from prosparse_jax import data as data_lib
    from prosparse_jax import optim as optim_lib
    from prosparse_jax import schedules

    model = model_config_from_dict(_section(c, "model"))
    data = data_lib.data_config_from_dict(_section(c, "data"))
    optim = optim_lib.optim_config_from_dict(_section(c, "optim"))
    t = _section(c, "train")
    section_items(TrainConfig, "train", t)
    train = TrainConfig(**t)
    s = section_items(SparsityConfig, "sparsity", _section(c, "sparsity"))
    try:
        stages = [(float(reg), int(step)) for reg, step in s["stages"]]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"sparsity.stages: expected [[lambda, step], ...], got {s['stages']!r}") from e
    try:
        schedules.validate_stages(stages)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if stages[-1][1] != train.steps:
        try:
            stages = schedules.scale_stages(stages, train.steps)
        except ConfigError:  # a quick check far shorter than the table: merge colliding stages, say so
            merged = schedules.scale_stages(stages, train.steps, merge=True)
            warnings.warn(f"sparsity.stages: {len(stages)} stages do not fit in train.steps={train.steps}; "
                          f"colliding stages merged to {merged}", stacklevel=2)
            stages = merged
    sparsity = SparsityConfig(stages=tuple(stages), final_threshold=float(s["final_threshold"]),
                              l1_reduction=str(s.get("l1_reduction", "sum")))
    if data.vocab_size > model.vocab_size and not data.tokenizer:
        raise ConfigError(
            f"data.vocab_size={data.vocab_size} exceeds model.vocab_size={model.vocab_size}; set them equal"
        )
    return RunConfig(model=model, data=data, optim=optim, train=train, sparsity=sparsity,
                     init_from=str(c.get("init_from", "")))
