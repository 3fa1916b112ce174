"""Fast-BLAS loading: both paths, each in a fresh interpreter."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from grpo import _blas

PROBE = "import json, grpo, mlx.core as mx; print(json.dumps(grpo.blas_info()))"


def _probe(code=PROBE, **env):
    full = {**os.environ, **env}
    out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def _openblas_present():
    import ctypes

    try:
        ctypes.CDLL("libopenblas.so.0")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux-only path")
@pytest.mark.skipif(not _openblas_present(), reason="libopenblas0 not installed")
def test_openblas_loaded_and_mlx_matmul_correct():
    code = (
        "import json, grpo, numpy as np, mlx.core as mx\n"
        "a = np.random.default_rng(0).standard_normal((96, 80), dtype=np.float32)\n"
        "b = np.random.default_rng(1).standard_normal((80, 72), dtype=np.float32)\n"
        "err = float(np.abs(np.array(mx.array(a) @ mx.array(b)) - a @ b).max())\n"
        "print(json.dumps({**grpo.blas_info(), 'err': err}))"
    )
    info, _ = _probe(code, GRPO_FAST_BLAS="1")
    assert info["backend"] == "openblas"
    assert info["err"] < 1e-3


def test_env_var_turns_it_off():
    info, _ = _probe(GRPO_FAST_BLAS="0")
    assert info["backend"] == "bundled"
    assert "GRPO_FAST_BLAS" in info["reason"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux-only path")
def test_missing_library_stays_on_bundled():
    info, _ = _probe(GRPO_BLAS_LIB="/nonexistent/libnothing.so")
    assert info["backend"] == "bundled"
    assert "/nonexistent/libnothing.so" in info["reason"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux-only path")
def test_warns_when_mlx_imported_first():
    code = "import mlx.core, json, grpo; print(json.dumps(grpo.blas_info()))"
    info, err = _probe(code, GRPO_FAST_BLAS="1", PYTHONWARNINGS="always")
    assert info["backend"] == "bundled"
    assert "mlx was imported before grpo" in err


class _WrongBlas:
    """A library whose sgemm writes garbage: verification must reject it."""

    def cblas_sgemm(self, *args):
        c = args[12]
        np.ctypeslib.as_array(c, shape=(64 * 32,))[:] = 7.0


def test_verify_rejects_a_wrong_blas():
    assert not _blas.verify(_WrongBlas())
    assert not _blas.verify(object())


@pytest.mark.skipif(not _openblas_present(), reason="libopenblas0 not installed")
def test_verify_accepts_openblas():
    import ctypes

    assert _blas.verify(ctypes.CDLL("libopenblas.so.0"))
