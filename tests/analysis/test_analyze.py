"""analyze CLI on a trained tiny SiLU model: exact vs PPL-p%, CETT, top-k / FAT, sparse mode, per-dataset, errors; the
headline CETT / PPL-p% ratio (analyze and the law inputs) counted in the sparse forward; dead-neuron tiers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_run_config, write_corpus

from prosparse_jax.analysis import analyze as an
from prosparse_jax.analysis import law_inputs, measure, neurons
from prosparse_jax.config import DataConfig
from prosparse_jax.data import pipeline
from prosparse_jax.data.corpus import get_tokenizer, load_tokenizer, open_corpus
from prosparse_jax.errors import UsageError
from prosparse_jax.main import analyze as analyze_main
from prosparse_jax.model import transformer as model
from prosparse_jax.training import checkpoint as ckpt
from prosparse_jax.training import step as step_mod
from prosparse_jax.training import train as train_mod

STEPS = 40
EVAL = dict(batch_size=4, num_batches=2, progress=False)


def small_config(corpus, steps):
    """A 2-layer SiLU model on a tiny file corpus."""
    return small_run_config(corpus, steps, activation="silu", batch_size=8, checkpoint_every=steps)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(workdir, corpus dir) of a SiLU model trained for STEPS steps (~30 s)."""
    root = tmp_path_factory.mktemp("analyze")
    corpus = write_corpus(root / "corpus", 60)
    res = train_mod.train(small_config(corpus, STEPS), root / "run")
    assert res.final_eval["eval_loss"] < 4.5  # well below ln(320) = 5.77: not a random model
    return root / "run", corpus


@pytest.fixture(scope="module")
def exact_and_pplp(run, tmp_path_factory):
    wd, corpus = run
    out = tmp_path_factory.mktemp("out")
    src = f"files:{corpus}/*.txt"
    return (an.analyze(wd, src, "exact", None, out / "exact", **EVAL),
            an.analyze(wd, src, "pplp", 1.0, out / "pplp", **EVAL), out)


def test_pplp_is_within_budget_and_far_sparser_than_exact_for_silu(exact_and_pplp):
    exact, pplp, out = exact_and_pplp
    assert exact["activation_ratio"] > 0.99  # SiLU has (almost) no exact zeros
    assert exact["sparse_loss"] == exact["dense_loss"] and exact["forward_passes"] == 2
    assert pplp["ppl_ratio"] <= 1.01
    assert pplp["activation_ratio"] < 0.5 * exact["activation_ratio"]
    assert 0 < pplp["cett_target"] < 1 and len(pplp["thresholds_per_layer"]) == 2
    assert pplp["forward_passes"] == 2 * (1 + 12)  # capture + one sweep per bisection step, 2 batches each
    assert pplp["dense_loss"] == pytest.approx(exact["dense_loss"], rel=1e-6)
    for k in ("activation_ratio_per_layer", "dead_neuron_fraction_per_layer", "dead_neuron_fraction",
              "dead_neuron_tiers", "tokens_measured", "dense_forward_activation_ratio", "pplp_search",
              "cett_achieved_per_layer"):
        assert k in pplp
    assert pplp["tokens_measured"] == 4 * 32 * 2
    on_disk = json.loads((out / "pplp" / "sparsity.json").read_text())
    assert on_disk["ppl_ratio"] == pplp["ppl_ratio"]
    for f in ("heatmap.png", "per_layer.png", "sparse_mode.json"):
        assert (out / "pplp" / f).stat().st_size > 0
    assert not (out / "exact" / "sparse_mode.json").exists()


def test_sparse_mode_reproduces_the_reported_sparse_loss(run, exact_and_pplp):
    wd, corpus = run
    _, pplp, out = exact_and_pplp
    taus = json.loads((out / "pplp" / "sparse_mode.json").read_text())["model.neuron_thresholds"]
    assert taus == pplp["thresholds_per_layer"]
    mcfg, params, tok_path = ckpt.load_model(wd)
    held_out = open_corpus(DataConfig(source=f"files:{corpus}/*.txt", data_dir=str(corpus.parent / "tfds"),
                                      eval_fraction=0.1))
    batches = pipeline.make_eval_batches(held_out, load_tokenizer(tok_path), seq_len=32, batch_size=4, num_batches=2)
    sparse = step_mod.make_evaluate(mcfg.replace(neuron_thresholds=tuple(taus)))(params, batches)
    assert sparse["eval_loss"] == pytest.approx(pplp["sparse_loss"], rel=1e-5)
    dense = step_mod.make_evaluate(mcfg)(params, batches)
    assert dense["eval_loss"] == pytest.approx(pplp["dense_loss"], rel=1e-5)
    assert 1 - sparse["eval_sparsity"] == pytest.approx(pplp["activation_ratio"], abs=1e-6)


def test_pplp_without_a_feasible_target_falls_back_to_cett_target_zero(run, tmp_path):
    """p = 0 allows no perplexity increase and the 2 bisection steps try only large targets (1/2, 1/4 of the FFN
    output norm truncated), which cost the trained model perplexity: no step is feasible (asserted below), so the
    result is the target 0 -- tau = 0, only exact zeros truncated, i.e. the dense model (SiLU: no exact zeros)."""
    wd, corpus = run
    r = an.analyze(wd, f"files:{corpus}/*.txt", "pplp", 0.0, tmp_path, pplp_steps=2, **EVAL)
    search = r["pplp_search"]
    assert [s["cett_target"] for s in search] == [0.5, 0.25]
    assert all(not s["feasible"] and s["ppl_ratio"] > 1.0 for s in search)
    assert r["cett_target"] == 0.0 and r["cett_achieved_per_layer"] == [0.0, 0.0]
    assert r["thresholds_per_layer"] == [0.0, 0.0] and r["sparse_mode"]["model.neuron_thresholds"] == [0.0, 0.0]
    assert r["ppl_ratio"] == pytest.approx(1.0, rel=1e-5)
    assert r["sparse_loss"] == pytest.approx(r["dense_loss"], rel=1e-5)
    assert r["activation_ratio"] == 1.0 and r["activation_ratio_per_layer"] == [1.0, 1.0]
    assert r["dense_forward_activation_ratio"] == 1.0
    assert r["forward_passes_detail"] == {"capture": 2, "sparse": 2 * (2 + 1)}  # 2 steps + the sweep at target 0


def test_cett_hits_target_without_extra_forward_passes(run, tmp_path):
    wd, corpus = run
    r = an.analyze(wd, f"files:{corpus}/*.txt", "cett", 0.2, tmp_path, **EVAL)
    assert r["forward_passes_detail"] == {"capture": 2, "sparse": 2}
    assert all(0.19 <= c <= 0.2 for c in r["cett_achieved_per_layer"])
    assert all(a < 0.9 for a in r["activation_ratio_per_layer"])
    assert (tmp_path / "sparse_mode.json").exists()


@pytest.mark.parametrize("metric,value,mode",
                         [("topk", 0.5, "global"), ("topk", 0.25, "token"), ("fat", 0.05, "global")])
def test_topk_and_fat_sparse_loss(run, tmp_path, metric, value, mode):
    wd, corpus = run
    r = an.analyze(wd, f"files:{corpus}/*.txt", metric, value, tmp_path, topk_mode=mode, **EVAL)
    assert r["forward_passes"] == 4 and r["sparse_loss"] != r["dense_loss"]
    if metric == "topk":
        assert r["topk_mode"] == mode
        assert r["activation_ratio_per_layer"] == pytest.approx([value] * 2)
        assert r["dense_forward_activation_ratio"] == pytest.approx(value)
        assert all(t > 0 for t in r["thresholds_per_layer"])
    else:
        assert r["topk_mode"] is None and r["thresholds_per_layer"] == [value, value]
        assert 0.2 < r["activation_ratio"] < 1.0
    assert not (tmp_path / "sparse_mode.json").exists()


def test_per_dataset_breakdown(run, tmp_path):
    wd, corpus = run
    srcs = [f"files:{corpus}/doc00*.txt", f"files:{corpus}/doc0[1-5]*.txt"]
    r = an.analyze(wd, ",".join(srcs), "cett", 0.1, tmp_path, **EVAL)
    assert sorted(r["per_dataset"]) == sorted(srcs) and r["data"] == srcs
    parts = r["per_dataset"]
    assert sum(p["tokens_measured"] for p in parts.values()) == r["tokens_measured"]
    pooled = np.mean([p["activation_ratio_per_layer"] for p in parts.values()], axis=0)
    np.testing.assert_allclose(pooled, r["activation_ratio_per_layer"], rtol=1e-9)  # equal token counts
    assert r["forward_passes"] == 2 * 2 * 2


def _model_and_batches(wd, corpus):
    """(dense model config, params, the held-out batches analyze measures with EVAL) of the trained run."""
    mcfg, params, tok_path = ckpt.load_model(wd)
    held_out = open_corpus(DataConfig(source=f"files:{corpus}/*.txt", data_dir=str(corpus.parent / "tfds"),
                                      eval_fraction=0.1))
    batches = pipeline.make_eval_batches(held_out, load_tokenizer(tok_path), seq_len=32, batch_size=4, num_batches=2)
    return mcfg.replace(neuron_thresholds=()), params, batches


def _tau_activity(params, cfg, batches, taus_L):
    """Per-neuron active-token counts [L, F] under per-layer taus (kept: |x1_i| * ||W_down[i]|| > tau_l), counted
    inside a forward whose hook (written here) drops the rest layer by layer, and on the dense forward's x1; and the
    valid tokens."""
    norms_LxF = jnp.linalg.norm(jnp.asarray(params["layers"]["w_down_LxFxD"], jnp.float32), axis=-1)
    taus = jnp.asarray(np.asarray(taus_L, np.float32))

    def keep(layer, x1_BxTxF):
        return jnp.abs(x1_BxTxF.astype(jnp.float32)) * norms_LxF[layer] > taus[layer]

    def hook(layer, x1_BxTxF, act_BxTxF, valid_BxT):
        return jnp.where(keep(layer, x1_BxTxF), x1_BxTxF, 0.0)

    sparse_LxF, dense_LxF, tokens = 0, 0, 0
    for b in batches:
        kw = dict(segment_ids_BxT=b["segment_ids"], positions_BxT=b["positions"], capture=True)
        valid = np.asarray(b["segment_ids"]) != 0
        _, st = model.forward(params, b["inputs"], cfg, x1_mask=hook, **kw)
        sparse_LxF = sparse_LxF + (np.asarray(st.x1) != 0)[:, valid].sum(axis=1)
        _, st = model.forward(params, b["inputs"], cfg, **kw)
        kept = np.asarray(jax.vmap(keep)(jnp.arange(cfg.n_layers), st.x1))
        dense_LxF = dense_LxF + kept[:, valid].sum(axis=1)
        tokens += int(valid.sum())
    return sparse_LxF, dense_LxF, tokens


def _assert_sparse_forward_count(ratio_L, dense_ratio_L, sparse_LxF, dense_LxF, tokens):
    """The headline equals the sparse-forward count, the labelled field the dense one; they agree on layer 0 (no
    masking upstream) and differ on layer 1 (layer 0's masking changes its input)."""
    units = tokens * sparse_LxF.shape[1]
    want_L, want_dense_L = sparse_LxF.sum(axis=1) / units, dense_LxF.sum(axis=1) / units
    np.testing.assert_allclose(ratio_L, want_L, rtol=0, atol=1e-12)
    np.testing.assert_allclose(dense_ratio_L, want_dense_L, rtol=0, atol=1e-12)
    assert want_L[0] == want_dense_L[0]
    assert abs(sparse_LxF[1].sum() - dense_LxF[1].sum()) >= 1  # counts of units: at least one apart


@pytest.mark.parametrize("metric", ["pplp", "cett"])
def test_headline_cett_ratio_is_the_sparse_forward_count(run, exact_and_pplp, tmp_path, metric):
    wd, corpus = run
    r = (exact_and_pplp[1] if metric == "pplp"
         else an.analyze(wd, f"files:{corpus}/*.txt", "cett", 0.2, tmp_path, **EVAL))
    cfg, params, batches = _model_and_batches(wd, corpus)
    sparse_LxF, dense_LxF, tokens = _tau_activity(params, cfg, batches, r["thresholds_per_layer"])
    _assert_sparse_forward_count(r["activation_ratio_per_layer"], r["dense_forward_activation_ratio_per_layer"],
                                 sparse_LxF, dense_LxF, tokens)
    assert r["activation_ratio"] == pytest.approx(sparse_LxF.sum() / (tokens * cfg.n_layers * cfg.d_ff), abs=1e-12)
    assert r["sparsity"] == pytest.approx(1 - r["activation_ratio"], abs=1e-12)
    assert r["activation_counted_in"].startswith("sparse forward")
    # the dead-neuron tiers are those of the same (sparse-forward) activity
    assert r["dead_neuron_tiers"] == neurons.dead_neuron_tiers(sparse_LxF / tokens, tokens)
    assert r["dead_neuron_fraction_per_layer"] == r["dead_neuron_tiers"]["below_1e-3"]["fraction_per_layer"]


def test_law_inputs_count_the_ratio_in_the_sparse_forward(run, tmp_path):
    wd, corpus = run
    out, kw = tmp_path / "law.json", dict(min_step=0, n_search=1, num_batches=2, batch_size=4, search_steps=6)
    res = law_inputs.law_ratios(wd, out, **kw)
    (row,) = res["checkpoints"]
    assert 0 < res["cett_target"] < 1 and row["ppl_ratio"] <= 1.01
    cfg, params, batches = _model_and_batches(wd, corpus)
    sparse_LxF, dense_LxF, tokens = _tau_activity(params, cfg, batches, row["taus_per_layer"])
    _assert_sparse_forward_count(row["activation_ratio_per_layer"], row["dense_forward_activation_ratio_per_layer"],
                                 sparse_LxF, dense_LxF, tokens)
    assert row["activation_ratio"] == pytest.approx(np.mean(row["activation_ratio_per_layer"]), abs=1e-15)
    old = json.loads(out.read_text())  # a file of the dense-count format is not reused
    old["format"] = 1
    out.write_text(json.dumps(old))
    with pytest.raises(law_inputs.StaleOutputError, match="format 1"):
        law_inputs.law_ratios(wd, out, **kw)


def test_cli_runs_and_prints_the_override(run, tmp_path, capsys):
    wd, corpus = run
    exit_code = analyze_main.main(["analyze", f"--checkpoint={wd}", f"--data=files:{corpus}/*.txt",
                                   "--metric=cett", "--value=0.1", f"--out={tmp_path}", "--batch_size=2",
                                   "--num_batches=1", "--noprogress"])
    out = capsys.readouterr().out
    assert exit_code == 0 and "--config.model.neuron_thresholds='(" in out
    printed, res = json.loads(out.splitlines()[0]), json.loads((tmp_path / "sparsity.json").read_text())
    assert printed["metric"] == "cett" and printed["activation_ratio"] == res["activation_ratio"]
    assert printed["dense_forward_activation_ratio"] == res["dense_forward_activation_ratio"]
    tiers = res["dead_neuron_tiers"]
    assert printed["dead_neurons_per_layer"] == {
        "never": tiers["never"]["count_per_layer"], "below_1e-4": tiers["below_1e-4"]["count_per_layer"],
        "below_1e-3": tiers["below_1e-3"]["count_per_layer"], "mostly_dead_layers": tiers["mostly_dead_layers"]}
    before = (tmp_path / "sparsity.json").read_text()
    exit_code = analyze_main.main(["analyze", f"--checkpoint={wd}", "--metric=exact", f"--out={tmp_path}"])
    assert exit_code == 1 and "set overwrite" in capsys.readouterr().err
    assert (tmp_path / "sparsity.json").read_text() == before  # nothing lost


@pytest.mark.parametrize("args,name", [
    (["--metric=sparse", "--value=1"], "metric"),
    (["--metric=topk", "--value=0"], "value"),
    (["--metric=topk", "--value=1.5"], "value"),
    (["--metric=topk"], "value"),
    (["--metric=pplp", "--value=-1"], "value"),
    (["--metric=cett", "--value=1.2"], "value"),
    (["--metric=fat", "--value=-0.1"], "value"),
    (["--metric=topk", "--value=0.5", "--topk_mode=row"], "topk_mode"),
    (["--metric=exact", "--batch_size=0"], "batch_size"),
])
def test_bad_arguments_name_the_argument(tmp_path, capsys, args, name):
    exit_code = analyze_main.main(["analyze", f"--checkpoint={tmp_path}", f"--out={tmp_path / 'o'}", *args])
    assert exit_code != 0 and f"analyze: error: {name}: " in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_checkpoint_names_the_argument(tmp_path, capsys):
    exit_code = analyze_main.main(["analyze", f"--checkpoint={tmp_path / 'nope'}", "--metric=exact",
                                   f"--out={tmp_path / 'o'}"])
    assert exit_code != 0 and "checkpoint: " in capsys.readouterr().err
    exit_code = analyze_main.main(["analyze", "--metric=exact", f"--out={tmp_path / 'o'}"])
    assert exit_code != 0 and "--checkpoint" in capsys.readouterr().err
    with pytest.raises(UsageError, match="checkpoint: .*nope does not exist"):
        an.analyze(tmp_path / "nope", "stdlib", "exact", None, tmp_path / "o")


def test_distinct_tokens_next_to_tokens_measured(run, exact_and_pplp, tmp_path, capsys):
    """A small held-out split cycled by many eval rows: distinct_tokens < tokens_measured, said on stderr and in
    sparsity.json; rows spread over a larger split: equal."""
    exact, _, _ = exact_and_pplp
    assert exact["distinct_tokens"] == exact["tokens_measured"] == 4 * 32 * 2 and "warnings" not in exact
    wd, corpus = run
    exit_code = analyze_main.main(["analyze", f"--checkpoint={wd}", f"--data=files:{corpus}/*.txt",
                                   "--metric=exact", f"--out={tmp_path}", "--batch_size=8", "--num_batches=16",
                                   "--noprogress"])
    captured = capsys.readouterr()
    printed = json.loads(captured.out.splitlines()[0])
    res = json.loads((tmp_path / "sparsity.json").read_text())
    keys = list(res)
    assert exit_code == 0 and keys.index("distinct_tokens") == keys.index("tokens_measured") + 1
    held_out = open_corpus(DataConfig(source=f"files:{corpus}/*.txt", data_dir=str(corpus.parent / "tfds"),
                                      eval_fraction=0.1))
    stream_len = len(held_out.token_stream("validation", load_tokenizer(wd / "tokenizer.json"))[0])
    assert printed["tokens_measured"] == res["tokens_measured"] == 8 * 16 * 32 > stream_len  # the split is cycled
    assert printed["distinct_tokens"] == res["distinct_tokens"] <= stream_len
    assert res["distinct_tokens"] >= stream_len * 32 / 33 - 32  # every window is used: all but each row's last token
    warnings = [ln for ln in captured.err.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("analyze: warning: the held-out split was cycled")
    assert f"only {res['distinct_tokens']} distinct" in warnings[0] and res["warnings"][0] in warnings[0]


@pytest.fixture(scope="module")
def eval_stream(tmp_path_factory):
    """(corpus, tokenizer) of a small file corpus whose held-out stream (~1,000 tokens) never repeats itself."""
    root = tmp_path_factory.mktemp("eval_stream")
    (root / "corpus").mkdir()
    for k in range(20):
        lines = [f"x{k}_{j} = {(k * 7919 + j * 104729) % 1000003}\n" for j in range(12)]
        (root / "corpus" / f"d{k:02d}.txt").write_text("".join(lines))
    cfg = DataConfig(source=f"files:{root / 'corpus'}/*.txt", data_dir=str(root / "tfds"), vocab_size=300,
                     eval_fraction=0.15)
    corpus = open_corpus(cfg)
    return corpus, get_tokenizer(cfg, corpus, root)


def _positions_read(stream_L: np.ndarray, batches: list[dict]) -> int:
    """Distinct stream positions the inputs of ``batches`` hold, each row found among all cyclic offsets of the
    stream."""
    L, T = len(stream_L), batches[0]["inputs"].shape[1]
    windows = {stream_L[(o + np.arange(T)) % L].tobytes(): o for o in range(L)}
    assert len(windows) == L  # every offset is recognisable
    seen: set[int] = set()
    for b in batches:
        for inputs_T in np.asarray(b["inputs"], np.int32):
            seen.update(((windows[inputs_T.tobytes()] + np.arange(T)) % L).tolist())
    return len(seen)


@pytest.mark.parametrize("seq_len,batch_size,num_batches", [
    (20, 3, 1),  # three windows far apart
    (32, 4, 2),  # distinct windows spread over the stream, the last one wrapping onto the first
    (32, 40, 40),  # more rows than windows: cycled
    (4096, 2, 2),  # a stream shorter than one row: every row is the same wrapped window
])
def test_distinct_positions_counts_the_positions_the_eval_batches_read(eval_stream, seq_len, batch_size,
                                                                       num_batches):
    corpus, tok = eval_stream
    stream_L = corpus.token_stream("validation", tok)[0]
    batches = pipeline.make_eval_batches(corpus, tok, seq_len=seq_len, batch_size=batch_size, num_batches=num_batches)
    got = measure.distinct_positions(len(stream_L), seq_len, batch_size, num_batches)
    assert got == _positions_read(stream_L, batches)
    if seq_len > len(stream_L):
        assert got == len(stream_L)
