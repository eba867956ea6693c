"""The C kernels for CPU tensors, built at first use.

``rq_kernel.c`` is the RQ spline (:mod:`~normflux.transforms.native_spline`),
``affine_kernel.c`` the affine coupling (:mod:`~normflux.transforms.native_affine`),
``masked_kernel.c`` a MADE's masked layers (:mod:`~normflux.nets.native_made`); all are
shipped beside this module and compiled into one shared library.

The library is compiled with the system's C compiler (``$CC``, else ``cc``, ``gcc`` or
``clang``) the first time a process needs it, and cached in ``$NORMFLUX_CACHE`` (default
``~/.cache/normflux``; a per-user temporary directory if that cannot be written), keyed
by the sources, the flags, the compiler and the CPU. It is optional: without a compiler,
with ``NORMFLUX_NATIVE=0``, on other devices, or when the build fails, :func:`available`
is false and the layers run on tensor ops (a failed build is retried by the next
process, not cached).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from .._tracing import constant_when_traced

__all__ = ["available", "library"]

_log = logging.getLogger(__name__)
#: the kernels, compiled into one library: the RQ spline, the affine coupling, MADE layers
_SOURCES = tuple(Path(__file__).with_name(f)
                 for f in ("rq_kernel.c", "affine_kernel.c", "masked_kernel.c"))
# First the vectorised build (-march=native; GCC calls glibc's libmvec for the SIMD
# exp/log, Clang the scalar ones), then plainer ones. Flags keep IEEE semantics: no
# -ffast-math, no FMA contraction (ISO C mode implies it for GCC, not for Clang).
_FLAG_SETS = (
    ["-O3", "-march=native", "-std=c11", "-ffp-contract=off", "-DNFX_SIMD_MATH",
     "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-lmvec", "-lm"],
    ["-O3", "-march=native", "-std=c11", "-ffp-contract=off", "-fopenmp-simd",
     "-fno-math-errno", "-lm"],
    ["-O2", "-std=c11", "-ffp-contract=off", "-lm"],
)


def _cache_dir() -> Path:
    root = os.environ.get("NORMFLUX_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "normflux"


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(lines))


def _compile(cc: list[str], flags: list[str], out: Path) -> bool:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_so = Path(tmp) / out.name
        # libraries after the source (link order)
        cmd = (cc + ["-shared", "-fPIC"] + [f for f in flags if not f.startswith("-l")]
               + [str(f) for f in _SOURCES] + ["-o", str(tmp_so)] + [f for f in flags if f.startswith("-l")])
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as e:
            _errors.append(str(e))
            _log.debug("normflux: kernel build failed: %s", e)
            return False
        if done.returncode != 0:
            _errors.append(done.stderr.strip()[-500:] or f"exit status {done.returncode}")
            _log.debug("normflux: kernel build failed: %s", done.stderr[-2000:])
            return False
        os.replace(tmp_so, out)  # atomic: concurrent builders each install a whole file
    return True


def _build(cc: list[str], flags: list[str], name: str) -> Path | None:
    """The cached library ``name``, built if missing; in a per-user temporary directory
    when the cache directory cannot be written."""
    fallback = Path(tempfile.gettempdir()) / f"normflux-{os.getuid() if hasattr(os, 'getuid') else 0}"
    for root in (_cache_dir(), fallback):
        path = root / name
        if path.exists():
            return path
        try:
            if _compile(cc, flags, path):
                return path
            return None  # the compiler failed: another directory will not help
        except OSError as e:
            _log.debug("normflux: cannot build in %s: %s", root, e)
    return None


def _load() -> ctypes.CDLL | None:
    if os.environ.get("NORMFLUX_NATIVE", "1") == "0" or not sys.platform.startswith(("linux", "darwin")):
        return None
    if os.environ.get("CC"):  # the user's compiler, with its arguments ("ccache gcc")
        try:
            cc = shlex.split(os.environ["CC"])
        except ValueError as e:  # unbalanced quotes, say
            _warn(f"CC={os.environ['CC']!r} cannot be split into a command: {e}")
            return None
    else:
        found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        cc = [found] if found else []
    if not cc:
        return None  # no compiler at all: the documented fallback, silently
    if shutil.which(cc[0]) is None:
        _warn(f"the C compiler CC={os.environ['CC']!r} was not found")
        return None
    try:
        version = subprocess.run(cc + ["--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    sources = [f.read_bytes() for f in _SOURCES]
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b"\0".join(
            sources + [" ".join(cc + flags).encode(), version.encode(), _cpu_id().encode()])
        ).hexdigest()
        path = _build(cc, flags, f"kernels-{key[:20]}.so")
        if path is None:
            continue
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            _log.debug("normflux: cannot load %s: %s", path, e)
            continue
        _declare(lib)
        return lib
    if _errors:
        _warn(f"{' '.join(cc)} failed to build it: {_errors[-1]}")
    return None


_errors: list[str] = []


def _warn(why: str) -> None:
    warnings.warn(f"normflux: the C kernel is unavailable ({why}); splines and affine "
                  "couplings run on slower tensor ops. Set NORMFLUX_NATIVE=0 to skip the build.",
                  RuntimeWarning, stacklevel=3)


_LIB: ctypes.CDLL | None = None
_TRIED = False


@constant_when_traced  # traced by torch.compile as its value (it may build)
def available() -> bool:
    """Whether the C kernels are built and loaded (builds them on the first call).

    False without a C compiler, when the build fails, or with ``NORMFLUX_NATIVE=0`` in the
    environment at the first call.
    """
    global _LIB, _TRIED
    if not _TRIED:
        _TRIED = True
        try:
            _LIB = _load()
        except OSError as e:  # an unwritable cache, say: run on tensor ops instead
            _log.debug("normflux: kernels unavailable: %s", e)
            _LIB = None
    return _LIB is not None


def library() -> ctypes.CDLL:
    """The loaded library.

    Raises:
        RuntimeError: it is not loaded (call :func:`available` first, which builds it).
    """
    if _LIB is None:
        raise RuntimeError("normflux's C kernels are not loaded: call "
                           "normflux.transforms.native.available() first (false without a "
                           "compiler or with NORMFLUX_NATIVE=0)")
    return _LIB


def _declare(lib: ctypes.CDLL) -> None:
    """The C signatures (ctypes converts and checks the arguments with them)."""
    i, i64, d, p = ctypes.c_int, ctypes.c_int64, ctypes.c_double, ctypes.c_void_p
    for fn in (lib.nfx_rq_forward, lib.nfx_rq_backward):
        fn.argtypes = [i, i, d, d, d, i, p]
        fn.restype = i
    lib.nfx_affine_coupling_forward.argtypes = [i, i64, i64, i64, p, p, p, d, p, p, p]
    lib.nfx_affine_coupling_backward.argtypes = [i, i64, i64, i64, p, p, p, p, p, p, d, p, p]
    for fn in (lib.nfx_affine_coupling_forward, lib.nfx_affine_coupling_backward):
        fn.restype = None
    lib.nfx_masked_available.argtypes = []
    lib.nfx_masked_available.restype = i
    lib.nfx_masked_forward.argtypes = [i64, i64, i64, p, p, p, p, p, i64, i, p]
    lib.nfx_masked_forward.restype = i
    lib.nfx_masked_grad_input.argtypes = [i64, i64, i64, p, p, p, p, p]
    lib.nfx_masked_grad_input.restype = i
    lib.nfx_masked_grad_weight.argtypes = [i64, i64, i64, p, p, p, p, p]
    lib.nfx_masked_grad_weight.restype = i
