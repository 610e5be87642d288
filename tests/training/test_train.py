"""Training: objective, exact resume, SIGTERM, NaN guard, config errors, init_from substitution."""

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import small_run_config, tiny_model_config, write_corpus

from prosparse_jax.config import ConfigError
from prosparse_jax.data import pipeline as data_lib
from prosparse_jax.model.transformer import forward, init_params
from prosparse_jax.run_config import resolve
from prosparse_jax.training import checkpoint as ckpt
from prosparse_jax.training import loop as loop_mod
from prosparse_jax.training import step as step_mod
from prosparse_jax.training import train as train_mod
from prosparse_jax.training.metrics import MetricsFileError, read_metrics
from prosparse_jax.training.schedules import reg_factor_numpy

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("c") / "corpus")


def small_config(corpus, steps=8, **train_kw):
    stages = [[0.0, 2], [0.05, 4], [0.2, 8]] if steps >= 4 else None  # rescaled to steps
    c = small_run_config(corpus, steps, stages=stages)
    c.train.update(train_kw)
    return c


def _params(workdir, step=None):
    _, p, _ = ckpt.load_model(workdir, step)
    return p


def _assert_grads_close(a, b, rtol=1e-5):
    """Leaf by leaf: ``rtol`` per element plus an ``atol`` of ``rtol`` x the leaf's largest magnitude.

    A gradient element is a sum over tokens: where it nearly cancels, its round-off is that of the leaf's terms, not
    of its own value, so a fixed atol does not scale with the leaf; a wrong gradient is off by O(1) of the leaf.
    """
    def check(x, y):
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * float(np.abs(y).max()))

    jax.tree.map(check, a, b)


def test_l1_gradient_matches_written_formula():
    cfg = tiny_model_config(activation="relu")
    params = init_params(cfg, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": jnp.ones((2, 8), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(8), (2, 8)), "weights": jnp.ones((2, 8))}
    lam = 0.37

    def reg_only(p):
        _, aux = step_mod.loss_fn(p, batch, cfg, jnp.float32(lam), "mean")
        return aux["reg_loss"]

    def written(p):  # lambda * sum_l mean_{tokens x d_ff} |x1_l|, from the captured x1
        _, st = forward(p, batch["inputs"], cfg, capture=True)
        return lam * sum(jnp.mean(jnp.abs(st.x1[i])) for i in range(cfg.n_layers))

    g1, g2 = jax.grad(reg_only)(params), jax.grad(written)(params)
    _assert_grads_close(g1, g2)
    # analytic: d/dW_up of mean|relu(g) * u| = x^T (relu(g) * sign(x1)) / (tokens * F), checked on layer 0's FFN
    x = jax.random.normal(jax.random.key(2), (5, cfg.d_model))
    wg, wu = params["layers"]["w_gate_LxDxF"][0], params["layers"]["w_up_LxDxF"][0]
    f = lambda w: jnp.mean(jnp.abs(jax.nn.relu(x @ wg) * (x @ w)))  # noqa: E731
    x1 = jax.nn.relu(x @ wg) * (x @ wu)
    analytic = x.T @ (jax.nn.relu(x @ wg) * jnp.sign(x1)) / x1.size
    _assert_grads_close(jax.grad(f)(wu), analytic)


def test_train_writes_metrics_and_logs_lambda_per_step(corpus, tmp_path):
    c = small_config(corpus, steps=8)
    res = train_mod.train(c, tmp_path / "run")
    rows = read_metrics(tmp_path / "run", "train")
    assert [r["step"] for r in rows] == list(range(1, 9))
    for k in ("step", "loss", "lm_loss", "reg_loss", "reg_factor", "lr", "sparsity", "sparsity_per_layer",
              "tokens_per_sec", "mfu"):
        assert k in rows[0]
    # the entry of step s logs the update with index t = s - 1 (0-based), whose lambda is lambda(t)
    stages = [tuple(x) for x in c.sparsity.stages]
    for r in rows:
        assert r["reg_factor"] == pytest.approx(reg_factor_numpy(stages, r["step"] - 1), rel=1e-6, abs=1e-9)
    assert rows[0]["reg_factor"] == 0.0 and rows[-1]["reg_factor"] > 0.15
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["lm_loss"] + rows[-1]["reg_loss"], rel=1e-6)  # a float32 sum
    assert "eval_loss" in res.final_eval and "eval_sparsity" in res.final_eval
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["activation"] == "relu"
    assert list((tmp_path / "run" / "tb").glob("events.*"))
    assert ckpt.latest_step(tmp_path / "run") == 8


@pytest.mark.parametrize("scan_layers", [True, False])
def test_resume_is_bitwise_identical(corpus, tmp_path, scan_layers):
    c = small_config(corpus, steps=8, grad_accum=2)
    c.model.scan_layers = scan_layers
    train_mod.train(c, tmp_path / "full")
    r1 = train_mod.train(c, tmp_path / "split", stop_after=5)  # 'killed' after step 5 (forced checkpoint)
    assert r1.interrupted and ckpt.latest_step(tmp_path / "split") == 5
    train_mod.train(c, tmp_path / "split")
    a, b = _params(tmp_path / "full"), _params(tmp_path / "split")
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    la = [r["loss"] for r in read_metrics(tmp_path / "full", "train")]
    lb = [r["loss"] for r in read_metrics(tmp_path / "split", "train")]
    assert la == lb


def test_per_layer_training_matches_scan_and_saves_stacked_checkpoints(corpus, tmp_path):
    c = small_config(corpus, steps=4)
    train_mod.train(c, tmp_path / "scan")
    c.model.scan_layers = False
    train_mod.train(c, tmp_path / "per_layer")
    a, b = _params(tmp_path / "scan"), _params(tmp_path / "per_layer")
    assert isinstance(b["layers"], dict) and b["layers"]["w_up_LxDxF"].shape[0] == c.model.n_layers
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-6), a, b)
    la = [r["loss"] for r in read_metrics(tmp_path / "scan", "train")]
    lb = [r["loss"] for r in read_metrics(tmp_path / "per_layer", "train")]
    np.testing.assert_allclose(la, lb, rtol=1e-5)


def test_nan_guard_stops_and_keeps_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    real = train_mod.schedules.reg_factor_schedule
    monkeypatch.setattr(train_mod.schedules, "reg_factor_schedule",
                        lambda stages: (lambda t: jnp.where(t >= 5, jnp.nan, real(stages)(t))))
    c = small_config(corpus, steps=8)
    with pytest.raises(train_mod.NonFiniteLossError, match="step 5"):
        train_mod.train(c, tmp_path / "run")
    assert ckpt.latest_step(tmp_path / "run") == 4
    p = _params(tmp_path / "run")
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(p))


def test_resume_with_different_config_refused(corpus, tmp_path):
    c = small_config(corpus, steps=4)
    train_mod.train(c, tmp_path / "run")
    before = (tmp_path / "run" / "config.json").read_text()
    c2 = small_config(corpus, steps=4)
    c2.model.d_ff = 96
    with pytest.raises(train_mod.TrainError, match="model.d_ff"):
        train_mod.train(c2, tmp_path / "run")
    assert (tmp_path / "run" / "config.json").read_text() == before


def test_init_from_substitutes_activation(corpus, tmp_path):
    c = small_config(corpus, steps=4)
    c.model.activation = "silu"
    train_mod.train(c, tmp_path / "silu")
    c2 = small_config(corpus, steps=2)
    c2.init_from = str(tmp_path / "silu")
    c2.sparsity.stages = [[0.0, 2]]
    c2.optim.lr = 1e-9  # (almost) no update: the step-0 ReLU model is the SiLU weights with ReLU substituted
    train_mod.train(c2, tmp_path / "relu")
    rows = read_metrics(tmp_path / "relu", "train")
    assert rows[0]["sparsity"] > 0.2  # SiLU has no exact zeros; ReLU on the same weights has many
    assert read_metrics(tmp_path / "silu", "train")[-1]["sparsity"] == 0.0
    assert (tmp_path / "relu" / "tokenizer.json").read_text() == (tmp_path / "silu" / "tokenizer.json").read_text()


@pytest.mark.parametrize("stages,msg", [([[0.0, 4], [0.1, 4]], "increasing"), ([[0.0, 2], [-0.1, 4]], ">= 0")])
def test_bad_stage_tables(corpus, tmp_path, stages, msg):
    c = small_config(corpus, steps=4)
    c.sparsity.stages = stages
    with pytest.raises(ConfigError, match=msg):
        train_mod.train(c, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_missing_corpus_and_unknown_tfds(corpus, tmp_path):
    from prosparse_jax.data import pipeline as data_lib

    c = small_config(corpus, steps=2)
    c.data.source = f"files:{tmp_path}/nothing/*.txt"
    with pytest.raises(data_lib.DataError, match="nothing"):
        train_mod.train(c, tmp_path / "run")
    c.data.source = "tfds:no_such_dataset_xyz"
    with pytest.raises(data_lib.DataError, match="no_such_dataset_xyz"):
        train_mod.train(c, tmp_path / "run2")
    c.data.source = f"files:{corpus}/*.txt"
    c.data.tokenizer = str(tmp_path / "missing.json")
    with pytest.raises(train_mod.TrainError, match=r"data\.tokenizer=.*missing\.json: no such file"):
        train_mod.train(c, tmp_path / "run3")
    assert not (tmp_path / "run3" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_signal_saves_restorable_checkpoint(corpus, tmp_path, sig, code):
    """SIGTERM (a scheduler's preemption) and Ctrl-C both save and say so; Ctrl-C exits non-zero (130)."""
    wd = tmp_path / "run"
    cmd = [sys.executable, "-m", "prosparse_jax.training.train", "--config=configs/prosparse.py:tiny", f"--workdir={wd}",
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


@pytest.mark.parametrize("scan_layers", [True, False])
def test_train_step_compiles_once(corpus, scan_layers):
    """The state place_state() builds (as train() does) is placed as the jitted step returns it: no recompile."""
    from prosparse_jax.run_config import resolve
    from prosparse_jax.training import optim as optim_lib
    from prosparse_jax.training import schedules
    from prosparse_jax.training.sharding import make_mesh

    c = small_config(corpus, steps=4)
    c.model.scan_layers = scan_layers
    rc = resolve(c)
    mesh = make_mesh()
    tx, lr_fn = optim_lib.make_optimizer(rc.optim, rc.train.steps, rc.model.d_model)
    params = init_params(rc.model, jax.random.key(0))
    state = step_mod.place_state(params, tx.init(params), 0, rc.model, mesh)
    step_fn = jax.jit(step_mod.make_train_step(rc, tx, lr_fn, schedules.reg_factor_schedule(rc.sparsity.stages)),
                      donate_argnums=(0,))
    B, T = rc.train.batch_size, rc.data.seq_len
    batch = {"inputs": jnp.zeros((1, B, T), jnp.int32), "targets": jnp.zeros((1, B, T), jnp.int32),
             "segment_ids": jnp.ones((1, B, T), jnp.int32), "positions": jnp.broadcast_to(jnp.arange(T), (1, B, T)),
             "weights": jnp.ones((1, B, T), jnp.float32)}
    for _ in range(3):
        state, _ = step_fn(state, batch)
    assert step_fn._cache_size() == 1


def test_l1_reduction_sum_is_exactly_d_ff_times_mean():
    """'sum' (ProSparse Eq. 2: ||x1||_1 over d_ff, averaged over tokens) = d_ff x 'mean', in value and gradient."""
    cfg = tiny_model_config(activation="relu")
    params = init_params(cfg, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
    w = jnp.ones((2, 8)).at[1, 5:].set(0.0)  # padding must not count as tokens
    seg = jnp.ones((2, 8), jnp.int32).at[1, 5:].set(0)
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": seg,
             "positions": jnp.broadcast_to(jnp.arange(8), (2, 8)), "weights": w}
    lam = jnp.float32(0.3)

    def reg(p, reduction):
        return step_mod.loss_fn(p, batch, cfg, lam, reduction)[1]["reg_loss"]

    s, m = float(reg(params, "sum")), float(reg(params, "mean"))
    assert s == pytest.approx(cfg.d_ff * m, rel=1e-6)
    # the literal formula: lambda * sum over layers of mean over valid tokens of sum over d_ff |x1|
    _, st = forward(params, batch["inputs"], cfg, segment_ids_BxT=seg, capture=True)
    valid = np.asarray(seg) > 0
    literal = 0.3 * sum(np.abs(np.asarray(st.x1[i], np.float64)).sum(-1)[valid].mean() for i in range(cfg.n_layers))
    assert s == pytest.approx(literal, rel=1e-5)
    gs, gm = jax.grad(reg)(params, "sum"), jax.grad(reg)(params, "mean")
    _assert_grads_close(gs, jax.tree.map(lambda b: cfg.d_ff * b, gm))
    with pytest.raises(ConfigError, match="l1_reduction"):
        step_mod.loss_fn(params, batch, cfg, lam, "l2")


def test_l1_reduction_config(corpus):
    from prosparse_jax.run_config import resolve

    c = small_config(corpus)
    assert resolve(c).sparsity.l1_reduction == "sum"  # the paper's literal form is the default
    c.sparsity.l1_reduction = "avg"
    with pytest.raises(ConfigError, match="sparsity.l1_reduction.*sum, mean"):
        resolve(c)
    c = small_config(corpus)
    c.sparsity.unknown_field = 1
    with pytest.raises(ConfigError, match="sparsity: unknown field"):
        resolve(c)


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
    aux1, g1 = step_mod.accumulate_grads(params, one, cfg, lam)
    aux2, g2 = step_mod.accumulate_grads(params, two, cfg, lam)
    for k in ("loss", "lm_loss", "reg_loss"):
        assert float(aux2[k]) == pytest.approx(float(aux1[k]), rel=1e-5), k
    np.testing.assert_allclose(aux2["sparsity_per_layer"], aux1["sparsity_per_layer"], rtol=1e-5)
    _assert_grads_close(g2, g1)
    # the mean of micro-batch means (the old rule) is a different objective on this batch
    means = [step_mod.loss_fn(params, jax.tree.map(lambda x, i=i: x[i], two), cfg, lam)[0] for i in range(2)]
    assert abs(float(sum(means)) / 2 - float(aux1["loss"])) > 1e-3


def test_progressive_lambda_gives_higher_sparsity_than_lambda_zero(corpus, tmp_path):
    """ProSparse's point, at equal steps from the same init: the progressive L1 schedule raises activation sparsity."""
    finals = {}
    for name, stages in (("zero", [[0.0, 12]]), ("progressive", [[0.0, 2], [0.05, 4], [0.2, 8], [0.2, 12]])):
        c = small_run_config(corpus, 12, stages=stages)
        finals[name] = train_mod.train(c, tmp_path / name).final_eval
    assert finals["progressive"]["eval_sparsity"] > finals["zero"]["eval_sparsity"] + 0.05


def test_final_fatrelu_eval_is_the_shifted_model_on_the_held_out_batches(corpus, tmp_path):
    """ProSparse §3.3: after training, ReLU is replaced by FATReLU(t) without retraining; the final evaluation reports
    that model's held-out loss and sparsity next to the ReLU model's."""
    c = small_config(corpus, steps=4)
    c.sparsity.final_threshold = 0.05
    res = train_mod.train(c, tmp_path / "run")
    fin = res.final_eval
    assert fin["fatrelu_threshold"] == 0.05
    assert fin["fatrelu_eval_sparsity"] > fin["eval_sparsity"] + 0.01  # the threshold really shifts

    # reference: the checkpoint with activation fatrelu(t), cross-entropy from log_softmax, on the run's eval batches
    rc = resolve(c)
    mcfg, params, tok_path = ckpt.load_model(tmp_path / "run")
    assert mcfg.activation == "relu"
    dcfg = dataclasses.replace(rc.data, tokenizer=str(tok_path))
    batches = data_lib.make_eval_batches(dcfg, data_lib.get_tokenizer(dcfg, tmp_path / "run"),
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
    entries = read_metrics(tmp_path / "run", "final_fatrelu")
    assert len(entries) == 1 and entries[0]["fatrelu_eval_loss"] == fin["fatrelu_eval_loss"]
    assert json.loads((tmp_path / "run" / "final_eval.json").read_text())["fatrelu_threshold"] == 0.05


def test_no_fatrelu_eval_for_silu(corpus, tmp_path):
    """Threshold shifting applies to ReLU-family gates only: a SiLU run has no FATReLU evaluation."""
    c = small_run_config(corpus, 2, activation="silu")
    c.sparsity.final_threshold = 0.05
    fin = train_mod.train(c, tmp_path / "run").final_eval
    assert "fatrelu_eval_loss" not in fin and not read_metrics(tmp_path / "run", "final_fatrelu")


def test_lost_config_json_refuses_another_config_and_is_recovered(corpus, tmp_path):
    """Every checkpoint carries the run config: without config.json a changed config is still refused, naming the
    fields, and the resumed run restores config.json from the checkpoint (not from the new command)."""
    c = small_config(corpus, steps=4)
    wd = tmp_path / "run"
    train_mod.train(c, wd, stop_after=2)
    saved = json.loads((wd / "config.json").read_text())
    (wd / "config.json").unlink()
    bad = small_config(corpus, steps=4)
    bad.model.activation = "silu"
    bad.optim.lr = 1e-2
    with pytest.raises(train_mod.TrainError, match=r"model\.activation: saved 'relu' vs now 'silu'.*"
                       r"optim\.lr: saved 0\.003 vs now 0\.01.*config\.json is missing"):
        train_mod.train(bad, wd)
    assert not (wd / "config.json").exists()  # nothing written by the refused command
    res = train_mod.train(c, wd)
    assert res.step == 4 and json.loads((wd / "config.json").read_text()) == saved


def test_failed_start_leaves_the_workdir_usable(corpus, tmp_path):
    """A start that fails before its first step (bad init_from) writes no config.json: the corrected command runs."""
    wd = tmp_path / "run"
    c = small_config(corpus, steps=2)
    c.init_from = str(tmp_path / "no_such_run")
    with pytest.raises(ckpt.CheckpointError, match="no_such_run"):
        train_mod.train(c, wd)
    assert not (wd / "config.json").exists() and ckpt.latest_step(wd) is None
    c2 = small_config(corpus, steps=2)
    c2.optim.lr = 1e-3  # a different config: accepted, as the failed start left no run behind
    assert train_mod.train(c2, wd).step == 2


def test_tokenizer_file_into_a_new_workdir(corpus, tmp_path):
    c = small_config(corpus, steps=2)
    train_mod.train(c, tmp_path / "a")
    c2 = small_config(corpus, steps=2)
    c2.data.tokenizer = str(tmp_path / "a" / "tokenizer.json")
    train_mod.train(c2, tmp_path / "new" / "nested")  # the workdir does not exist yet
    assert (tmp_path / "new" / "nested" / "tokenizer.json").read_bytes() == (tmp_path / "a" / "tokenizer.json"
                                                                            ).read_bytes()


def test_metrics_survive_a_line_cut_by_a_crash(corpus, tmp_path):
    c = small_config(corpus, steps=4)
    wd = tmp_path / "run"
    train_mod.train(c, wd, stop_after=2)
    with open(wd / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "kind": "train", "lo')  # a crash mid-write
    assert [r["step"] for r in read_metrics(wd, "train")] == [1, 2]  # readers skip the cut line
    assert train_mod.train(c, wd).step == 4
    assert [r["step"] for r in read_metrics(wd, "train")] == [1, 2, 3, 4]
    assert '"lo' in (wd / "metrics.discarded.jsonl").read_text()
    lines = (wd / "metrics.jsonl").read_text().splitlines()
    (wd / "metrics.jsonl").write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(MetricsFileError, match=r"metrics\.jsonl:2: not a metrics entry"):
        read_metrics(wd)


def test_workdir_that_is_a_file_is_refused_before_any_work(corpus, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(train_mod.TrainError, match="is a file, not a directory"):
        train_mod.train(small_config(corpus, steps=2), tmp_path / "f")


def test_list_fields_are_overridable_on_the_command_line():
    out = subprocess.run([sys.executable, "-m", "prosparse_jax.main.describe", "--config=configs/prosparse.py:tiny",
                          "--config.sparsity.stages=((0, 10), (5e-5, 20))", "--config.train.steps=20",
                          "--config.model.neuron_thresholds=(0.1, 0.2, 0.3, 0.4)"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    d = json.loads(out)
    assert d["sparsity_stages"] == [[0.0, 10], [5e-5, 20]]


def test_disk_full_during_a_checkpoint_is_one_error_and_keeps_the_older_one(corpus, tmp_path, monkeypatch):
    import errno

    c = small_config(corpus, steps=4)
    wd = tmp_path / "run"
    train_mod.train(c, wd, stop_after=2)
    real_save = ckpt.save

    def full(mgr, step, *a, **k):
        if step == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(wd / "checkpoints" / "4"))
        return real_save(mgr, step, *a, **k)

    monkeypatch.setattr(ckpt, "save", full)
    with pytest.raises(train_mod.TrainError, match=r"No space left on device.*newest complete checkpoint \(step 2\) "
                                                   r"is intact"):
        train_mod.train(c, wd)
    monkeypatch.setattr(ckpt, "save", real_save)
    assert ckpt.latest_step(wd) == 2 and train_mod.train(c, wd).step == 4  # rerun after freeing space resumes
