"""One owner per workdir: the lock file ``<workdir>/.lock``, held for a whole training run (or a write into a
workdir), so that a second command on the same workdir is refused instead of writing next to the first.

Made for the shared filesystems of clusters (NFS, Lustre), where fcntl/flock locks cannot be trusted: the lock is a
hard link to a complete temporary file (atomic, never seen half-written; O_EXCL where there are no hard links) holding
JSON ``{what, host, pid, started, heartbeat_s}``. The holder refreshes its mtime every ``heartbeat_s`` (a daemon
thread). A lock is stale when its holder is gone: on the same host its pid no longer runs; from another host (whose
pids cannot be checked) when it was not refreshed for ``stale_after_s``, by the filesystem's clock. A stale lock is
taken over under a claim file created with O_EXCL, so of several processes taking over the same stale lock exactly one
removes it, and the exclusive create decides who holds the new one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from prosparse_jax.errors import TrainError

LOCK_FILE = ".lock"
HEARTBEAT_S = 30.0  # the holder refreshes the lock's mtime this often
STALE_AFTER_S = 300.0  # a lock of another host not refreshed for this long is stale (its holder died)
_CLAIM_STALE_S = 60.0  # a take-over claim lives for milliseconds: one older than this was interrupted
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Holder:
    """What a lock file says about the process holding it."""

    path: Path  # the lock file
    what: str = "?"  # the command holding it: train, import_hf, permute
    host: str = "?"
    pid: int = -1
    started: str = "?"  # ISO time the holder took the lock
    pid_start: str | None = None  # the holder's start time in /proc/<pid>/stat: a reused pid is another process
    pid_ns: str | None = None  # the holder's pid namespace: containers may share a host name
    mtime: float = 0.0  # the holder's last refresh
    readable: bool = True
    identity: tuple[int, bytes] = (0, b"")  # (inode, content): this lock file, not a later one at the same path

    def describe(self) -> str:
        if not self.readable:
            return f"an unknown process (its lock file {self.path} cannot be read)"
        return f"{self.what} (pid {self.pid} on host {self.host}, since {self.started})"

    @property
    def on_this_host(self) -> bool:
        """Whether the holder's pid can be checked here (same host name and pid namespace)."""
        return self.readable and self.host == socket.gethostname() and self.pid_ns == _pid_ns()


class WorkdirLock:
    """The exclusive lock of ``workdir`` for the command ``what`` (``with WorkdirLock(wd, "train"): ...``).

    :meth:`acquire` creates the workdir if needed (and :meth:`release` removes it again when it is still empty), takes
    the lock or takes over a stale one, and refuses with a :class:`TrainError` naming the holder when it is held.
    """

    def __init__(self, workdir: str | os.PathLike, what: str = "train", *, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S) -> None:
        self.workdir, self.what = Path(workdir), what
        self.path = self.workdir / LOCK_FILE
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.took_over: str = ""  # why the stale lock this one replaced was stale ("" if there was none)
        self._content: bytes | None = None  # this holder's lock file content while held
        self._created: list[Path] = []  # directories acquire() created, deepest first
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._content is not None

    def acquire(self) -> WorkdirLock:
        """Takes the lock, taking over a stale one; returns self.

        Raises:
          TrainError: the lock is held by a live process (named, with what to do), or cannot be written.
        """
        if self.held:
            raise RuntimeError(f"{self.path} is already held by this WorkdirLock")
        self._make_workdir()
        content = json.dumps({
            "what": self.what, "host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "heartbeat_s": self.heartbeat_s, "pid_start": _pid_start(os.getpid()), "pid_ns": _pid_ns(),
            "token": uuid.uuid4().hex}).encode()
        try:
            for _ in range(50):
                if _create(self.path, content):
                    break
                holder = read_holder(self.workdir)
                if holder is None:
                    continue  # released meanwhile
                reason = stale_reason(holder, self.stale_after_s)
                if not reason:
                    raise TrainError(refusal(self.workdir, holder, self.stale_after_s))
                if self._take_over(holder, reason):
                    self.took_over = reason
                else:
                    time.sleep(0.02)  # another process is taking it over: see who holds it next
            else:
                raise TrainError(f"could not take the lock {self.path}: other processes keep taking it; rerun")
        except OSError as e:
            self._remove_created()
            raise TrainError(f"cannot write the lock {self.path} ({e.strerror or e}); a workdir must be writable "
                             "(nothing was changed)") from e
        except BaseException:
            self._remove_created()
            raise
        self._content = content
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"lock heartbeat {self.path}", daemon=True)
        self._beat.start()
        return self

    def release(self) -> None:
        """Stops the heartbeat and removes the lock if it is still this holder's; no-op when not held."""
        if self._content is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        with contextlib.suppress(OSError):
            now = read_holder(self.workdir)
            if now is not None and now.identity[1] == self._content:
                self.path.unlink()
        self._content = None
        self._remove_created()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)  # None: the filesystem's current time (on NFS the server's)
            except FileNotFoundError:
                log.warning("the lock %s was removed while %s held it: another command may now write %s",
                            self.path, self.what, self.workdir)
                return
            except OSError:
                pass  # a transient filesystem error: refreshed at the next beat

    def _take_over(self, stale: Holder, reason: str) -> bool:
        """Removes the stale lock ``stale`` unless another process is doing so or did; True when this one did."""
        ino, content = stale.identity
        claim = self.path.with_name(
            f"{LOCK_FILE}.takeover-{hashlib.sha256(content + str(ino).encode()).hexdigest()[:16]}")
        try:
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if _fs_now(self.workdir) - os.stat(claim).st_mtime > _CLAIM_STALE_S:
                    raise TrainError(
                        f"an interrupted take-over of the stale lock {self.path} left {claim}: make sure no other "
                        f"command uses {self.workdir}, delete both files and rerun") from None
            return False
        try:
            now = read_holder(self.workdir)
            if now is None or now.identity != stale.identity:
                return False  # another process took it over first
            self.path.unlink()
        finally:
            claim.unlink(missing_ok=True)
        log.warning("%s: took over the stale lock of %s: %s", self.workdir, stale.describe(), reason)
        return True

    def _make_workdir(self) -> None:
        if self.workdir.exists() and not self.workdir.is_dir():
            raise TrainError(f"workdir {self.workdir} is a file, not a directory; choose a directory")
        p, created = self.workdir.absolute(), []
        while not p.exists() and p != p.parent:
            created.append(p)
            p = p.parent
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrainError(f"cannot create workdir {self.workdir} ({e.strerror or e})") from e
        self._created = created

    def _remove_created(self) -> None:
        """Removes the directories acquire() created that are still empty (a failed start leaves nothing)."""
        for d in self._created:
            try:
                d.rmdir()
            except OSError:
                break
        self._created = []


def read_holder(workdir: str | os.PathLike) -> Holder | None:
    """The holder named by ``workdir``'s lock file, live or stale; None when there is no lock."""
    path = Path(workdir) / LOCK_FILE
    try:
        with open(path, "rb") as f:
            st, content = os.fstat(f.fileno()), f.read()
    except FileNotFoundError:
        return None
    try:
        d = json.loads(content)
        return Holder(path, str(d["what"]), str(d["host"]), int(d["pid"]), str(d["started"]), d.get("pid_start"),
                      d.get("pid_ns"), st.st_mtime, True, (st.st_ino, content))
    except (ValueError, KeyError, TypeError):
        return Holder(path, mtime=st.st_mtime, readable=False, identity=(st.st_ino, content))


def stale_reason(holder: Holder, stale_after_s: float = STALE_AFTER_S) -> str:
    """Why ``holder`` is gone, or "" while it may be alive."""
    if holder.on_this_host:
        return "" if _runs(holder.pid, holder.pid_start) else f"pid {holder.pid} no longer runs on this host"
    age = _fs_now(holder.path.parent) - holder.mtime
    return f"not refreshed for {age:.0f} s (stale after {stale_after_s:.0f} s)" if age > stale_after_s else ""


def live_holder(workdir: str | os.PathLike, stale_after_s: float = STALE_AFTER_S) -> Holder | None:
    """The live holder of ``workdir``'s lock; None when there is no lock or a stale one."""
    h = read_holder(workdir)
    return h if h is not None and not stale_reason(h, stale_after_s) else None


def refusal(workdir: str | os.PathLike, holder: Holder, stale_after_s: float = STALE_AFTER_S) -> str:
    """The one-line refusal of a command on ``workdir`` while ``holder`` holds it."""
    if holder.on_this_host:
        gone = f"if pid {holder.pid} is not that command, delete {holder.path}"
    else:
        age = _fs_now(holder.path.parent) - holder.mtime
        gone = (f"its lock was refreshed {age:.0f} s ago and is taken over automatically after {stale_after_s:.0f} s "
                f"without a refresh; if that process is gone, delete {holder.path}")
    return (f"workdir {workdir} is in use by {holder.describe()}: wait for it to end or stop it (SIGTERM or Ctrl-C "
            f"saves a train's checkpoint), then rerun; {gone} (nothing was changed)")


def check_free(workdir: str | os.PathLike) -> None:
    """Raises the :func:`refusal` when a live process holds ``workdir``'s lock (a check, not a lock: see
    :class:`WorkdirLock`)."""
    h = live_holder(workdir)
    if h is not None:
        raise TrainError(refusal(workdir, h))


# ---------------------------------------------------------------------------------------------------------------
# The filesystem and the processes of this host
# ---------------------------------------------------------------------------------------------------------------
def _create(path: Path, content: bytes) -> bool:
    """Creates ``path`` holding ``content`` unless it exists; True when this call created it.

    A hard link to a complete temporary file: atomic on NFS too, where a lost reply is caught by the link count
    (open(2), O_EXCL); an O_EXCL create where the filesystem has no hard links."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(content)
    try:
        try:
            os.link(tmp, path)
            return True
        except OSError as e:
            if os.stat(tmp).st_nlink == 2:
                return True
            if e.errno == errno.EEXIST:
                return False
            if e.errno not in _NO_HARD_LINKS:
                raise
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _fs_now(directory: Path) -> float:
    """The filesystem's clock: the mtime of a file created now (on NFS the server's clock, which also stamps the
    heartbeat), so that clocks of different hosts do not matter; this host's clock where ``directory`` is read-only."""
    try:
        fd, name = tempfile.mkstemp(prefix=f"{LOCK_FILE}.now.", dir=directory)
    except OSError:
        return time.time()
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        os.unlink(name)


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name ([] without that process; None without /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return [] if Path("/proc/self/stat").exists() else None
    except (OSError, IndexError):
        return None


def _pid_start(pid: int) -> str | None:
    fields = _proc_stat(pid)
    return fields[19] if fields else None


def _pid_ns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _runs(pid: int, pid_start: str | None) -> bool:
    """Whether process ``pid`` of this host runs (not a zombie) and, when ``pid_start`` is known, is the process
    that started then (not a later one given the same pid)."""
    if pid <= 0:
        return False
    fields = _proc_stat(pid)
    if fields is not None:
        return bool(fields) and fields[0] != "Z" and (pid_start is None or fields[19] == pid_start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
