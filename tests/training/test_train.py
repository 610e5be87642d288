"""Training: objective, exact resume, SIGTERM, NaN guard, config errors, init_from substitution."""

import json
import logging
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import (
    assert_grads_close,
    killed_after,
    load_config,
    small_run_config,
    tiny_model_config,
    write_corpus,
)

from prosparse_jax.config import resolve
from prosparse_jax.data import pipeline as data_lib
from prosparse_jax.data.corpus import load_tokenizer, open_corpus
from prosparse_jax.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError, TrainError
from prosparse_jax.model.transformer import forward, init_params
from prosparse_jax.training import checkpoint as ckpt
from prosparse_jax.training import loop as loop_mod
from prosparse_jax.training import optim as optim_lib
from prosparse_jax.training import sharding as shard_lib
from prosparse_jax.training import step as step_mod
from prosparse_jax.training import train as train_mod
from prosparse_jax.training.metrics import read_metrics
from prosparse_jax.training.schedules import reg_factor_schedule

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("c") / "corpus")


def small_config(corpus, steps=8, **train_kw):
    stages = [[0.0, 2], [0.05, 4], [0.2, 8]] if steps >= 4 else None  # rescaled to steps
    c = small_run_config(corpus, steps, stages=stages)
    c.train.update(train_kw)
    return c


def trained_config(corpus):
    """The config of the ``trained`` run: 4 steps, checkpoints 2 and 4, a FATReLU evaluation at 0.05."""
    c = small_config(corpus, steps=4)
    c.sparsity.final_threshold = 0.05
    return c


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """(config, workdir, result) of a finished run of :func:`trained_config`; tests that change the workdir work on
    a copy."""
    c = trained_config(corpus)
    wd = tmp_path_factory.mktemp("trained") / "run"
    return c, wd, train_mod.train(c, wd)


def _copy(workdir, dst) -> Path:
    return Path(shutil.copytree(workdir, dst))


def _params(workdir, step=None):
    _, p, _ = ckpt.load_model(workdir, step)
    return p


def _batch(cfg, n_rows=2, T=8, pad_from=None):
    """A batch of ``n_rows`` random rows; row 1 is padding from position ``pad_from`` on (not counted as tokens)."""
    ids = jax.random.randint(jax.random.key(1), (n_rows, T + 1), 0, cfg.vocab_size)
    seg = np.ones((n_rows, T), np.int32)
    if pad_from is not None:
        seg[1, pad_from:] = 0
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": jnp.asarray(seg),
            "positions": jnp.broadcast_to(jnp.arange(T), (n_rows, T)), "weights": jnp.asarray(seg > 0, jnp.float32)}


def _tb_scalars(workdir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of the TensorBoard event files under ``<workdir>/tb`` (TFRecord: length, crc,
    Event proto, crc)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted((Path(workdir) / "tb").glob("events.*")):
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


# ---------------------------------------------------------------------------------------------------------------
# The objective and the step
# ---------------------------------------------------------------------------------------------------------------
def test_l1_gradient_matches_written_formula():
    cfg = tiny_model_config(activation="relu")
    params = init_params(cfg, jax.random.key(0))
    batch = _batch(cfg)
    lam = 0.37

    def reg_only(p):
        _, aux = step_mod.loss_fn(p, batch, cfg, jnp.float32(lam), "mean")
        return aux["reg_loss"]

    def written(p):  # lambda * sum_l mean_{tokens x d_ff} |x1_l|, from the captured x1
        _, st = forward(p, batch["inputs"], cfg, capture=True)
        return lam * sum(jnp.mean(jnp.abs(st.x1[i])) for i in range(cfg.n_layers))

    assert_grads_close(jax.jit(jax.grad(reg_only))(params), jax.jit(jax.grad(written))(params))
    # analytic: d/dW_up of mean|relu(g) * u| = x^T (relu(g) * sign(x1)) / (tokens * F), checked on layer 0's FFN
    x = jax.random.normal(jax.random.key(2), (5, cfg.d_model))
    wg, wu = params["layers"]["w_gate_LxDxF"][0], params["layers"]["w_up_LxDxF"][0]
    f = lambda w: jnp.mean(jnp.abs(jax.nn.relu(x @ wg) * (x @ w)))  # noqa: E731
    x1 = jax.nn.relu(x @ wg) * (x @ wu)
    analytic = x.T @ (jax.nn.relu(x @ wg) * jnp.sign(x1)) / x1.size
    assert_grads_close(jax.grad(f)(wu), analytic)


def test_l1_sum_is_the_papers_literal_formula():
    """'sum' (ProSparse Eq. 2): lambda x sum over layers of the mean over valid tokens of ||x1||_1 over d_ff."""
    cfg = tiny_model_config(activation="relu")
    params = init_params(cfg, jax.random.key(0))
    batch = _batch(cfg, pad_from=5)  # padding must not count as tokens
    reg = jax.jit(lambda p: step_mod.loss_fn(p, batch, cfg, jnp.float32(0.3), "sum")[1]["reg_loss"])(params)
    _, st = forward(params, batch["inputs"], cfg, segment_ids_BxT=batch["segment_ids"], capture=True)
    valid = np.asarray(batch["segment_ids"]) > 0
    literal = 0.3 * sum(np.abs(np.asarray(st.x1[i], np.float64)).sum(-1)[valid].mean() for i in range(cfg.n_layers))
    assert float(reg) == pytest.approx(literal, rel=1e-5)


def test_grad_accum_is_the_token_weighted_objective():
    """grad_accum = 2 with unequal valid tokens per micro-batch equals one batch of all rows (loss and gradients)."""
    cfg = tiny_model_config(activation="relu")
    params = init_params(cfg, jax.random.key(0))
    T = 8
    ids = jax.random.randint(jax.random.key(1), (4, T + 1), 0, cfg.vocab_size)
    seg = np.ones((4, T), np.int32)
    seg[2:, 3:] = 0  # the second micro-batch holds 6 valid tokens, the first 16
    w = (seg > 0).astype(np.float32)
    w[0, 5] = 0.0  # a document boundary: CE and L1 token counts differ
    rows = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": jnp.asarray(seg),
            "positions": jnp.broadcast_to(jnp.arange(T), (4, T)), "weights": jnp.asarray(w)}
    lam = jnp.float32(0.05)
    one = jax.tree.map(lambda x: x[None], rows)  # [1, 4, T]
    two = jax.tree.map(lambda x: x.reshape(2, 2, *x.shape[1:]), rows)  # [2, 2, T]
    accumulate = jax.jit(lambda b: step_mod.accumulate_grads(params, b, cfg, lam))
    aux1, g1 = accumulate(one)
    aux2, g2 = accumulate(two)
    for k in ("loss", "lm_loss", "reg_loss"):
        assert float(aux2[k]) == pytest.approx(float(aux1[k]), rel=1e-5), k
    np.testing.assert_allclose(aux2["sparsity_per_layer"], aux1["sparsity_per_layer"], rtol=1e-5)
    assert_grads_close(g2, g1)
    # the mean of the micro-batch means is a different objective on this batch
    loss = jax.jit(lambda b: step_mod.loss_fn(params, b, cfg, lam)[0])
    means = [loss(jax.tree.map(lambda x, i=i: x[i], two)) for i in range(2)]
    assert abs(float(sum(means)) / 2 - float(aux1["loss"])) > 1e-3


@pytest.mark.parametrize("scan_layers", [True, False])
def test_train_step_compiles_once(corpus, scan_layers, caplog):
    """The jitted step training runs, on the state place_state() builds and batches placed as the loop places them,
    compiles on its first call only."""
    c = small_config(corpus, steps=4)
    c.model.scan_layers = scan_layers
    rc = resolve(c)
    mesh = shard_lib.make_mesh()
    tx, lr_fn = optim_lib.make_optimizer(rc.optim, rc.train.steps, rc.model.d_model)
    params = init_params(rc.model, jax.random.key(0))
    state = step_mod.place_state(params, tx.init(params), 0, rc.model, mesh)
    step_fn = step_mod.jit_train_step(rc, tx, lr_fn, state, mesh)
    B, T = rc.train.batch_size, rc.data.seq_len
    rows = {"inputs": np.zeros((1, B, T), np.int32), "targets": np.zeros((1, B, T), np.int32),
            "segment_ids": np.ones((1, B, T), np.int32), "positions": np.broadcast_to(np.arange(T), (1, B, T)),
            "weights": np.ones((1, B, T), np.float32)}
    with caplog.at_level(logging.WARNING), jax.log_compiles():
        for _ in range(3):
            state, _ = step_fn(state, shard_lib.host_batch_to_global(rows, shard_lib.accum_batch_sharding(mesh)))
    compiles = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling jit(step)")]
    assert len(compiles) == 1, compiles


# ---------------------------------------------------------------------------------------------------------------
# A run, its metrics and its final evaluation
# ---------------------------------------------------------------------------------------------------------------
def test_train_writes_metrics_and_logs_lambda_per_step(trained):
    c, wd, res = trained
    rows = read_metrics(wd, "train")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # the entry of step s logs the update with index t = s - 1 (0-based), whose lambda is lambda(t)
    lam = jax.jit(reg_factor_schedule(resolve(c).sparsity.stages))  # the table rescaled to the 4 steps
    for r in rows:
        assert r["reg_factor"] == pytest.approx(float(lam(r["step"] - 1)), rel=1e-6, abs=1e-9)
        assert r["loss"] == pytest.approx(r["lm_loss"] + r["reg_loss"], rel=1e-6)  # a float32 sum
        assert r["sparsity"] == pytest.approx(np.mean(r["sparsity_per_layer"]), rel=1e-6)
        assert r["tokens_seen"] == r["step"] * c.train.batch_size * c.data.seq_len and r["steps_averaged"] == 1
        assert r["tokens_per_sec"] > 0 and r["mfu"] > 0  # the peak is measured: on a loaded machine mfu may pass 1
    assert rows[0]["reg_factor"] == 0.0 and rows[-1]["reg_factor"] > 0.1
    # linear warmup from 0 over optim.warmup_steps = 2 updates to optim.lr, then decay
    assert rows[0]["lr"] == 0.0 and rows[2]["lr"] == pytest.approx(c.optim.lr) and rows[3]["lr"] < c.optim.lr
    assert res.step == 4 and not res.interrupted and ckpt.latest_step(wd) == 4
    assert json.loads((wd / "final_eval.json").read_text()) == dict(res.final_eval, step=4)
    assert res.final_eval["eval_ppl"] == pytest.approx(np.exp(res.final_eval["eval_loss"]), rel=1e-6)
    assert json.loads((wd / "config.json").read_text()) == train_mod.json_config(c)
    tb = _tb_scalars(wd)
    assert tb["train/loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows]
    assert tb["eval/eval_loss"] == [(4, pytest.approx(res.final_eval["eval_loss"], rel=1e-6))]


def test_final_fatrelu_eval_is_the_shifted_model_on_the_held_out_batches(trained):
    """ProSparse §3.3: after training, ReLU is replaced by FATReLU(t) without retraining; the final evaluation reports
    that model's held-out loss and sparsity next to the ReLU model's."""
    c, wd, res = trained
    fin = res.final_eval
    assert fin["fatrelu_threshold"] == 0.05
    assert fin["fatrelu_eval_sparsity"] > fin["eval_sparsity"] + 0.01  # the threshold really shifts

    # reference: the checkpoint with activation fatrelu(t), cross-entropy from log_softmax, on the run's eval batches
    rc = resolve(c)
    mcfg, params, tok_path = ckpt.load_model(wd)
    assert mcfg.activation == "relu"
    batches = data_lib.make_eval_batches(open_corpus(rc.data), load_tokenizer(tok_path), seq_len=rc.data.seq_len,
                                         batch_size=min(rc.train.batch_size, 8), num_batches=rc.train.eval_batches)
    fat_cfg = mcfg.replace(activation="fatrelu", activation_threshold=0.05)
    nll = tokens = zeros = 0.0
    for b in batches:
        logits, st = forward(params, b["inputs"], fat_cfg, segment_ids_BxT=b["segment_ids"],
                             positions_BxT=b["positions"])
        logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)), np.float64)
        picked = np.take_along_axis(logp, np.asarray(b["targets"])[..., None], axis=-1)[..., 0]
        nll -= float((picked * b["weights"]).sum())
        tokens += float(b["weights"].sum())
        zeros += float(np.mean(st.zero_frac)) / len(batches)
    np.testing.assert_allclose(fin["fatrelu_eval_loss"], nll / tokens, rtol=1e-5)
    np.testing.assert_allclose(fin["fatrelu_eval_sparsity"], zeros, rtol=1e-6)
    entries = read_metrics(wd, "final_fatrelu")
    assert len(entries) == 1 and entries[0]["fatrelu_eval_loss"] == fin["fatrelu_eval_loss"]


def test_per_layer_training_matches_scan_and_saves_stacked_checkpoints(trained, corpus, tmp_path):
    _, scan_wd, _ = trained
    c = trained_config(corpus)
    c.model.scan_layers = False
    train_mod.train(c, tmp_path / "per_layer")
    a, b = _params(scan_wd), _params(tmp_path / "per_layer")
    assert isinstance(b["layers"], dict) and b["layers"]["w_up_LxDxF"].shape[0] == c.model.n_layers
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-6), a, b)
    la = [r["loss"] for r in read_metrics(scan_wd, "train")]
    lb = [r["loss"] for r in read_metrics(tmp_path / "per_layer", "train")]
    np.testing.assert_allclose(la, lb, rtol=1e-5)


def test_metrics_fetched_a_step_late_change_nothing(corpus, tmp_path, monkeypatch):
    """The one-step metrics lag of the loop gives the same metrics entries and checkpoints as syncing every step."""
    c = small_config(corpus, steps=8, log_every=2, eval_every=4, checkpoint_every=3)
    train_mod.train(c, tmp_path / "lag")
    monkeypatch.setattr(loop_mod, "metrics_lag", lambda n: False)
    train_mod.train(c, tmp_path / "sync")
    drop = ("time", "tokens_per_sec", "mfu")
    rows = [[{k: v for k, v in r.items() if k not in drop} for r in read_metrics(tmp_path / d)]
            for d in ("lag", "sync")]
    assert rows[0] == rows[1] and len(rows[0]) >= 6
    for step in (3, 6, 8):
        la, lb = _params(tmp_path / "lag", step), _params(tmp_path / "sync", step)
        jax.tree.map(np.testing.assert_array_equal, la, lb)


def test_progressive_lambda_gives_higher_sparsity_than_lambda_zero(corpus, tmp_path):
    """ProSparse's point, at equal steps from the same init: the progressive L1 schedule raises activation sparsity."""
    finals = {}
    for name, stages in (("zero", [[0.0, 12]]), ("progressive", [[0.0, 2], [0.05, 4], [0.2, 8], [0.2, 12]])):
        c = small_run_config(corpus, 12, stages=stages)
        finals[name] = train_mod.train(c, tmp_path / name).final_eval
    assert finals["progressive"]["eval_sparsity"] > finals["zero"]["eval_sparsity"] + 0.05


def test_nan_guard_stops_and_keeps_last_good_checkpoint(corpus, tmp_path):
    """lambda = 1e38 from update 3 on overflows the loss to inf in float32: that update is not applied, the run stops
    naming it, and the checkpoint of step 2 is the last one."""
    c = small_run_config(corpus, 4, stages=[[0.0, 2], [1e38, 4]])
    with pytest.raises(NonFiniteLossError, match="non-finite loss/gradient at step 3"):
        train_mod.train(c, tmp_path / "run")
    assert ckpt.latest_step(tmp_path / "run") == 2
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(_params(tmp_path / "run")))


# ---------------------------------------------------------------------------------------------------------------
# Resume, and what a workdir refuses
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scan_layers", [True, False])
def test_resume_is_bitwise_identical(corpus, tmp_path, scan_layers):
    """A run killed after its checkpoint of step 4 and resumed ends bit for bit where the uninterrupted run ends,
    with the same metrics log."""
    c = small_config(corpus, steps=8, grad_accum=2)
    c.model.scan_layers = scan_layers
    train_mod.train(c, tmp_path / "full")
    wd = killed_after(_copy(tmp_path / "full", tmp_path / "resumed"), 4)
    res = train_mod.train(c, wd)
    assert res.step == 8 and not res.interrupted
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                 _params(tmp_path / "full"), _params(wd))
    losses = [[r["loss"] for r in read_metrics(d, "train")] for d in (tmp_path / "full", wd)]
    assert losses[0] == losses[1] and len(losses[0]) == 8


def test_resume_with_different_config_refused(trained, corpus, tmp_path):
    wd = _copy(trained[1], tmp_path / "run")
    before = (wd / "config.json").read_text()
    c2 = trained_config(corpus)
    c2.model.d_ff = 96
    with pytest.raises(TrainError, match=r"model\.d_ff: saved 64 vs now 96"):
        train_mod.train(c2, wd)
    assert (wd / "config.json").read_text() == before


def test_lost_config_json_refuses_another_config_and_is_recovered(trained, corpus, tmp_path):
    """Every checkpoint carries the run config: without config.json a changed config is still refused, naming the
    fields, and the resumed run restores config.json from the checkpoint (not from the new command)."""
    c, wd, _ = trained
    wd = killed_after(_copy(wd, tmp_path / "run"), 2)
    saved = json.loads((wd / "config.json").read_text())
    (wd / "config.json").unlink()
    bad = trained_config(corpus)
    bad.model.activation = "silu"
    bad.optim.lr = 1e-2
    with pytest.raises(TrainError, match=r"model\.activation: saved 'relu' vs now 'silu'.*"
                       r"optim\.lr: saved 0\.003 vs now 0\.01.*config\.json is missing"):
        train_mod.train(bad, wd)
    assert not (wd / "config.json").exists()  # nothing written by the refused command
    res = train_mod.train(c, wd)
    assert res.step == 4 and json.loads((wd / "config.json").read_text()) == saved


def test_workdir_that_is_a_file_is_refused_before_any_work(corpus, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(TrainError, match="is a file, not a directory"):
        train_mod.train(small_config(corpus, steps=2), tmp_path / "f")


def test_failed_start_leaves_the_workdir_usable(corpus, tmp_path):
    """A start that fails before its first step (bad init_from) writes no config.json: the corrected command runs."""
    wd = tmp_path / "run"
    c = small_config(corpus, steps=2)
    c.init_from = str(tmp_path / "no_such_run")
    with pytest.raises(CheckpointError, match="no_such_run"):
        train_mod.train(c, wd)
    assert not (wd / "config.json").exists() and ckpt.latest_step(wd) is None
    c2 = small_config(corpus, steps=2)
    c2.optim.lr = 1e-3  # a different config: accepted, as the failed start left no run behind
    assert train_mod.train(c2, wd).step == 2


def test_tokenizer_file_into_a_new_workdir(trained, corpus, tmp_path):
    _, wd, _ = trained
    c = small_config(corpus, steps=2)
    c.data.tokenizer = str(wd / "tokenizer.json")
    train_mod.train(c, tmp_path / "new" / "nested")  # the workdir does not exist yet
    assert (tmp_path / "new" / "nested" / "tokenizer.json").read_bytes() == (wd / "tokenizer.json").read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# init_from
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def silu_run(corpus, tmp_path_factory):
    """The workdir of a finished 4-step SiLU run, asked for a FATReLU evaluation at 0.05."""
    c = small_config(corpus, steps=4)
    c.model.activation = "silu"
    c.sparsity.final_threshold = 0.05
    wd = tmp_path_factory.mktemp("silu") / "run"
    train_mod.train(c, wd)
    return wd


def test_init_from_substitutes_activation(corpus, silu_run, tmp_path):
    c2 = small_config(corpus, steps=2)
    c2.init_from = str(silu_run)
    c2.sparsity.stages = [[0.0, 2]]
    c2.optim.lr = 1e-9  # (almost) no update: the step-0 ReLU model is the SiLU weights with ReLU substituted
    train_mod.train(c2, tmp_path / "relu")
    rows = read_metrics(tmp_path / "relu", "train")
    assert rows[0]["sparsity"] > 0.2  # SiLU has no exact zeros; ReLU on the same weights has many
    assert read_metrics(silu_run, "train")[-1]["sparsity"] == 0.0
    assert (tmp_path / "relu" / "tokenizer.json").read_text() == (silu_run / "tokenizer.json").read_text()


def test_no_fatrelu_eval_for_silu(silu_run):
    """Threshold shifting applies to ReLU-family gates only: a SiLU run has no FATReLU evaluation."""
    fin = json.loads((silu_run / "final_eval.json").read_text())
    assert "eval_loss" in fin and "fatrelu_eval_loss" not in fin and not read_metrics(silu_run, "final_fatrelu")


# ---------------------------------------------------------------------------------------------------------------
# Config errors before any work
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stages,msg", [([[0.0, 4], [0.1, 4]], "increasing"), ([[0.0, 2], [-0.1, 4]], ">= 0")])
def test_bad_stage_tables(corpus, tmp_path, stages, msg):
    c = small_config(corpus, steps=4)
    c.sparsity.stages = stages
    with pytest.raises(ConfigError, match=msg):
        train_mod.train(c, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_missing_corpus_and_unknown_tfds(corpus, tmp_path):
    c = small_config(corpus, steps=2)
    c.data.source = f"files:{tmp_path}/nothing/*.txt"
    with pytest.raises(DataError, match="nothing"):
        train_mod.train(c, tmp_path / "run")
    c.data.source = "tfds:no_such_dataset_xyz"
    with pytest.raises(DataError, match="no_such_dataset_xyz"):
        train_mod.train(c, tmp_path / "run2")
    c.data.source = f"files:{corpus}/*.txt"
    c.data.tokenizer = str(tmp_path / "missing.json")
    with pytest.raises(TrainError, match=r"data\.tokenizer=.*missing\.json: no such file"):
        train_mod.train(c, tmp_path / "run3")
    assert not (tmp_path / "run3" / "checkpoints").exists()


def test_l1_reduction_config(corpus):
    c = small_config(corpus)
    c.sparsity.l1_reduction = "avg"
    with pytest.raises(ConfigError, match="sparsity.l1_reduction.*sum, mean"):
        resolve(c)
    c = small_config(corpus)
    c.sparsity.unknown_field = 1
    with pytest.raises(ConfigError, match="sparsity: unknown field"):
        resolve(c)


def test_list_fields_are_overridable_on_the_command_line():
    c = load_config("configs/prosparse.py:tiny", "--config.sparsity.stages=((0, 10), (5e-5, 20))",
                    "--config.train.steps=20", "--config.model.neuron_thresholds=(0.1, 0.2, 0.3, 0.4)")
    rc = resolve(c)
    assert [list(s) for s in rc.sparsity.stages] == [[0.0, 10], [5e-5, 20]]
    assert tuple(rc.model.neuron_thresholds) == (0.1, 0.2, 0.3, 0.4)


# ---------------------------------------------------------------------------------------------------------------
# Signals, through the command line
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_signal_saves_restorable_checkpoint(corpus, tmp_path, sig, code):
    """SIGTERM (a scheduler's preemption) and Ctrl-C both save and say so; Ctrl-C exits non-zero (130)."""
    wd = tmp_path / "run"
    cmd = [sys.executable, "-m", "prosparse_jax.main.train", "--config=configs/prosparse.py:tiny", f"--workdir={wd}",
           f"--config.data.source=files:{corpus}/*.txt", f"--config.data.data_dir={tmp_path}/tfds",
           "--config.data.vocab_size=320", "--config.model.vocab_size=320", "--config.model.d_model=32",
           "--config.model.d_ff=64", "--config.model.n_layers=2", "--config.data.seq_len=32",
           "--config.train.steps=100000", "--config.train.checkpoint_every=100000", "--config.train.log_every=1",
           "--config.train.progress_bar=False", "--config.data.eval_fraction=0.1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (wd / "metrics.jsonl").exists() and len(read_metrics(wd)) >= 3:
            break
        time.sleep(0.5)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == code, out
    assert f"{signal.Signals(sig).name}: stopping after this step and saving a checkpoint" in out
    assert "stopping at step" in out and "Traceback" not in out
    step = ckpt.latest_step(wd)
    assert step is not None and step >= 3
    mgr = ocp.CheckpointManager((wd / "checkpoints").absolute())
    assert step in mgr.all_steps()
    p = _params(wd)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(p))
