"""Activation predictors: the metrics on a case with a known answer, calibration, a predictor predicting every neuron
leaves the sparse model's logits exactly as they are, the collected active sets are the model's own, exact resume of
training, a SiLU model in the CETT sparse mode, refused inputs (another model, corrupted files), and the command line
(train, eval, export beside an HF export) on a tiny workdir."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import one_error_line, random_params, tiny_model_config, write_bpe_tokenizer, write_corpus

from prosparse_jax.data import corpus as corpus_lib
from prosparse_jax.errors import CorruptCheckpointError, InputError, OutputError, UsageError
from prosparse_jax.main import export_hf as export_hf_cli
from prosparse_jax.main import predictor as cli
from prosparse_jax.model import transformer as model
from prosparse_jax.predictor import calibrate, collect, core, io, measure
from prosparse_jax.predictor.train import Settings, evaluate, train_predictor
from prosparse_jax.training import checkpoint

VOCAB = 300
SEQ_LEN = 16
SMALL = Settings(rank=8, steps=4, batch_size=4, lr=3e-3, checkpoint_every=2, calib_batches=2, eval_batch_size=4)


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: tiny random workdirs with a file corpus (no model training: built in a second)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("predictor_data")
    write_corpus(root / "corpus", 30)
    write_bpe_tokenizer(root / "tokenizer.json", VOCAB)
    return root


def _workdir(root, name, **model_kw):
    cfg = tiny_model_config(vocab_size=VOCAB, **model_kw)
    run_data = {"source": f"files:{root / 'corpus'}/*.txt", "data_dir": str(root / "tfds"), "seq_len": SEQ_LEN,
                "eval_fraction": 0.2}
    wd = checkpoint.write_params_workdir(root / name, cfg, random_params(cfg, seed=3),
                                         run_config={"data": run_data})
    shutil.copyfile(root / "tokenizer.json", wd / "tokenizer.json")
    return wd


@pytest.fixture(scope="module")
def relu_wd(data_root):
    return _workdir(data_root, "relu_wd", activation="relu")


@pytest.fixture(scope="module")
def trained(relu_wd, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "pred"
    return train_predictor(relu_wd, out, SMALL, progress_bar=False)


def _batch(cfg, B=2, T=12, seed=1):
    ids = jax.random.randint(jax.random.key(seed), (B, T + 1), 0, cfg.vocab_size)
    seg = jnp.ones((B, T), jnp.int32).at[1, -3:].set(0)  # padding at the end of row 1
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "weights": (seg != 0).astype(jnp.float32),
            "segment_ids": seg, "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))}


# ---------------------------------------------------------------------------------------------------------------
# Metrics and calibration on known answers
# ---------------------------------------------------------------------------------------------------------------
def test_metrics_on_a_known_case():
    # 2 layers, 3 tokens (the last is padding), 8 neurons; active: neurons 0-3 of every token
    F = 8
    active = np.zeros((2, 3, F), bool)
    active[:, :, :4] = True
    predicted = np.zeros((2, 3, F), bool)
    predicted[0, :, :6] = True  # layer 0: a superset, 1.5x the active set
    predicted[1, :, [0, 5]] = True  # layer 1: one of the four active, one inactive
    predicted[:, 2, :] = True  # the padding token predicts everything: not counted
    valid = np.array([True, True, False])
    s = measure.summarize(measure.mask_counts(predicted, active, valid), F)
    assert s["tokens"] == 2
    np.testing.assert_allclose(s["per_layer"]["recall"], [1.0, 0.25])
    np.testing.assert_allclose(s["per_layer"]["predicted_sparsity"], [1 - 6 / 8, 1 - 2 / 8])
    np.testing.assert_allclose(s["per_layer"]["ratio"], [1.5, 0.5])
    np.testing.assert_allclose(s["per_layer"]["true_sparsity"], [0.5, 0.5])
    np.testing.assert_allclose(s["mean"]["recall"], 0.625)
    np.testing.assert_allclose(s["mean"]["ratio"], 1.0)


def test_predictor_sets_follow_the_formula():
    # w1 = I, w2 = I, b2 = 0: logits = relu(x) = x for x >= 0, so the predicted set is x > threshold
    L, D, M = 2, 8, 5
    cfg = tiny_model_config(n_layers=L, d_model=D, d_ff=D, n_heads=2, n_kv_heads=1)
    eye = jnp.broadcast_to(jnp.eye(D), (L, D, D))
    pred = {"w1_LxDxR": eye, "w2_LxRxF": eye, "b2_LxF": jnp.zeros((L, D)), "threshold_L": jnp.array([0.5, 0.25])}
    core.check_predictor(pred, cfg)
    x = jax.random.uniform(jax.random.key(0), (L, M, D))
    active = jax.random.uniform(jax.random.key(1), (L, M, D)) > 0.5
    valid = jnp.array([True, True, True, False, True])
    want = measure.mask_counts(np.asarray(x) > np.array([0.5, 0.25])[:, None, None], active, valid)
    got = measure.add_counts(None, measure.predictor_counts(pred, x, active, valid))
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    np.testing.assert_array_equal(core.predicted_mask(pred, 1, x[1][None]), (x[1] > 0.25)[None])


def test_calibration_reaches_the_target_recall():
    # 1000 positives with logits spread over [-40, 40]; 10% of them below -32 (the underflow bin)
    z = np.linspace(-40.0, 40.0, 1000, dtype=np.float32)
    hist = np.zeros((2, calibrate.N_BINS + 2), np.int64)
    b = np.clip(np.floor((z - calibrate.LO) / calibrate.BIN_WIDTH).astype(int) + 1, 0, calibrate.N_BINS + 1)
    np.add.at(hist[0], b, 1)
    t = calibrate.thresholds_for_recall(hist, 0.75)
    recall = float(np.mean(z > t[0]))
    assert recall == 0.75  # the logits are 0.08 apart, bins 1/128 wide: exactly the target, no neuron more
    assert calibrate.thresholds_for_recall(hist, 0.95)[0] == -np.inf  # 900 positives above -32: not enough
    assert t[1] == np.finfo(np.float32).max  # a layer never active predicts nothing
    with pytest.raises(UsageError, match="target_recall"):
        calibrate.check_target(1.5)


# ---------------------------------------------------------------------------------------------------------------
# The model: collected sets, and the predictor in the loop
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(activation="fatrelu", activation_threshold=0.02),
                                dict(activation="silu", neuron_thresholds=(3e-4, 5e-4))])
def test_collected_active_sets_are_the_models_own(kw):
    cfg = tiny_model_config(**kw)
    params = random_params(cfg, seed=1)
    b = _batch(cfg)
    x_LxMxD, active_LxMxF, valid_M = collect.make_collect(cfg)(params, b)
    _, st = model.forward(params, b["inputs"], cfg, segment_ids_BxT=b["segment_ids"], positions_BxT=b["positions"],
                          capture=True)
    L, B, T, F = st.x1.shape
    np.testing.assert_array_equal(active_LxMxF, np.asarray(st.x1 != 0).reshape(L, B * T, F))
    np.testing.assert_array_equal(valid_M, np.asarray(b["segment_ids"] != 0).reshape(-1))
    assert 0.05 < float(np.mean(active_LxMxF)) < 0.95 and x_LxMxD.shape == (L, B * T, cfg.d_model)


@pytest.mark.parametrize("kw", [dict(activation="relu"), dict(activation="silu", neuron_thresholds=(3e-4, 5e-4))])
def test_predicting_every_neuron_gives_exactly_the_sparse_models_logits(kw):
    cfg = tiny_model_config(**kw)
    params = random_params(cfg, seed=2)
    b = _batch(cfg)
    pred = core.init_predictor(cfg, 4, jax.random.key(0))
    f_model, f_pred = measure.make_loss_forward(cfg, "model"), measure.make_loss_forward(cfg, "predictor")
    all_in = dict(pred, threshold_L=jnp.full((cfg.n_layers,), -jnp.inf))
    nll_m, w_m, zero_m = f_model(params, b, 0)
    nll_p, w_p, zero_p = f_pred(params, b, all_in)
    assert float(nll_p) == float(nll_m) and float(w_p) == float(w_m)
    np.testing.assert_array_equal(zero_p, zero_m)
    def run(p, b, hook):
        return model.forward(p, b["inputs"], cfg, segment_ids_BxT=b["segment_ids"], positions_BxT=b["positions"],
                             x1_mask=hook)[0]

    want = jax.jit(lambda p, b: run(p, b, None))(params, b)
    got = jax.jit(lambda p, b: run(p, b, measure.predictor_hook(all_in, p, cfg)))(params, b)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # a predictor that drops neurons changes them: the hook is in the loop
    some = dict(pred, threshold_L=jnp.zeros((cfg.n_layers,)))
    nll_s, _, zero_s = f_pred(params, b, some)
    assert float(nll_s) != float(nll_m) and float(jnp.mean(zero_s)) > float(jnp.mean(zero_m))


# ---------------------------------------------------------------------------------------------------------------
# Training: saved with digests, exact resume, a SiLU model in the CETT sparse mode
# ---------------------------------------------------------------------------------------------------------------
def test_trained_predictor_is_saved_with_its_meta(trained, relu_wd):
    out, pred, meta = trained
    cfg = checkpoint.load_model(relu_wd)[0]
    loaded, meta2 = io.load_predictor(out, cfg)
    for k in core.PARAM_NAMES:
        np.testing.assert_array_equal(loaded[k], pred[k])
    assert meta2["rank"] == 8 and meta2["target_recall"] == 0.99 and meta2["model"]["step"] == 0
    assert meta2["calibration"]["tokens"] > 0 and len(meta2["calibration"]["threshold_L"]) == cfg.n_layers
    with pytest.raises(OutputError, match="already holds a predictor"):
        io.save_predictor(out, pred, meta)
    with pytest.raises(OutputError, match="already holds a predictor"):
        train_predictor(relu_wd, out, SMALL, progress_bar=False)


def test_resumed_training_ends_exactly_like_an_uninterrupted_one(trained, relu_wd, tmp_path):
    _, want, _ = trained
    out = tmp_path / "pred"
    train_predictor(relu_wd, out, SMALL, progress_bar=False)
    # as a run killed right after its step-2 checkpoint leaves it
    shutil.rmtree(out / "train" / "checkpoints" / "4")
    io.remove_predictor(out)
    assert checkpoint.latest_step(out / "train") == 2
    _, got, _ = train_predictor(relu_wd, out, SMALL, progress_bar=False)
    assert checkpoint.latest_step(out / "train") == 4
    for k in core.PARAM_NAMES:
        np.testing.assert_array_equal(got[k], want[k])
    # another setting is refused, naming it
    io.remove_predictor(out)
    with pytest.raises(UsageError, match="settings.rank: 8 there, 16 now"):
        train_predictor(relu_wd, out, Settings(**{**SMALL.__dict__, "rank": 16}), progress_bar=False)


def test_silu_model_in_the_cett_sparse_mode_gets_a_working_predictor(data_root, tmp_path):
    wd = _workdir(data_root, "silu_wd", activation="silu")
    cfg, params, _ = checkpoint.load_model(wd)
    # taus: each layer's 70th percentile of the neuron output norms on a batch -> about 30% of the neurons kept
    b = _batch(cfg, B=4, T=16)
    _, st = model.forward(params, b["inputs"], cfg, capture=True)
    n_LxBxTxF = model.neuron_output_norms(st.x1, model.w_down_norms(params)[:, None, None, :])
    taus = tuple(float(np.quantile(np.asarray(n), 0.7)) for n in n_LxBxTxF)
    s = Settings(**{**SMALL.__dict__, "steps": 60, "rank": 16, "lr": 3e-2, "batch_size": 8, "target_recall": 0.95,
                    "checkpoint_every": 60})
    out, pred, meta = train_predictor(wd, tmp_path / "pred", s, neuron_thresholds=taus, progress_bar=False)
    assert "CETT" in meta["predicts"] and meta["neuron_thresholds"] == list(taus)
    dcfg = corpus_lib.run_data_config(checkpoint.read_run_config(wd)["data"])
    corpus, tok = collect.open_data(dcfg, wd / "tokenizer.json", cfg.vocab_size)
    calib, _ = collect.split_held_out(collect.eval_batches(corpus, tok, dcfg, batch_size=4, num_batches=4))
    on_calib = measure.summarize(_sum(pred, collect.make_collect(cfg.replace(neuron_thresholds=taus)), params, calib),
                                 cfg.d_ff)
    assert min(on_calib["per_layer"]["recall"]) >= 0.95  # by construction, on the calibration rows
    _, res = evaluate(wd, out, freq_batches=4, progress_bar=False)  # on other held-out rows
    got, base = res["predictor_metrics"]["mean"], res["frequency_baseline"]["mean"]
    assert 0.3 < got["true_sparsity"] < 0.95 and got["recall"] >= 0.9
    assert got["predicted_sparsity"] == pytest.approx(base["predicted_sparsity"], abs=0.02)  # the same budget
    assert got["recall"] > base["recall"] + 0.1  # and more of the active neurons than the frequency baseline

def _sum(pred, f, params, batches):
    acc = None
    for b in batches:
        acc = measure.add_counts(acc, measure.predictor_counts(pred, *f(params, b)))
    return acc


# ---------------------------------------------------------------------------------------------------------------
# Refused inputs
# ---------------------------------------------------------------------------------------------------------------
def test_a_predictor_for_another_model_is_refused_naming_the_mismatch(trained):
    out, _, _ = trained
    with pytest.raises(InputError, match=r"w1_LxDxR has shape \(2, 32, 8\) but the model needs \(3, 32, 8\)"):
        io.load_predictor(out, tiny_model_config(vocab_size=VOCAB, n_layers=3))
    with pytest.raises(InputError, match=r"w2_LxRxF has shape \(2, 8, 48\) but the model needs \(2, 8, 64\)"):
        io.load_predictor(out, tiny_model_config(vocab_size=VOCAB, d_ff=64))
    with pytest.raises(InputError, match="holds no predictor"):
        io.load_predictor(out.parent, tiny_model_config(vocab_size=VOCAB))


def test_a_corrupted_predictor_is_refused(trained, tmp_path):
    src, _, _ = trained
    cfg = tiny_model_config(vocab_size=VOCAB)
    bad = shutil.copytree(src, tmp_path / "bad", ignore=shutil.ignore_patterns("train"))
    record = json.loads((bad / io.META_FILE).read_text())
    record["digests"]["predictor"]["b2_LxF"] = "0" * 16  # as if the array had changed
    (bad / io.META_FILE).write_text(json.dumps(record))
    with pytest.raises(CorruptCheckpointError, match="b2_LxF does not match the digest"):
        io.load_predictor(bad, cfg)
    (bad / io.META_FILE).write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="is corrupt"):
        io.load_predictor(bad, cfg)
    bad2 = shutil.copytree(src, tmp_path / "bad2", ignore=shutil.ignore_patterns("train"))
    for f in sorted(p for p in (bad2 / io.PARAMS_DIR).rglob("*") if p.is_file() and p.stat().st_size > 64):
        f.write_bytes(b"\0" * f.stat().st_size)  # the array files zeroed
    with pytest.raises(CorruptCheckpointError, match="is corrupt"):
        io.load_predictor(bad2, cfg)


# ---------------------------------------------------------------------------------------------------------------
# The command line, end to end
# ---------------------------------------------------------------------------------------------------------------
def test_cli_train_eval_and_export(relu_wd, tmp_path, capsys):
    out = tmp_path / "pred"
    common = [f"--checkpoint={relu_wd}", "--noprogress_bar"]
    assert cli.main(["predictor", "train", *common, f"--out={out}", "--rank=8", "--steps=4", "--batch_size=4",
                     "--calib_batches=2", "--eval_batch_size=4", "--checkpoint_every=2"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["rank"] == 8 and len(line["threshold_L"]) == 2
    assert cli.main(["predictor", "eval", *common, f"--predictor={out}", "--freq_batches=2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    res = json.loads((out / "eval.json").read_text())
    assert summary["recall"] == res["predictor_metrics"]["mean"]["recall"] and 0 < summary["recall"] <= 1
    assert len(res["predictor_metrics"]["per_layer"]["recall"]) == 2 and res["ppl_ratio"]["predictor"] > 0
    per_token_L = (1 - np.asarray(res["predictor_metrics"]["per_layer"]["predicted_sparsity"])) * 48
    np.testing.assert_allclose(res["frequency_baseline"]["budget_L"], per_token_L, atol=0.5 + 1e-6)
    # user errors: one line
    assert cli.main(["predictor", "eval", *common, f"--predictor={out}"]) == 1
    assert "already exists" in one_error_line(capsys, "predictor")
    assert cli.main(["predictor", "train", *common, f"--out={out}"]) == 1
    assert "already holds a predictor" in one_error_line(capsys, "predictor")
    assert cli.main(["predictor", "fit", *common]) == 1
    assert "expected one of train, eval" in one_error_line(capsys, "predictor")
    assert cli.main(["predictor", "eval", *common, f"--predictor={tmp_path}"]) == 1
    assert "holds no predictor" in one_error_line(capsys, "predictor")
    # beside an HF export, verified, with its digests
    hf = tmp_path / "hf"
    assert export_hf_cli.main(["export_hf", f"--workdir={relu_wd}", f"--out={hf}", f"--predictor={out}"]) == 0
    capsys.readouterr()
    cfg = checkpoint.load_model(relu_wd)[0]
    got, _ = io.load_predictor(hf / "predictor", cfg)
    want, _ = io.load_predictor(out, cfg)
    for k in core.PARAM_NAMES:
        np.testing.assert_array_equal(got[k], want[k])


def test_analyze_reports_a_predictor(trained, relu_wd, data_root, tmp_path):
    from prosparse_jax.analysis.analyze import analyze

    out, pred, meta = trained
    src = f"files:{data_root / 'corpus'}/*.txt"
    res = analyze(relu_wd, src, "exact", None, tmp_path / "an", batch_size=2, num_batches=2, progress=False,
                  predictor=out)
    p = res["predictor"]
    assert p["rank"] == 8 and 0 < p["mean"]["recall"] <= 1 and len(p["per_layer"]["recall"]) == 2
    np.testing.assert_allclose(1 - p["mean"]["true_sparsity"], res["activation_ratio"], rtol=1e-6)
    # every neuron predicted: recall 1, the model's own loss
    all_in = tmp_path / "all_in"
    io.save_predictor(all_in, dict(pred, threshold_L=jnp.full((2,), -jnp.inf)), meta)
    res = analyze(relu_wd, src, "exact", None, tmp_path / "an2", batch_size=2, num_batches=2, progress=False,
                  predictor=all_in)
    assert res["predictor"]["mean"]["recall"] == 1.0 and res["predictor"]["ppl_ratio"] == 1.0
    assert res["predictor"]["loss_model"] == res["predictor"]["loss_with_predictor"]
    assert res["predictor"]["loss_model"] == pytest.approx(res["dense_loss"], rel=1e-6)


def test_cli_help_and_unknown_flag(capsys):
    assert cli.main(["predictor", "--help"]) == 0
    out = capsys.readouterr().out
    assert cli.__doc__.strip().splitlines()[0] in out and "--rank" in out and "--[no]verbose" in out
    assert cli.main(["predictor", "train", "--no_such_flag=1"]) == 1
    assert "no_such_flag" in one_error_line(capsys, "predictor")
