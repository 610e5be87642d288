"""The workdir lock: one writer per workdir, a second one refused in one line naming the holder; stale locks taken
over (of several takers exactly one wins); released however a train ends."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import random_params, small_run_config, tiny_model_config, write_corpus

from prosparse_jax.errors import ConfigError, TrainError
from prosparse_jax.hf import io as hf_io
from prosparse_jax.training import lock
from prosparse_jax.training import train as train_mod
from prosparse_jax.training.metrics import read_metrics
from prosparse_jax.training.model_io import export_hf, import_hf

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("c") / "corpus")


def write_lock(workdir: Path, *, host: str, pid: int, age_s: float = 0.0, content: str | None = None) -> Path:
    """A lock file as another holder left it, last refreshed ``age_s`` ago."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / lock.LOCK_FILE
    path.write_text(content if content is not None else json.dumps(
        {"what": "train", "host": host, "pid": pid, "started": "2026-12-01T10:00:00+00:00", "heartbeat_s": 30,
         "pid_ns": os.readlink("/proc/self/ns/pid") if host == socket.gethostname() else None}))
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def train_cmd(corpus: Path, tmp_path: Path, workdir: Path, steps: int) -> list[str]:
    config = tmp_path / f"cfg{steps}.py"
    config.write_text(f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(ROOT / "tests")!r})
from conftest import small_run_config

def get_config():
    return small_run_config(Path({str(corpus)!r}), {steps}, checkpoint_every=1000)
""")
    return [sys.executable, "-m", "prosparse_jax.main.train", f"--config={config}", f"--workdir={workdir}"]


def wait_for(condition, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{what}: not reached\n{proc.communicate()[0]}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------------------------
# Two trains on one workdir; release
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_second_train_on_a_running_workdir_is_refused_in_one_line(corpus, tmp_path):
    """Two `train` commands on one workdir: the second exits 1 with one line naming the first (host, pid, since when,
    what to do), the first goes on alone (one metrics entry per step) and releases the lock when Ctrl-C stops it."""
    wd = tmp_path / "run"
    cmd = train_cmd(corpus, tmp_path, wd, steps=100_000)
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (wd / "metrics.jsonl").exists() and len(read_metrics(wd)) >= 2, first, "first run's step 2")
        second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGINT)
        out, _ = first.communicate(timeout=TIMEOUT_S)
    err = [ln for ln in second.stderr.splitlines() if ln.strip()]
    assert second.returncode == 1 and len(err) == 1 and second.stdout == "", second.stderr
    assert err[0].startswith(f"train: error: workdir {wd} is in use by train (pid {first.pid} on host "
                             f"{socket.gethostname()}, since 20"), err[0]
    assert "wait for it to end or stop it" in err[0] and f"delete {wd / lock.LOCK_FILE}" in err[0]
    assert first.returncode == 130 and "stopping at step" in out, out
    steps = [e["step"] for e in read_metrics(wd, "train")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2  # one writer
    assert not (wd / lock.LOCK_FILE).exists()  # released on Ctrl-C


@pytest.mark.slow
def test_a_two_process_train_on_a_held_workdir_stops_on_both_processes(corpus, tmp_path):
    """Process 0 alone takes the lock; when it cannot, every process stops with one line (none waits for it)."""
    wd = tmp_path / "run"
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    cmd = train_cmd(corpus, tmp_path, wd, steps=4) + [f"--coordinator_address=localhost:{port}", "--num_processes=2"]
    with lock.WorkdirLock(wd, "import_hf"):
        procs = [subprocess.Popen([*cmd, f"--process_id={i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
        outs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    # besides the start-up's own lines (what each process waits for; the CPU collectives' [Gloo] line), one error
    lines = [[ln for ln in err.splitlines() if ln.strip()] for _, err in outs]
    errs = [[ln for ln in ls if not ln.startswith(("distributed:", "[Gloo]"))] for ls in lines]
    assert all(ls[0].startswith("distributed: process ") for ls in lines), outs
    assert [p.returncode for p in procs] == [1, 1], outs
    assert errs[0] == [errs[0][0]] and errs[0][0].startswith(f"train: error: workdir {wd} is in use by import_hf "
                                                             f"(pid {os.getpid()} "), outs
    assert errs[1] == [f"train: error: process 0 could not start the run: {errs[0][0].removeprefix('train: error: ')}"]
    assert not (wd / "tokenizer.json").exists()


@pytest.mark.slow
def test_sigterm_during_set_up_aborts_and_releases_the_lock(corpus, tmp_path):
    wd = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(corpus, tmp_path, wd, steps=100_000), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: (wd / lock.LOCK_FILE).exists(), proc, "the lock")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 130 and "aborted" in out and "Traceback" not in out, out
    assert not (wd / lock.LOCK_FILE).exists()


def test_a_train_stopped_by_sigterm_releases_the_lock(corpus, tmp_path):
    wd = tmp_path / "run"

    holders = []

    def stop_once_training():
        while not ((wd / "metrics.jsonl").exists() and read_metrics(wd)):
            time.sleep(0.01)
        holders.append(lock.live_holder(wd))
        os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=stop_once_training, daemon=True)
    t.start()
    res = train_mod.train(small_run_config(corpus, 100_000, checkpoint_every=1000), wd)
    t.join()
    assert holders[0].pid == os.getpid() and holders[0].what == "train"  # held while training
    assert res.stop_signal == "SIGTERM" and res.interrupted
    assert not (wd / lock.LOCK_FILE).exists()


def test_lock_released_after_a_run_and_after_user_errors_and_a_dead_holder_is_taken_over(corpus, tmp_path, caplog):
    wd = tmp_path / "run"
    pid = dead_pid()
    write_lock(wd, host=socket.gethostname(), pid=pid)  # a train killed with kill -9 on this host
    c = small_run_config(corpus, 2)
    assert train_mod.train(c, wd).step == 2
    assert f"took over the stale lock of train (pid {pid} on host {socket.gethostname()}" in caplog.text
    assert f"pid {pid} no longer runs on this host" in caplog.text
    assert sorted(p.name for p in wd.glob(".lock*")) == []  # released; no claim or temporary file left

    c.optim.lr = 1e-3  # a workdir of another config: refused, released
    with pytest.raises(TrainError, match="different config"):
        train_mod.train(c, wd)
    assert not (wd / lock.LOCK_FILE).exists()
    bad = small_run_config(corpus, 2)
    bad.train.batch_size = 0
    with pytest.raises(ConfigError):
        train_mod.train(bad, tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()  # a failed start leaves nothing, not even the workdir


# ---------------------------------------------------------------------------------------------------------------
# The lock itself
# ---------------------------------------------------------------------------------------------------------------
def test_lock_of_a_live_process_is_refused_and_of_a_dead_one_taken_over(tmp_path):
    wd = tmp_path / "w"
    with lock.WorkdirLock(wd, "train") as held:
        assert held.held and json.loads((wd / lock.LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(TrainError, match=rf"is in use by train \(pid {os.getpid()} on host "):
            lock.WorkdirLock(wd, "import_hf").acquire()
    assert not (wd / lock.LOCK_FILE).exists() and not wd.exists()  # it created the workdir: removed while empty

    pid = dead_pid()
    write_lock(wd, host=socket.gethostname(), pid=pid)
    assert lock.live_holder(wd) is None
    with lock.WorkdirLock(wd) as taken:
        assert taken.took_over == f"pid {pid} no longer runs on this host"


def test_lock_of_another_host_is_stale_only_without_a_heartbeat(tmp_path):
    """Another host's pid cannot be checked: its lock counts while refreshed, and is taken over after
    ``stale_after_s`` without a refresh (by the filesystem's clock)."""
    wd = tmp_path / "w"
    write_lock(wd, host="node042", pid=4242, age_s=60)
    with pytest.raises(TrainError) as e:
        lock.WorkdirLock(wd, stale_after_s=300).acquire()
    msg = str(e.value)
    assert "in use by train (pid 4242 on host node042, since 2026-12-01T10:00:00+00:00)" in msg and "\n" not in msg
    assert "refreshed 60 s ago and is taken over automatically after 300 s" in msg
    with lock.WorkdirLock(wd, stale_after_s=30) as taken:
        assert taken.took_over.startswith("not refreshed for 60 s")
        assert json.loads((wd / lock.LOCK_FILE).read_text())["host"] == socket.gethostname()

    write_lock(wd, host="node042", pid=0, content="")  # a holder that crashed while writing it
    with pytest.raises(TrainError, match="an unknown process"):
        lock.WorkdirLock(wd).acquire()
    write_lock(wd, host="node042", pid=0, content="", age_s=1000)
    with lock.WorkdirLock(wd) as taken:
        assert taken.took_over.startswith("not refreshed for 1000 s")


def test_heartbeat_keeps_the_lock_fresh(tmp_path):
    wd = tmp_path / "w"
    with lock.WorkdirLock(wd, heartbeat_s=0.05):
        time.sleep(0.5)
        as_remote = dataclasses.replace(lock.read_holder(wd), host="node042")  # as seen from another host
        assert lock.stale_reason(as_remote, stale_after_s=0.3) == ""
    with lock.WorkdirLock(wd, heartbeat_s=1000):  # not refreshed
        time.sleep(0.5)
        as_remote = dataclasses.replace(lock.read_holder(wd), host="node042")
        assert lock.stale_reason(as_remote, stale_after_s=0.3).startswith("not refreshed for")


def _take(wd: Path, barrier: threading.Barrier, won: list, refused: list) -> None:
    barrier.wait()
    try:
        won.append(lock.WorkdirLock(wd).acquire())
    except TrainError as e:
        refused.append(str(e))


def test_take_over_race_has_one_winner_among_threads(tmp_path):
    for round_ in range(50):
        wd = tmp_path / str(round_)
        write_lock(wd, host=socket.gethostname(), pid=dead_pid())
        barrier, won, refused = threading.Barrier(8), [], []
        threads = [threading.Thread(target=_take, args=(wd, barrier, won, refused)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(refused) == 7, (won, refused)
        assert all(f"in use by train (pid {os.getpid()} " in r for r in refused)
        won[0].release()
        assert not list(wd.iterdir())


TAKER = r"""
import sys, time
from pathlib import Path
from prosparse_jax.errors import TrainError
from prosparse_jax.training.lock import WorkdirLock

wd, go = Path(sys.argv[1]), Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
try:
    held = WorkdirLock(wd, stale_after_s=100).acquire()
    print("won", flush=True)
    time.sleep(2)  # held while the others try
    held.release()
except TrainError as e:
    print("refused", e, flush=True)
"""


def test_take_over_race_has_one_winner_among_processes(tmp_path):
    """Processes taking over the same stale lock of another host at once: exactly one holds it after."""
    wd, go = tmp_path / "w", tmp_path / "go"
    write_lock(wd, host="node042", pid=4242, age_s=1000)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", TAKER, str(wd), str(go)], stdout=subprocess.PIPE, text=True,
                              env=env) for _ in range(6)]
    time.sleep(1.0)  # all started and waiting
    go.touch()
    outs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    assert sum(o.startswith("won") for o in outs) == 1, outs
    assert sum(o.startswith("refused") and "in use by train" in o for o in outs) == 5, outs
    assert not list(wd.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# Other commands writing into a workdir
# ---------------------------------------------------------------------------------------------------------------
def test_import_and_export_into_a_locked_workdir_are_refused_and_write_nothing(tmp_path):
    cfg = tiny_model_config()
    hf = hf_io.save_hf_folder(cfg, random_params(cfg), tmp_path / "hf")
    wd = tmp_path / "run"
    with lock.WorkdirLock(wd, "train"):  # a train in its set-up: no run written yet
        (wd / "tokenizer.json").write_text("{}")
        before = sorted(p.name for p in wd.iterdir())
        with pytest.raises(TrainError, match=r"is in use by train \(pid"):
            import_hf(hf, wd)
        with pytest.raises(TrainError, match=r"is in use by train \(pid"):
            export_hf(hf, wd, overwrite=True)
        assert sorted(p.name for p in wd.iterdir()) == before and (wd / "tokenizer.json").read_text() == "{}"
    assert import_hf(hf, tmp_path / "free") == tmp_path / "free" and not (tmp_path / "free" / lock.LOCK_FILE).exists()
