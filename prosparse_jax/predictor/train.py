"""Training a model's activation predictors, calibrating them and measuring them (the library behind
``python -m prosparse_jax.main.predictor {train,eval}``).

Training (:func:`train_predictor`): every step takes one batch of the run's *training* split, collects every layer's
FFN input and active set from the frozen model (:mod:`~prosparse_jax.predictor.collect`; nothing is cached) and takes
one Adam step on the sum over layers of each layer's binary cross-entropy with positive-class weighting: positives
weigh ``pos_weight`` (0: the batch's negatives/positives ratio of that layer, in [1, 1000], i.e. balanced classes).
The layers' losses are computed one after the other (``lax.map``), so device memory holds one layer's logits at a
time plus the collected batch: ``tokens * n_layers * (4 d_model + d_ff)`` bytes (:func:`collect.bytes_per_token`).
Step 0 sets each neuron's bias to the logit of its firing rate in the first batch. The state (trained arrays,
optimizer state, step, data position) is an orbax checkpoint with digests under ``<out>/train`` every
``checkpoint_every`` steps: a rerun resumes it and ends with exactly the arrays of an uninterrupted run.

Then the thresholds are calibrated (:mod:`~prosparse_jax.predictor.calibrate`) on the even held-out batches and the
predictor saved into ``<out>`` (:mod:`~prosparse_jax.predictor.io`); :func:`evaluate` measures it on the odd ones
(:mod:`~prosparse_jax.predictor.measure`), which are disjoint from the calibration rows.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prosparse_jax import files
from prosparse_jax.config import ModelConfig, to_dict
from prosparse_jax.data import corpus as corpus_lib
from prosparse_jax.errors import OutputError, UsageError
from prosparse_jax.model.transformer import Params, ppl_ratio
from prosparse_jax.predictor import calibrate as calib_lib
from prosparse_jax.predictor import collect as collect_lib
from prosparse_jax.predictor import io as io_lib
from prosparse_jax.predictor import measure as measure_lib
from prosparse_jax.predictor.core import Predictor, init_predictor, layer_logits
from prosparse_jax.training import checkpoint
from prosparse_jax.training.lock import WorkdirLock
from prosparse_jax.training.model_io import is_hf_folder, load_model

TRAIN_DIR = "train"
EVAL_FILE = "eval.json"
TRAINED = ("w1_LxDxR", "w2_LxRxF", "b2_LxF")  # the optimized arrays (threshold_L is calibrated afterwards)
MAX_POS_WEIGHT = 1000.0


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a predictor training depends on; a resume under other settings is refused."""

    rank: int = 0  # 0: d_model // 4 (at least 8)
    steps: int = 1000  # optimizer steps, one training batch each
    batch_size: int = 8  # sequences per step
    lr: float = 1e-2  # peak Adam learning rate (warmup, cosine decay to lr / 10)
    seed: int = 0  # init and data-order seed
    pos_weight: float = 0.0  # weight of the positive class; 0: balanced per batch and layer
    checkpoint_every: int = 100  # steps between training-state checkpoints (and one at the end)
    target_recall: float = 0.99  # calibration target per layer
    calib_batches: int = 4  # held-out batches to calibrate on (as many disjoint ones are left for eval)
    eval_batch_size: int = 8  # sequences per held-out batch

    def resolved(self, cfg: ModelConfig) -> Settings:
        """The settings with the rank resolved and every value checked (:class:`UsageError` naming the flag)."""
        s = dataclasses.replace(self, rank=self.rank or max(8, cfg.d_model // 4))
        for name in ("rank", "steps", "batch_size", "checkpoint_every", "calib_batches", "eval_batch_size"):
            if getattr(s, name) < 1:
                raise UsageError(f"--{name}: must be >= 1, got {getattr(s, name)}")
        if not (s.lr > 0 and math.isfinite(s.lr)):
            raise UsageError(f"--lr: must be a positive number, got {s.lr}")
        if not (s.pos_weight >= 0 and math.isfinite(s.pos_weight)):
            raise UsageError(f"--pos_weight: must be >= 0 (0: balanced), got {s.pos_weight}")
        calib_lib.check_target(s.target_recall)
        return s


# ---------------------------------------------------------------------------------------------------------------
# The loss and the step
# ---------------------------------------------------------------------------------------------------------------
def layer_loss(w1_DxR: jax.Array, w2_RxF: jax.Array, b2_F: jax.Array, x_MxD: jax.Array, active_MxF: jax.Array,
               valid_M: jax.Array, pos_weight: float) -> jax.Array:
    """Weighted binary cross-entropy of one layer, normalised by the total weight of its valid cells."""
    z_MxF = layer_logits(w1_DxR, w2_RxF, b2_F, x_MxD)
    y_MxF = active_MxF.astype(jnp.float32)
    v_Mx1 = valid_M[:, None].astype(jnp.float32)
    pos, neg = jnp.sum(y_MxF * v_Mx1), jnp.sum((1.0 - y_MxF) * v_Mx1)
    wp = jnp.float32(pos_weight) if pos_weight > 0 else jnp.clip(neg / jnp.maximum(pos, 1.0), 1.0, MAX_POS_WEIGHT)
    cell_MxF = wp * y_MxF * jax.nn.softplus(-z_MxF) + (1.0 - y_MxF) * jax.nn.softplus(z_MxF)
    return jnp.sum(cell_MxF * v_Mx1) / jnp.maximum(wp * pos + neg, 1.0)


def make_optimizer(s: Settings) -> optax.GradientTransformation:
    """Adam with a linear warmup (a tenth of the steps, at most 100) and a cosine decay to lr / 10."""
    warmup = max(1, min(100, s.steps // 10))
    return optax.adam(optax.warmup_cosine_decay_schedule(0.0, s.lr, warmup, max(s.steps, warmup + 1), s.lr / 10))


def make_train_step(opt: optax.GradientTransformation, pos_weight: float) -> Callable[..., Any]:
    """Jitted (trained, opt_state, x_LxMxD, active_LxMxF, valid_M) -> (trained, opt_state, loss_L)."""

    def loss_fn(tr: dict[str, jax.Array], x_LxMxD: jax.Array, active_LxMxF: jax.Array, valid_M: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
        def one(args: tuple[jax.Array, ...]) -> jax.Array:
            return layer_loss(*args, valid_M, pos_weight)

        loss_L = jax.lax.map(one, (tr["w1_LxDxR"], tr["w2_LxRxF"], tr["b2_LxF"], x_LxMxD, active_LxMxF))
        return jnp.sum(loss_L), loss_L

    def step(tr: dict[str, jax.Array], opt_state: Any, x_LxMxD: jax.Array, active_LxMxF: jax.Array,
             valid_M: jax.Array) -> tuple[dict[str, jax.Array], Any, jax.Array]:
        (_, loss_L), grads = jax.value_and_grad(loss_fn, has_aux=True)(tr, x_LxMxD, active_LxMxF, valid_M)
        updates, opt_state = opt.update(grads, opt_state, tr)
        return optax.apply_updates(tr, updates), opt_state, loss_L

    return jax.jit(step, donate_argnums=(0, 1))


def rate_bias(active_LxMxF: jax.Array, valid_M: jax.Array) -> jax.Array:
    """b2 [L, F]: the logit of each neuron's firing rate in one batch (rates clipped to [1e-4, 1 - 1e-4])."""
    v = valid_M[None, :, None]
    rate_LxF = jnp.sum(active_LxMxF & v, axis=1) / jnp.maximum(jnp.sum(valid_M), 1)
    rate_LxF = jnp.clip(rate_LxF.astype(jnp.float32), 1e-4, 1 - 1e-4)
    return jnp.log(rate_LxF) - jnp.log1p(-rate_LxF)


# ---------------------------------------------------------------------------------------------------------------
# The model a predictor is for
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Model:
    """A loaded model: its config (with the sparse mode the predictor is for), params, run data section, tokenizer."""

    path: Path
    cfg: ModelConfig
    params: Params
    run_data: dict[str, Any]
    tok_path: Path | None
    step: int | None
    digest: str


def load(checkpoint_path: str | Path, step: int | None = None,
         neuron_thresholds: tuple[float, ...] | None = None) -> Model:
    """The model of a workdir or HF folder; ``neuron_thresholds`` (a sparse_mode.json's) replace its sparse mode."""
    path = files.check_model_path(checkpoint_path, "checkpoint")
    cfg, params, tok = load_model(path, step)
    if neuron_thresholds is not None:
        if len(neuron_thresholds) != cfg.n_layers:
            raise UsageError(f"thresholds: {len(neuron_thresholds)} values for a model of {cfg.n_layers} layers; "
                             "pass the sparse_mode.json analyze wrote for this checkpoint")
        cfg = cfg.replace(neuron_thresholds=tuple(float(t) for t in neuron_thresholds))
    hf = is_hf_folder(path)
    raw = {} if hf else checkpoint.read_run_config(path)
    run_data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    used_step = None if hf else step if step is not None else checkpoint.latest_step(path)
    params = jax.device_put(params)
    return Model(path, cfg, params, run_data, tok, used_step, io_lib.model_digest(params))


def _active_rule(cfg: ModelConfig) -> str:
    """What the predictor predicts, in words."""
    if cfg.neuron_thresholds:
        return "CETT sparse mode: |x1_i| * ||W_down[i]|| > tau_l (model.neuron_thresholds)"
    return f"x1 != 0 of activation {cfg.activation}" + (
        f" (threshold {cfg.activation_threshold})" if cfg.activation == "fatrelu" else "")


# ---------------------------------------------------------------------------------------------------------------
# Train
# ---------------------------------------------------------------------------------------------------------------
def _progress(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="predictor", file=sys.stderr, dynamic_ncols=True)


def train_predictor(checkpoint_path: str | Path, out: str | Path | None = None, settings: Settings | None = None, *,
                    step: int | None = None, data: str | None = None, data_dir: str | None = None,
                    neuron_thresholds: tuple[float, ...] | None = None, overwrite: bool = False,
                    progress_bar: bool = True) -> tuple[Path, Predictor, dict[str, Any]]:
    """Trains, calibrates and saves the predictor of a model; returns (out, predictor, meta).

    ``out`` (default ``<checkpoint>/predictor``) holding a predictor is refused before any work unless
    ``overwrite`` (which also restarts the training); holding an unfinished training of the same settings, it is
    resumed.
    """
    ckpt_path = files.check_model_path(checkpoint_path, "checkpoint")
    out = files.check_output_path(Path(out) if out else ckpt_path / "predictor", "out")
    if io_lib.has_predictor(out) and not overwrite:
        raise OutputError(f"out: {out} already holds a predictor; pass --overwrite to train a new one, or choose "
                          "another --out (nothing was done)")
    m = load(ckpt_path, step, neuron_thresholds)
    s = (settings or Settings()).resolved(m.cfg)
    dcfg = corpus_lib.run_data_config(m.run_data, data, data_dir)
    corpus, tok = collect_lib.open_data(dcfg, m.tok_path, m.cfg.vocab_size)
    with WorkdirLock(out, "predictor train"):
        if overwrite:
            io_lib.remove_predictor(out)
            shutil.rmtree(out / TRAIN_DIR, ignore_errors=True)
        identity = {"settings": dataclasses.asdict(s), "model_digest": m.digest, "data": dataclasses.asdict(dcfg),
                    "neuron_thresholds": list(m.cfg.neuron_thresholds)}
        collect = collect_lib.make_collect(m.cfg)
        trained, losses = _train_loop(m, s, collect, dcfg, corpus, tok, out / TRAIN_DIR, identity, progress_bar)
        calib, _ = collect_lib.split_held_out(collect_lib.eval_batches(
            corpus, tok, dcfg, batch_size=s.eval_batch_size, num_batches=2 * s.calib_batches))
        pred = dict(trained, threshold_L=jnp.zeros((m.cfg.n_layers,), jnp.float32))
        thresholds_L, calib_tokens = calib_lib.calibrate(pred, (collect(m.params, b) for b in calib), s.target_recall)
        pred["threshold_L"] = jnp.asarray(thresholds_L)
        meta = {
            "rank": s.rank, "target_recall": s.target_recall, "settings": dataclasses.asdict(s),
            "predicts": _active_rule(m.cfg), "neuron_thresholds": list(m.cfg.neuron_thresholds),
            "model": {"checkpoint": str(m.path.absolute()), "step": m.step, "digest": m.digest,
                      "n_layers": m.cfg.n_layers, "d_model": m.cfg.d_model, "d_ff": m.cfg.d_ff,
                      "activation": m.cfg.activation, "activation_threshold": m.cfg.activation_threshold},
            "data": {"source": dcfg.source, "seq_len": dcfg.seq_len,
                     "train_tokens": s.steps * s.batch_size * dcfg.seq_len},
            "calibration": {"split": "eval", "batches": "even batches of make_eval_batches(eval_batch_size, "
                            "2 * calib_batches)", "tokens": calib_tokens,
                            "threshold_L": [float(t) if np.isfinite(t) else None for t in thresholds_L],
                            "threshold_null_means": "-inf: every neuron predicted"},
            "final_loss_L": losses, "model_config": to_dict(m.cfg),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "jax": jax.__version__,
        }
        io_lib.save_predictor(out, pred, meta)
    return out, pred, meta


def _train_loop(m: Model, s: Settings, collect: collect_lib.Collect, dcfg: Any, corpus: Any, tok: Any,
                train_dir: Path, identity: dict[str, Any], progress_bar: bool
                ) -> tuple[dict[str, jax.Array], list[float]]:
    """The optimization, resumed from ``train_dir`` when it holds a state of the same ``identity``."""
    opt = make_optimizer(s)
    step_fn = make_train_step(opt, s.pos_weight)
    it = collect_lib.train_iterator(corpus, tok, dcfg, batch_size=s.batch_size, seed=s.seed)
    init = init_predictor(m.cfg, s.rank, jax.random.key(s.seed))
    tr = {k: init[k] for k in TRAINED}
    opt_state = opt.init(tr)
    mgr = checkpoint.manager(train_dir, keep=2, async_save=False)
    start, losses = 0, []
    try:
        latest = mgr.latest_step()
        if latest is not None:
            saved = checkpoint.read_extra(train_dir, latest).get("identity")
            if saved != json.loads(json.dumps(identity)):
                raise UsageError(f"out: {train_dir} holds a predictor training of other settings or another model "
                                 f"({_identity_diff(saved, identity)}); pass --overwrite to start again, or choose "
                                 "another --out")
            dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), (tr, opt_state))
            tr, opt_state, extra = checkpoint.restore(mgr, latest, *abstract)
            it.set_state(extra["data_state"])
            start, losses = int(extra["step"]), list(extra.get("loss_L", []))
        pbar = _progress(s.steps, start, progress_bar)
        for i in range(start, s.steps):
            x_LxMxD, active_LxMxF, valid_M = collect(m.params, collect_lib.as_device(next(it)))
            if i == 0:
                tr["b2_LxF"] = rate_bias(active_LxMxF, valid_M)
            tr, opt_state, loss_L = step_fn(tr, opt_state, x_LxMxD, active_LxMxF, valid_M)
            done = i + 1
            if done % s.checkpoint_every == 0 or done == s.steps:
                losses = [float(v) for v in jax.device_get(loss_L)]
                extra = {"step": done, "data_state": it.get_state(), "identity": identity, "loss_L": losses}
                with checkpoint.save_errors(mgr):
                    checkpoint.save(mgr, done, tr, opt_state, extra, force=True)
                    mgr.wait_until_finished()
            if pbar is not None:
                pbar.update(1)
                if done % 10 == 0 or done == s.steps:
                    pbar.set_postfix(loss=f"{float(jnp.mean(loss_L)):.4f}")
        if pbar is not None:
            pbar.close()
    finally:
        mgr.close()
    return tr, losses


def _identity_diff(saved: Any, now: dict[str, Any]) -> str:
    """The first key of the training identity that differs (e.g. ``settings.rank: 64 -> 128``)."""
    saved = saved if isinstance(saved, dict) else {}
    now = json.loads(json.dumps(now))
    for k, v in now.items():
        if isinstance(v, dict) and isinstance(saved.get(k), dict):
            for kk, vv in v.items():
                if saved[k].get(kk) != vv:
                    return f"{k}.{kk}: {saved[k].get(kk)!r} there, {vv!r} now"
        elif saved.get(k) != v:
            return f"{k}: differs" if k == "neuron_thresholds" else f"{k}: {saved.get(k)!r} there, {v!r} now"
    return "unknown difference"


# ---------------------------------------------------------------------------------------------------------------
# Eval
# ---------------------------------------------------------------------------------------------------------------
def evaluate(checkpoint_path: str | Path, predictor: str | Path | None = None, out: str | Path | None = None, *,
             step: int | None = None, data: str | None = None, data_dir: str | None = None,
             freq_batches: int = 8, overwrite: bool = False, progress_bar: bool = True) -> tuple[Path, dict[str, Any]]:
    """Measures the predictor of a model (:mod:`~prosparse_jax.predictor.measure`); writes and returns the eval JSON.

    The measurement batches are the odd held-out batches of the calibration's split (disjoint from the calibration
    rows); the frequency baseline counts ``freq_batches`` training batches.
    """
    ckpt_path = files.check_model_path(checkpoint_path, "checkpoint")
    pdir = Path(predictor) if predictor else ckpt_path / "predictor"
    out = files.check_output_file(Path(out) if out else pdir / EVAL_FILE, "out")
    if out.exists() and not overwrite:
        raise OutputError(f"out: {out} already exists; pass --overwrite to replace it, or choose another --out "
                          "(nothing was done)")
    if freq_batches < 1:
        raise UsageError(f"--freq_batches: must be >= 1, got {freq_batches}")
    record = io_lib.read_record(pdir)
    meta0 = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    taus = meta0.get("neuron_thresholds")
    m = load(ckpt_path, step)
    if taus and not m.cfg.neuron_thresholds:  # trained with --thresholds: measure in that sparse mode
        m.cfg = m.cfg.replace(neuron_thresholds=tuple(float(t) for t in taus))
    pred, meta = io_lib.load_predictor(pdir, m.cfg)
    if meta.get("model", {}).get("digest") not in (None, m.digest):
        warnings.warn(f"predictor {pdir} was trained on another model's weights (digest "
                      f"{meta['model']['digest']}, this one {m.digest}); its numbers are for this model", stacklevel=2)
    s = Settings(**{k: v for k, v in meta.get("settings", {}).items() if k in Settings.__dataclass_fields__})
    dcfg = corpus_lib.run_data_config(m.run_data, data, data_dir,
                                   seq_len=(meta.get("data") or {}).get("seq_len"))
    corpus, tok = collect_lib.open_data(dcfg, m.tok_path, m.cfg.vocab_size)
    _, batches = collect_lib.split_held_out(collect_lib.eval_batches(
        corpus, tok, dcfg, batch_size=s.eval_batch_size, num_batches=2 * s.calib_batches))
    collect = collect_lib.make_collect(m.cfg)
    pbar = _progress(freq_batches + 2 * len(batches), 0, progress_bar)

    def tick() -> None:
        if pbar is not None:
            pbar.update(1)

    # the frequency baseline's ranking, on training data
    it = collect_lib.train_iterator(corpus, tok, dcfg, batch_size=s.eval_batch_size, seed=s.seed + 1)
    freq_LxF, freq_tokens = 0, 0
    for _ in range(freq_batches):
        _, active_LxMxF, valid_M = collect(m.params, collect_lib.as_device(next(it)))
        freq_LxF = freq_LxF + np.asarray(measure_lib.active_counts(active_LxMxF, valid_M), np.int64)
        freq_tokens += int(jnp.sum(valid_M))
        tick()
    # the predictor's sets on the held-out batches
    counts = None
    for b in batches:
        counts = measure_lib.add_counts(counts, measure_lib.predictor_counts(pred, *collect(m.params, b)))
        tick()
    budget_L = np.rint(counts["predicted_L"] / max(counts["tokens"], 1)).astype(np.int64)
    keep_LxF = measure_lib.frequency_keep(freq_LxF, budget_L)
    keep_dev = jnp.asarray(keep_LxF)
    fwd = {k: measure_lib.make_loss_forward(m.cfg, k) for k in ("model", "predictor", "keep")}
    base_counts, sums = None, {k: [0.0, 0.0, 0.0] for k in fwd}
    for b in batches:
        _, active_LxMxF, valid_M = collect(m.params, b)
        base_counts = measure_lib.add_counts(base_counts, measure_lib.keep_counts(keep_dev, active_LxMxF, valid_M))
        for k, f in fwd.items():
            nll, w, zero_L = f(m.params, b, {"model": 0, "predictor": pred, "keep": keep_dev}[k])
            sums[k][0] += float(nll)
            sums[k][1] += float(w)
            sums[k][2] += float(jnp.mean(zero_L))
        tick()
    if pbar is not None:
        pbar.close()
    loss = {k: v[0] / max(v[1], 1.0) for k, v in sums.items()}
    computed = {k: 1.0 - v[2] / len(batches) for k, v in sums.items()}
    res = {
        "predictor": str(pdir.absolute()), "checkpoint": str(m.path.absolute()), "step": m.step,
        "model_digest": m.digest, "rank": int(pred["w1_LxDxR"].shape[-1]),
        "target_recall": meta.get("target_recall"), "predicts": meta.get("predicts"),
        "held_out": {"split": "eval", "batches": len(batches), "batch_size": s.eval_batch_size,
                     "seq_len": dcfg.seq_len, "rows": "odd batches of make_eval_batches(eval_batch_size, "
                     "2 * calib_batches), disjoint from the calibration rows"},
        "predictor_metrics": measure_lib.summarize(counts, m.cfg.d_ff),
        "frequency_baseline": {**measure_lib.summarize(base_counts, m.cfg.d_ff), "budget_L": budget_L.tolist(),
                               "train_tokens": freq_tokens},
        "loss": {"model": loss["model"], "with_predictor": loss["predictor"], "with_frequency_baseline": loss["keep"]},
        "ppl_ratio": {"predictor": ppl_ratio(loss["predictor"], loss["model"]),
                      "frequency_baseline": ppl_ratio(loss["keep"], loss["model"])},
        "computed_fraction_in_loop": {"model": computed["model"], "predictor": computed["predictor"],
                                      "frequency_baseline": computed["keep"]},
        "machine": {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "jax": jax.__version__},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    files.write_text_atomic(out, json.dumps(res, indent=2))
    return out, res
