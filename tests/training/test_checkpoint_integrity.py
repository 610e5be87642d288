"""Checkpoint integrity: every array is digested when saved and checked when restored; a damaged step says so and
names the newest intact older step (train resume, load_model and the CLIs)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import killed_after, small_run_config, write_corpus

from prosparse_jax import digest
from prosparse_jax.errors import CheckpointError, CorruptCheckpointError
from prosparse_jax.training import checkpoint as ckpt
from prosparse_jax.training import train as train_mod

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def _quiet_orbax():
    """As the command-line tools do: the reads a failed restore leaves behind do not report as noise."""
    ckpt.quiet_orbax_noise()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(config, workdir) of a run of 6 steps killed after its checkpoint of step 4: checkpoints 2 and 4, resumable."""
    base = tmp_path_factory.mktemp("integrity")
    c = small_run_config(write_corpus(base / "corpus"), 6, checkpoint_every=2)
    train_mod.train(c, base / "run")
    killed_after(base / "run", 4)
    assert sorted(int(p.name) for p in (base / "run" / ckpt.CKPT_DIR).iterdir()) == [2, 4]
    return c, base / "run"


def _copy(run, tmp_path) -> Path:
    return Path(shutil.copytree(run[1], tmp_path / "wd"))


def _data_files(wd: Path, step: int, item: str = "params") -> list[Path]:
    """The files that hold the array bytes (orbax OCDBT: ``<item>/**/d/<hash>``), biggest first."""
    files = [f for f in (wd / ckpt.CKPT_DIR / str(step) / item).rglob("*") if f.is_file() and f.parent.name == "d"]
    return sorted(files, key=lambda f: f.stat().st_size, reverse=True)


def _changed_leaves(a, b) -> list[str]:
    flat = jax.tree_util.tree_flatten_with_path(a)[0]
    return [jax.tree_util.keystr(p, simple=True, separator="/")
            for (p, x), y in zip(flat, jax.tree.leaves(b), strict=True)
            if not np.array_equal(np.asarray(x), np.asarray(y))]


def _orbax_params(wd: Path, step: int):
    """The params of ``step`` as orbax reads them back, with no digest check."""
    mgr = ocp.CheckpointManager((wd / ckpt.CKPT_DIR).absolute())
    try:
        return mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]
    finally:
        mgr.close()


def _flip_values(wd: Path, step: int) -> list[str]:
    """Flips 4 bytes inside a params data file of ``step`` such that orbax still reads it back, with other values
    (what a failing disk does silently). Returns the params leaves whose values changed."""
    good = _orbax_params(wd, step)
    for f in _data_files(wd, step)[:3]:
        orig = f.read_bytes()
        for frac in (0.5, 0.4, 0.6, 0.3, 0.7, 0.2, 0.8):
            b = bytearray(orig)
            i = int(len(b) * frac)
            b[i:i + 4] = bytes(x ^ 0xFF for x in b[i:i + 4])
            f.write_bytes(bytes(b))
            try:
                bad = _orbax_params(wd, step)
            except Exception:  # noqa: BLE001 -- this flip broke the compressed stream: try another place
                f.write_bytes(orig)
                continue
            if changed := _changed_leaves(good, bad):
                return changed
            f.write_bytes(orig)
    pytest.fail("no byte flip in the params data files changed a parameter value")


def test_flipped_bytes_are_caught_and_the_intact_step_named(run, tmp_path):
    c, _ = run
    wd = _copy(run, tmp_path)
    changed = _flip_values(wd, 4)
    step_dir = wd / ckpt.CKPT_DIR / "4"
    with pytest.raises(CorruptCheckpointError) as e:
        ckpt.load_model(wd)
    msg = str(e.value)
    assert f"checkpoint {step_dir} is corrupt" in msg and f"params leaf {changed[0]} does not match" in msg
    assert "the newest intact older step is step 2" in msg and "--step=2" in msg and "nothing was deleted" in msg
    assert "\n" not in msg
    ckpt.load_model(wd, 2)  # the older step is fine
    with pytest.raises(CorruptCheckpointError, match=r"checkpoints/4 is corrupt: params leaf .*newest intact "
                       r"older step is step 2: move it aside \(`mv .*/checkpoints/4 .*/corrupt-step-4`\) and rerun "
                       r"to resume from step 2 \(nothing was deleted\)"):
        train_mod.train(c, wd)
    assert step_dir.is_dir()  # nothing was deleted
    # the advice works: move the corrupt step aside, rerun, and the run resumes from step 2 to the end
    shutil.move(step_dir, wd / "corrupt-step-4")
    res = train_mod.train(c, wd)
    assert res.step == 6 and not res.interrupted and ckpt.latest_step(wd) == 6
    ckpt.load_model(wd)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_truncated_or_missing_file_is_corrupt_not_a_traceback(run, tmp_path, damage):
    wd = _copy(run, tmp_path)
    f = _data_files(wd, 4)[0]
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        f.unlink()
    with pytest.raises(CorruptCheckpointError, match=r"checkpoints/4 is corrupt: reading it failed \(.*\); the "
                       r"newest intact older step is step 2"):
        ckpt.load_model(wd)


def test_damaged_opt_state_stops_the_resume_only(run, tmp_path):
    """load_model reads params only; resuming also reads (and checks) opt_state."""
    c, _ = run
    wd = _copy(run, tmp_path)
    f = _data_files(wd, 4, "opt_state")[0]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    ckpt.load_model(wd)
    with pytest.raises(CorruptCheckpointError, match=r"checkpoints/4 is corrupt: reading it failed .*opt_state.*"
                       r"newest intact older step is step 2"):
        train_mod.train(c, wd)


def test_no_intact_older_step(run, tmp_path):
    wd = _copy(run, tmp_path)
    _flip_values(wd, 2)
    (wd / ckpt.CKPT_DIR / "4" / "extra" / "metadata").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match=r"checkpoints/4 is corrupt: reading it failed .*; there "
                       r"is no intact older step \(older step 2 fails too\); nothing was deleted"):
        ckpt.load_model(wd)


def test_intact_checkpoints_restore_bit_exactly_and_undigested_ones_are_refused(run, tmp_path):
    # a save/restore round trip: bit-exact, and the digests written with it are those of what comes back
    params = {"w": jax.random.normal(jax.random.key(0), (33, 7)), "b": jnp.arange(5, dtype=jnp.float32),
              "h": jax.random.normal(jax.random.key(1), (4, 3)).astype(jnp.bfloat16)}
    tx = optax.adam(1e-2)
    opt = tx.init(params)
    _, opt = tx.update(jax.tree.map(jnp.ones_like, params), opt, params)
    mgr = ckpt.manager(tmp_path / "rt", async_save=True)
    ckpt.save(mgr, 3, params, opt, {"step": 3})
    mgr.wait_until_finished()
    p2, o2, extra = ckpt.restore(mgr, 3, jax.eval_shape(lambda: params), jax.eval_shape(lambda: opt))
    mgr.close()
    assert not _changed_leaves(params, p2) and not _changed_leaves(opt, o2)
    assert extra["step"] == 3 and extra["digests"]["algorithm"] == digest.DIGEST_ALGORITHM
    assert {k: extra["digests"][k] for k in ("params", "opt_state")} == digest.digests({"params": p2, "opt_state": o2})
    assert set(extra["digests"]["params"]) == {"w", "b", "h"}

    # a checkpoint without digests (another version wrote it) cannot be verified: refused in one line
    wd = _copy(run, tmp_path)
    meta = wd / ckpt.CKPT_DIR / "4" / "extra" / "metadata"
    extra = json.loads(meta.read_text())
    del extra["digests"]
    meta.write_text(json.dumps(extra))
    with pytest.raises(CheckpointError, match=r"checkpoints/4 carries no .* digests .* not loaded$") as e:
        ckpt.load_model(wd)
    assert not isinstance(e.value, CorruptCheckpointError) and "\n" not in str(e.value)


def test_wrong_model_config_is_a_mismatch_not_corruption(run, tmp_path):
    wd = _copy(run, tmp_path)
    cfg = json.loads((wd / "config.json").read_text())
    cfg["model"]["d_ff"] = 96
    (wd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"does not match the model in .*config.json: params leaf "
                       r"layers.w_down_LxFxD has shape \(2, 64, 32\) in the checkpoint, \(2, 96, 32\)") as e:
        ckpt.load_model(wd)
    assert not isinstance(e.value, CorruptCheckpointError)


def test_cli_says_corrupt_in_one_line(run, tmp_path):
    flipped = _copy(run, tmp_path / "a")
    _flip_values(flipped, 4)
    truncated = _copy(run, tmp_path / "b")
    f = _data_files(truncated, 4)[0]
    f.write_bytes(f.read_bytes()[:100])
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-m", "prosparse_jax.main.score", f"--checkpoint={wd}", "--text=hi"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for wd in (flipped, truncated)]
    for wd, proc in zip((flipped, truncated), procs, strict=True):
        out, err = proc.communicate(timeout=120)
        lines = [x for x in err.splitlines() if x.strip() and not x.startswith("WARNING: All log messages before")]
        assert proc.returncode == 1 and out == "", (out, err)
        assert len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith(f"score: error: checkpoint {wd / ckpt.CKPT_DIR / '4'} is corrupt: ")
        assert "the newest intact older step is step 2" in lines[0]


def _digest(x) -> str:
    return digest.digests({"t": {"x": x}})["t"]["x"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int32", "uint8", "bool"])
def test_host_and_device_digests_agree_and_see_every_bit(dtype):
    """A numpy array is digested on the host, a jax.Array of more than 64K words by XLA on its devices: the two give
    the same digest of the same values."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((300, 250)) * 100).astype(dtype)  # 75,000 words
    ref = _digest(np.asarray(x))
    assert _digest(x) == ref
    if dtype == "float32":  # any single flipped bit changes both halves
        a = np.asarray(x).copy()
        words = a.reshape(-1).view(np.uint32)
        for i in range(0, words.size, 997):
            for bit in (0, 17, 31):
                words[i] ^= np.uint32(1 << bit)
                h = _digest(a)
                words[i] ^= np.uint32(1 << bit)
                assert h[:8] != ref[:8] and h[8:] != ref[8:]
        assert _digest(a) == ref


def test_big_host_arrays_are_digested_block_by_block_like_on_device():
    x = np.random.default_rng(1).standard_normal((4100, 1024)).astype(np.float32)  # > 4M words: several host blocks
    assert _digest(x) == _digest(jnp.asarray(x))


SHARDED = r"""
import numpy as np, jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from prosparse_jax import digest
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("a", "b"))
dig = lambda x: digest.digests({"t": x})["t"][""]
for shape in [(8, 6, 5), (8, 96, 100)]:  # digested on the host shard by shard; by XLA on the devices (> 64K words)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    ref = dig(x)
    for spec in [P(), P("a"), P(None, "b"), P("a", "b"), P("b", None, None)]:
        assert dig(jax.device_put(x, NamedSharding(mesh, spec))) == ref, (shape, spec)
print("ok")
"""


def test_sharded_digests_match_the_unsharded_one():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    out = subprocess.run([sys.executable, "-c", SHARDED], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_the_orbax_noise_filter_is_narrow():
    """Only orbax's leftover reads are dropped ("Event loop is closed"); any other unraisable reaches the hook."""
    ckpt.quiet_orbax_noise()
    seen = []
    hook = sys.unraisablehook
    try:
        sys.unraisablehook = lambda u: seen.append(u)
        ckpt.quiet_orbax_noise()
        for exc in (RuntimeError("Event loop is closed"), RuntimeError("other")):
            sys.unraisablehook(type("U", (), {"exc_value": exc, "object": None, "exc_traceback": None})())
    finally:
        sys.unraisablehook = hook
    assert [str(u.exc_value) for u in seen] == ["other"]
