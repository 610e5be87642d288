r"""Exact offline neuron permutation of the FFN: co-active neurons side by side, and a block-sparsity report.

    python -m prosparse_jax.analysis.permute --checkpoint=<workdir or HF folder> --out=<new workdir> \
        [--order=frequency|coactivation] [--data=stdlib] [--num_batches=4 --report_batches=4 --batch_size=8]
        [--seq_len=... --step=N]

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
``--cluster`` neurons that fire together, picked among the ``--window`` most frequent unassigned neurons). Memory of
``coactivation``: every token's activity packed 8 neurons to a byte (L x N x F / 8 bytes), and the [F, F]
co-activation counts of one layer at a time (float32: 485 MB for LLaMA2-7B's F = 11008), built, clustered and
dropped before the next layer's; time O(N F^2) per layer.

Data: ``--num_batches`` + ``--report_batches`` held-out batches of one deterministic draw (windows spaced evenly over
the held-out split, each batch spanning all of it); the order is chosen on the first ``--num_batches``, the report is
measured on the other ``--report_batches`` (default: as many), which share no token with them (refused when the split
is too small for that). ``--report_batches=0`` reports on the fitting batches instead (in-sample, labelled so).

Writes ``<out>`` as a params-only workdir (the checkpoint's config and tokenizer.json, the permuted params at step 0,
``permuted_from`` in config.json) and ``<out>/permutation.json``: ``permutation`` [L][F] (new neuron j of layer l is
old neuron ``permutation[l][j]``), ``tokens`` (the tokens the order was chosen on), ``report_batches`` ({"count",
"tokens", "held_out_from_fit"}) and the block-sparsity report before / after on them (the "after" figures are measured
on the permuted model's own forward pass), with the loss of both models (equal up to float rounding).
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

from prosparse_jax.analysis import measure
from prosparse_jax.analysis.measure import Batch
from prosparse_jax.analysis.permute_orders import (
    check_permutation,
    pack_activity,
    permutation_by_frequency,
    permutation_from_activity,
)
from prosparse_jax.config import ConfigError, ModelConfig
from prosparse_jax.data import pipeline as data_lib
from prosparse_jax.hf.config import HFConversionError
from prosparse_jax.main import common as cli
from prosparse_jax.model import transformer as model
from prosparse_jax.model.transformer import Params
from prosparse_jax.training import checkpoint as ckpt

ORDERS = ("frequency", "coactivation")
BLOCKS = (16, 32, 64)
_FFN_LEAVES = {"w_gate_LxDxF": 2, "w_up_LxDxF": 2, "w_down_LxFxD": 1}  # leaf -> its F axis (stacked layout)

FLAGS = flags.FlagValues()  # own flag set: the CLI modules can be imported together (tests)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir or HF model folder.", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "New (empty) workdir for the permuted model.", flag_values=FLAGS)
_ORDER = flags.DEFINE_string("order", "frequency", f"Neuron order: {' | '.join(ORDERS)}.", flag_values=FLAGS)
_DATA = flags.DEFINE_string("data", "stdlib", "Data source: stdlib | files:<glob> | tfds:<name>.", flag_values=FLAGS)
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 4, "Held-out batches the order is chosen on.", flag_values=FLAGS)
_REPORT_BATCHES = flags.DEFINE_integer(
    "report_batches", None, "Further held-out batches, disjoint from those, the block-sparsity report is measured on; "
    "default: --num_batches; 0: report on the --num_batches batches (in-sample).", flag_values=FLAGS)
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


def neuron_stats(params: Params, cfg: ModelConfig, batches: Iterable[Batch], *, keep_activity: bool = False
                 ) -> dict[str, Any]:
    """Per-layer activity of every neuron over the valid tokens of ``batches`` (one forward with capture each).

    Args:
      params: parameters (either layer layout).
      cfg: model config; in sparse mode (``neuron_thresholds``) activity follows the sparse mode's rule.
      batches: held-out batches (inputs, targets, segment_ids, positions, weights).
      keep_activity: also keep every token's activity, packed (``activity_L``: L x N x F / 8 bytes), for
        :func:`permutation_from_activity`.

    Returns:
      {"freq_LxF": activation frequency (float64), "count_LxF": active tokens (int64), "tokens": valid tokens,
      "nll": NLL sum, "weight": weight sum, and "activity_L" (per layer, :func:`pack_activity` of its [N, F]
      activity) if asked}.
    """
    capture = _capture_fn(cfg)
    count_LxF, packed_L, tokens, nll, weight = None, [[] for _ in range(cfg.n_layers)], 0, 0.0, 0.0
    for b in batches:
        n, w, active_LxBxTxF, valid_BxT = capture(params, b)
        a_LxNxF = _tokens(active_LxBxTxF, valid_BxT)
        nll, weight, tokens = nll + float(n), weight + float(w), tokens + a_LxNxF.shape[1]
        c_LxF = a_LxNxF.sum(axis=1, dtype=np.int64)
        count_LxF = c_LxF if count_LxF is None else count_LxF + c_LxF
        if keep_activity:
            for packed, a_NxF in zip(packed_L, a_LxNxF, strict=True):
                packed.append(pack_activity(a_NxF))
    if count_LxF is None:
        raise ValueError("neuron_stats: no batches")
    out = {"freq_LxF": count_LxF / max(tokens, 1), "count_LxF": count_LxF, "tokens": tokens, "nll": nll,
           "weight": weight}
    if keep_activity:
        out["activity_L"] = [np.concatenate(packed) for packed in packed_L]
    return out


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
    """Block sparsity of the model's own activity on ``batches``: {"loss", "tokens" (valid tokens),
    "activation_ratio", "block_sparsity": {str(block): {"mean", "per_layer"}}} (one forward with capture per
    batch)."""
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
    return {"loss": measure.mean_loss(nll, weight), "tokens": tokens,
            "activation_ratio": float(active.sum() / max(tokens * cfg.d_ff * cfg.n_layers, 1)),
            "block_sparsity": {str(b): {"mean": float(per[b].mean()), "per_layer": [float(x) for x in per[b]]}
                               for b in blocks}}


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def _check_args(checkpoint: str | Path, out: str | Path, order: str, batch_size: int, num_batches: int,
                report_batches: int, cluster: int, window: int | None) -> Path:
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
    if report_batches < 0:
        raise PermuteError(f"--report_batches: must be >= 0 (0 = report on the --num_batches batches, in-sample), "
                           f"got {report_batches}")
    return out


def _split_batches(batches: list[Batch], distinct: int, data: str, num_batches: int, report_batches: int
                   ) -> tuple[list[Batch], list[Batch]]:
    """(fit batches, report batches): the first ``num_batches`` and the rest, refused unless their ``distinct``
    token positions show that no token is in both (a held-out split too small for them is cycled)."""
    fit, held = batches[:num_batches], batches[num_batches:]
    need = sum(int(np.prod(b["inputs"].shape)) for b in batches)
    if held and distinct < need:
        raise PermuteError(
            f"--num_batches / --report_batches: the held-out split of {data!r} has {distinct} distinct token "
            f"positions, fewer than the {need} of {num_batches} + {report_batches} disjoint batches; lower "
            "--num_batches, --report_batches or --batch_size, raise the run's data.eval_fraction, or pass "
            "--report_batches=0 to report on the fitting batches (in-sample)")
    return fit, held


def _load(checkpoint: str | Path, step: int | None, data: str, seq_len: int | None, data_dir: str | None,
          batch_size: int, num_batches: int, report_batches: int
          ) -> tuple[ModelConfig, Params, Path, dict[str, Any], list[Batch], list[Batch]]:
    """(model config, params, tokenizer path, run config, fit batches, report batches) of a checkpoint: the
    num_batches + report_batches held-out batches of one deterministic draw, split in two."""
    try:
        mcfg, params, tok_path = ckpt.load_model(checkpoint, step)
    except HFConversionError as e:
        raise PermuteError(f"--checkpoint: {e}") from e
    if tok_path is None:
        raise PermuteError(f"--checkpoint: {checkpoint} has no tokenizer.json next to config.json")
    run_cfg = cli.read_json(Path(checkpoint) / "config.json", "config.json")
    try:
        batches, distinct = measure.load_eval([data], tok_path, measure.run_data_section(run_cfg), seq_len,
                                              data_dir, batch_size, num_batches + report_batches, mcfg.vocab_size)
    except measure.MeasureError as e:
        raise PermuteError(str(e)) from e
    fit, held = _split_batches(batches[data], distinct[data], data, num_batches, report_batches)
    is_hf = "model_type" in run_cfg or "architectures" in run_cfg
    return mcfg, jax.device_put(params), tok_path, {} if is_hf else run_cfg, fit, held


def _order(params: Params, cfg: ModelConfig, batches: list[Batch], order: str, cluster: int, window: int
           ) -> tuple[np.ndarray, int]:
    """(the permutation int [L, F] in ``order``, tokens it was chosen on) from the activity on ``batches``."""
    st = neuron_stats(params, cfg, batches, keep_activity=order == "coactivation")
    if order == "frequency":
        return permutation_by_frequency(st["freq_LxF"]), st["tokens"]
    return permutation_from_activity(st["count_LxF"], st["activity_L"], cfg.d_ff, cluster, window), st["tokens"]


def permute(checkpoint: str | Path, out: str | Path, *, order: str = "frequency", data: str = "stdlib",
            num_batches: int = 4, report_batches: int | None = None, batch_size: int = 8, seq_len: int | None = None,
            step: int | None = None, data_dir: str | None = None, cluster: int = 16, window: int | None = None
            ) -> dict[str, Any]:
    """Measures neuron activity on ``num_batches`` held-out batches of ``data``, permutes the neurons in ``order``,
    reports block sparsity before / after on ``report_batches`` further batches (None = num_batches; 0 = the
    fitting batches, in-sample) and writes ``out``.

    Returns:
      The dict written to ``<out>/permutation.json`` (the permutation and the block-sparsity report).
    """
    report_batches = num_batches if report_batches is None else report_batches
    out = _check_args(checkpoint, out, order, batch_size, num_batches, report_batches, cluster, window)
    mcfg, params, tok_path, run_cfg, fit, held = _load(checkpoint, step, data, seq_len, data_dir, batch_size,
                                                       num_batches, report_batches)
    window = cluster if window is None else window
    perm_LxF, tokens = _order(params, mcfg, fit, order, cluster, window)
    new_params = permute_neurons(params, perm_LxF)
    before, after = block_report(params, mcfg, held or fit), block_report(new_params, mcfg, held or fit)
    res = {"checkpoint": str(checkpoint), "step": step, "order": order, "data": data, "tokens": tokens,
           "cluster": cluster if order == "coactivation" else None,
           "window": window if order == "coactivation" else None, "before": before, "after": after,
           "report_batches": {"count": len(held) or len(fit), "tokens": before["tokens"],
                              "held_out_from_fit": bool(held)},
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
    """The report as one JSON line: the tokens the order was chosen on, the report's batches (held out from those
    or in-sample), mean block sparsity before / after per block size, and both losses."""
    keys = res["before"]["block_sparsity"]
    return json.dumps({
        "order": res["order"], "tokens": res["tokens"], "report_batches": res["report_batches"],
        "activation_ratio": res["before"]["activation_ratio"],
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
            report_batches=_REPORT_BATCHES.value, batch_size=_BATCH.value, seq_len=_SEQ_LEN.value, step=_STEP.value,
            data_dir=_DATA_DIR.value, cluster=_CLUSTER.value, window=_WINDOW.value))

    return cli.run("permute", FLAGS, argv, body,
                   (PermuteError, ConfigError, ckpt.CheckpointError, data_lib.DataError, OSError), __doc__)


if __name__ == "__main__":
    sys.exit(main())
