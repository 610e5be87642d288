r"""Exact offline neuron permutation of the FFN: co-active neurons side by side, and a block-sparsity report.

    python -m prosparse_jax.permute --checkpoint=<workdir or HF folder> --out=<new workdir> \
        [--order=frequency|coactivation] [--data=stdlib] [--num_batches=4 --batch_size=8 --seq_len=... --step=N]

A sparse FFN kernel reads only the rows of W_up / W_gate / W_down of the active neurons, but on GPU / TPU it reads
them in blocks of 16-64 rows: a block is skipped only when all its neurons are inactive. At 88% sparsity with neurons
in random order a block of 16 is all-inactive with probability 0.88^16 ~ 0.13. Reordering the neurons so that
frequently co-active ones sit together (PowerInfer's hot / cold neuron split, arXiv 2312.12456; ProSparse's
sparse acceleration kernels, arXiv 2402.13516) raises that fraction; the reordering is exact: permuting the columns of
W_gate / W_up and the rows of W_down of a layer by the same permutation computes the same function, and the sparse
mode's per-layer thresholds (``ModelConfig.neuron_thresholds``) stay valid.

Activity: a neuron is active on a valid token iff its x1 is non-zero in the model as configured (:func:`active_mask`;
in sparse mode also iff its output norm |x1_i| * ||W_down[i]|| exceeds the layer's tau, the rule sparse mode runs).

Orders: ``frequency`` (most active first, PowerInfer's hot / cold split) or ``coactivation`` (greedy clusters of
``--cluster`` neurons that fire together, picked among the ``--window`` most frequent unassigned neurons; O(F^2) per
layer and an [L, F, F] co-activation count: for small models).

Writes ``<out>`` as a params-only workdir (the checkpoint's config and tokenizer.json, the permuted params at step 0,
``permuted_from`` in config.json) and ``<out>/permutation.json``: ``permutation`` [L][F] (new neuron j of layer l is
old neuron ``permutation[l][j]``), and the block-sparsity report before / after (the "after" figures are measured on
the permuted model's own forward pass, on the same held-out batches the order was chosen on: in-sample figures),
with the loss of both models (equal up to float rounding).
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from prosparse_jax import checkpoint as ckpt
from prosparse_jax import cli, measure, model
from prosparse_jax import data as data_lib
from prosparse_jax.config import ConfigError, ModelConfig
from prosparse_jax.hf_config import HFConversionError
from prosparse_jax.measure import Batch
from prosparse_jax.model import Params

ORDERS = ("frequency", "coactivation")
BLOCKS = (16, 32, 64)
_FFN_LEAVES = {"w_gate_LxDxF": 2, "w_up_LxDxF": 2, "w_down_LxFxD": 1}  # leaf -> its F axis (stacked layout)

FLAGS = flags.FlagValues()  # own flag set: the CLI modules can be imported together (tests)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir or HF model folder.", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "New (empty) workdir for the permuted model.", flag_values=FLAGS)
_ORDER = flags.DEFINE_string("order", "frequency", f"Neuron order: {' | '.join(ORDERS)}.", flag_values=FLAGS)
_DATA = flags.DEFINE_string("data", "stdlib", "Data source: stdlib | files:<glob> | tfds:<name>.", flag_values=FLAGS)
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 4, "Held-out batches measured.", flag_values=FLAGS)
_BATCH = flags.DEFINE_integer("batch_size", 8, "Sequences per batch.", flag_values=FLAGS)
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Tokens per sequence; default: the run's data.seq_len, else 256.",
                                flag_values=FLAGS)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of a workdir; default: the latest.", flag_values=FLAGS)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir; default: the run's data.data_dir.",
                                flag_values=FLAGS)
_CLUSTER = flags.DEFINE_integer("cluster", 16, "coactivation: neurons per greedy cluster.", flag_values=FLAGS)
_WINDOW = flags.DEFINE_integer("window", None, "coactivation: candidates per pick (the most frequent unassigned "
                               "neurons); default: --cluster.", flag_values=FLAGS)


class PermuteError(ValueError):
    """Bad permute arguments or inputs; the message names the flag."""


# ---------------------------------------------------------------------------------------------------------------
# Activity statistics
# ---------------------------------------------------------------------------------------------------------------
def active_mask(x1_LxBxTxF: jax.Array, params: Params, cfg: ModelConfig) -> jax.Array:
    """Active neurons, [L, B, T, F] bool: x1 != 0, and in sparse mode also output norm > the layer's tau."""
    active = x1_LxBxTxF != 0
    if cfg.neuron_thresholds:
        taus_L = jnp.asarray(cfg.neuron_thresholds, jnp.float32)
        active = active & measure.active_tau(x1_LxBxTxF, model.w_down_norms(params), taus_L)
    return active


@functools.lru_cache(maxsize=8)
def _capture_fn(cfg: ModelConfig) -> Any:
    """Jitted (params, batch) -> (NLL sum, weight sum, active_LxBxTxF, valid_BxT) of the model as configured (one
    per config: the passes of a run share its compilation)."""

    def f(params: Params, batch: Batch) -> tuple[jax.Array, ...]:
        logits_BxTxV, st = model.forward(params, batch["inputs"], cfg, segment_ids_BxT=batch["segment_ids"],
                                         positions_BxT=batch["positions"], capture=True)
        w_BxT = batch["weights"]
        nll = model.cross_entropy(logits_BxTxV, batch["targets"], w_BxT) * jnp.maximum(w_BxT.sum(), 1.0)
        return nll, w_BxT.sum(), active_mask(st.x1, params, cfg), batch["segment_ids"] != 0

    return jax.jit(f)


def _tokens(active_LxBxTxF: jax.Array, valid_BxT: jax.Array) -> np.ndarray:
    """The valid tokens' activity, [L, N, F] bool numpy (N = valid tokens)."""
    a = np.asarray(active_LxBxTxF)
    return a.reshape(a.shape[0], -1, a.shape[-1])[:, np.asarray(valid_BxT).reshape(-1)]


def neuron_stats(params: Params, cfg: ModelConfig, batches: Iterable[Batch], *, coactivation: bool = False
                 ) -> dict[str, Any]:
    """Per-layer activity of every neuron over the valid tokens of ``batches`` (one forward with capture each).

    Args:
      params: parameters (either layer layout).
      cfg: model config; in sparse mode (``neuron_thresholds``) activity follows the sparse mode's rule.
      batches: held-out batches (inputs, targets, segment_ids, positions, weights).
      coactivation: also count co-activations (``co_LxFxF``: O(L F^2) memory, for small models).

    Returns:
      {"freq_LxF": activation frequency (float64), "count_LxF": active tokens (int64), "tokens": valid tokens,
      "nll": NLL sum, "weight": weight sum, and "co_LxFxF" (tokens where both neurons are active) if asked}.
    """
    capture = _capture_fn(cfg)
    count_LxF, co_LxFxF, tokens, nll, weight = None, None, 0, 0.0, 0.0
    for b in batches:
        n, w, active_LxBxTxF, valid_BxT = capture(params, b)
        a_LxNxF = _tokens(active_LxBxTxF, valid_BxT)
        nll, weight, tokens = nll + float(n), weight + float(w), tokens + a_LxNxF.shape[1]
        c_LxF = a_LxNxF.sum(axis=1, dtype=np.int64)
        count_LxF = c_LxF if count_LxF is None else count_LxF + c_LxF
        if coactivation:
            f_LxNxF = a_LxNxF.astype(np.float32)
            c = np.einsum("lnf,lng->lfg", f_LxNxF, f_LxNxF).astype(np.int64)
            co_LxFxF = c if co_LxFxF is None else co_LxFxF + c
    if count_LxF is None:
        raise ValueError("neuron_stats: no batches")
    out = {"freq_LxF": count_LxF / max(tokens, 1), "count_LxF": count_LxF, "tokens": tokens, "nll": nll,
           "weight": weight}
    if coactivation:
        out["co_LxFxF"] = co_LxFxF
    return out


# ---------------------------------------------------------------------------------------------------------------
# Orders
# ---------------------------------------------------------------------------------------------------------------
def permutation_by_frequency(freq_LxF: Any) -> np.ndarray:
    """Most active neurons first (PowerInfer's hot neurons), per layer: int [L, F]; ties keep the original order."""
    return np.argsort(-np.asarray(freq_LxF, np.float64), axis=-1, kind="stable")


def _greedy_layer(count_F: np.ndarray, co_FxF: np.ndarray, cluster: int, window: int) -> np.ndarray:
    """Greedy clusters of one layer, O(F^2): seed = the most frequent unassigned neuron; then, among the ``window``
    most frequent unassigned neurons, add the j most co-active with the cluster: the largest
    sum_i co_ij / count_j = sum_i P(i active | j active) over the members i (ties: the more frequent). The window keeps
    cold neurons out of hot clusters; ``window = 1`` is the frequency order."""
    F = count_F.shape[0]
    count = count_F.astype(np.float64)
    rank_F = np.argsort(-count, kind="stable")
    free = np.ones(F, bool)
    order: list[int] = []
    while len(order) < F:
        seed = int(rank_F[free[rank_F]][0])
        free[seed] = False
        order.append(seed)
        co_sum = co_FxF[seed].astype(np.float64)
        for _ in range(min(cluster, F - len(order) + 1) - 1):
            cand = rank_F[free[rank_F]][:window]
            j = int(cand[np.argmax(co_sum[cand] / np.maximum(count[cand], 1.0))])
            free[j] = False
            order.append(j)
            co_sum += co_FxF[j]
    return np.asarray(order, np.int64)


def permutation_by_coactivation(count_LxF: Any, co_LxFxF: Any, cluster: int = 16, window: int | None = None
                                ) -> np.ndarray:
    """Co-active neurons together (greedy clustering, :func:`_greedy_layer`), clusters in decreasing frequency of
    their seeds: int [L, F].

    Args:
      count_LxF: active tokens per neuron (or frequencies).
      co_LxFxF: tokens (or frequency) where both neurons are active, same units as ``count_LxF``.
      cluster: neurons per cluster (the kernel's block size; clusters of 16 nest into blocks of 32 / 64).
      window: candidates per pick, the most frequent unassigned neurons; None = cluster (F: pure co-activation).
    """
    window = cluster if window is None else window
    if cluster < 1 or window < 1:
        raise ValueError(f"cluster and window must be >= 1, got {cluster}, {window}")
    count_LxF, co_LxFxF = np.asarray(count_LxF), np.asarray(co_LxFxF)
    return np.stack([_greedy_layer(count_LxF[i], co_LxFxF[i], cluster, window) for i in range(count_LxF.shape[0])])


def check_permutation(perm_LxF: Any, n_layers: int, d_ff: int) -> np.ndarray:
    """``perm_LxF`` as int64 [L, F], checked to be a bijection of 0..F-1 per layer; ValueError otherwise."""
    perm = np.asarray(perm_LxF)
    if perm.shape != (n_layers, d_ff) or not np.issubdtype(perm.dtype, np.integer):
        raise ValueError(f"permutation must be int [{n_layers}, {d_ff}], got {perm.dtype} {list(perm.shape)}")
    bad = [i for i in range(n_layers) if not np.array_equal(np.sort(perm[i]), np.arange(d_ff))]
    if bad:
        raise ValueError(f"permutation of layer {bad[0]} is not a bijection of 0..{d_ff - 1}")
    return perm.astype(np.int64)


def inverse_permutation(perm_LxF: Any) -> np.ndarray:
    """inv with inv[l, perm[l, j]] = j, int [L, F]."""
    perm = np.asarray(perm_LxF)
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.arange(perm.shape[1])[None, :].repeat(perm.shape[0], 0), axis=1)
    return inv


# ---------------------------------------------------------------------------------------------------------------
# The exact permutation and block sparsity
# ---------------------------------------------------------------------------------------------------------------
def _permute_group(group: dict[str, Any], perm_LxF: np.ndarray) -> dict[str, Any]:
    """One stacked dict of layer leaves with its FFN leaves permuted along F."""
    out = dict(group)
    for name, axis in _FFN_LEAVES.items():
        idx = jnp.asarray(perm_LxF).reshape(perm_LxF.shape[:1] + (1,) * (axis - 1) + perm_LxF.shape[1:]
                                            + (1,) * (2 - axis))
        out[name] = jnp.take_along_axis(jnp.asarray(group[name]), idx, axis=axis)
    return out


def permute_neurons(params: Params, perm_LxF: Any) -> Params:
    """Params whose FFN neuron j of layer l is the old neuron ``perm_LxF[l, j]``: W_gate / W_up columns and W_down
    rows reordered (stacked or per-layer layout, kept). The model computes the same function; its x1 is permuted."""
    layers = params["layers"]
    per_layer = isinstance(layers, (list, tuple))
    n_layers = len(layers) if per_layer else layers["w_up_LxDxF"].shape[0]
    d_ff = (layers[0] if per_layer else layers)["w_up_LxDxF"].shape[-1]
    perm = check_permutation(perm_LxF, n_layers, d_ff)
    if per_layer:
        return dict(params, layers=[_permute_group(g, perm[i:i + 1]) for i, g in enumerate(layers)])
    return dict(params, layers=_permute_group(layers, perm))


def block_inactive_counts(active_LxNxF: Any, block: int) -> np.ndarray:
    """(token, block) pairs whose ``block`` consecutive neurons are all inactive, per layer: int64 [L] (a last,
    partial block counts as one block)."""
    a = np.asarray(active_LxNxF, bool)
    L, N, F = a.shape
    pad = -F % block
    if pad:
        a = np.concatenate([a, np.zeros((L, N, pad), bool)], axis=-1)
    return (~a.reshape(L, N, -1, block).any(axis=-1)).sum(axis=(1, 2), dtype=np.int64)


def block_sparsity(active_LxNxF: Any, block: int) -> np.ndarray:
    """Per layer, the fraction of (token, block) pairs whose block of ``block`` neurons is entirely inactive: [L]."""
    L, N, F = np.shape(active_LxNxF)
    return block_inactive_counts(active_LxNxF, block) / max(N * math.ceil(F / block), 1)


def block_report(params: Params, cfg: ModelConfig, batches: Iterable[Batch], blocks: Iterable[int] = BLOCKS
                 ) -> dict[str, Any]:
    """Block sparsity of the model's own activity on ``batches``: {"loss", "activation_ratio",
    "block_sparsity": {str(block): {"mean", "per_layer"}}} (one forward with capture per batch)."""
    capture, blocks = _capture_fn(cfg), list(blocks)
    counts = {b: np.zeros(cfg.n_layers, np.int64) for b in blocks}
    active, tokens, nll, weight = np.zeros(cfg.n_layers, np.int64), 0, 0.0, 0.0
    for bt in batches:
        n, w, active_LxBxTxF, valid_BxT = capture(params, bt)
        a_LxNxF = _tokens(active_LxBxTxF, valid_BxT)
        nll, weight, tokens = nll + float(n), weight + float(w), tokens + a_LxNxF.shape[1]
        active += a_LxNxF.sum(axis=(1, 2), dtype=np.int64)
        for b in blocks:
            counts[b] += block_inactive_counts(a_LxNxF, b)
    per = {b: counts[b] / max(tokens * math.ceil(cfg.d_ff / b), 1) for b in blocks}
    return {"loss": measure.mean_loss(nll, weight),
            "activation_ratio": float(active.sum() / max(tokens * cfg.d_ff * cfg.n_layers, 1)),
            "block_sparsity": {str(b): {"mean": float(per[b].mean()), "per_layer": [float(x) for x in per[b]]}
                               for b in blocks}}


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def _check_args(checkpoint: str | Path, out: str | Path, order: str, batch_size: int, num_batches: int,
                cluster: int, window: int | None) -> Path:
    """Checks the arguments before any work: --out first (refused when it exists and is not empty)."""
    out = cli.check_output_dir(out, "--out")
    if out.is_dir() and any(out.iterdir()):
        raise PermuteError(f"--out: {out} exists and is not empty; choose a new directory (nothing was written)")
    cli.check_model_path(checkpoint, "--checkpoint")
    if order not in ORDERS:
        raise PermuteError(f"--order: {order!r}; choose one of: {', '.join(ORDERS)}")
    for name, v in (("batch_size", batch_size), ("num_batches", num_batches), ("cluster", cluster),
                    ("window", 1 if window is None else window)):
        if v <= 0:
            raise PermuteError(f"--{name}: must be a positive integer, got {v}")
    return out


def _load(checkpoint: str | Path, step: int | None, data: str, seq_len: int | None, data_dir: str | None,
          batch_size: int, num_batches: int) -> tuple[ModelConfig, Params, Path, dict[str, Any], list[Batch]]:
    """(model config, params, tokenizer path, run config, held-out batches) of a checkpoint."""
    try:
        mcfg, params, tok_path = ckpt.load_model(checkpoint, step)
    except HFConversionError as e:
        raise PermuteError(f"--checkpoint: {e}") from e
    if tok_path is None:
        raise PermuteError(f"--checkpoint: {checkpoint} has no tokenizer.json next to config.json")
    run_cfg = cli.read_json(Path(checkpoint) / "config.json", "config.json")
    try:
        batches = measure.load_batches([data], tok_path, measure.run_data_section(run_cfg), seq_len, data_dir,
                                       batch_size, num_batches, mcfg.vocab_size)[data]
    except measure.MeasureError as e:
        raise PermuteError(str(e)) from e
    is_hf = "model_type" in run_cfg or "architectures" in run_cfg
    return mcfg, jax.device_put(params), tok_path, {} if is_hf else run_cfg, batches


def permute(checkpoint: str | Path, out: str | Path, *, order: str = "frequency", data: str = "stdlib",
            num_batches: int = 4, batch_size: int = 8, seq_len: int | None = None, step: int | None = None,
            data_dir: str | None = None, cluster: int = 16, window: int | None = None) -> dict[str, Any]:
    """Measures neuron activity on held-out ``data``, permutes the neurons in ``order`` and writes ``out``.

    Returns:
      The dict written to ``<out>/permutation.json`` (the permutation and the block-sparsity report).
    """
    out = _check_args(checkpoint, out, order, batch_size, num_batches, cluster, window)
    mcfg, params, tok_path, run_cfg, batches = _load(checkpoint, step, data, seq_len, data_dir, batch_size,
                                                     num_batches)
    st = neuron_stats(params, mcfg, batches, coactivation=order == "coactivation")
    if order == "frequency":
        perm_LxF = permutation_by_frequency(st["freq_LxF"])
    else:
        window = cluster if window is None else window
        perm_LxF = permutation_by_coactivation(st["count_LxF"], st["co_LxFxF"], cluster, window)
    new_params = permute_neurons(params, perm_LxF)
    before, after = block_report(params, mcfg, batches), block_report(new_params, mcfg, batches)
    res = {"checkpoint": str(checkpoint), "step": step, "order": order, "data": data, "tokens": st["tokens"],
           "cluster": cluster if order == "coactivation" else None,
           "window": window if order == "coactivation" else None, "before": before, "after": after,
           "report_batches": "the held-out batches the order was chosen on (in-sample)",
           "permutation_rule": "new neuron j of layer l = old neuron permutation[l][j]",
           "permutation": perm_LxF.tolist()}
    run_cfg = dict(run_cfg, permuted_from={"checkpoint": str(Path(checkpoint).absolute()), "step": step,
                                           "order": order})
    with cli.staged_output(out) as stage:
        ckpt.write_params_workdir(stage, mcfg, jax.tree.map(np.asarray, new_params), run_config=run_cfg)
        (stage / "tokenizer.json").write_bytes(tok_path.read_bytes())
        (stage / "permutation.json").write_text(json.dumps(res))
    return res


def summary_line(res: dict[str, Any]) -> str:
    """The report as one JSON line: mean block sparsity before / after per block size, and both losses."""
    keys = res["before"]["block_sparsity"]
    return json.dumps({
        "order": res["order"], "tokens": res["tokens"], "activation_ratio": res["before"]["activation_ratio"],
        "loss_before": res["before"]["loss"], "loss_after": res["after"]["loss"],
        "block_sparsity_before": {b: res["before"]["block_sparsity"][b]["mean"] for b in keys},
        "block_sparsity_after": {b: res["after"]["block_sparsity"][b]["mean"] for b in keys}})


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: parses ``argv`` (default ``sys.argv``), runs :func:`permute`; returns the exit code."""
    def body() -> str:
        if not _OUT.value:
            raise PermuteError("--out: required (a new directory for the permuted workdir)")
        if not _CHECKPOINT.value:
            raise PermuteError("--checkpoint: required (a workdir or HF model folder)")
        return summary_line(permute(
            _CHECKPOINT.value, _OUT.value, order=_ORDER.value, data=_DATA.value, num_batches=_NUM_BATCHES.value,
            batch_size=_BATCH.value, seq_len=_SEQ_LEN.value, step=_STEP.value, data_dir=_DATA_DIR.value,
            cluster=_CLUSTER.value, window=_WINDOW.value))

    return cli.run("permute", FLAGS, argv, body,
                   (PermuteError, ConfigError, ckpt.CheckpointError, data_lib.DataError, OSError), __doc__)


if __name__ == "__main__":
    sys.exit(main())
