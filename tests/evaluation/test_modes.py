"""Sparse modes: the sparsity the backend reports equals what ``analyze`` measures for the same setting on the same
tokens (FATReLU, the PPL-1% sparse mode, Top-k); modes a model cannot run are one clear error naming the fix."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import random_params, tiny_model_config, write_bpe_tokenizer, write_corpus

pytest.importorskip("lm_eval")

from prosparse_jax.analysis import analyze as an  # noqa: E402
from prosparse_jax.analysis import frontier, measure  # noqa: E402
from prosparse_jax.errors import UsageError  # noqa: E402
from prosparse_jax.evaluation import modes  # noqa: E402
from prosparse_jax.evaluation.backend import ProsparseLM  # noqa: E402
from prosparse_jax.training import checkpoint  # noqa: E402

VOCAB = 300
EVAL = dict(batch_size=2, num_batches=2, progress=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    """(workdir of a random ReLU model, its data source, its run's data section, its backend)."""
    root = tmp_path_factory.mktemp("modes")
    corpus = write_corpus(root / "corpus", 30)
    tok = write_bpe_tokenizer(root / "tokenizer.json", VOCAB)
    cfg = tiny_model_config(vocab_size=VOCAB)
    run_data = {"seq_len": 32, "eval_fraction": 0.1, "data_dir": str(root / "tfds")}
    wd = checkpoint.write_params_workdir(root / "wd", cfg, random_params(cfg, seed=1), run_config={"data": run_data})
    shutil.copyfile(tok, wd / "tokenizer.json")
    src = f"files:{corpus}/*.txt"
    return wd, src, run_data, ProsparseLM(pretrained=str(wd), scale_data=src, batch_size=3)


def analyze_sequences(wd, src: str, run_data: dict) -> list[list[int]]:
    """The documents analyze's batches hold (``measure.load_eval`` with analyze's arguments), one token list per
    segment of a row: each is a sequence of its own (positions from 0, attention within the segment)."""
    by_src, _ = measure.load_eval([src], wd / "tokenizer.json", run_data, None, None, EVAL["batch_size"],
                                  EVAL["num_batches"], VOCAB)
    seqs = []
    for b in by_src[src]:
        for ids_T, seg_T in zip(np.asarray(b["inputs"]), np.asarray(b["segment_ids"]), strict=True):
            for s in np.unique(seg_T[seg_T > 0]):
                seqs.append(ids_T[seg_T == s].tolist())
    return seqs


def backend_sparsity(lm: ProsparseLM, mode: str, seqs: list[list[int]]) -> list[float]:
    """The per-layer sparsity the backend reports in ``mode`` after reading each sequence once (a dummy target)."""
    lm.set_mode(mode)
    lm.score_tokens([(s, [0]) for s in seqs], ["t"] * len(seqs))
    return lm.sparsity.result("t")["sparsity_per_layer"]


@pytest.mark.parametrize(("metric", "value", "mode"), [
    ("fat", 0.02, "fatrelu:0.02"),  # ReLU: |act(gate)| >= t is FATReLU's gate >= t
    ("topk", 0.25, "topk:0.25"),
    ("pplp", 1.0, "thresholds:{out}/sparse_mode.json"),
])
def test_reported_sparsity_equals_analyze(setup, tmp_path, metric: str, value: float, mode: str) -> None:
    wd, src, run_data, lm = setup
    res = an.analyze(wd, src, metric, value, tmp_path, **EVAL)
    got = backend_sparsity(lm, mode.format(out=tmp_path), analyze_sequences(wd, src, run_data))
    want = [1 - r for r in res["activation_ratio_per_layer"]]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert lm.sparsity.result("t")["tokens"] == res["tokens_measured"]
    assert np.mean(got) > 0.4  # every layer counted (the dense random ReLU model is ~50% sparse)


def test_predictor_mode_equals_the_predictor_in_the_loop(setup, tmp_path) -> None:
    """predictor:<dir> loads a saved predictor and runs it in the loop: its sparsity is the predictor's own
    loss forward's (prosparse_jax.predictor.measure) on analyze's batches, above the model's exact zeros."""
    import jax

    from prosparse_jax.predictor import core, io
    from prosparse_jax.predictor import measure as pmeasure

    wd, src, run_data, lm = setup
    pred = core.init_predictor(lm.model_cfg, 8, jax.random.key(0))
    io.save_predictor(tmp_path / "pred", pred, {"rank": 8})
    seqs = analyze_sequences(wd, src, run_data)
    dense = backend_sparsity(lm, "dense", seqs)
    got = backend_sparsity(lm, f"predictor:{tmp_path / 'pred'}", seqs)
    by_src, _ = measure.load_eval([src], wd / "tokenizer.json", run_data, None, None, EVAL["batch_size"],
                                  EVAL["num_batches"], VOCAB)
    forward = pmeasure.make_loss_forward(lm.model_cfg, "predictor")
    want = np.mean([np.asarray(forward(lm.params, b, pred)[2]) for b in by_src[src]], axis=0)  # equal-size batches
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert np.mean(got) > np.mean(dense) + 0.1


def test_fatrelu_sparsity_equals_the_models_own_forward(setup) -> None:
    """fatrelu:t runs the model's own FATReLU activation: its sparsity is the forward's zero count of that model."""
    import jax.numpy as jnp

    from prosparse_jax.model import transformer as model

    wd, src, run_data, lm = setup
    seqs = analyze_sequences(wd, src, run_data)[:5]
    got = backend_sparsity(lm, "fatrelu:0.03", seqs)
    mcfg, params, _ = checkpoint.load_model(wd)
    fat = mcfg.replace(activation="fatrelu", activation_threshold=0.03)
    zeros, tokens = np.zeros(mcfg.n_layers), 0
    for s in seqs:  # one unpadded forward per sequence
        zero_frac_L = model.forward(params, jnp.asarray([s]), fat)[1].zero_frac
        zeros += np.asarray(zero_frac_L) * len(s)
        tokens += len(s)
    np.testing.assert_allclose(got, zeros / tokens, rtol=1e-5)


def test_relative_fatrelu_is_scaled_by_the_positive_gate_mean(setup) -> None:
    wd, src, run_data, lm = setup
    mode = lm.set_mode("fatrelu:0.5rel")
    by_src, _ = measure.load_eval([src], wd / "tokenizer.json", run_data, 32, None, 4, 2, VOCAB)
    mcfg, params, _ = checkpoint.load_model(wd)
    scale = frontier.positive_gate_mean(params, mcfg, by_src[src])
    assert mode.settings["positive_gate_mean"] == pytest.approx(scale, rel=1e-6)
    assert mode.settings["threshold"] == pytest.approx(0.5 * scale, rel=1e-6)


@pytest.mark.parametrize(("text", "match"), [
    ("sparse", "unknown kind 'sparse'"),
    ("fatrelu", "fatrelu needs an argument, e.g. fatrelu:0.01"),
    ("fatrelu:-1", "threshold must be >= 0"),
    ("fatrelu:xrel", "must be a number"),
    ("topk:1.5", "k must be a fraction in \\(0, 1\\] or a whole number"),
    ("dense:1", "dense takes no argument"),
])
def test_bad_mode_strings_are_one_clear_error(text: str, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        modes.parse_mode(text)


def test_a_silu_model_without_thresholds_names_the_command_that_gives_them() -> None:
    cfg = tiny_model_config(activation="silu")
    for text in ("thresholds", "fatrelu:0.01"):
        with pytest.raises(UsageError, match=r"prosparse_jax\.main\.analyze --checkpoint=runs/x .*--metric=pplp"):
            modes.resolve_mode(text, cfg, checkpoint="runs/x")
    taus = (0.1, 0.2)
    mode = modes.resolve_mode("thresholds", cfg.replace(neuron_thresholds=taus))
    np.testing.assert_array_equal(mode.aux.taus_L, np.float32(taus))


@pytest.mark.parametrize(("activation", "t0", "mode", "want"), [
    ("fatrelu", 0.05, "dense", ("fatrelu", 0.05)),  # a FATReLU model's dense run keeps its own threshold
    ("fatrelu", 0.05, "fatrelu:0.01", ("fatrelu", 0.01)),  # below the model's own: the gate is ReLU underneath
    ("relu", 0.0, "fatrelu:0.03", ("fatrelu", 0.03)),
    ("relu", 0.0, "dense", ("relu", 0.0)),
    ("silu", 0.0, "dense", ("silu", 0.0)),
])
def test_threshold_modes_run_what_the_model_config_runs(activation: str, t0: float, mode: str, want: tuple) -> None:
    """dense / fatrelu (one program, thresholds as arrays) equal the forward of the model configured that way:
    the same logits and the same exact zeros."""
    import jax

    from prosparse_jax.model import transformer as model

    cfg = tiny_model_config(activation=activation, activation_threshold=t0)
    params = random_params(cfg, seed=4)
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    m = modes.resolve_mode(mode, cfg)
    got, got_stats = model.forward(params, ids, m.cfg, x1_mask=m.hook(params, m.aux))
    ref, ref_stats = model.forward(params, ids, cfg.replace(activation=want[0], activation_threshold=want[1]))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(got_stats.zero_frac), np.asarray(ref_stats.zero_frac))


def test_modes_of_one_program_compile_once(setup) -> None:
    """dense and any fatrelu threshold share one compiled forward: switching between them compiles nothing."""
    import jax

    wd, src, run_data, lm = setup
    seqs = analyze_sequences(wd, src, run_data)[:4]
    backend_sparsity(lm, "dense", seqs)
    lm.set_mode("fatrelu:0.5rel")  # its activation scale (a forward of its own) computed before counting
    compiles: list[str] = []
    listening = [True]
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(event)
        if listening[0] and event == "/jax/compilation/backend_compile_duration" else None)
    sparse = backend_sparsity(lm, "fatrelu:0.02", seqs)
    backend_sparsity(lm, "fatrelu:0.5rel", seqs)
    listening[0] = False
    assert compiles == []
    assert np.mean(sparse) > np.mean(backend_sparsity(lm, "dense", seqs))  # the threshold acts


def test_thresholds_of_another_model_are_refused(tmp_path) -> None:
    (tmp_path / "sparse_mode.json").write_text('{"model.neuron_thresholds": [0.1, 0.2, 0.3]}')
    with pytest.raises(UsageError, match="another model"):
        modes.resolve_mode(f"thresholds:{tmp_path}", tiny_model_config())


def test_topk_as_a_neuron_count() -> None:
    mode = modes.resolve_mode("topk:12", tiny_model_config())  # d_ff = 48
    assert mode.settings["k_fraction"] == 0.25
    with pytest.raises(UsageError, match="exceeds d_ff"):
        modes.resolve_mode("topk:64", tiny_model_config())
