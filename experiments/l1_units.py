"""The λ unit of the ProSparse L1 term: L1 term / LM loss at each config's first regularised step, per reading.

    python experiments/l1_units.py --workdir=runs/l1_units
    python experiments/l1_units.py --workdir=runs/l1_units_quick --quick  # CI: the tiny proxy, a few steps

ProSparse (arXiv 2402.13516 §3.2, Eq. 2) does not say how tokens combine in the L1 term, so its λ tables have no
stated unit. For every config of ``configs/prosparse.py`` with a regulariser this prints the ratio L1 term / LM loss
at λ₁ (its first stage with λ > 0, the first regularised step) under each reading of ``sparsity.l1_reduction``
(docs/training.md, "The λ unit"). What is measured: a proxy is trained briefly as SiLU on the built-in corpus, gets
ReLU and trains on at λ = 0 (ProSparse's stage 0); on held-out batches of its micro-batch shape a real forward gives
its LM loss and the mean |x1| per neuron and token (``step.loss_fn`` under each reading). A config's row scales that
mean to its layers × d_ff and micro-batch tokens; the LM loss is the proxy's. Proxies: ``tiny`` is the tiny config
itself; the paper-scale rows share one MiniCPM-1B-width proxy (d 1536, d_ff 3840, GQA 24/8, µP, at 2 of its 52
layers; the LLaMA2 rows borrow its |x1|). ``--quick`` uses the tiny proxy for every row.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from configs import prosparse as prosparse_configs
from prosparse_jax import files
from prosparse_jax.config import L1_REDUCTIONS, DataConfig, build_section, resolve
from prosparse_jax.data import corpus as corpus_lib
from prosparse_jax.data import pipeline as data_lib
from prosparse_jax.main import common as cli
from prosparse_jax.training import checkpoint as ckpt
from prosparse_jax.training.step import BLOCKFFN_L1_SCALE, loss_fn
from prosparse_jax.training.train import train

FLAGS = flags.FlagValues()  # own flag set, parsed by prosparse_jax.main.common.run (one-line errors, --verbose)
_WORKDIR = flags.DEFINE_string("workdir", "runs/l1_units", "Output directory (one sub-workdir per proxy run).",
                               flag_values=FLAGS)
_SILU_STEPS = flags.DEFINE_integer("silu_steps", 30, "SiLU steps of each proxy (warm-up, then constant LR).",
                                   flag_values=FLAGS)
_RELU_STEPS = flags.DEFINE_integer("relu_steps", 6, "ReLU steps at λ = 0 after the substitution (stage 0).",
                                   flag_values=FLAGS)
_BATCHES = flags.DEFINE_integer("batches", 4, "Held-out micro-batches the terms are measured on.", flag_values=FLAGS)
_QUICK = flags.DEFINE_boolean("quick", False, "CI smoke version: the tiny proxy for every row, a few steps.",
                              flag_values=FLAGS)

#: Configs with a regulariser (tiny-silu has none) and the proxy each is measured on.
ROWS = {"tiny": "tiny", "minicpm-1b": "minicpm-1b", "llama2-7b": "minicpm-1b", "llama2-13b": "minicpm-1b"}
PROXY_LAYERS = 2  # depth of the paper-scale proxy
PROXY_BATCH = 4  # rows of 256 tokens per step of the paper-scale proxy
#: The per-GPU micro-batch of one 4,096-token sequence: BlockFFN's term is per GPU micro-batch (bmtrain averages
#: gradients over ranks), so this column is the reading on such a cluster.
SEQ_MICRO_BATCH = 4096


# ---------------------------------------------------------------------------------------------------------------
# The proxies
# ---------------------------------------------------------------------------------------------------------------
def shared_tokenizer(workdir: Path) -> Path:
    """The tiny config's BPE of the built-in corpus, trained once (cached in ``<workdir>/tokenizer``) for every run."""
    data = build_section(DataConfig, "data", prosparse_configs.get_config("tiny").data)
    corpus_lib.get_tokenizer(data, corpus_lib.open_corpus(data), workdir / "tokenizer")
    return workdir / "tokenizer" / "tokenizer.json"


def proxy_config(proxy: str, activation: str, steps: int, tokenizer: Path, quick: bool):
    """The config of one proxy run: ``tiny``, or ``minicpm-1b``'s model at :data:`PROXY_LAYERS` layers, float32, on
    the tiny run's data (the built-in corpus, its 4,096-token BPE, 256-token rows) with its own optimizer."""
    c = prosparse_configs.get_config("tiny")
    c.data.tokenizer = str(tokenizer)
    if proxy != "tiny":
        paper = prosparse_configs.get_config(proxy)
        c.model.update(dict(paper.model.to_dict(), n_layers=PROXY_LAYERS, vocab_size=c.data.vocab_size,
                            dtype="float32", remat=False, scan_layers=False))
        c.optim.update(dict(lr=paper.optim.lr, mup=paper.optim.mup))
        c.train.batch_size = PROXY_BATCH
    c.model.activation = activation
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 1 if quick else min(10, steps)
    c.sparsity.stages = [[0.0, steps]]  # SiLU, then stage 0: ReLU at λ = 0
    c.sparsity.final_threshold = 0.0
    c.train.update(dict(steps=steps, eval_every=0, checkpoint_every=steps, keep_checkpoints=1, eval_batches=2,
                        log_every=max(min(10, steps // 2), 1), progress_bar=False))
    return c


def train_proxy(workdir: Path, proxy: str, silu_steps: int, relu_steps: int, quick: bool) -> Path:
    """SiLU run, then ReLU from it at λ = 0; returns the ReLU run's workdir (a rerun resumes both)."""
    silu, relu = workdir / f"{proxy}_silu", workdir / f"{proxy}_relu"
    tok = shared_tokenizer(workdir)
    for name, c in (("silu", proxy_config(proxy, "silu", silu_steps, tok, quick)),
                    ("relu", proxy_config(proxy, "relu", relu_steps, tok, quick))):
        if name == "relu":
            c.init_from = str(silu)
        t0 = time.time()
        train(c, silu if name == "silu" else relu)
        print(f"=== {proxy} {name}: {c.train.steps} steps in {time.time() - t0:.0f}s", flush=True)
    return relu


def measure(run: Path, num_batches: int) -> dict[str, Any]:
    """LM loss, mean |x1| per neuron and token, and each reading's L1 term per unit λ, held-out means over
    ``num_batches`` micro-batches of the run's shape (``step.loss_fn``, one real forward each)."""
    cfg, params, tok_path = ckpt.load_model(run)
    run_config = json.loads((run / "config.json").read_text())
    data = build_section(DataConfig, "data", run_config["data"])
    batches = data_lib.make_eval_batches(corpus_lib.open_corpus(data), corpus_lib.load_tokenizer(tok_path),
                                         seq_len=data.seq_len, batch_size=run_config["train"]["batch_size"],
                                         num_batches=num_batches)

    @jax.jit
    def terms(p: Any, b: dict[str, Any]) -> dict[str, Any]:
        out = {r: loss_fn(p, b, cfg, jnp.float32(1.0), r)[1] for r in L1_REDUCTIONS}
        return {"lm_loss": out["sum"]["lm_loss"], "abs_x1": jnp.mean(out["sum"]["mean_abs_x1_per_layer"]),
                "tokens": jnp.sum(b["segment_ids"] != 0), **{r: out[r]["reg_loss"] for r in L1_REDUCTIONS}}

    per = [jax.device_get(terms(params, b)) for b in batches]
    mean = {k: float(np.mean([x[k] for x in per])) for k in per[0]}
    return {"n_layers": cfg.n_layers, "d_ff": cfg.d_ff, "d_model": cfg.d_model, "batches": num_batches, **mean}


# ---------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------
def first_lambda(stages: Any) -> float:
    """λ₁: the factor of the first stage with λ > 0."""
    return next(float(lam) for lam, _ in stages if lam > 0)


def config_row(name: str, m: dict[str, Any]) -> dict[str, Any]:
    """L1 term / LM loss at config ``name``'s λ₁ under each reading, from proxy measurement ``m``: the L1 term per
    token of a layer is d_ff × the proxy's mean |x1| per neuron; 'blockffn' multiplies it by 1e-8 × the tokens of the
    config's micro-batch (``train.batch_size / train.grad_accum`` rows), and by 1e-8 × 4,096 in the last column."""
    rc = resolve(prosparse_configs.get_config(name))
    lam, L, F = first_lambda(rc.sparsity.stages), rc.model.n_layers, rc.model.d_ff
    micro = rc.train.batch_size // rc.train.grad_accum * rc.data.seq_len
    per_token = L * F * m["abs_x1"]  # the "sum" term: Σ_layers ||x1||_1 per token
    terms = {"sum": per_token, "mean": per_token / F, "blockffn": BLOCKFFN_L1_SCALE * micro * per_token,
             f"blockffn@{SEQ_MICRO_BATCH}": BLOCKFFN_L1_SCALE * SEQ_MICRO_BATCH * per_token}
    return {"config": name, "lambda1": lam, "layers_x_dff": L * F, "micro_batch_tokens": micro,
            "configured": rc.sparsity.l1_reduction, "ratio": {k: lam * v / m["lm_loss"] for k, v in terms.items()}}


def table(rows: list[dict[str, Any]], proxies: dict[str, dict[str, Any]], used: dict[str, str]) -> str:
    md = ["Proxies (held-out means after SiLU → ReLU at λ = 0):", "",
          "| proxy | d_model | layers | d_ff | micro-batch tokens | LM loss | mean \\|x1\\| per neuron | "
          "L1 per unit λ: sum / mean / blockffn |", "|---|---|---|---|---|---|---|---|"]
    for name, m in proxies.items():
        md.append(f"| {name} | {m['d_model']} | {m['n_layers']} | {m['d_ff']} | {m['tokens']:.0f} | "
                  f"{m['lm_loss']:.3f} | {m['abs_x1']:.4g} | {m['sum']:.4g} / {m['mean']:.4g} / "
                  f"{m['blockffn']:.4g} |")
    md += ["", "L1 term / LM loss at each config's first regularised step (λ₁), per reading "
           "(**bold** = the config's reading):", "",
           "| config | proxy | λ₁ | layers × d_ff | micro-batch tokens | sum | mean | blockffn | "
           f"blockffn, {SEQ_MICRO_BATCH:,}-token micro-batch |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for k, v in r["ratio"].items():
            cell = f"{v:.2g}"
            cells.append(f"**{cell}**" if k == r["configured"] else cell)
        md.append(f"| {r['config']} | {used[r['config']]} | {r['lambda1']:g} | {r['layers_x_dff']:,} | "
                  f"{r['micro_batch_tokens']:,} | " + " | ".join(cells) + " |")
    return "\n".join(md)


def _run() -> str:
    """The experiment (flags parsed); returns the tables."""
    logging.set_verbosity(logging.WARNING)
    workdir = files.check_output_path(_WORKDIR.value, "--workdir")
    quick = _QUICK.value
    silu_steps, relu_steps, n_batches = (3, 2, 1) if quick else (_SILU_STEPS.value, _RELU_STEPS.value,
                                                                 _BATCHES.value)
    used = {name: "tiny" if quick else proxy for name, proxy in ROWS.items()}
    t0 = time.time()
    proxies = {}
    for proxy in dict.fromkeys(used.values()):
        proxies[proxy] = measure(train_proxy(workdir, proxy, silu_steps, relu_steps, quick), n_batches)
    rows = [config_row(name, proxies[used[name]]) for name in ROWS]
    md = table(rows, proxies, used)
    files.write_text_atomic(workdir / "l1_units.json", json.dumps({"proxies": proxies, "rows": rows}, indent=1))
    files.write_text_atomic(workdir / "l1_units.md", md + "\n")
    return f"{md}\n\n{time.time() - t0:.0f}s; written to {workdir}/l1_units.{{md,json}}"


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (1 with one error line on stderr for bad input; --verbose: traceback)."""
    return cli.run("l1_units", FLAGS, argv, _run, __doc__)


if __name__ == "__main__":
    sys.exit(main())
