"""Load an optimised BLAS before mlx on Linux.

mlx's Linux CPU wheel links a bundled reference BLAS (~8 GFLOP/s here). Loading
OpenBLAS with ``RTLD_GLOBAL`` before ``mlx.core`` makes the dynamic linker resolve
mlx's ``cblas_*`` symbols to OpenBLAS instead (~100-200 GFLOP/s). The library is
first loaded privately and checked on one matmul against NumPy; only a library that
passes is promoted to global scope. ``GRPO_FAST_BLAS=0`` turns this off and
``GRPO_BLAS_LIB`` names a different library.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

import numpy as np

CANDIDATES = (
    "libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "libopenblas.so",
)

_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS = 101, 111

STATUS: dict = {"backend": "bundled", "library": None, "reason": "not attempted"}


def _sgemm(lib, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    m, k = a.shape
    n = b.shape[1]
    c = np.zeros((m, n), dtype=np.float32)
    ptr = ctypes.POINTER(ctypes.c_float)
    fn = lib.cblas_sgemm
    fn.restype = None
    fn(
        _CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS, _CBLAS_NO_TRANS, m, n, k,
        ctypes.c_float(1.0), a.ctypes.data_as(ptr), k, b.ctypes.data_as(ptr), n,
        ctypes.c_float(0.0), c.ctypes.data_as(ptr), n,
    )  # fmt: skip
    return c


def verify(lib) -> bool:
    """True when ``lib.cblas_sgemm`` matches NumPy on one 64x48x32 float32 matmul."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 48), dtype=np.float32)
    b = rng.standard_normal((48, 32), dtype=np.float32)
    try:
        got = _sgemm(lib, a, b)
    except (AttributeError, OSError):
        return False
    return bool(np.allclose(got, a.astype(np.float64) @ b, rtol=1e-4, atol=1e-4))


def _candidates() -> tuple[str, ...]:
    override = os.environ.get("GRPO_BLAS_LIB")
    return (override,) if override else CANDIDATES


def load_fast_blas() -> dict:
    """Try to put an optimised BLAS in front of mlx's bundled one; returns ``STATUS``."""
    if not sys.platform.startswith("linux"):
        STATUS.update(reason="not Linux: mlx uses Accelerate/Metal")
        return STATUS
    if os.environ.get("GRPO_FAST_BLAS", "1").lower() in ("0", "false", "no", "off"):
        STATUS.update(reason="disabled by GRPO_FAST_BLAS")
        return STATUS
    if "mlx.core" in sys.modules:
        STATUS.update(reason="mlx was imported before grpo")
        warnings.warn(
            "mlx was imported before grpo, so grpo could not load a fast BLAS; mlx keeps its "
            "bundled reference BLAS (much slower on CPU). Import grpo first, or set "
            "GRPO_FAST_BLAS=0 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return STATUS
    reasons = []
    for name in _candidates():
        try:
            lib = ctypes.CDLL(name, mode=ctypes.RTLD_LOCAL)
        except OSError as e:
            reasons.append(f"{name}: {e}")
            continue
        if not verify(lib):
            reasons.append(f"{name}: failed the matmul check against NumPy")
            continue
        ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)  # promote: mlx's cblas_* now bind here
        STATUS.update(backend="openblas", library=name, reason="loaded and verified")
        return STATUS
    STATUS.update(reason="; ".join(reasons) or "no candidate library")
    return STATUS
