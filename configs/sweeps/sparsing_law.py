"""The Sparsing Law grid (arXiv 2411.02335): model scales x {relu, silu}, every checkpoint kept for the law fit.

Usage: ``--sweep=configs/sweeps/sparsing_law.py:<arg>`` with arg

- ``full``: the paper's five scales 0.1B..1.2B x {relu, silu} = 10 runs of ``configs/sparsing_law.py`` (base
  ``0.1b-relu``; each scale's overrides are exactly the fields in which ``sparsing_law.py:<scale>-relu`` differs
  from it: shapes, init, batch). For a cluster (``sweep slurm``); set ``data.tokenizer`` to the paper's
  tokenizer to train on real data.
- ``tiny`` (CI, ~3 min on 2 cores with ``--parallel=2``): 2 tiny scales (d_model 64 / 128, d_ff = 2.5 d as in the
  paper's shapes) x {relu, silu} on the built-in corpus, 40 steps each with a checkpoint every 5 steps, all kept
  (``train.keep_period``): 7 law points per run after the 5 warm-up steps. The recipe is the ``tiny`` one of
  ``configs/prosparse.py`` (``tiny-silu``: AdamW, WSD, no regulariser), not MiniCPM's µP, which is meaningless at
  d_model 64. The aggregate measures the paper's A (CETT-PPL-1% per checkpoint) on 2 x 4 sequences, 8 bisection
  steps (~10 s per run).
"""

from configs import sparsing_law as law_configs
from prosparse_jax.errors import ConfigError
from prosparse_jax.sweeps.spec import analysis, config_diff, grid, sweep

ACTIVATIONS = {"relu": {"model.activation": "relu"}, "silu": {"model.activation": "silu"}}

# name -> (d_model, n_layers, n_heads): head width 32, d_ff = 2.5 d (the paper's ratio)
TINY_SCALES = {"t64": (64, 2, 2), "t128": (128, 3, 4)}
TINY_STEPS = 40
TINY_EVERY = 5  # checkpoint (all kept) and log interval


def _tiny():
    scales = {name: {"model.d_model": d, "model.n_layers": n_layers, "model.n_heads": heads, "model.n_kv_heads": heads,
                     "model.d_ff": int(2.5 * d)}
              for name, (d, n_layers, heads) in TINY_SCALES.items()}
    fixed = {"train.steps": TINY_STEPS, "train.checkpoint_every": TINY_EVERY, "train.keep_period": TINY_EVERY,
             "train.log_every": TINY_EVERY, "train.eval_every": 0, "train.eval_batches": 4,
             "train.progress_bar": False, "optim.warmup_steps": TINY_EVERY}
    runs = grid({"scale": scales, "activation": ACTIVATIONS}, fixed)
    return sweep("sparsing_law_tiny", "configs/prosparse.py:tiny-silu", runs,
                 analysis("cett_ppl", num_batches=2, batch_size=4, search_steps=8))


def _full():
    base = law_configs.get_config("0.1b-relu")
    scales = {s: config_diff(base, law_configs.get_config(f"{s}-relu")) for s in law_configs.SCALES}
    runs = grid({"scale": scales, "activation": ACTIVATIONS})
    return sweep("sparsing_law", "configs/sparsing_law.py:0.1b-relu", runs, analysis("cett_ppl"))


SWEEPS = {"tiny": _tiny, "full": _full}


def get_config(arg: str = "tiny"):
    if arg not in SWEEPS:
        raise ConfigError(f"sweeps/sparsing_law: unknown sweep {arg!r}; choose one of: {', '.join(SWEEPS)}")
    return SWEEPS[arg]()
