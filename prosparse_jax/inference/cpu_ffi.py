"""Build, load and call the C++ sparse FFN kernel for XLA:CPU (``csrc/sparse_ffn_cpu.cc``, an XLA FFI custom call).

Given the active neurons' mask, the kernel reads their rows of W_up^T and W_down in place on XLA's intra-op thread pool:
ProSparse (arXiv 2402.13516) §4.3 S2 + S3 after the dense gate projection. It is compiled on first use with ``$CXX``
into :func:`cache_dir`, under a hash of the source, compiler, flags, jaxlib and CPU (``-march=native``), so a changed
source or jaxlib rebuilds and a cache shared between machines never loads a foreign build.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from prosparse_jax.errors import KernelUnavailableError

Array = jax.Array

SOURCE = Path(__file__).parent / "csrc" / "sparse_ffn_cpu.cc"
#: The FFI target name and the exported handler symbol.
TARGET = "prosparse_sparse_ffn_down"
SYMBOL = "ProsparseSparseFfnDown"
#: Compiler options besides the include directory (-ffp-contract=fast: fused multiply-adds; no -ffast-math).
CXXFLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-shared", "-fPIC", "-std=c++17")
FIX = "install g++ (Debian: apt-get install g++) or use implementation='cpu_gather'"


def cache_dir() -> Path:
    """``$PROSPARSE_CACHE_DIR``, else ``$XDG_CACHE_HOME/prosparse_jax``, else ``~/.cache/prosparse_jax``."""
    if os.environ.get("PROSPARSE_CACHE_DIR"):
        return Path(os.environ["PROSPARSE_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "prosparse_jax"


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


def library_path(source: str | None = None, cxx: str | None = None) -> Path:
    """Where the build of ``source`` (default: the kernel's) with ``cxx`` lives in :func:`cache_dir`."""
    source = SOURCE.read_text() if source is None else source
    key = "\n".join([source, cxx or compiler(), *CXXFLAGS, jaxlib.__version__, platform.machine(), _cpu_id()])
    return cache_dir() / f"sparse_ffn_cpu-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def _excerpt(stderr: str, limit: int = 2000) -> str:
    """The compiler's error lines (at most ``limit`` characters), else the tail of its output."""
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    return ("\n".join(errors) if errors else stderr.strip())[-limit:]


def build(cxx: str | None = None) -> Path:
    """The kernel compiled with ``cxx`` (default :func:`compiler`): the cached library, else compiled now (written to a
    temporary file and renamed, so concurrent builds are safe).

    Raises:
      KernelUnavailableError: no source or compiler, or the compile failed (with the compiler's error lines).
    """
    if not SOURCE.exists():
        raise KernelUnavailableError(f"cpu_ffi: the kernel source {SOURCE} is missing (an install without the "
                                     f"package's csrc/ files); install from the repository (pip install -e .) or "
                                     f"use implementation='cpu_gather'")
    cxx = cxx or compiler()
    path = library_path(cxx=cxx)
    if path.exists():
        return path
    exe = shutil.which(cxx)
    if exe is None:
        raise KernelUnavailableError(f"cpu_ffi: the C++ compiler {cxx!r} ($CXX, default g++) was not found; {FIX}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".so.tmp", dir=path.parent)
    os.close(fd)
    cmd = [exe, *CXXFLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            tail = _excerpt(res.stderr or res.stdout or "")
            raise KernelUnavailableError(f"cpu_ffi: compiling {SOURCE.name} failed (exit status {res.returncode}: "
                                         f"{' '.join(cmd)}); {FIX}\n{tail}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


@functools.cache
def _load(path: Path, cxx: str) -> ctypes.CDLL | KernelUnavailableError:
    """The build at ``path`` (compiled with ``cxx`` if missing), loaded and registered as the FFI target, or why not.

    Cached per build, so registering happens once per process; a changed ``$CXX`` or cache directory is another build.
    """
    try:
        build(cxx)
    except KernelUnavailableError as e:
        return e
    try:
        lib = ctypes.cdll.LoadLibrary(str(path))
        handler = getattr(lib, SYMBOL)
    except (OSError, AttributeError) as e:
        return KernelUnavailableError(f"cpu_ffi: cannot load {path} ({e}); delete it to rebuild, or {FIX}")
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform="cpu")
    return lib


def _kernel() -> ctypes.CDLL | KernelUnavailableError:
    """The kernel of the current ``$CXX`` and cache directory (see :func:`_load`)."""
    cxx = compiler()
    return _load(library_path(cxx=cxx), cxx)


def available() -> bool:
    """Whether the kernel builds and loads on this machine (compiled on the first call)."""
    return not isinstance(_kernel(), KernelUnavailableError)


def unavailable_reason() -> str:
    """Why :func:`available` is False (the build error's message), or '' when it is True."""
    lib = _kernel()
    return str(lib) if isinstance(lib, KernelUnavailableError) else ""


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
    lib = _kernel()
    if isinstance(lib, KernelUnavailableError):
        raise KernelUnavailableError(str(lib))
    # under jax.vmap the call loops over the mapped axis (weights unbatched: no copies)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(x_BxD.shape, jnp.float32), vmap_method="sequential")
    return call(x_BxD, coeff_BxF, jnp.asarray(active_F, jnp.bool_), w_up_FxD, w_down_FxD, read_up=np.bool_(read_up),
                drelu=np.bool_(drelu))
