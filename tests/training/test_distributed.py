"""Multi-process runs on jax.distributed: start-up settings, a start-up that times out in one line, two local
processes training like one, input errors."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import write_corpus

from prosparse_jax.errors import UsageError
from prosparse_jax.main import train as train_main
from prosparse_jax.training import checkpoint as ckpt
from prosparse_jax.training.distributed import DEFAULT_TIMEOUT_S, Settings, resolve
from prosparse_jax.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240  # per launch; a hung collective must not hang the suite


# ---------------------------------------------------------------------------------------------------------------
# Start-up settings
# ---------------------------------------------------------------------------------------------------------------
SRUN = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1"}


def test_no_settings_is_one_process():
    assert resolve(environ={}) is None
    assert resolve(environ={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None


def test_flags_take_precedence_over_the_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "envhost:1", "JAX_NUM_PROCESSES": "8", "JAX_PROCESS_ID": "7", **SRUN}
    s = resolve("flaghost:2", 2, 1, "0,1", environ=env)
    assert s == Settings("flags/environment", "flaghost:2", 2, 1, (0, 1))
    assert resolve(environ=env) == Settings("flags/environment", "envhost:1", 8, 7)  # JAX_* before SLURM
    assert resolve(process_id=3, environ=env).process_id == 3  # per field: a flag overrides its variable


def test_slurm_srun_task_lets_jax_detect_everything():
    assert resolve(environ=SRUN) == Settings("SLURM")  # jax.distributed.initialize() with no arguments
    assert resolve(num_processes=1, environ=SRUN) is None  # --num_processes=1 forces one process


def test_slurm_batch_script_without_srun_runs_one_process(caplog):
    env = {k: v for k, v in SRUN.items() if k not in ("SLURM_STEP_NODELIST", "SLURM_PROCID")}
    assert resolve(environ=env) is None
    assert "launch with `srun python -m prosparse_jax.main.train ...`" in caplog.text


def test_prosparse_distributed_asks_jax_to_detect_the_cluster():
    assert resolve(environ={"PROSPARSE_DISTRIBUTED": "1"}) == Settings("PROSPARSE_DISTRIBUTED=1")


@pytest.mark.parametrize("kw, env, named", [
    (dict(coordinator_address="h:1"), {}, "--num_processes (or JAX_NUM_PROCESSES) and --process_id"),
    (dict(num_processes=2, process_id=0), {}, "--coordinator_address (or JAX_COORDINATOR_ADDRESS) is missing"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "--process_id (or JAX_PROCESS_ID)"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), {}, "must be in [0, --num_processes=2)"),
    (dict(coordinator_address="h", num_processes=2, process_id=0), {}, "must be host:port of process 0"),
    ({}, {"JAX_NUM_PROCESSES": "two"}, "--num_processes (or JAX_NUM_PROCESSES) must be an integer"),
    (dict(local_device_ids="0,x"), {}, "--local_device_ids (or JAX_LOCAL_DEVICE_IDS) must be comma-separated"),
])
def test_partial_settings_name_what_is_missing(kw, env, named):
    with pytest.raises(UsageError) as e:
        resolve(**kw, environ=env)
    assert named in str(e.value)


def test_train_cli_reports_partial_flags_in_one_line(tmp_path, capsys, monkeypatch):
    for var in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    code = train_main.main(["train", "--config=configs/prosparse.py:tiny", f"--workdir={tmp_path / 'w'}",
                           "--coordinator_address=localhost:1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("train: error: ") and "--num_processes (or JAX_NUM_PROCESSES)" in err[0]
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------------------------------------------------------
# Subprocess helpers
# ---------------------------------------------------------------------------------------------------------------
def _env(n_devices: int) -> dict[str, str]:
    # keep the caller's XLA flags (e.g. --xla_cpu_max_isa=AVX2); nothing of a surrounding SLURM job leaks in
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n_devices}".strip()
    return {"XLA_FLAGS": flags, "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": str(ROOT)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class _Procs:
    """Processes started together, output in files (no pipe to fill); all killed if one fails or time runs out."""

    def __init__(self, out_dir: Path, cmds: list[list[str]], env: dict[str, str]) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.logs = [(out_dir / f"p{i}.out", out_dir / f"p{i}.err") for i in range(len(cmds))]
        self.procs: list[subprocess.Popen] = []
        for cmd, (o, e) in zip(cmds, self.logs, strict=True):
            with open(o, "w") as out, open(e, "w") as err:  # the child keeps its own copies
                self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err))

    def report(self) -> str:
        parts = []
        for i, (p, (o, e)) in enumerate(zip(self.procs, self.logs, strict=True)):
            parts.append(f"--- process {i} (rc {p.returncode}) stdout:\n{o.read_text()[-2000:]}\n--- stderr:\n"
                         f"{e.read_text()[-4000:]}")
        return "\n".join(parts)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()

    def wait(self, timeout: float = TIMEOUT_S) -> list[str]:
        """Waits for all; returns their stdouts. Fails (after killing the rest) on a timeout or a non-zero exit."""
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in self.procs):
            failed = [p for p in self.procs if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                self.kill()
                pytest.fail(("a process failed" if failed else f"timed out after {timeout:.0f} s") + "\n"
                            + self.report())
            time.sleep(0.2)
        if any(p.returncode for p in self.procs):
            pytest.fail("a process failed\n" + self.report())
        return [o.read_text() for o, _ in self.logs]


def _write_config(path: Path, corpus: Path, steps: int) -> Path:
    path.write_text(f'''
import sys
from pathlib import Path
sys.path.insert(0, {str(ROOT / "tests")!r})
from conftest import small_run_config

def get_config():
    c = small_run_config(Path({str(corpus)!r}), {steps}, batch_size=8, checkpoint_every={steps})
    c.train.mesh_fsdp = 2  # 2 processes x 2 devices: data 2 x fsdp 2, parameters sharded across the processes
    return c
''')
    return path


# A single process reading, as its batch, the rows both processes of the 2-process run read (concatenated in
# process order, as the global batch is assembled): the same global batch on one device.
REFERENCE = r"""
import runpy
import numpy as np
from prosparse_jax.data import pipeline as data_lib
from prosparse_jax.training.train import train

make = data_lib.make_train_iterator


class Hosts:
    def __init__(self, its):
        self.its = its

    def __iter__(self):
        return self

    def __next__(self):
        parts = [next(it) for it in self.its]
        return {{k: np.concatenate([p[k] for p in parts]) for k in parts[0]}}

    def get_state(self):
        return [it.get_state() for it in self.its]


def hosts(corpus, tok, *, batch_size, process_index, process_count, **kw):
    return Hosts([make(corpus, tok, batch_size=batch_size // {procs}, process_index=i, process_count={procs}, **kw)
                  for i in range({procs})])


data_lib.make_train_iterator = hosts
c = runpy.run_path({config!r})["get_config"]()
c.train.mesh_fsdp = 1
train(c, {workdir!r})
"""


def _train_losses(workdir: Path) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in read_metrics(workdir, "train")]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    """Two local processes x 2 CPU devices (FSDP across them) under jax.distributed, launched with the train CLI's
    coordinator flags: SIGTERM to process 1 alone stops both after the same step with a checkpoint; the rerun
    restores it (each process its own data position) and finishes. The losses equal those of one process on one
    device fed the same global batches, only process 0 wrote metrics, and the final checkpoint loads anywhere."""
    steps = 60
    corpus = write_corpus(tmp_path / "corpus")
    config = _write_config(tmp_path / "cfg.py", corpus, steps)
    wd = tmp_path / "multi"

    def launch(tag: str) -> _Procs:
        port = _free_port()
        return _Procs(tmp_path / tag, [
            [sys.executable, "-m", "prosparse_jax.main.train", f"--config={config}", f"--workdir={wd}",
             f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"]
            for i in range(2)], _env(2))

    # 1. interrupted: SIGTERM reaches process 1 only, after a few steps
    run1 = launch("run1")
    deadline = time.monotonic() + TIMEOUT_S
    while len(_train_losses(wd)) < 3:
        if time.monotonic() > deadline or any(p.poll() is not None for p in run1.procs):
            run1.kill()
            pytest.fail("the 2-process run did not reach step 3\n" + run1.report())
        time.sleep(0.05)
    run1.procs[1].send_signal(signal.SIGTERM)
    out1 = run1.wait()
    stopped = ckpt.latest_step(wd)
    assert stopped is not None and 3 <= stopped < steps, run1.report()
    assert f"stopped at step {stopped}" in out1[0]
    assert "distributed (flags/environment): 2 processes, 2 local / 4 global cpu devices, coordinator localhost:" \
        in out1[0]
    assert '"processes": 2' in out1[0] and "{" not in out1[1]  # prints: process 0 only
    extra = ckpt.read_extra(wd, stopped)
    assert len(extra["data_states"]) == 2  # each process's position in its own shard
    assert [s for s, _ in _train_losses(wd)][-1] == stopped

    # 2. the same command resumes from the checkpoint on both processes and finishes
    out2 = launch("run2").wait()
    assert f"resuming {wd} from step {stopped}" in out2[0] and "resuming" not in out2[1]

    # 3. one process, one device, the same global batches
    ref = tmp_path / "ref"
    code = REFERENCE.format(procs=2, config=str(config), workdir=str(ref))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(1), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]

    multi, one = _train_losses(wd), _train_losses(ref)
    assert [s for s, _ in multi] == list(range(1, steps + 1)) == [s for s, _ in one]  # one writer, no duplicates
    # float32: the same sums in another order (4 devices, 2 processes) drift by round-off only
    np.testing.assert_allclose([v for _, v in multi], [v for _, v in one], rtol=1e-5)
    fm, fo = (json.loads((w / "final_eval.json").read_text()) for w in (wd, ref))
    np.testing.assert_allclose(fm["eval_loss"], fo["eval_loss"], rtol=1e-5)
    assert len(list((wd / "tb").iterdir())) == 2  # one TensorBoard file per launch: process 0's
    assert (wd / "config.json").exists()
    _, a, _ = ckpt.load_model(wd)  # written by 2 processes, read by 1
    _, b, _ = ckpt.load_model(ref)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=2e-6), a, b)


# ---------------------------------------------------------------------------------------------------------------
# Start-up that cannot complete: said while waiting, one line at the timeout
# ---------------------------------------------------------------------------------------------------------------
def test_start_up_timeout_comes_from_the_argument_the_environment_or_the_default():
    flags = dict(coordinator_address="h:1", num_processes=2, process_id=1)
    assert resolve(**flags, environ={}).timeout_s == DEFAULT_TIMEOUT_S
    assert resolve(**flags, environ={"PROSPARSE_DISTRIBUTED_TIMEOUT": "12.5"}).timeout_s == 12.5
    assert resolve(**flags, timeout_s=7, environ={"PROSPARSE_DISTRIBUTED_TIMEOUT": "12.5"}).timeout_s == 7
    assert resolve(environ={**SRUN, "PROSPARSE_DISTRIBUTED_TIMEOUT": "60"}).timeout_s == 60
    for bad in ("0", "-3", "soon", "nan", "inf"):
        with pytest.raises(UsageError, match=r"--distributed_timeout \(or PROSPARSE_DISTRIBUTED_TIMEOUT\) must be a "
                                             "positive number of seconds"):
            resolve(**flags, environ={"PROSPARSE_DISTRIBUTED_TIMEOUT": bad})


def test_a_start_up_that_cannot_complete_says_what_it_waits_for_and_fails_in_one_line(tmp_path):
    """Process 1 of 2 whose coordinator port is closed, and process 0 of 2 whose peer never starts: each says on
    stderr what it waits for, then exits with the one-line error (code 1) at the timeout, instead of JAX's SIGABRT
    with a native stack after 5 minutes."""
    timeout_s = 3
    env = {**_env(1), "PROSPARSE_DISTRIBUTED_TIMEOUT": str(timeout_s)}
    closed, lonely = f"localhost:{_free_port()}", f"localhost:{_free_port()}"
    cases = {"no_coordinator": (1, closed), "no_peer": (0, lonely)}
    procs = {name: subprocess.Popen(
        [sys.executable, "-m", "prosparse_jax.main.train", f"--workdir={tmp_path / name}", "--num_processes=2",
         f"--process_id={pid}", f"--coordinator_address={addr}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for name, (pid, addr) in cases.items()}
    try:
        # a hang guard, not a timing: JAX's own start-up gives up after 300 s
        done = {name: p.communicate(timeout=120) for name, p in procs.items()}
    finally:
        for p in procs.values():
            p.kill()
    for name, (pid, addr) in cases.items():
        rc, err = procs[name].returncode, done[name][1]
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 1, (name, rc, err[-3000:])
        assert "Check failure" not in err and "Traceback" not in err and len(lines) == 2, (name, err[-3000:])
        assert lines[0].startswith(f"distributed: process {pid} of 2") and addr in lines[0], lines
        assert f"at most {timeout_s} s: --distributed_timeout or PROSPARSE_DISTRIBUTED_TIMEOUT" in lines[0], lines
        assert lines[1].startswith(f"train: error: process {pid} of 2 ") and f"{timeout_s} s" in lines[1], lines
        assert not (tmp_path / name).exists()
    no_coordinator, no_peer = (done[n][1].splitlines()[-1] for n in cases)
    assert f"waited 3 s for the coordinator at {closed}, which does not answer" in no_coordinator
    assert "start process 0 (--process_id=0) there, or fix --coordinator_address" in no_coordinator
    assert f"waited 3 s at {lonely} for process 1, which did not join: start it with --coordinator_address=" \
           f"{lonely} and --num_processes=2" in no_peer
    assert "or raise --distributed_timeout (or PROSPARSE_DISTRIBUTED_TIMEOUT)" in no_peer


# ---------------------------------------------------------------------------------------------------------------
# Inputs the devices cannot split fail before any work
# ---------------------------------------------------------------------------------------------------------------
BAD_INPUTS = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from conftest import small_run_config
from prosparse_jax.errors import ConfigError
from prosparse_jax.training.train import train

out = {{}}
for name, kw in {{"mesh": dict(mesh_fsdp=3), "mesh_data": dict(mesh_data=2, mesh_fsdp=2),
                 "batch": dict(batch_size=12, mesh_fsdp=4)}}.items():
    c = small_run_config(Path({corpus!r}), 2)
    c.train.update(kw)
    wd = Path({tmp!r}) / name
    try:
        train(c, wd)
        out[name] = "trained"
    except ConfigError as e:
        out[name] = str(e)
    out[name + "_workdir"] = wd.exists() or (Path({corpus!r}).parent / "tfds").exists()
print(json.dumps(out))
"""


def test_mesh_or_batch_the_devices_cannot_split_fail_first(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    code = BAD_INPUTS.format(tests=str(ROOT / "tests"), corpus=str(corpus), tmp=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(8), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["mesh"] == "train.mesh_fsdp=3 must divide the 8 devices; choose one of 1, 2, 4, 8"
    assert "train.mesh_data * train.mesh_fsdp = 2*2 must equal the 8 devices; set train.mesh_data=4" in out["mesh_data"]
    assert "= 12 sequences per micro-step do not split over the 8 devices of the mesh data:2,fsdp:4" in out["batch"]
    assert "set train.batch_size to a multiple of 8" in out["batch"]
    # nothing was written (no workdir, no tokenizer, no corpus prepared) and no model was built
    assert not any(out[k] for k in out if k.endswith("_workdir"))
