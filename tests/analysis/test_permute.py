"""permute: the neuron permutation is exact (same logits, stacked and per-layer, dense and sparse mode), the orders
are bijections, block sparsity (hand example, frequency and co-activation orders on constructed activity), and the
CLI (a loadable workdir with the same logits and its source step, refusals before any work, the stage of a killed
write removed)."""

import json
import os
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import WORDS, tiny_model_config, write_corpus

from prosparse_jax.analysis import permute as pm
from prosparse_jax.main import permute as permute_main
from prosparse_jax.model import transformer as model
from prosparse_jax.training import checkpoint

ROOT = Path(__file__).resolve().parents[2]
RTOL = 1e-5
_forward = jax.jit(model.forward, static_argnames=("cfg", "capture"))


def _random_perm(L: int, F: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(F) for _ in range(L)])


def _ids(cfg, B=2, T=12, seed=1):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, cfg.vocab_size)


def _assert_close(a, b):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * float(np.abs(b).max()))


# ---------------------------------------------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["stacked", "per_layer"])
def test_permuted_model_gives_the_same_logits_and_permuted_x1(layout):
    cfg = tiny_model_config()
    params = model.init_params(cfg, jax.random.key(0))
    if layout == "per_layer":
        params = model.unstack_layers(params)
    perm = _random_perm(cfg.n_layers, cfg.d_ff)
    new = pm.permute_neurons(params, perm)
    assert isinstance(new["layers"], list) == (layout == "per_layer")
    ids = _ids(cfg)
    logits, st = _forward(params, ids, cfg=cfg, capture=True)
    logits2, st2 = _forward(new, ids, cfg=cfg, capture=True)
    _assert_close(logits2, logits)
    assert not np.allclose(np.asarray(model.layer_param(new, "w_up_LxDxF")),
                           np.asarray(model.layer_param(params, "w_up_LxDxF")))
    x1 = np.asarray(st.x1)
    _assert_close(st2.x1, np.stack([x1[i][..., perm[i]] for i in range(cfg.n_layers)]))
    back = pm.permute_neurons(new, np.argsort(perm, axis=1))  # the inverse permutation restores every weight
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_permutation_keeps_the_sparse_mode_exact():
    """The per-layer thresholds of sparse mode stay valid: same logits and the same dropped neurons."""
    cfg = tiny_model_config()
    params = model.init_params(cfg, jax.random.key(3))
    ids = _ids(cfg)
    _, st = _forward(params, ids, cfg=cfg, capture=True)
    dense_zeros = np.asarray(st.zero_frac)
    n_LxBxTxF = np.abs(np.asarray(st.x1)) * np.asarray(model.w_down_norms(params))[:, None, None, :]
    taus = tuple(float(t) for t in 0.5 * n_LxBxTxF.mean(axis=(1, 2, 3)))
    scfg = cfg.replace(neuron_thresholds=taus)
    perm = _random_perm(cfg.n_layers, cfg.d_ff, seed=5)
    new = pm.permute_neurons(params, perm)
    logits, st = _forward(params, ids, cfg=scfg, capture=True)
    logits2, st2 = _forward(new, ids, cfg=scfg, capture=True)
    _assert_close(logits2, logits)
    assert np.all(np.asarray(st.zero_frac) > dense_zeros + 0.01)  # the thresholds drop neurons
    np.testing.assert_allclose(np.asarray(st2.zero_frac), np.asarray(st.zero_frac))


def test_permute_neurons_rejects_a_non_bijection():
    cfg = tiny_model_config()
    params = model.init_params(cfg, jax.random.key(0))
    perm = _random_perm(cfg.n_layers, cfg.d_ff)
    perm[1, 0] = perm[1, 1]
    with pytest.raises(ValueError, match="layer 1 is not a bijection"):
        pm.permute_neurons(params, perm)
    with pytest.raises(ValueError, match="must be int"):
        pm.permute_neurons(params, perm[:, :-1])


# ---------------------------------------------------------------------------------------------------------------
# Orders and block sparsity
# ---------------------------------------------------------------------------------------------------------------
def test_block_sparsity_hand_example():
    # one layer, 3 tokens, 8 neurons, blocks of 4: token 0 -> only block 0 active; token 1 -> both; token 2 -> none
    a = np.zeros((1, 3, 8), bool)
    a[0, 0, 1] = True
    a[0, 1, [2, 6]] = True
    np.testing.assert_allclose(pm.block_sparsity(a, 4), [3 / 6])
    np.testing.assert_allclose(pm.block_sparsity(a, 8), [1 / 3])
    np.testing.assert_allclose(pm.block_sparsity(a, 1), [(24 - 3) / 24])
    # 6 neurons in blocks of 4: the partial block (neurons 4, 5) counts as one block
    np.testing.assert_allclose(pm.block_sparsity(a[:, :, :6], 4), [4 / 6])
    # reordering the neurons (2 and 6 adjacent, 1 with them) -> token 1 touches one block
    perm = np.array([[1, 2, 6, 0, 3, 4, 5, 7]])
    np.testing.assert_allclose(pm.block_sparsity(a[:, :, perm[0]], 4), [4 / 6])


def _skewed_activity(L=2, N=2000, F=256, seed=0):
    """Independent neurons whose frequencies follow a power law (a few hot ones), in random order: [L, N, F]."""
    rng = np.random.default_rng(seed)
    freq_LxF = np.stack([rng.permutation(0.6 * (np.arange(F) + 1.0) ** -0.8) for _ in range(L)])
    return rng.random((L, N, F)) < freq_LxF[:, None, :]


def test_frequency_order_is_a_bijection_and_raises_block_sparsity():
    a = _skewed_activity()
    freq = a.mean(axis=1)
    perm = pm.permutation_by_frequency(freq)
    pm.check_permutation(perm, 2, 256)
    assert np.all(np.diff(np.take_along_axis(freq, perm, axis=1), axis=1) <= 0)  # most active first
    after_a = np.stack([a[i][:, perm[i]] for i in range(2)])
    for block in pm.BLOCKS:
        before, after = pm.block_sparsity(a, block), pm.block_sparsity(after_a, block)
        assert np.all(after >= before) and np.all(after > before + 0.05), (block, before, after)


def test_coactivation_order_finds_co_active_groups():
    """16 groups of 16 neurons scattered over F = 256; every token fires one group (in turn), each of its neurons with
    probability 0.9: the frequencies of all neurons are alike, so frequency order cannot help; the co-activation
    clusters recover the groups."""
    rng = np.random.default_rng(1)
    L, N, F, G = 2, 1500, 256, 16
    group_LxF = np.stack([rng.permutation(np.repeat(np.arange(G), F // G)) for _ in range(L)])
    fired_N = np.arange(N) % G
    a = (group_LxF[:, None, :] == fired_N[None, :, None]) & (rng.random((L, N, F)) < 0.9)
    count = a.sum(axis=1)
    co = np.einsum("lnf,lng->lfg", a.astype(np.int64), a.astype(np.int64))
    perm_co = pm.permutation_by_coactivation(count, co, cluster=16, window=F)
    perm_fr = pm.permutation_by_frequency(count)
    for p in (perm_co, perm_fr):
        pm.check_permutation(p, L, F)
    apply = lambda p: np.stack([a[i][:, p[i]] for i in range(L)])  # noqa: E731
    bs_co, bs_fr, bs_0 = (pm.block_sparsity(apply(perm_co), 16), pm.block_sparsity(apply(perm_fr), 16),
                          pm.block_sparsity(a, 16))
    assert np.all(bs_co > 0.99 * (G - 1) / G)  # the ideal: one block per token
    assert np.all(bs_co > bs_fr + 0.3) and np.all(bs_co > bs_0 + 0.3), (bs_co, bs_fr, bs_0)


def _old_coactivation_counts(a_LxNxF):
    """The co-activation counts of all layers at once, as permute computed them before the per-layer path."""
    f = a_LxNxF.astype(np.float32)
    return np.einsum("lnf,lng->lfg", f, f).astype(np.int64)


def test_neuron_stats_counts_valid_tokens_only():
    cfg = tiny_model_config()
    params = model.init_params(cfg, jax.random.key(0))
    ids = _ids(cfg, B=2, T=8)
    seg = jnp.asarray([[1] * 8, [1] * 5 + [0] * 3], jnp.int32)
    batch = {"inputs": ids, "targets": ids, "segment_ids": seg, "weights": (seg != 0).astype(jnp.float32),
             "positions": jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))}
    st = pm.neuron_stats(params, cfg, [batch, batch], keep_activity=True)
    _, fs = _forward(params, ids, cfg=cfg, segment_ids_BxT=seg, capture=True)
    x1 = np.asarray(fs.x1)[:, np.asarray(seg) != 0]  # [L, 13, F]
    assert st["tokens"] == 26
    np.testing.assert_array_equal(st["count_LxF"], 2 * (x1 != 0).sum(axis=1))
    np.testing.assert_allclose(st["freq_LxF"], (x1 != 0).mean(axis=1))
    for i, packed in enumerate(st["activity_L"]):
        assert packed.dtype == np.uint8 and packed.shape == (26, -(-cfg.d_ff // 8))
        np.testing.assert_array_equal(np.unpackbits(packed, axis=-1, count=cfg.d_ff).astype(bool),
                                      np.concatenate([x1[i] != 0] * 2))
    assert 0.2 < st["freq_LxF"].mean() < 0.8  # ReLU at init: about half active


def test_per_layer_coactivation_order_equals_the_all_layers_one_on_a_model():
    """The order from the packed activity, one layer's counts at a time, is the order the [L, F, F] counts give
    (the model's own activity, several batches, window = F: co-activation decides every pick)."""
    cfg = tiny_model_config()
    params = model.init_params(cfg, jax.random.key(4))
    batches = []
    for seed in (1, 2):
        ids = _ids(cfg, B=2, T=12, seed=seed)
        batches.append({"inputs": ids, "targets": ids, "segment_ids": jnp.ones((2, 12), jnp.int32),
                        "weights": jnp.ones((2, 12), jnp.float32),
                        "positions": jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))})
    st = pm.neuron_stats(params, cfg, batches, keep_activity=True)
    a_LxNxF = np.concatenate([np.asarray(_forward(params, b["inputs"], cfg=cfg, capture=True)[1].x1) != 0
                              for b in batches], axis=2).reshape(cfg.n_layers, -1, cfg.d_ff)
    for cluster, window in ((4, cfg.d_ff), (16, None), (8, 3)):
        old = pm.permutation_by_coactivation(a_LxNxF.sum(axis=1), _old_coactivation_counts(a_LxNxF), cluster, window)
        new = pm.permutation_from_activity(st["count_LxF"], st["activity_L"], cfg.d_ff, cluster, window)
        np.testing.assert_array_equal(new, old)


@pytest.mark.parametrize("block", [None, 5, 64, 1000])
def test_coactivation_counts_equal_the_einsum(block):
    """Token blocks that do not divide N, F not a multiple of 8 nor of the mirroring's 64 rows: exact counts."""
    rng = np.random.default_rng(2)
    a_NxF = rng.random((301, 75)) < 0.3
    co = pm.coactivation_counts(pm.pack_activity(a_NxF), 75, block)
    assert co.dtype == np.float32
    np.testing.assert_array_equal(co, _old_coactivation_counts(a_NxF[None])[0])


def test_coactivation_counts_stay_exact_beyond_float32_integers():
    """2^24 + 1 tokens: counts float32 cannot hold (2^24 + 1 would round to 2^24)."""
    n = 2**24 + 1
    activity_NxP = np.full((n, 1), 0b1000_0000, np.uint8)  # packed (pm.pack_activity): neuron 0 on every token,
    activity_NxP[::2] |= 0b0100_0000  # neuron 1 on (n + 1) / 2 tokens, neuron 2 never
    assert np.array_equal(activity_NxP[:2], pm.pack_activity([[1, 1, 0], [1, 0, 0]]))
    co = pm.coactivation_counts(activity_NxP, 3, 2**21)
    half = (n + 1) // 2
    np.testing.assert_array_equal(co, [[n, half, 0], [half, half, 0], [0, 0, 0]])


def test_coactivation_order_memory_is_one_layer_of_counts():
    """tracemalloc sees numpy's allocations: the order of L = 4 layers of F = 1024 neurons peaks near one layer's
    F x F float32 counts, a quarter of the [L, F, F] array the all-layers path held (int64: twice that again)."""
    L, N, F = 4, 2000, 1024
    a = _skewed_activity(L, N, F, seed=3)
    count_LxF, activity_L = a.sum(axis=1), [pm.pack_activity(x) for x in a]
    del a
    tracemalloc.start()
    try:
        perm = pm.permutation_from_activity(count_LxF, activity_L, F)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    pm.check_permutation(perm, L, F)
    assert peak < 1.5 * F * F * 4, (peak, F * F * 4)


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """(params-only workdir of a tiny random ReLU model at step 7 with a tokenizer, its corpus glob)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("permute")
    corpus = write_corpus(root / "corpus", 30)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([" ".join(WORDS)] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    cfg = tiny_model_config(vocab_size=300, d_ff=64)
    params = model.init_params(cfg, jax.random.key(0))
    run_cfg = {"data": {"seq_len": 16, "data_dir": str(root / "tfds"), "eval_fraction": 0.25}}
    wd = checkpoint.write_params_workdir(root / "wd", cfg, params, run_config=run_cfg, step=7)
    tok.save(str(wd / "tokenizer.json"))
    return wd, f"files:{corpus}/*.txt"


@pytest.mark.parametrize("order", ["frequency", "coactivation"])
def test_cli_writes_a_loadable_permuted_workdir(workdir, tmp_path, capsys, order):
    wd, data = workdir
    out = tmp_path / "permuted"
    argv = ["permute", f"--checkpoint={wd}", f"--out={out}", f"--data={data}", f"--order={order}",
            "--num_batches=2", "--batch_size=4"]
    assert permute_main.main(argv) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["order"] == order and line["tokens"] == 2 * 4 * 16
    assert line["loss_after"] == pytest.approx(line["loss_before"], rel=1e-5)
    for b in ("16", "32", "64"):
        assert line["block_sparsity_after"][b] >= line["block_sparsity_before"][b]
    cfg0, p0, _ = checkpoint.load_model(wd)
    cfg1, p1, tok1 = checkpoint.load_model(out)
    assert cfg1 == cfg0 and tok1.read_bytes() == (wd / "tokenizer.json").read_bytes()
    res = json.loads((out / "permutation.json").read_text())
    perm = pm.check_permutation(res["permutation"], cfg0.n_layers, cfg0.d_ff)
    np.testing.assert_array_equal(np.asarray(p1["layers"]["w_down_LxFxD"]),
                                  np.asarray(pm.permute_neurons(p0, perm)["layers"]["w_down_LxFxD"]))
    ids = _ids(cfg0)
    _assert_close(_forward(p1, ids, cfg=cfg1)[0], _forward(p0, ids, cfg=cfg0)[0])
    src = json.loads((out / "config.json").read_text())["permuted_from"]
    assert src == {"checkpoint": str(wd.absolute()), "step": 7, "order": order} and res["step"] == 7  # the latest


def test_cli_refuses_an_existing_out_before_any_work(workdir, tmp_path, capsys, monkeypatch):
    wd, data = workdir
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")

    def boom(*a, **k):
        raise AssertionError("work was done before --out was checked")

    monkeypatch.setattr(checkpoint, "load_model", boom)
    assert permute_main.main(["permute", f"--checkpoint={wd}", f"--out={out}", f"--data={data}"]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("permute: error: out:") and "not empty" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert permute_main.main(["permute", f"--checkpoint={wd}", f"--out={tmp_path / 'new'}", "--order=spectral"]) == 1
    assert "permute: error: order: " in capsys.readouterr().err


def _spy(monkeypatch, name):
    """Records the batches passed to ``pm.<name>`` (then runs it): a list of batch lists, one per call."""
    seen, real = [], getattr(pm, name)

    def spy(params, cfg, batches, *a, **k):
        seen.append(list(batches))
        return real(params, cfg, batches, *a, **k)

    monkeypatch.setattr(pm, name, spy)
    return seen


def _rows(batches):
    return {tuple(row) for b in batches for row in np.asarray(b["inputs"]).tolist()}


def test_cli_reports_on_held_out_batches_disjoint_from_the_fitting_ones(workdir, tmp_path, capsys, monkeypatch):
    wd, data = workdir
    fit, report = _spy(monkeypatch, "neuron_stats"), _spy(monkeypatch, "block_report")
    argv = ["permute", f"--checkpoint={wd}", f"--data={data}", "--num_batches=2", "--batch_size=4"]
    assert permute_main.main([*argv, f"--out={tmp_path / 'held'}", "--report_batches=1"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["tokens"] == 2 * 4 * 16
    assert line["report_batches"] == {"count": 1, "tokens": 1 * 4 * 16, "held_out_from_fit": True}
    assert len(fit) == 1 and len(fit[0]) == 2 and len(report) == 2 and len(report[0]) == 1
    assert not _rows(report[0]) & _rows(fit[0])  # no window in both
    res = json.loads((tmp_path / "held" / "permutation.json").read_text())
    assert res["report_batches"] == line["report_batches"] and res["before"]["tokens"] == 1 * 4 * 16

    fit.clear(), report.clear()
    assert permute_main.main([*argv, f"--out={tmp_path / 'in'}", "--report_batches=0"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["report_batches"] == {"count": 2, "tokens": 2 * 4 * 16, "held_out_from_fit": False}
    assert _rows(report[0]) == _rows(fit[0]) == _rows(report[1])


def test_cli_refuses_bad_report_batches_in_one_line(workdir, tmp_path, capsys):
    wd, data = workdir
    argv = ["permute", f"--checkpoint={wd}", f"--data={data}", "--batch_size=4"]
    assert permute_main.main([*argv, f"--out={tmp_path / 'neg'}", "--report_batches=-1"]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("permute: error: report_batches: must be >= 0"), err
    assert permute_main.main([*argv, f"--out={tmp_path / 'many'}", "--num_batches=40"]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("permute: error: num_batches / report_batches:"), err
    assert "report_batches=0" in err[0] and not (tmp_path / "many").exists()


# a writer of <argv[1]> through files.staged_output: "killed" dies mid-write (SIGKILL), "live" writes until stdin closes
STAGE_WRITER = r"""
import os, signal, sys
from prosparse_jax import files
with files.staged_output(sys.argv[1]) as stage:
    (stage / "model.safetensors").write_bytes(b"half written")
    print(stage, flush=True)
    if sys.argv[2] == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.read()
    raise SystemExit(1)
"""


def test_cli_removes_the_stage_a_killed_write_left_and_keeps_a_live_writers(workdir, tmp_path, capsys, caplog):
    wd, data = workdir
    out = tmp_path / "permuted"
    writer = [sys.executable, "-c", STAGE_WRITER, str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    live = subprocess.Popen([*writer, "live"], cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        alive = Path(live.stdout.readline().strip())
        assert alive.parent == tmp_path and alive.name.startswith(".permuted.") and alive.is_dir()
        killed = subprocess.run([*writer, "killed"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        dead = Path(killed.stdout.strip())
        assert dead.parent == tmp_path and dead.name.startswith(".permuted.") and dead.is_dir()
        argv = ["permute", f"--checkpoint={wd}", f"--out={out}", f"--data={data}", "--num_batches=1",
                "--batch_size=4"]
        assert permute_main.main(argv) == 0, capsys.readouterr().err
        assert not dead.exists() and alive.is_dir()  # the killed writer's stage is gone, the live one's kept
    finally:
        live.stdin.close()
        live.wait(timeout=120)
    removed = [r.getMessage() for r in caplog.records if "interrupted write" in r.getMessage()]
    assert len(removed) == 1 and removed[0].startswith(f"removed {dead}, left by an interrupted write to {out}")
    assert [p.name for p in tmp_path.iterdir()] == ["permuted"] and (out / "permutation.json").is_file()
