# ruff: noqa: I001  (grpo must be imported before mlx: it loads the fast BLAS first)
import os

import grpo  # noqa: F401  (loads the fast BLAS before mlx)
import mlx.core as mx
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=25,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session", autouse=True)
def fast_kernels_installed():
    """grpo's loaders install its CPU kernels in the mlx-lm Llama module; tests that load
    through ``mlx_lm.load`` get the same state from the start, whatever runs first."""
    from mlx_lm.models import llama

    from grpo.io.fast_attention import install_fast_kernels

    assert install_fast_kernels(llama)


@pytest.fixture
def key():
    """A fresh explicit RNG key (equinox's getkey)."""
    return mx.random.key(1234)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A seeded ~0.37M-parameter Llama model + char tokenizer, written to disk once."""
    from grpo.io.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), size="test", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """``(model, tokenizer)`` loaded through the real ``mlx_lm.load`` path."""
    import mlx_lm

    return mlx_lm.load(str(tiny_model_dir))


def _peak_extra_bytes(fn):
    mx.synchronize()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(fn())
    mx.synchronize()
    return mx.get_peak_memory() - base


@pytest.fixture
def peak_extra_bytes():
    """``measure(fn)``: peak bytes above the memory active before ``fn()`` was built and run."""
    return _peak_extra_bytes


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    """Environment for ``grpo`` CLI subprocesses: a cache of the module's own, one process."""
    env = dict(os.environ, MLX_GRPO_CACHE=str(tmp_path_factory.mktemp("cache")))
    env.pop("MLX_RANK", None)
    return env
