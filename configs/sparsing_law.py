"""Sparsing Law scaling study (arXiv 2411.02335): MiniCPM-style models from 0.1B to 1.2B, any activation.

    python -m prosparse_jax.main.train --config=configs/sparsing_law.py:0.4b-relu --workdir=runs/law_0.4b_relu

For GPU / TPU clusters; the arg is ``<scale>-<act>`` (scale 0.1b..1.2b, any activation). Shapes follow the public
configs of thunlp/SparsingLaw, tokens per step the paper's Table 3, training the paper (WSD, MiniCPM µP, no sparsity
regulariser); warm-up, stable-phase length and checkpoint spacing the public code (below). Every checkpoint is kept
for the law fit; ``fit_laws --max_step=<stable_steps>`` (``describe`` prints it as ``decay_start_step``) fits the
stable phase only, as the paper's law checkpoints are.
"""

import math
from typing import NamedTuple

from prosparse_jax.config import base_config
from prosparse_jax.errors import ConfigError
from prosparse_jax.model.activations import ACTIVATIONS


class Scale(NamedTuple):
    d_model: int
    n_layers: int
    n_heads: int
    tokens_per_step: int  # the paper's Table 3
    warmup_steps: int  # public train config: warmup_iters
    stable_steps: int  # last checkpoint before the LR decay in the public law-fit checkpoint list (see below)
    checkpoint_every: int  # spacing of that list


# Public code, thunlp/SparsingLaw commit a64dfaa: src/configs/train_configs/<scale>.json (glb_batch_token,
# warmup_iters) and scripts/get_ckpt_list.sh, the checkpoints the law was measured on -- all before the decay stage,
# as the repository's README says of its released checkpoints. stable_steps is the last step of the ReLU list
# (0.1b_relu_fit-fix, 0.2b_relu, 0.4b-v3_relu_fit-fix -- the batch-192 run --, 0.8b_relu, 1.2b_relu_fit); the SiLU
# lists end at 130k / 200k / 300k / 330k steps (0.1B / 0.4B / 0.8B / 1.2B), and one budget per scale gives both
# activations the same tokens. The train configs' own train_iters (132,500 / 163,580 / 200,000 / 135,000 / 15,000)
# are stop points of a constant-LR phase, not the length of the runs the lists show. 0.8B and 1.2B end at the same
# 566B tokens; at the ends the published ReLU curves are within 15 / 8 / 4 / 0.3 / 0.4% of their limits A0.
# Checkpoint spacing: the lists' (0.8B's ReLU list has 20k, its SiLU list 10k: 10k, for more points).
SCALES = {
    "0.1b": Scale(768, 16, 6, 327_680, 1_325, 130_000, 5_000),  # 80 x 4096 tokens per step; 42.6B tokens
    "0.2b": Scale(1024, 20, 8, 589_824, 1_635, 150_000, 5_000),  # 144 x 4096; 88.5B
    "0.4b": Scale(1280, 24, 10, 786_432, 2_100, 200_000, 5_000),  # 192 x 4096; 157B
    "0.8b": Scale(1536, 28, 12, 1_179_648, 2_576, 480_000, 10_000),  # 288 x 4096; 566B
    "1.2b": Scale(1792, 32, 14, 1_572_864, 1_502, 360_000, 10_000),  # 384 x 4096; 566B
}
HEAD_DIM = 128
VOCAB = 122_753
# The LR decay after the stable phase: its length is chosen here (the public code gives a rate, not a length; the
# paper's facts at hand give neither). The public scheduler (WarmupStableExp, drop_rate 0.5, drop_iter 560) halves
# the LR every 560 steps from a chosen step; the same rate down to optim.min_lr_ratio = 0.1 takes
# 560 * log2(10) = 1,860 steps (at most 2.9B tokens), after the last checkpoint the law is meant to fit.
MIN_LR_RATIO = 0.1
DECAY_STEPS = round(560 * math.log2(1 / MIN_LR_RATIO))


def get_config(arg: str = "0.1b-relu"):
    try:
        scale, act = arg.lower().split("-", 1)
    except ValueError:
        raise ConfigError(f"sparsing_law config arg {arg!r}: expected '<scale>-<act>', e.g. '0.4b-relu'") from None
    if scale not in SCALES:
        raise ConfigError(f"sparsing_law: unknown scale {scale!r}; choose one of: {', '.join(SCALES)}")
    if act not in ACTIVATIONS:
        raise ConfigError(f"sparsing_law: unknown activation {act!r}; choose one of: {', '.join(ACTIVATIONS)}")
    s = SCALES[scale]
    d = s.d_model
    c = base_config()
    m = c.model
    m.vocab_size = VOCAB  # paper tokenizer size; set data.tokenizer to its tokenizer.json to train on real data
    m.d_model = d
    m.n_layers = s.n_layers
    m.n_heads = s.n_heads
    m.n_kv_heads = s.n_heads  # MHA
    m.head_dim = HEAD_DIM
    m.d_ff = int(2.5 * d)
    m.activation = act
    m.tie_embeddings = True
    m.scale_emb = 12.0
    m.scale_depth = 1.4
    m.dim_model_base = 256
    m.init_std = 0.1 / (d / 256) ** 0.5
    m.dtype = "bfloat16"
    m.remat = True

    c.data.seq_len = 4096
    c.data.vocab_size = VOCAB
    c.train.batch_size = s.tokens_per_step // c.data.seq_len
    c.train.steps = s.stable_steps + DECAY_STEPS
    c.train.eval_every = 1000
    c.train.checkpoint_every = s.checkpoint_every
    c.train.keep_period = c.train.checkpoint_every  # keep every checkpoint: the law fit measures each one
    c.train.log_every = 50
    c.optim.lr = 0.01
    c.optim.schedule = "wsd"
    c.optim.warmup_steps = s.warmup_steps
    c.optim.decay_fraction = DECAY_STEPS / c.train.steps  # the decay starts right after step stable_steps
    c.optim.min_lr_ratio = MIN_LR_RATIO
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.weight_decay = 0.1
    c.optim.mup = True
    c.sparsity.stages = [[0.0, c.train.steps]]
    return c
