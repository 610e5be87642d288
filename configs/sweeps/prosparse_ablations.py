"""ProSparse ablations (arXiv 2402.13516): progressive vs constant lambda, the last lambda, the FATReLU threshold.

    python -m prosparse_jax.main.sweep run --sweep=configs/sweeps/prosparse_ablations.py:tiny --root=runs/sweeps/abl

``tiny`` (2 CPU cores) tests ProSparse's claim that progressive reaches the sparsity of constant at a lower loss;
``tiny-threshold`` varies ``sparsity.final_threshold``; ``llama2-7b`` is the grid at the paper's scale (add
``init_from``, an imported SiLU checkpoint, to start as the paper does). Runs: docs/sweeps.md.
"""

from configs import prosparse as prosparse_configs
from prosparse_jax.errors import ConfigError
from prosparse_jax.sweeps.spec import grid, sweep
from prosparse_jax.training.schedules import PROSPARSE_STAGES

SCHEDULES = ("progressive", "constant")


def _stages(table, schedule: str, last_lambda: float) -> tuple:
    """``table`` with its lambdas scaled so that the last is ``last_lambda`` (progressive).

    ``constant``: lambda 0 for the first stage, then ``last_lambda`` to the end.
    """
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

