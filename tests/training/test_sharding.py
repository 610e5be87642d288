"""Data-parallel + FSDP on 4 and 8 simulated CPU devices gives the same training as one device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from prosparse_jax.training import checkpoint as ckpt
from prosparse_jax.training.sharding import param_specs

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from conftest import small_run_config
from prosparse_jax.training.train import train
import jax
c = small_run_config(Path({corpus!r}), 4, stages=[[0.0, 2], [0.05, 4], [0.2, 8]])  # rescaled to 4 steps
c.train.mesh_fsdp = {fsdp}
c.train.batch_size = 8
train(c, {workdir!r})
print(json.dumps({{"devices": jax.device_count()}}))
"""


def _run(corpus, workdir, n_devices, fsdp):
    # keep the caller's XLA flags (e.g. --xla_cpu_max_isa=AVX2 to run the comparison as on another CPU)
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n_devices}".strip()
    env = {"XLA_FLAGS": flags, "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    code = SCRIPT.format(tests=str(ROOT / "tests"), corpus=str(corpus), fsdp=fsdp, workdir=str(workdir))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["devices"] == n_devices


def test_param_specs_table():
    shapes = {"embed_VxD": jax.ShapeDtypeStruct((64, 32), np.float32),
              "layers": {"w_down_LxFxD": jax.ShapeDtypeStruct((2, 48, 32), np.float32),
                         "attn_norm_LxD": jax.ShapeDtypeStruct((2, 32), np.float32)}}
    specs = param_specs(shapes, 4)
    assert tuple(specs["embed_VxD"]) == ("fsdp", None)
    assert tuple(specs["layers"]["w_down_LxFxD"]) == (None, "fsdp", None)
    assert tuple(specs["layers"]["attn_norm_LxD"]) == ()
    assert tuple(param_specs(shapes, 1)["embed_VxD"]) == ()


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """The reference: the same run on one device (corpus, workdir)."""
    from conftest import write_corpus

    tmp = tmp_path_factory.mktemp("sharding")
    corpus = write_corpus(tmp / "corpus")
    _run(corpus, tmp / "one", 1, 1)
    return corpus, tmp / "one"


def _train_losses(workdir):
    return [json.loads(x)["loss"] for x in (workdir / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("n_devices, fsdp", [(8, 4), (8, 8)], ids=["data2xfsdp4", "fsdp8"])  # data x fsdp, fsdp alone
def test_fsdp_matches_single_device(one_device, tmp_path, n_devices, fsdp):
    corpus, one = one_device
    _run(corpus, tmp_path / "many", n_devices, fsdp)
    _, a, _ = ckpt.load_model(one)
    _, b, _ = ckpt.load_model(tmp_path / "many")
    # same math, different reduction order across devices: equal to float32 round-off
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=2e-6), a, b)
    la, lb = _train_losses(one), _train_losses(tmp_path / "many")
    assert len(la) == len(lb) == 4
    np.testing.assert_allclose(la, lb, rtol=1e-5)
