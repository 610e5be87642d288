"""ProSparse ablations (arXiv 2402.13516) on ``configs/prosparse.py``: how lambda is scheduled and how large it ends,
and the FATReLU threshold.

Usage: ``--sweep=configs/sweeps/prosparse_ablations.py:<arg>`` with arg

- ``tiny`` (2 CPU cores, 6 runs of the 100-step ``tiny`` recipe, ~1 min each): lambda schedule {progressive (the
  tiny stage table: lambda 0, constant warm-up, sine ramp, constant), constant (lambda 0 for the same first stage,
  then the last lambda throughout)} x last lambda {1e-4, 2e-4, 4e-4} (the progressive table's warm-up lambda scaled
  with it). ProSparse's claim: progressive reaches the sparsity of constant at a lower loss.
- ``tiny-threshold``: the progressive 2e-4 run with the FATReLU threshold of the final evaluation (no retraining,
  ``sparsity.final_threshold``) in {0, 0.01, 0.1, 0.5}. Each run retrains the same model (identical up to the final
  evaluation), so it costs 4 trainings for one; ``experiments/prosparse_miniature.py``'s threshold table measures
  many thresholds on one trained model.
- ``llama2-7b``: the schedule x last lambda grid at the paper's scale (stage table of ProSparse for LLaMA2-7B, last
  lambda {0.1, 0.2 (paper), 0.4}); start it from an imported SiLU checkpoint (add ``init_from`` to ``FIXED_7B``).

Runs start from scratch with ReLU (the tiny runs; the paper continues a SiLU model -- set ``init_from``).
"""

from configs import prosparse as prosparse_configs
from prosparse_jax.errors import ConfigError
from prosparse_jax.sweeps.spec import grid, sweep
from prosparse_jax.training.schedules import PROSPARSE_STAGES

SCHEDULES = ("progressive", "constant")


def _stages(table, schedule: str, last_lambda: float) -> tuple:
    """The stage table ``table`` with its lambdas scaled so that the last one is ``last_lambda`` (progressive), or
    lambda 0 for the first stage, then ``last_lambda`` to the end (constant)."""
    if schedule == "constant":
        return ((0.0, table[0][1]), (last_lambda, table[-1][1]))
    scale = last_lambda / table[-1][0]
    return tuple((lam * scale, end) for lam, end in table)


def _lambda_grid(table, lambdas: dict[str, float]):
    axes = {"schedule": {s: {} for s in SCHEDULES}, "lambda": {k: {} for k in lambdas}}
    return grid(axes, derive=lambda a: {"sparsity.stages": _stages(table, a["schedule"], lambdas[a["lambda"]])})


def _tiny():
    runs = _lambda_grid(prosparse_configs.TINY_STAGES, {"lam1e-4": 1e-4, "lam2e-4": 2e-4, "lam4e-4": 4e-4})
    for r in runs:
        r["overrides"]["train.progress_bar"] = False
    return sweep("prosparse_ablations_tiny", "configs/prosparse.py:tiny", runs)


def _tiny_threshold():
    thresholds = {f"t{t:g}": {"sparsity.final_threshold": t} for t in (0.0, 0.01, 0.1, 0.5)}
    return sweep("prosparse_threshold_tiny", "configs/prosparse.py:tiny",
                 grid({"threshold": thresholds}, {"train.progress_bar": False}))


def _llama2_7b():
    return sweep("prosparse_ablations_7b", "configs/prosparse.py:llama2-7b",
                 _lambda_grid(PROSPARSE_STAGES["llama2-7b"], {"lam0.1": 0.1, "lam0.2": 0.2, "lam0.4": 0.4}))


SWEEPS = {"tiny": _tiny, "tiny-threshold": _tiny_threshold, "llama2-7b": _llama2_7b}


def get_config(arg: str = "tiny"):
    if arg not in SWEEPS:
        raise ConfigError(f"sweeps/prosparse_ablations: unknown sweep {arg!r}; choose one of: {', '.join(SWEEPS)}")
    return SWEEPS[arg]()

