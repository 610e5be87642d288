"""The experiment config: one ml_collections ConfigDict with sections model / data / optim / train / sparsity.

``base_config()`` holds every field with its default and a comment; the files in ``configs/`` start from it and
set what their experiment needs. ``resolve(config)`` turns the ConfigDict into the frozen, validated
:class:`prosparse_jax.config.RunConfig` the library works with (the sections' dataclasses and their validation live
in :mod:`prosparse_jax.config`; every error names its field).

Batch semantics (printed at start-up by train): ``train.batch_size`` is the GLOBAL number of sequences per optimizer
step, summed over all devices, hosts and accumulation micro-steps. Per step each of ``train.grad_accum`` micro-steps
processes batch_size / grad_accum sequences, split evenly across the data-parallel devices (per-device batch =
batch_size / grad_accum / num_devices). Tokens per step = batch_size * data.seq_len.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import ml_collections

from prosparse_jax.config import SECTIONS, ConfigError, RunConfig, build_section
from prosparse_jax.training import schedules


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
    m.attention = "auto"  # attention backend: auto (by platform: cpu xla_blocks, gpu cudnn for bfloat16 else xla,
    # tpu splash) | xla_blocks (block-causal XLA) | xla (jax.nn, any platform) | cudnn (bfloat16) | splash (Pallas TPU)
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
    c.sparsity.stages = ((0.0, 1000),)  # a tuple: overridable as --config.sparsity.stages="((0, 10), (5e-5, 20))"
    # Regulariser: lambda(t) * sum over layers of the layer's L1 term, reduced as l1_reduction says:
    # 'sum'  = ||x1||_1 of each token's d_ff vector (ProSparse Eq. 2, a sum over d_ff), averaged over valid tokens;
    #          the paper's lambda tables mean this.
    # 'mean' = mean |x1| over valid tokens x d_ff = 'sum' / d_ff (lambda ~d_ff x larger for the same pull).
    c.sparsity.l1_reduction = "sum"
    c.sparsity.final_threshold = 0.0  # FATReLU threshold t for the evaluation after training; 0 = no shifting

    c.init_from = ""  # workdir (or HF folder) whose params start this run; model.activation replaces its activation
    return c


def resolve(c: Any) -> RunConfig:
    """Validates an experiment ConfigDict and returns the typed :class:`RunConfig`.

    The stage table is rescaled to ``train.steps`` when it ends elsewhere (colliding stages of a run far shorter
    than the table are merged, with a warning).
    """
    parts = {}
    for name, cls in SECTIONS.items():
        if name not in c:
            raise ConfigError(f"config has no '{name}' section; start experiment configs from "
                              "prosparse_jax.run_config.base_config()")
        parts[name] = build_section(cls, name, c[name])
    rc = RunConfig(**parts, init_from=str(c.get("init_from", "")))
    stages = list(rc.sparsity.stages)
    if stages[-1][1] != rc.train.steps:
        try:
            stages = schedules.scale_stages(stages, rc.train.steps)
        except ConfigError:  # a quick check far shorter than the table: merge colliding stages, say so
            merged = schedules.scale_stages(stages, rc.train.steps, merge=True)
            warnings.warn(f"sparsity.stages: {len(stages)} stages do not fit in train.steps={rc.train.steps}; "
                          f"colliding stages merged to {merged}", stacklevel=2)
            stages = merged
        rc = dataclasses.replace(rc, sparsity=dataclasses.replace(rc.sparsity, stages=tuple(stages)))
    if rc.data.vocab_size > rc.model.vocab_size and not rc.data.tokenizer:
        raise ConfigError(f"data.vocab_size={rc.data.vocab_size} exceeds model.vocab_size={rc.model.vocab_size}; "
                          "set them equal")
    return rc
