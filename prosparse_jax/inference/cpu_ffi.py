"""Build, load and call the C++ sparse FFN kernel for XLA:CPU (``csrc/sparse_ffn_cpu.cc``, two XLA FFI custom calls).

Given the active neurons' mask, :func:`gather_down` reads their rows of W_up^T and W_down in place on XLA's intra-op
thread pool: ProSparse (arXiv 2402.13516) §4.3 S2 + S3 after the gate. With an activation predictor,
:func:`predict_gate` computes its logits (the W2 rows of the non-zero hidden units) and the gate of the predicted
neurons only (their rows of W_gate^T), so the gate projection is no longer read densely. It is compiled on first use
with ``$CXX`` into :func:`cache_dir`, under a hash of the source, compiler, flags, jaxlib and CPU (``-march=native``),
so a changed source or jaxlib rebuilds and a cache shared between machines never loads a foreign build. A sha256
written with each build is checked before loading: a damaged or truncated library is rebuilt, never mapped; where the
kernel cannot be built or loaded, :class:`KernelUnavailableError` says why in one line (``auto`` then runs
``cpu_gather``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from prosparse_jax import files
from prosparse_jax.errors import KernelUnavailableError

Array = jax.Array

SOURCE = Path(__file__).parent / "csrc" / "sparse_ffn_cpu.cc"
#: The FFI target names and their exported handler symbols.
TARGET = "prosparse_sparse_ffn_down"
PREDICT_TARGET = "prosparse_predict_gate"
SYMBOLS = {TARGET: "ProsparseSparseFfnDown", PREDICT_TARGET: "ProsparsePredictGate"}
#: Compiler options besides the include directory (-ffp-contract=fast: fused multiply-adds; no -ffast-math).
CXXFLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-shared", "-fPIC", "-std=c++17")
FIX = "install g++ (Debian: apt-get install g++) or use implementation='cpu_gather'"
CACHE_FIX = "set PROSPARSE_CACHE_DIR to a writable directory, or use implementation='cpu_gather'"
#: Modes of the cached library and its digest file before the umask: loadable by every user of a shared cache.
LIBRARY_MODE, DIGEST_MODE = 0o755, 0o644
#: Age after which a builder's temporary file is taken for a killed build's and removed.
STALE_TMP_S = 3600


def compiler() -> str:
    """The C++ compiler: ``$CXX`` or ``g++``."""
    return os.environ.get("CXX") or "g++"


@functools.cache
def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags (Linux), else the processor name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _source() -> str:
    """The kernel's C++ source; missing (an install without the package's csrc/ files) is a KernelUnavailableError."""
    try:
        return SOURCE.read_text()
    except OSError as e:
        raise KernelUnavailableError(f"cpu_ffi: cannot read the kernel source {SOURCE} ({e.strerror or e}; an install "
                                     f"without the package's csrc/ files?); install from the repository "
                                     f"(pip install -e .) or use implementation='cpu_gather'") from None


def library_path(source: str | None = None, cxx: str | None = None) -> Path:
    """Where the build of ``source`` (default: the kernel's) with ``cxx`` lives in :func:`cache_dir`."""
    source = _source() if source is None else source
    key = "\n".join([source, cxx or compiler(), *CXXFLAGS, jaxlib.__version__, platform.machine(), _cpu_id()])
    return files.cache_dir() / f"sparse_ffn_cpu-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def digest_path(library: Path) -> Path:
    """The file holding the library's sha256, written with the build (``sha256sum -c`` reads it)."""
    return library.with_name(library.name + ".sha256")


def _sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _damage(path: Path) -> str | None:
    """None when ``path`` holds a build matching its digest file, else why not ('' when there is no build)."""
    try:
        if not path.exists():
            return ""
        recorded = digest_path(path).read_bytes().decode("ascii", "replace").split()
    except FileNotFoundError:
        return "has no digest file"
    except OSError as e:
        return f"cannot be checked ({e.strerror or e})"
    try:
        actual = _sha256(path)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if len(recorded) != 2 or recorded[1] != path.name or len(recorded[0]) != 64:
        return "has a damaged digest file"
    return None if recorded[0] == actual else "does not match its digest (damaged or truncated)"


def _excerpt(stderr: str, limit: int = 300) -> str:
    """The compiler's first error line on one line (at most ``limit`` characters), else the start of its output."""
    errors = [line for line in stderr.splitlines() if "error" in line.lower() and "collect2" not in line]
    return " ".join((errors[0] if errors else stderr).split())[:limit]


def _umask() -> int:
    """The process umask (read without changing it, from /proc on Linux), else the usual 022."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _fsync(path: str | os.PathLike, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError:
        if not directory:  # some filesystems cannot sync a directory; the files themselves are synced
            raise
    finally:
        os.close(fd)


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files of builds of ``path`` killed mid-way (older than :data:`STALE_TMP_S`)."""
    now = time.time()
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > STALE_TMP_S:
                tmp.unlink()


def build(cxx: str | None = None) -> Path:
    """The kernel compiled with ``cxx`` (default :func:`compiler`): the cached library when it matches the sha256
    written with it, else compiled now (a damaged or truncated build is replaced, never loaded).

    A build is compiled to a temporary file in the cache directory, synced, its digest written, and both renamed into
    place, so concurrent builders never see each other's partial files. Modes: :data:`LIBRARY_MODE`, :data:`DIGEST_MODE`
    less the umask.

    Raises:
      KernelUnavailableError: no source or compiler, the compile failed, or the cache directory is unusable (one line
        naming the cause and the fix).
    """
    source = _source()
    cxx = cxx or compiler()
    path = library_path(source, cxx)
    damage = _damage(path)
    if damage is None:
        return path
    old = f"the cached build {path} {damage} and cannot be rebuilt: " if damage else ""
    exe = shutil.which(cxx)
    if exe is None:
        raise KernelUnavailableError(f"cpu_ffi: {old}the C++ compiler {cxx!r} ($CXX, default g++) was not found; {FIX}")
    d = path.parent
    tmps = []
    try:
        try:
            d.mkdir(parents=True, exist_ok=True)
            _remove_stale_temporaries(path)
            for suffix in (".so.tmp", ".sha256.tmp"):
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=d)
                os.close(fd)
                tmps.append(tmp)
        except OSError as e:
            where = "it is a file" if d.exists() and not d.is_dir() else (e.strerror or str(e))
            raise KernelUnavailableError(f"cpu_ffi: {old}the kernel cache directory {d} is unusable ({where}); "
                                         f"{CACHE_FIX}") from None
        tmp_lib, tmp_digest = tmps
        cmd = [exe, *CXXFLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", tmp_lib]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            raise KernelUnavailableError(f"cpu_ffi: {old}cannot run the C++ compiler {exe} ({e.strerror or e}); "
                                         f"{FIX}") from None
        if res.returncode != 0:
            said = _excerpt(res.stderr or res.stdout or "")
            fix = CACHE_FIX if "No space left on device" in said else FIX
            raise KernelUnavailableError(f"cpu_ffi: {old}compiling {SOURCE.name} failed (exit status "
                                         f"{res.returncode}: {' '.join(cmd)}){': ' + said if said else ''}; {fix}")
        try:
            umask = _umask()
            os.chmod(tmp_lib, LIBRARY_MODE & ~umask)
            _fsync(tmp_lib)
            with open(tmp_digest, "w") as f:
                f.write(f"{_sha256(tmp_lib)}  {path.name}\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp_digest, DIGEST_MODE & ~umask)
            os.replace(tmp_lib, path)  # a reader seeing the new library with the old digest rebuilds it: never loads it
            os.replace(tmp_digest, digest_path(path))
            _fsync(d, directory=True)
        except OSError as e:
            raise KernelUnavailableError(f"cpu_ffi: {old}cannot write the build to the kernel cache directory {d} "
                                         f"({e.strerror or e}); {CACHE_FIX}") from None
    finally:
        for tmp in tmps:
            with contextlib.suppress(OSError):
                os.remove(tmp)
    return path


#: The library registered as the FFI target: XLA keeps one handler per name and process, so the first kernel loaded
#: serves every later call (another $CXX or cache directory is not loaded again).
_REGISTERED: list[ctypes.CDLL] = []
_LOCK = threading.Lock()  # one build, load and registration at a time (jit may trace from several threads)


@functools.cache
def _load(path: Path, cxx: str) -> ctypes.CDLL | KernelUnavailableError:
    """The build at ``path`` (compiled with ``cxx`` unless it is there and matches its digest), loaded and registered
    as the FFI target, or why not. Cached per build: a failure is reported once and not retried."""
    try:
        build(cxx)
    except KernelUnavailableError as e:
        return e
    try:
        lib = ctypes.cdll.LoadLibrary(str(path))
        handlers = {target: getattr(lib, symbol) for target, symbol in SYMBOLS.items()}
    except (OSError, AttributeError) as e:
        return KernelUnavailableError(f"cpu_ffi: cannot load {path} ({e}); {CACHE_FIX}")
    if not _REGISTERED:
        try:
            for target, handler in handlers.items():
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
        except (RuntimeError, ValueError) as e:  # JaxRuntimeError is a RuntimeError
            return KernelUnavailableError(f"cpu_ffi: cannot register {path} with XLA ({e}); use "
                                          f"implementation='cpu_gather'")
        _REGISTERED.append(lib)
    return lib


def _kernel() -> ctypes.CDLL | KernelUnavailableError:
    """The registered kernel, else the one of the current ``$CXX`` and cache directory (see :func:`_load`)."""
    with _LOCK:
        if _REGISTERED:
            return _REGISTERED[0]
        cxx = compiler()
        try:
            path = library_path(cxx=cxx)
        except KernelUnavailableError as e:
            return e
        return _load(path, cxx)


def available() -> bool:
    """Whether the kernel builds and loads on this machine (compiled on the first call)."""
    return not isinstance(_kernel(), KernelUnavailableError)


def unavailable_reason() -> str:
    """Why :func:`available` is False (the build error's message), or '' when it is True."""
    lib = _kernel()
    return str(lib) if isinstance(lib, KernelUnavailableError) else ""


def _require_kernel() -> None:
    lib = _kernel()
    if isinstance(lib, KernelUnavailableError):
        raise KernelUnavailableError(str(lib))


def gather_down(x_BxD: Array, coeff_BxF: Array, active_F: Array, w_up_FxD: Array, w_down_FxD: Array, *,
                read_up: bool, drelu: bool) -> Array:
    """out_BxD = sum over the neurons i with active_F[i] of x1[:, i] * W_down[i, :], on all cores (float32 only).

    Args:
      coeff_BxF: act(gate) when ``read_up`` (x1 = coeff * (x . W_up^T[i]), with relu(up) when ``drelu``); else x1.
      active_F: bool, the neurons whose rows are read (the kernel builds their index list itself, which is cheaper
        than ``jnp.nonzero`` in XLA).
      w_up_FxD: W_up^T (one row per neuron); not read unless ``read_up`` (any [F, D] array then).

    Raises:
      KernelUnavailableError: the kernel cannot be built here.
    """
    _require_kernel()
    # under jax.vmap the call loops over the mapped axis (weights unbatched: no copies)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(x_BxD.shape, jnp.float32), vmap_method="sequential")
    return call(x_BxD, coeff_BxF, jnp.asarray(active_F, jnp.bool_), w_up_FxD, w_down_FxD, read_up=np.bool_(read_up),
                drelu=np.bool_(drelu))


def predict_gate(x_BxD: Array, h_BxR: Array, w2_RxF: Array, b2_F: Array, threshold: Array,
                 w_gate_FxD: Array) -> tuple[Array, Array]:
    """(gate_BxF, predicted_F): the predictor's set, any row's ``h W2 + b2 > threshold`` (reading the W2 rows whose
    ``h_BxR`` is non-zero on some row), and ``x . W_gate^T[i]`` for the predicted neurons i, 0 elsewhere (float32).

    Args:
      h_BxR: the predictor's hidden layer relu(x W1) (:func:`prosparse_jax.predictor.core.layer_logits`' first half).
      threshold: the layer's decision threshold, one float32 (may be traced).
      w_gate_FxD: W_gate^T, one row per neuron (``sparse_ffn.prepare_weights``).

    Raises:
      KernelUnavailableError: the kernel cannot be built here.
    """
    _require_kernel()
    B, F = x_BxD.shape[0], w2_RxF.shape[1]
    call = jax.ffi.ffi_call(PREDICT_TARGET, (jax.ShapeDtypeStruct((B, F), jnp.float32),
                                             jax.ShapeDtypeStruct((F,), jnp.bool_)), vmap_method="sequential")
    return call(x_BxD, h_BxR, w2_RxF, b2_F, jnp.asarray(threshold, jnp.float32).reshape(1), w_gate_FxD)
