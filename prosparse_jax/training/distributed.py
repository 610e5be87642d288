"""Multi-process runs on JAX's own runtime (``jax.distributed``): start-up, barriers and agreement between processes.

Every process runs the same command and joins the run (:func:`initialize`) before anything touches a JAX backend; all
must see the same workdir and data dir. Set-up: docs/scaling.md.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from prosparse_jax.errors import UsageError

# set by srun in each task of a job step; JAX's SLURM detection (jax/_src/clusters/slurm_cluster.py) needs them
_SLURM_STEP_VARS = ("SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
# (setting, train flag, environment variable)
_FIELDS = (("coordinator_address", "--coordinator_address", "JAX_COORDINATOR_ADDRESS"),
           ("num_processes", "--num_processes", "JAX_NUM_PROCESSES"),
           ("process_id", "--process_id", "JAX_PROCESS_ID"))
DEFAULT_TIMEOUT_S = 300.0  # how long the processes wait for each other at start-up (JAX's own default)
_TIMEOUT = "--distributed_timeout (or PROSPARSE_DISTRIBUTED_TIMEOUT)"
_TIMEOUT_SET = "--distributed_timeout or PROSPARSE_DISTRIBUTED_TIMEOUT"
# JAX's client aborts the process (SIGABRT, a native stack) at its own start-up deadline: it gets this much longer
# than ours, so that the one-line error comes first
_JAX_DEADLINE_AFTER_S = 30
EXIT_USER_ERROR = 1  # the exit code of the command-line tools for a UserError


@dataclasses.dataclass(frozen=True)
class Settings:
    """What :func:`initialize` passes to ``jax.distributed.initialize`` (None: JAX detects it), and its source."""

    source: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S  # start-up: how long to wait for every process to join


def _int(value: Any, flag: str, env: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UsageError(f"{flag} (or {env}) must be an integer, got {value!r}") from None


def _timeout(value: Any) -> float:
    if value is None or value == "":
        return DEFAULT_TIMEOUT_S
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = math.nan
    if not 0 < t < math.inf:
        raise UsageError(f"{_TIMEOUT} must be a positive number of seconds, got {value!r}")
    return t


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, local_device_ids: str | Sequence[int] | None = None,
            environ: Mapping[str, str] | None = None, timeout_s: float | None = None) -> Settings | None:
    """The multi-process settings, or None for one process; the first source that applies wins:

    1. the arguments (the train command's flags), each falling back on ``JAX_COORDINATOR_ADDRESS``,
       ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (``JAX_LOCAL_DEVICE_IDS``); ``num_processes=1`` forces one process;
    2. SLURM: a task of an ``srun`` step with ``SLURM_NTASKS`` > 1, JAX's SLURM detection supplying the rest (without
       ``srun``: one process, with a warning);
    3. ``PROSPARSE_DISTRIBUTED=1``: any other cluster JAX detects (Cloud TPU pods, Open MPI).

    ``timeout_s`` (else ``PROSPARSE_DISTRIBUTED_TIMEOUT``, else :data:`DEFAULT_TIMEOUT_S`): how long
    :func:`initialize` waits for every process to join.

    Raises:
      UsageError: a partial or inconsistent setting; the message names the missing flag / variable.
    """
    env = os.environ if environ is None else environ
    timeout = _timeout(timeout_s if timeout_s is not None else env.get("PROSPARSE_DISTRIBUTED_TIMEOUT"))
    given = {"coordinator_address": coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None,
             "num_processes": _int(num_processes if num_processes is not None else env.get("JAX_NUM_PROCESSES"),
                                   "--num_processes", "JAX_NUM_PROCESSES"),
             "process_id": _int(process_id if process_id is not None else env.get("JAX_PROCESS_ID"),
                                "--process_id", "JAX_PROCESS_ID")}
    ids = local_device_ids if local_device_ids is not None else env.get("JAX_LOCAL_DEVICE_IDS")
    if isinstance(ids, str):
        try:
            ids = [int(x) for x in ids.split(",") if x.strip()] or None
        except ValueError:
            raise UsageError(f"--local_device_ids (or JAX_LOCAL_DEVICE_IDS) must be comma-separated integers, "
                             f"got {ids!r}") from None
    ids = tuple(ids) if ids else None
    n = given["num_processes"]
    if n is not None and n < 1:
        raise UsageError(f"--num_processes (or JAX_NUM_PROCESSES) must be >= 1, got {n}")
    if n == 1 and given["coordinator_address"] is None and given["process_id"] in (None, 0):
        return None  # one process, explicitly: no cluster detection
    if any(v is not None for v in given.values()):
        missing = [f"{flag} (or {var})" for key, flag, var in _FIELDS if given[key] is None]
        if missing:
            have = ", ".join(f"{flag}={given[key]}" for key, flag, _ in _FIELDS if given[key] is not None)
            raise UsageError(f"a multi-process run needs all of --coordinator_address, --num_processes and "
                             f"--process_id; {have} is set but {' and '.join(missing)} is missing (or run "
                             "under SLURM's srun, which supplies them)")
        if not 0 <= given["process_id"] < n:
            raise UsageError(f"--process_id={given['process_id']} must be in [0, --num_processes={n})")
        if ":" not in given["coordinator_address"]:
            raise UsageError(f"--coordinator_address={given['coordinator_address']} must be host:port of "
                             "process 0 (e.g. node001:12345), the same for every process")
        return Settings("flags/environment", **given, local_device_ids=ids, timeout_s=timeout)
    if env.get("SLURM_JOB_ID") and _int(env.get("SLURM_NTASKS"), "SLURM_NTASKS", "SLURM_NTASKS") not in (None, 1):
        if all(env.get(v) is not None for v in _SLURM_STEP_VARS):
            return Settings("SLURM", local_device_ids=ids, timeout_s=timeout)
        logging.getLogger(__name__).warning(
            "SLURM_NTASKS=%s but this process was not started by srun (no SLURM_PROCID / SLURM_STEP_NODELIST): "
            "running as one process; launch with `srun python -m prosparse_jax.main.train ...` for a multi-process "
            "run", env["SLURM_NTASKS"])
        return None
    if env.get("PROSPARSE_DISTRIBUTED") == "1":
        return Settings("PROSPARSE_DISTRIBUTED=1", local_device_ids=ids, timeout_s=timeout)
    return None


def initialize(settings: Settings | None) -> None:
    """Joins the processes of a multi-process run (None: one process); call it once, before any JAX backend is used.

    Says on stderr what it waits for, and gives up after ``settings.timeout_s`` with a :class:`UsageError` naming
    what did not arrive (JAX's own client would abort the process with a native stack trace). A process that gave up
    (or got Ctrl-C) cannot join any more: it then exits at once when Python exits (code 1, 130 after Ctrl-C), skipping
    JAX's exit handler, which would wait for the abandoned connection's deadline.
    """
    if settings is None or jax.distributed.is_initialized():
        return
    s = settings
    print(waiting_line(s), file=sys.stderr, flush=True)
    joined, failed = threading.Event(), []

    def join() -> None:  # JAX's connect blocks without the GIL: this thread waits, the main thread keeps the clock
        try:
            jax.distributed.initialize(coordinator_address=s.coordinator_address, num_processes=s.num_processes,
                                       process_id=s.process_id, local_device_ids=s.local_device_ids,
                                       initialization_timeout=math.ceil(s.timeout_s) + _JAX_DEADLINE_AFTER_S)
        except BaseException as e:  # re-raised in the main thread
            failed.append(e)
        finally:
            joined.set()

    threading.Thread(target=join, name="jax.distributed.initialize", daemon=True).start()
    try:
        coordinator = _wait(joined, s)
    except KeyboardInterrupt:
        atexit.register(_exit_now, 130)
        raise
    if coordinator is not None:
        atexit.register(_exit_now, EXIT_USER_ERROR)
        raise UsageError(timeout_message(s, coordinator))
    if failed:
        e = failed[0]
        if not isinstance(e, (RuntimeError, ValueError)):  # XLA's connection errors are RuntimeErrors
            raise e
        where = s.coordinator_address or "the address JAX derived from the cluster"
        raise UsageError(
            f"joining the multi-process run ({s.source}) failed: {str(e).strip().splitlines()[0][:300]}. Check that "
            f"process 0 runs and is reachable at {where}, and that every process got the same coordinator and "
            "process count and its own process id") from e
    if jax.process_index() == 0:
        print(startup_line(s.source, s.coordinator_address), flush=True)


def _exit_now(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _jax_settings(s: Settings) -> tuple[str | None, int | None, int | None]:
    """(coordinator, processes, process id): the given ones, else those JAX detected (known once it started)."""
    from jax._src import distributed as _dist

    state = getattr(_dist, "global_state", None)
    return (s.coordinator_address or getattr(state, "coordinator_address", None),
            s.num_processes or getattr(state, "num_processes", None),
            s.process_id if s.process_id is not None else getattr(state, "process_id", None))


def waiting_line(s: Settings) -> str:
    """The line on stderr when the wait starts: who this process is, whom it waits for, and for how long."""
    limit = f"(at most {s.timeout_s:g} s: {_TIMEOUT_SET})"
    if s.coordinator_address is None:
        return (f"distributed ({s.source}): joining the run at the coordinator JAX detects; waiting for every "
                f"process to join {limit}")
    n, i, addr = s.num_processes, s.process_id, s.coordinator_address
    if i == 0:
        return f"distributed: process 0 of {n}, the coordinator at {addr}; waiting for {_others(n)} to join {limit}"
    return (f"distributed: process {i} of {n}, joining the coordinator at {addr}; waiting for it and all {n} "
            f"processes {limit}")


def _others(n: int) -> str:
    return "process 1" if n == 2 else f"processes 1-{n - 1}"


def _answers(address: str, timeout_s: float) -> str:
    """"" when something accepts a TCP connection at ``host:port``, else why not."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return ""
    except (OSError, ValueError) as e:
        if isinstance(e, TimeoutError):
            return f"no answer within {timeout_s:.0f} s"
        return getattr(e, "strerror", None) or str(e)


def _wait(joined: threading.Event, s: Settings) -> str | None:
    """None when ``joined`` is set within ``s.timeout_s``; else whether the coordinator accepted a TCP connection
    meanwhile (tried every second by the processes other than 0): "" if it did, else why not."""
    deadline = time.monotonic() + s.timeout_s
    why = "not tried"
    while not joined.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
        left = deadline - time.monotonic()
        if left <= 0:
            return why
        addr, _, i = _jax_settings(s)
        if why and addr and i not in (0, None):
            why = _answers(addr, min(2.0, left))
    return None


def timeout_message(s: Settings, coordinator: str) -> str:
    """The one-line error after ``s.timeout_s`` without every process: what did not arrive, and the fixes;
    ``coordinator``: "" when the coordinator answered during the wait, else why not."""
    addr, n, i = _jax_settings(s)
    t, raise_it = f"{s.timeout_s:g} s", f"or raise {_TIMEOUT} if some start later than that"
    same = f"with --coordinator_address={addr} and --num_processes={n}" if addr and n else "with the same settings"
    if addr is None or n is None or i is None:
        return (f"the multi-process run ({s.source}) did not start within {t}: not every process joined at the "
                f"coordinator JAX detected; check that every task started and can reach the first one, {raise_it}")
    if i == 0:
        it = ("it", "did not join", "it") if n == 2 else ("them", "did not all join", "they")
        return (f"process 0 of {n} waited {t} at {addr} for {_others(n)}, which {it[1]}: start {it[0]} {same} "
                f"({it[2]} must reach port {addr.rpartition(':')[2]} of this host), {raise_it}")
    if coordinator:
        return (f"process {i} of {n} waited {t} for the coordinator at {addr}, which does not answer ({coordinator}): "
                f"start process 0 (--process_id=0) there, or fix --coordinator_address (host:port of process 0, the "
                f"same for every process), {raise_it}")
    return (f"process {i} of {n}: something answers at {addr}, but the run did not start within {t}: either not all "
            f"{n} processes joined (start every process 0-{n - 1} {same}) or {addr} is not process 0 of this run "
            f"(fix --coordinator_address), {raise_it}")


def startup_line(source: str, coordinator: str | None = None) -> str:
    """One line about the joined run: processes, devices (local / global) and the coordinator."""
    if coordinator is None:  # the address JAX connected to, also when it derived it from the cluster
        from jax._src import distributed as _dist

        coordinator = getattr(getattr(_dist, "global_state", None), "coordinator_address", None) or "detected by JAX"
    return (f"distributed ({source}): {jax.process_count()} processes, {jax.local_device_count()} local / "
            f"{jax.device_count()} global {jax.local_devices()[0].platform} devices, coordinator {coordinator}")


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def main_process_first(name: str) -> Iterator[None]:
    """Process 0 runs the block first (it builds shared files: tokenizer, data caches); the others wait, then run
    it (reading what process 0 wrote)."""
    if jax.process_index() == 0:
        yield
        barrier(name)
    else:
        barrier(name)
        yield


def allgather_json(obj: Any) -> list[Any]:
    """``[obj of process 0, obj of process 1, ...]`` for a JSON-serialisable ``obj``; every process must call it."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(len(data)))).reshape(-1)
    buf = np.zeros(int(lengths.max()), np.uint8)
    buf[:len(data)] = data
    rows = np.asarray(multihost_utils.process_allgather(buf))
    return [json.loads(rows[i, :n].tobytes()) for i, n in enumerate(lengths)]


def any_process_fn(mesh: jax.sharding.Mesh) -> Callable[[bool], jax.Array]:
    """``any_process(flag)``: dispatches the OR of a per-process flag over all processes, a replicated bool scalar,
    the same everywhere (so that every process stops after the same step when only some got a signal)."""
    sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
    reduce = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def any_process(flag: bool) -> jax.Array:
        local = np.full(len(sharding.addressable_devices), flag, bool)
        return reduce(jax.make_array_from_process_local_data(sharding, local))

    return any_process
