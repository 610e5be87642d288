"""ProSparse runs (arXiv 2402.13516): ReLU substitution + progressive L1 regularisation + FATReLU shifting.

    python -m prosparse_jax.main.train --config=configs/prosparse.py:tiny --workdir=runs/tiny

``tiny`` trains on 2 CPU cores on the built-in corpus; ``tiny-silu`` is the same model dense (SiLU, no regulariser);
``minicpm-1b``, ``llama2-7b``, ``llama2-13b`` carry the paper's shapes, stage tables and batch sizes (start them from
an imported SiLU checkpoint with ``--config.init_from=<workdir>``).

The unit of λ is an interpretation: Eq. 2 sums |x1| over d_ff but does not say how tokens combine, so the paper's λ
tables have no stated unit. The paper-scale configs read them as ``sparsity.l1_reduction = "mean"`` (mean |x1| over
valid tokens × d_ff, summed over layers). Factors between the readings for the same λ: ``"sum"`` = d_ff × ``"mean"``;
``"blockffn"`` = ``"sum"`` × 1e-8 × valid tokens per micro-batch. The choice rests on the L1 term / LM loss each
reading gives at the configs' first regularised step (experiments/l1_units.py; docs/training.md, "The λ unit").
"""

from prosparse_jax.config import base_config
from prosparse_jax.errors import ConfigError
from prosparse_jax.training.schedules import PROSPARSE_STAGES

NAMES = ("tiny", "tiny-silu", "minicpm-1b", "llama2-7b", "llama2-13b")

# Tiny stage table (steps of the miniature's continued run; rescaled to train.steps): ReLU substitution (lambda 0),
# constant warm-up, one sine ramp, then a constant stage at the last lambda, as the paper's tables end.
TINY_STAGES = [[0.0, 10], [5e-5, 25], [2e-4, 60], [2e-4, 100]]
# The unit of the tiny lambdas above, tuned on the miniature in it ("sum" = 704 x "mean" at d_ff 704).
TINY_L1_REDUCTION = "sum"
# The unit the paper's lambda tables are read in (an interpretation, see the module docstring). For the same lambda,
# "blockffn" = "mean" x 1e-8 x tokens per micro-batch x d_ff: x 0.16 / 0.45 / 0.57 at one 4,096-token sequence per
# micro-batch and d_ff 3840 / 11008 / 13824 (minicpm-1b / llama2-7b / llama2-13b).
PAPER_L1_REDUCTION = "mean"


def _tiny(c) -> None:
    """The miniature's 5.3M model and recipe (experiments/prosparse_miniature.py)."""
    # The per-layer (unrolled) layout is faster on CPU than the scan (docs/benchmarks.md) and compiles fast at 4 layers.
    c.model.update(dict(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=704,
                        scan_layers=False))
    c.data.vocab_size = 4096
    c.data.seq_len = 256
    c.train.batch_size = 8
    c.train.eval_every = 50
    c.train.eval_batches = 32  # 65,536 held-out tokens sampled across the split
    c.train.checkpoint_every = 50
    c.train.log_every = 10
    # Peak LR tuned on the miniature's held-out loss (docs/results/miniature.md).
    c.optim.lr = 5e-3
    c.optim.warmup_steps = 10
    c.optim.schedule = "wsd"
    c.optim.decay_fraction = 0.4
    c.optim.min_lr_ratio = 0.1
    c.sparsity.stages = TINY_STAGES
    c.sparsity.l1_reduction = TINY_L1_REDUCTION
    c.sparsity.final_threshold = 0.01


def _minicpm_1b(c) -> None:
    c.model.update(dict(vocab_size=73440, d_model=1536, n_layers=52, n_heads=24, n_kv_heads=8, d_ff=3840,
                        tie_embeddings=True, scale_emb=12.0, scale_depth=1.4, dim_model_base=256,
                        init_std=0.1 / (1536 / 256) ** 0.5, dtype="bfloat16", remat=True))
    c.data.vocab_size = 73440
    c.data.seq_len = 4096
    c.train.batch_size = 1200  # 4.92M tokens per step
    c.optim.lr = 0.01
    c.optim.schedule = "wsd"
    # The WSD decay spans the whole last stage, 35k -> 95k (60k of 95k steps), with lambda held at 5e-2.
    c.optim.decay_fraction = 60_000 / 95_000
    c.optim.mup = True
    c.sparsity.stages = [list(s) for s in PROSPARSE_STAGES["minicpm-1b"]]
    c.sparsity.l1_reduction = PAPER_L1_REDUCTION
    # NOT from the paper: ProSparse states FATReLU thresholds only for LLaMA2-7B/13B (t = 0.01, App. O); the
    # MiniCPM-1B threshold is unpublished. 0.01 mirrors the LLaMA2 choice; measure your own (analyze --metric=fat).
    c.sparsity.final_threshold = 0.01


def _llama2(c, name: str) -> None:
    d, n_layers, heads, d_ff, batch, lr, thr = {
        "llama2-7b": (4096, 32, 32, 11008, 512, 3e-5, 0.01),
        "llama2-13b": (5120, 40, 40, 13824, 2048, 5e-5, 0.01),
    }[name]
    c.model.update(dict(vocab_size=32000, d_model=d, n_layers=n_layers, n_heads=heads, n_kv_heads=heads, d_ff=d_ff,
                        dtype="bfloat16", remat=True))
    c.data.vocab_size = 32000
    c.data.seq_len = 4096
    c.train.batch_size = batch
    c.optim.lr = lr
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 100
    c.sparsity.stages = [list(s) for s in PROSPARSE_STAGES[name]]
    c.sparsity.l1_reduction = PAPER_L1_REDUCTION
    c.sparsity.final_threshold = thr


def get_config(arg: str = "tiny"):
    name = arg.lower()
    if name not in NAMES:
        raise ConfigError(f"prosparse config: unknown name {arg!r}; choose one of: {', '.join(NAMES)}")
    c = base_config()
    c.model.activation = "relu"
    if name in ("tiny", "tiny-silu"):
        _tiny(c)
    elif name == "minicpm-1b":
        _minicpm_1b(c)
    else:
        _llama2(c, name)
    if name == "tiny-silu":  # the dense SiLU model of the same shape and recipe: no regulariser, no FATReLU
        c.model.activation = "silu"
        c.sparsity.stages = [[0.0, 100]]
        c.sparsity.final_threshold = 0.0
    c.train.steps = int(c.sparsity.stages[-1][1])
    if not name.startswith("tiny"):
        c.train.eval_every = 500
        c.train.checkpoint_every = 500
        c.train.log_every = 10
    return c
