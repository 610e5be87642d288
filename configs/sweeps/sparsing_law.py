"""The Sparsing Law grid (arXiv 2411.02335): model scales x {relu, silu}, every checkpoint kept for the law fit.

    python -m prosparse_jax.main.sweep run --sweep=configs/sweeps/sparsing_law.py:tiny --root=runs/sweeps/law_tiny

``full``: the paper's five scales, each run exactly ``configs/sparsing_law.py:<scale>-<act>``, for a cluster
(``sweep slurm``); its law fit stops at each run's LR-decay start (the stable phase, as the paper's law checkpoints).
``tiny``: two tiny scales on the built-in corpus with the ``tiny-silu`` recipe (MiniCPM's µP means nothing at
d_model 64), to check the pipeline on a CPU; it fits every kept checkpoint (its stable phase holds only 3 after the
warm-up, fewer than a law needs). Runs: docs/sweeps.md.
"""

from configs import sparsing_law as law_configs
from prosparse_jax.analysis.law_fit import DECAY_START
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
    # max_step: each run's own decay start, read from its config.json (describe's decay_start_step)
    return sweep("sparsing_law", "configs/sparsing_law.py:0.1b-relu", runs, analysis("cett_ppl", max_step=DECAY_START))


SWEEPS = {"tiny": _tiny, "full": _full}


def get_config(arg: str = "tiny"):
    if arg not in SWEEPS:
        raise ConfigError(f"sweeps/sparsing_law: unknown sweep {arg!r}; choose one of: {', '.join(SWEEPS)}")
    return SWEEPS[arg]()
