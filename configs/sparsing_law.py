"""Sparsing Law scaling study (arXiv 2411.02335): MiniCPM-style models from 0.1B to 1.2B, any activation.

    python -m prosparse_jax.main.train --config=configs/sparsing_law.py:0.4b-relu --workdir=runs/law_0.4b_relu

For GPU / TPU clusters; the arg is ``<scale>-<act>`` (scale 0.1b..1.2b, any activation). Shapes follow the public
configs of thunlp/SparsingLaw, tokens per step the paper's Table 3, training the paper (WSD, MiniCPM µP, no sparsity
regulariser). Every checkpoint is kept for the law fit (fit_laws).
"""

from prosparse_jax.config import base_config
from prosparse_jax.errors import ConfigError
from prosparse_jax.model.activations import ACTIVATIONS

# scale -> (d_model, n_layers, n_heads, tokens per optimizer step in the paper's Table 3)
SCALES = {
    "0.1b": (768, 16, 6, 327_680),  # 80 x 4096
    "0.2b": (1024, 20, 8, 589_824),  # 144 x 4096
    "0.4b": (1280, 24, 10, 786_432),  # 192 x 4096
    "0.8b": (1536, 28, 12, 1_179_648),  # 288 x 4096
    "1.2b": (1792, 32, 14, 1_572_864),  # 384 x 4096
}
HEAD_DIM = 128
VOCAB = 122_753


def get_config(arg: str = "0.1b-relu"):
    try:
        scale, act = arg.lower().split("-", 1)
    except ValueError:
        raise ConfigError(f"sparsing_law config arg {arg!r}: expected '<scale>-<act>', e.g. '0.4b-relu'") from None
    if scale not in SCALES:
        raise ConfigError(f"sparsing_law: unknown scale {scale!r}; choose one of: {', '.join(SCALES)}")
    if act not in ACTIVATIONS:
        raise ConfigError(f"sparsing_law: unknown activation {act!r}; choose one of: {', '.join(ACTIVATIONS)}")
    d, n_layers, n_heads, batch_tokens = SCALES[scale]
    c = base_config()
    m = c.model
    m.vocab_size = VOCAB  # paper tokenizer size; set data.tokenizer to its tokenizer.json to train on real data
    m.d_model = d
    m.n_layers = n_layers
    m.n_heads = n_heads
    m.n_kv_heads = n_heads  # MHA
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
    c.train.batch_size = batch_tokens // c.data.seq_len
    c.train.steps = 100_000
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.train.keep_period = c.train.checkpoint_every  # keep every checkpoint: the law fit measures each one
    c.train.log_every = 50
    c.optim.lr = 0.01
    c.optim.schedule = "wsd"
    c.optim.warmup_steps = 2000
    c.optim.decay_fraction = 0.1
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.weight_decay = 0.1
    c.optim.mup = True
    c.sparsity.stages = [[0.0, c.train.steps]]
    return c
